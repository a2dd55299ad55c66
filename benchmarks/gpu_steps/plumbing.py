"""What every step of the GPU check shares: sizes, the report, subprocesses, the CIFAR-10 copy, timing.

Only the standard library is imported at the top: the smoke step must be able to report a PyTorch
that does not import.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import importlib.util
import io
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "benchmarks" / "gpu_check.py"  # the check's entry point; it also runs its workers
CARRY = REPO / "gpu-carry"  # filled by benchmarks/gpu_prepare.sh, git-ignored, carried to the GPU machine
CIFAR_ARCHIVE = "cifar10-jpeg.tar.gz"
CIFAR_SHA256 = "565b23c5c7308074240a1d9ebd0afd4c0fe42223a52214959e9589ec71b5f2f4"  # ../shared/data/README.md
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
STEPS = ("smoke", "setup", "tests", "mine", "torchrun", "resume", "speed", "evalbatch", "compile", "reference")
OPT_IN = ("reference",)  # run only when --only names them (the default check fits 5 minutes without them)
PAPER_EPOCHS = {"search": 150, "finetune": 150}  # ResNet-20 / CIFAR-10, evaluated every epoch
PAPER_TRAIN_IMAGES = 50_000
MIN_STEP_SECONDS = 8.0  # a step is not started with less of the budget left
LOG_CHARS = 200_000  # per command, in gpu_check.log


@dataclass(frozen=True)
class Sizes:
    """Every size the check uses; --dry-run shrinks them all."""

    device: str
    width: int | None  # --model-width; None: ResNet-20's own 16
    batch: int  # batch of the mine / speed runs (the paper's 128)
    limit: int  # training images per epoch of the mine / speed runs (--data-limit)
    epochs: int  # search and fine-tuning epochs of those runs (>= 6: freezing period 5)
    eval_every: int
    resume_limit: int
    resume_batch: int
    per_class: tuple[int, int] | None  # (train, test) images per class taken from the archive; None: all
    tests: tuple[str, ...]  # what pytest collects (it runs the tests marked `device`)
    budget: float  # seconds for the whole check
    reference: tuple[int, int | None]  # the reference step's epochs and training images per epoch (None: all)
    limits: dict[str, float] = field(default_factory=dict)  # seconds per step, at most


GPU = Sizes(device="cuda", width=None, batch=128, limit=12_800, epochs=6, eval_every=3, resume_limit=2_560,
            resume_batch=128, per_class=None, tests=("tests",), budget=330.0, reference=(150, None),
            limits={"smoke": 60, "setup": 150, "tests": 100, "mine": 150, "torchrun": 90, "resume": 120,
                    "speed": 150, "evalbatch": 60, "compile": 240, "reference": 480})


DRY = Sizes(device="cpu", width=4, batch=32, limit=96, epochs=6, eval_every=3, resume_limit=64, resume_batch=32,
            per_class=(12, 6), tests=("tests/test_masking.py",), budget=240.0, reference=(2, 96),
            limits={"smoke": 60, "setup": 90, "tests": 90, "mine": 90, "torchrun": 90, "resume": 90,
                    "speed": 90, "evalbatch": 60, "compile": 90, "reference": 90})


class StepFailed(Exception):
    """A step's check did not hold; `details` still go into the report."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


class StepSkipped(Exception):
    """A step that does not apply here (the reason goes into the report)."""


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def tail(text: str, chars: int = 3000) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


def tagged_json(output: str, tag: str) -> dict[str, Any]:
    for line in reversed(output.splitlines()):
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    raise StepFailed(f"no {tag} line in the output:\n{tail(output)}")


class Report:
    """``gpu_check.json``: one entry per step (status ok / failed / skipped / running / pending,
    seconds, error tail, details), written atomically after every change. With --only, an
    existing report at the same path is updated in place: the other steps keep their results."""

    def __init__(self, path: Path, planned: list[str], dry_run: bool, argv: list[str], budget: float,
                 update: bool) -> None:
        self.path = path
        previous = None
        if update and path.is_file():
            try:
                previous = json.loads(path.read_text())
            except (OSError, ValueError):
                previous = None
        self.data: dict[str, Any] = previous or {"check": "benchmarks/gpu_check.sh", "invocations": [],
                                                 "steps": {name: {"status": "not run"} for name in STEPS}}
        self.data["dry_run"] = dry_run
        self.invocation = len(self.data["invocations"]) + 1
        self.data["invocations"].append({"number": self.invocation, "started": now(), "argv": argv,
                                         "steps": planned, "budget_s": budget, "host": platform.node(),
                                         "git_commit": git_commit(), "source_digest": source_digest()})
        for name in planned:
            self.data["steps"][name] = {"status": "pending", "invocation": self.invocation}
        self.write()

    def start(self, name: str) -> None:
        self.data["steps"][name] = {"status": "running", "invocation": self.invocation, "started": now()}
        self.write()

    def finish(self, name: str, status: str, seconds: float, details: dict[str, Any], error: str | None) -> None:
        entry = self.data["steps"].get(name, {})
        entry.update({"status": status, "invocation": self.invocation, "seconds": round(seconds, 1),
                      "details": details})
        entry.pop("error", None)
        if error:
            entry["error"] = error
        self.data["steps"][name] = entry
        self.write()

    def write(self) -> None:
        steps = self.data["steps"]
        self.data["updated"] = now()
        self.data["summary"] = {status: [name for name, entry in steps.items() if entry.get("status") == status]
                                for status in ("ok", "failed", "skipped", "running", "pending", "not run")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def git_commit() -> str | None:
    """HEAD of the checkout's .git. A copy of a working tree can carry an older .git than its files (a
    report once named the commit before the one that ran), so `source_digest` is the check of what ran."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


SOURCE_FILES = ("pyproject.toml", "gemminer/**/*.py", "benchmarks/*.py", "benchmarks/gpu_steps/*.py", "benchmarks/*.sh",
                "tests/**/*.py")


def source_digest(root: Path = REPO) -> str:
    """sha256 over the code's files (names and bytes) as they lie in `root`, not as .git says:
    `python benchmarks/gpu_check.py --source-digest` prints it for a checkout here, to match a report's."""
    digest = hashlib.sha256()
    paths = sorted({path for pattern in SOURCE_FILES for path in root.glob(pattern) if path.is_file()})
    for path in paths:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


class Job:
    """A subprocess in its own process group, its output in a file (no pipe to fill or hang on)."""

    def __init__(self, check: Check, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.check, self.name, self.argv = check, name, argv
        self.output_path = check.work / "logs" / f"{len(check.jobs):03d}-{name}.out"
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        check.jobs.append(self)
        self.started = time.monotonic()
        with open(self.output_path, "wb") as handle:
            self.process = subprocess.Popen(argv, cwd=REPO, env=env or check.env, stdout=handle,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.seconds: float | None = None
        self.timed_out = False
        self.logged = False

    def poll(self) -> int | None:
        return self.process.poll()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process itself (a SIGKILL as a crash would); `stop` ends its whole group."""
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, limit: float) -> int:
        timeout = max(1.0, min(limit, self.check.remaining()))
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.stop()
            self.process.wait()
        self.stop()  # nothing it started outlives it (torchrun's workers)
        self.seconds = time.monotonic() - self.started
        self.log()
        return self.process.returncode

    @property
    def ok(self) -> bool:
        return self.process.returncode == 0 and not self.timed_out

    @property
    def output(self) -> str:
        try:
            return self.output_path.read_bytes().decode(errors="replace")
        except OSError:
            return ""

    def log(self) -> None:
        if self.logged:
            return
        self.logged = True
        state = "timed out" if self.timed_out else f"exit {self.process.returncode}"
        command = " ".join("<script>" if "\n" in arg else arg for arg in self.argv)
        with open(self.check.log_path, "a") as log:
            log.write(f"\n=== [{self.check.step}] {self.name}: {command}\n"
                      f"=== {state}, {self.seconds or 0:.1f} s\n{tail(self.output, LOG_CHARS)}\n")

    def failure(self, what: str) -> str:
        state = (f"timed out after {self.seconds:.0f} s" if self.timed_out
                 else f"exited {self.process.returncode}")
        return f"{what} {state}:\n{tail(self.output)}"


@dataclass
class Run:
    """A finished `gemminer mine` of this invocation."""

    variant: str
    folder: Path
    job: Job

    @property
    def ok(self) -> bool:
        return self.job.ok and (self.folder / "summary.json").is_file()

    def summary(self) -> dict[str, Any]:
        return json.loads((self.folder / "summary.json").read_text())


@dataclass
class Check:
    sizes: Sizes
    dry_run: bool
    work: Path
    out: Path
    data_tar: Path | None
    deadline: float
    env: dict[str, str] = field(default_factory=dict)
    step: str = ""
    step_deadline: float = 0.0
    jobs: list[Job] = field(default_factory=list)
    runs: dict[str, Run] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # the converted CIFAR-10: folder, train and test counts

    @property
    def log_path(self) -> Path:
        return self.out / "gpu_check.log"

    def remaining(self) -> float:
        return min(self.deadline, self.step_deadline or self.deadline) - time.monotonic()

    def run(self, name: str, argv: list[str], limit: float = 600.0, env: dict[str, str] | None = None) -> Job:
        job = Job(self, name, argv, env)
        job.wait(limit)
        return job

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    # gemminer runs -------------------------------------------------------------------
    def common_flags(self, out: Path, limit: int | None, batch: int, density: str = "0.05") -> list[str]:
        """ResNet-20 / CIFAR-10 at `density`, `limit` training images per epoch (None: all)."""
        folder = ensure_cifar(self)["folder"]
        flags = ["mine", "--out", str(out), "--quiet", "--data", "cifar10", "--data-dir", str(folder),
                 "--model", "resnet20", "--density", density, "--seed", "0", "--device", self.sizes.device,
                 "--data-batch-size", str(batch)]
        flags += ["--data-limit", str(limit)] if limit else []
        return flags + (["--model-width", str(self.sizes.width)] if self.sizes.width else [])

    def speed_flags(self, out: Path) -> list[str]:
        """The short ResNet-20 / CIFAR-10 schedule of the mine, speed and compile steps: E epochs of
        search (one freezing event, period 5 as the paper's) and E of fine-tuning, evaluated every
        `eval_every` epochs, so the metrics separate training epochs from evaluated ones."""
        s = self.sizes
        return [*self.common_flags(out, s.limit, s.batch), "--epochs", str(s.epochs), "--search-freeze-period",
                "5", "--finetune-epochs", str(s.epochs), "--eval-every", str(s.eval_every)]

    def small_flags(self, out: Path) -> list[str]:
        """A few seconds' run (torchrun, kill and resume): 4 search epochs with 3 freezing events."""
        s = self.sizes
        return [*self.common_flags(out, s.resume_limit, s.resume_batch), "--epochs", "4", "--search-freeze-period",
                "1", "--finetune-epochs", "2", "--checkpoint-every", "1"]

    def mine_run(self, variant: str) -> Run:
        """fp32, bf16 or compile, each once per invocation (the speed step reuses the mine step's)."""
        if variant in self.runs:
            return self.runs[variant]
        if variant == "bf16" and self.dry_run:  # bf16 autocast is CUDA-only: the dry run's is the fp32 run
            fp32 = self.mine_run("fp32")
            self.runs[variant] = Run(variant, fp32.folder, fp32.job)
            return self.runs[variant]
        ensure_cifar(self)
        folder = self.work / "runs" / variant
        shutil.rmtree(folder, ignore_errors=True)
        extra = {"fp32": [], "bf16": ["--bf16"], "compile": ["--compile"]}[variant]
        job = self.run(f"mine-{variant}", self.python("-m", "gemminer", *self.speed_flags(folder), *extra),
                       limit=self.sizes.limits["compile" if variant == "compile" else "mine"])
        self.runs[variant] = Run(variant, folder, job)
        return self.runs[variant]


def make_env(check: Check) -> dict[str, str]:
    """PYTHONPATH: the repository (in case pip cannot install it), the carried mnist1d, and a stub
    `requests` where none is installed (mnist1d imports it at the top but gemminer never downloads)."""
    env = dict(os.environ)
    paths = [str(REPO)]
    if (CARRY / "site").is_dir():
        paths.append(str(CARRY / "site"))
    if importlib.util.find_spec("requests") is None:
        stub = check.work / "stubs"
        (stub / "requests").mkdir(parents=True, exist_ok=True)
        (stub / "requests" / "__init__.py").write_text(
            "def get(*args, **kwargs):\n    raise OSError('requests is a stub on this machine (no network)')\n")
        paths.append(str(stub))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env.update({"PYTHONPATH": os.pathsep.join(paths), "GEMMINER_CACHE": str(check.work / "cache"),
                "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"})
    if check.dry_run:
        env["OMP_NUM_THREADS"] = "1"  # the dry run shares a small machine
    return env


def archive_source(check: Check) -> Path | None:
    for candidate in (check.data_tar, CARRY / CIFAR_ARCHIVE, REPO.parent / "shared" / "data" / CIFAR_ARCHIVE):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def synthetic_archive(path: Path, per_class: tuple[int, int]) -> Path:
    """A small archive of random JPEGs in the real one's layout, for a dry run where there is none."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for split, count in zip(("train", "test"), per_class, strict=True):
            for label, name in enumerate(CIFAR_CLASSES):
                for index in range(count):
                    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    image[..., label % 3] //= 1 + label // 3  # a little class signal
                    buffer = io.BytesIO()
                    Image.fromarray(image).save(buffer, format="JPEG")
                    info = tarfile.TarInfo(f"{split}/{name}/{index:04d}.jpg")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    archive.addfile(info, buffer)
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_cifar(archive: Path, folder: Path, per_class: tuple[int, int] | None) -> dict[str, Any]:
    """train/<class>/*.jpg and test/<class>/*.jpg -> the binary release (`cifar-10-batches-bin/`) that
    `--data cifar10 --data-dir folder` reads. Classes in alphabetical order (CIFAR-10's label order);
    the training records shuffled with a fixed seed, as the official files are. The 60,000 images
    are 184 MB as records, too much to carry, but 19 MB as JPEGs: they are converted here."""
    import numpy as np
    from PIL import Image

    quota = dict(zip(("train", "test"), per_class, strict=True)) if per_class else None
    found: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in found:
                continue
            split, label = parts[-3], parts[-2]
            if quota is not None:
                if counts.get((split, label), 0) >= quota[split]:
                    continue
                counts[split, label] = counts.get((split, label), 0) + 1
            handle = tar.extractfile(member)
            if handle is not None:
                found[split].append((label, parts[-1], handle.read()))
    classes = sorted({label for label, _, _ in found["train"]})
    if len(classes) != 10 or not found["test"]:
        raise StepFailed(f"{archive}: expected train/<class>/ and test/<class>/ of 10 classes, found {classes}")

    def decode(blob: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(blob)) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        if pixels.shape != (32, 32, 3):
            raise StepFailed(f"{archive}: an image of shape {pixels.shape}, not 32x32 RGB")
        return pixels

    binary = folder / "cifar-10-batches-bin"
    shutil.rmtree(binary, ignore_errors=True)
    binary.mkdir(parents=True)
    sizes = {}
    for split, names in (("train", [f"data_batch_{i}.bin" for i in range(1, 6)]), ("test", ["test_batch.bin"])):
        items = sorted(found[split], key=lambda item: (item[0], item[1]))
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            images = np.stack(list(pool.map(decode, [blob for _, _, blob in items], chunksize=256)))
        labels = np.array([classes.index(label) for label, _, _ in items], dtype=np.uint8)
        if split == "train":
            order = np.random.default_rng(0).permutation(len(items))
            images, labels = images[order], labels[order]
        records = np.empty((len(items), 1 + 3 * 32 * 32), dtype=np.uint8)
        records[:, 0] = labels
        records[:, 1:] = images.transpose(0, 3, 1, 2).reshape(len(items), -1)
        for name, part in zip(names, np.array_split(records, len(names)), strict=True):
            part.tofile(binary / name)
        sizes[split] = len(items)
    (binary / "batches.meta.txt").write_text("\n".join(classes) + "\n")
    return {"train": sizes["train"], "test": sizes["test"], "classes": classes}


def ensure_cifar(check: Check) -> dict[str, Any]:
    """The converted CIFAR-10 under the work folder, made once (any step may be the first to need it)."""
    if check.data:
        return check.data
    folder = check.work / "data" / "cifar10"
    source = archive_source(check)
    if source is None:
        if not check.dry_run:
            raise StepFailed(f"no {CIFAR_ARCHIVE}: run `bash benchmarks/gpu_prepare.sh` on the machine with the "
                             "data, and copy gpu-carry/ to this machine beside the repository's files")
        source = check.work / "synthetic" / CIFAR_ARCHIVE
        if not source.is_file():
            synthetic_archive(source, check.sizes.per_class or (8, 4))
    stat = source.stat()
    key = json.loads(json.dumps({"source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                 "per_class": check.sizes.per_class}))  # as it reads back from meta.json
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            check.data = {**meta["data"], "folder": str(folder), "converted_s": 0.0, "reused": True}
            return check.data
    start = time.monotonic()
    digest = sha256(source)
    if source.name == CIFAR_ARCHIVE and "synthetic" not in source.parts and digest != CIFAR_SHA256:
        raise StepFailed(f"{source}: sha256 {digest} is not the published {CIFAR_SHA256}")
    data = convert_cifar(source, folder, check.sizes.per_class)
    data.update({"source": str(source), "sha256": digest,
                 "subset": f"{check.sizes.per_class[0]} train / {check.sizes.per_class[1]} test images per class"
                 if check.sizes.per_class else "all 60,000 images"})
    meta_path.write_text(json.dumps({"key": key, "data": data}))
    check.data = {**data, "folder": str(folder), "converted_s": round(time.monotonic() - start, 1), "reused": False}
    return check.data


def metric_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def search_rows(folder: Path) -> int:
    try:
        return sum(1 for line in (folder / "metrics.csv").read_text().splitlines() if line.startswith("search,"))
    except OSError:
        return 0


def evaluation_due(epoch: int, epochs: int, eval_every: int) -> bool:
    """As gemminer.train.evaluation_due: every `eval_every`-th epoch (0-based `epoch`) and the last."""
    return (epoch + 1) % max(eval_every, 1) == 0 or epoch + 1 == epochs


def phase_timing(rows: list[dict[str, str]], phase: str, eval_every: int) -> dict[str, float]:
    """Seconds of one training epoch and of one evaluation, from the cumulative `seconds` column:
    epochs 2.. that are not evaluated give the training epoch (the first is warm-up: CUDA, cuDNN,
    compiling), evaluated epochs after the first evaluated one give training + evaluation."""
    cumulative = [float(row["seconds"]) for row in rows if row["phase"] == phase]
    if len(cumulative) < 3:
        raise StepFailed(f"{len(cumulative)} {phase} epochs in metrics.csv; the timing needs at least 3")
    epochs = [cumulative[0]] + [b - a for a, b in itertools.pairwise(cumulative)]
    evaluated = [i for i in range(len(epochs)) if evaluation_due(i, len(epochs), eval_every)]
    train_only = [epochs[i] for i in range(1, len(epochs)) if i not in evaluated]
    if not train_only:
        raise StepFailed(f"no unevaluated {phase} epoch after the first to time")
    train = statistics.median(train_only)
    steady = [epochs[i] for i in evaluated[1:]] or [epochs[evaluated[0]]]
    return {"epochs": len(epochs), "evaluated_epochs": len(evaluated), "train_epoch_s": train,
            "eval_s": max(statistics.median(steady) - train, 0.0), "first_epoch_s": epochs[0],
            "total_s": cumulative[-1]}


def speed_of(check: Check, run: Run) -> dict[str, Any]:
    """Images per second and the projected wall clock of the paper's 150 + 150 epochs from one run."""
    rows = metric_rows(run.folder)
    images = min(check.sizes.limit, int(check.data["train"]))
    test_images = int(check.data["test"])
    search = phase_timing(rows, "search", check.sizes.eval_every)
    tune = phase_timing(rows, "finetune", check.sizes.eval_every)
    explained = sum(t["epochs"] * t["train_epoch_s"] + t["evaluated_epochs"] * t["eval_s"] for t in (search, tune))
    overhead = max((run.job.seconds or 0.0) - explained, 0.0)  # start-up, warm-up, at-init accuracies, files
    scale = PAPER_TRAIN_IMAGES / images
    search_epoch = scale * search["train_epoch_s"] + search["eval_s"]  # the search's eval recalibrates BN too
    tune_epoch = scale * tune["train_epoch_s"] + tune["eval_s"]
    projected = overhead + PAPER_EPOCHS["search"] * search_epoch + PAPER_EPOCHS["finetune"] * tune_epoch
    rate = lambda count, seconds: round(count / seconds, 1) if seconds > 0 else None  # noqa: E731
    return {
        "train_images_per_epoch": images, "test_images": test_images, "batch_size": check.sizes.batch,
        "search_img_per_s": rate(images, search["train_epoch_s"]),
        "dense_train_img_per_s": rate(images, tune["train_epoch_s"]),
        "eval_img_per_s": rate(test_images, tune["eval_s"]),
        "search_eval_with_bn_recalibration_s": round(search["eval_s"], 3),
        "paper_search_epoch_s": round(search_epoch, 2), "paper_finetune_epoch_s": round(tune_epoch, 2),
        "overhead_s": round(overhead, 1), "run_wall_s": round(run.job.seconds or 0.0, 1),
        "projected_paper_run_s": round(projected, 1), "projected_paper_run_min": round(projected / 60, 2),
        "timing": {"search": search, "finetune": tune},
    }


def speedups(base: dict[str, Any], other: dict[str, Any]) -> dict[str, float | None]:
    keys = ("search_img_per_s", "dense_train_img_per_s", "eval_img_per_s")
    out = {key: round(other[key] / base[key], 2) if base.get(key) and other.get(key) else None for key in keys}
    out["projected_paper_run"] = (round(base["projected_paper_run_s"] / other["projected_paper_run_s"], 2)
                                  if other.get("projected_paper_run_s") else None)
    return out


def describe(run: Run, dry_run: bool) -> dict[str, Any]:
    summary = run.summary()
    keys = ("device", "processes", "density_actual", "density_gem", "acc_before_finetune", "acc_ticket_at_init",
            "acc_after_finetune", "search_seconds", "finetune_seconds")
    view = {key: summary.get(key) for key in keys}
    view["wall_s"] = round(run.job.seconds or 0.0, 1)
    if run.variant == "bf16" and dry_run:
        view["note"] = "bf16 autocast is CUDA-only: the dry run ran fp32"
    return view
