"""Run folders: resolved config, metrics CSV, safetensors artifacts, checkpoint, and summary.json last."""

from __future__ import annotations

import csv
import errno
import functools
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor

from gemminer.checkpoint import write_bytes_atomic
from gemminer.config import RunConfig, dump_yaml, load_run_config, result_config
from gemminer.errors import GemminerError, reading
from gemminer.safety import RUN_FILES, file_digest
from gemminer.ticket import Ticket, save_state

try:
    import fcntl
except ImportError:  # Windows: no lock, no error
    fcntl = None  # type: ignore[assignment]

# reg_lambda: Gem-Miner's lambda during the epoch; frozen_gem: weights with score > 0.5 that the epoch's
# freezing event froze out (none where lambda keeps the gem below the schedule); search_exit: the epoch
# the search ended early (no score left above 0.5).
METRIC_COLUMNS = ["phase", "epoch", "lr", "train_loss", "reg_loss", "reg_lambda", "train_acc", "test_acc", "density",
                  "density_gem", "freeze_event", "frozen_gem", "search_exit", "seconds"]


def read_json(path: Path, what: str, remedy: str = "") -> dict[str, Any]:
    """A JSON object from `path`, through the one guard for files (`errors.reading`)."""
    with reading(path, what, remedy):
        loaded = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(loaded, dict):
            raise ValueError("not a JSON object")
    return loaded


def output_folder(out: str | os.PathLike | None, what: str = "run folder") -> Path:
    """`out` as a folder to write into, refusing degenerate paths: empty, the current folder, the
    home folder or the filesystem root (a run would be spread over a folder that holds other things)."""
    if out is None or not str(out).strip():
        raise GemminerError(f"the {what} path is empty; name a folder, e.g. --out runs/my-run")
    path = Path(out)
    if path.is_symlink() and not path.exists():
        try:
            path.resolve(strict=True)
            reason = f"a symlink to {os.readlink(path)}, which cannot be reached;"
        except FileNotFoundError:
            reason = f"a symlink to {os.readlink(path)}, which does not exist; create that folder or"
        except (OSError, RuntimeError):
            reason = "a symlink loop;"
        raise GemminerError(f"the {what} {path} is {reason} name another --out")
    try:
        resolved = path.expanduser().resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise GemminerError(f"cannot use the {what} {path}: {getattr(err, 'strerror', None) or err}") from err
    if resolved in (Path.cwd().resolve(), Path.home().resolve(), Path(resolved.anchor)):
        raise GemminerError(f"refusing to write a {what} into {resolved} itself; name a folder of its own, "
                            "e.g. --out runs/my-run")
    try:
        if path.exists() and not path.is_dir():
            raise GemminerError(f"the {what} {path} is a file, not a folder")
    except OSError as err:  # a name over NAME_MAX, a path over PATH_MAX
        raise GemminerError(f"cannot use the {what} {path}: {err.strerror}") from err
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    write_bytes_atomic(path, text.encode(), "file")


LOCK_FILE = ".lock"


@contextmanager
def folder_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive OS lock on `path/.lock` (the folder is created if needed) until the block ends.

    The lock is `flock`: the kernel drops it when its holder exits, even by SIGKILL, so a
    killed run can be resumed. A second holder gets one GemminerError naming the first
    ("pid 1234 on host abc"), before it touches anything else in the folder. A folder this
    lock created and left with nothing but `.lock` is removed again. Where there is no
    fcntl (Windows), or the file system refuses locks, nothing is locked.
    """
    if fcntl is None:
        yield
        return
    path = Path(path)
    lock_path = path / LOCK_FILE
    fd, made, fresh = _acquire(path, lock_path)
    try:
        yield
    finally:
        if fd is not None:
            _release(fd, path, lock_path, made, fresh)


def _acquire(path: Path, lock_path: Path) -> tuple[int | None, Path | None, bool]:
    """The locked file's descriptor (None where locks are unsupported), the topmost folder made here, and
    whether this lock made `.lock`."""
    made, fresh = None, False
    for _ in range(100):  # retried only while another holder removes a folder it made
        if not path.is_dir():
            top = next((folder for folder in reversed([path, *path.parents]) if not folder.exists()), path)
            try:
                path.mkdir(parents=True)
                made = made or top
            except FileExistsError:
                pass
            except OSError as err:
                raise GemminerError(f"cannot create run folder {path}: {err.strerror}") from err
        fresh = not os.path.lexists(lock_path)
        try:  # never through a symlink, never inherited by a child process
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | LOCK_OPEN_FLAGS, 0o644)
        except FileNotFoundError:
            continue
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EMLINK):
                raise GemminerError(_not_a_lock(lock_path)) from None
            return None, made, fresh  # e.g. a read-only folder: writing there fails later with its own error
        problem = _lock_file_problem(fd)
        if problem:
            os.close(fd)
            raise GemminerError(_not_a_lock(lock_path, problem))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                return None, made, fresh  # a file system without locks
            holder = _holder(fd)
            os.close(fd)
            raise GemminerError(f"{path} is in use by {holder} (another gemminer run writes there); "
                                "wait for it or choose another --out") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file between our open and flock: lock the new one
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        except OSError as err:  # e.g. a full disk: the lock and any folder made for it go again
            _release(fd, path, lock_path, made, fresh)
            reason = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
            raise GemminerError(f"cannot write the lock file {lock_path}: {reason}") from err
        return fd, made, fresh
    raise GemminerError(f"cannot lock run folder {path}: it keeps being removed")


LOCK_OPEN_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def _lock_file_problem(fd: int) -> str:
    """Why the opened `.lock` is not a file of the run's own ("" where it is): truncating and writing the
    holder line must never reach another file (a hard link) or a device."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_nlink > 1:
        return "a hard link to another file"
    return ""


def _not_a_lock(lock_path: Path, what: str = "") -> str:
    if not what:
        what = "a symlink" if lock_path.is_symlink() else "a folder" if lock_path.is_dir() else "not a regular file"
    return (f"{lock_path} is {what}, not gemminer's lock file; the run folder cannot be locked safely: "
            "remove it, or choose another --out")


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it (it writes right after locking)."""
    for _ in range(20):
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "another process"


def _release(fd: int, path: Path, lock_path: Path, made: Path | None, fresh: bool = False) -> None:
    """Unlock; a folder left with nothing but `.lock` loses it (and is removed if this lock made it)."""
    try:
        entries = [entry.name for entry in os.scandir(path)]
        if entries == [LOCK_FILE]:
            lock_path.unlink()  # while still locked: a waiting opener sees the file gone and starts over
            if made is not None:
                for folder in [path, *path.parents]:
                    folder.rmdir()
                    if folder == made:
                        break
        elif fresh and "config.yaml" not in entries:  # a refused run in a folder of the user's: leave no trace
            lock_path.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)  # closing the only descriptor drops the lock


def _format_row(row: dict[str, Any]) -> dict[str, Any]:
    return {key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()}


class RunFolder:
    """One run's folder. `summary.json` is written last: its presence means finished.

    Metrics go to metrics.csv and metrics.jsonl (every key of every row), and to
    TensorBoard event files under ``tensorboard/`` when the config asks for them.
    Only the writer (rank 0 under torchrun) touches the disk; other ranks' calls are no-ops.
    """

    def __init__(self, path: str | os.PathLike, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer
        self.tensorboard: Any = None  # a SummaryWriter while a run with `tensorboard: true` is open
        self._locked = 0  # how deep this process is inside `lock()`
        # sha256 of each file this run wrote, by name: saved with every checkpoint, checked on resume
        self.written: dict[str, str] = {}

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Lock the folder against other writers while the block runs (see `folder_lock`); re-entrant.
        A non-writer (another rank under torchrun) does not lock."""
        if not self.writer or self._locked:
            self._locked += 1
            try:
                yield
            finally:
                self._locked -= 1
            return
        with folder_lock(self.path):
            self._locked += 1
            try:
                yield
            finally:
                self._locked -= 1

    def open_tensorboard(self, config: RunConfig) -> None:
        """Start TensorBoard logging if the config asks for it (fresh or resumed run; a fresh one after
        `start`, which clears an earlier run's events)."""
        if self.writer and config.tensorboard and self.tensorboard is None:
            self.tensorboard = summary_writer_class()(log_dir=str(self.file("tensorboard")))

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def finished(self) -> bool:
        return self.file("summary.json").is_file()

    def start(self, config: RunConfig, force: bool = False) -> None:
        """Create the folder (refusing a finished run unless `force`) and write the config."""
        if self.finished and not force:
            raise GemminerError(f"{self.path} holds a finished run; pass --force to overwrite it")
        if not self.writer:
            return
        with self.lock():  # a no-op inside run_session, which holds it already; never delete under another writer
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise GemminerError(f"cannot create run folder {self.path}: {err.strerror}") from err
            held_a_run = self.file("config.yaml").is_file()
            clashes = [name for name in (*RUN_FILES, "init.safetensors", "tickets", "sanity")
                       if os.path.lexists(self.file(name))]
            if clashes and not held_a_run and not force:  # not a run's files: the user's, never removed unasked
                raise GemminerError(f"{self.path} holds {', '.join(clashes[:3])} but no gemminer run (no config.yaml);"
                                    " a run there would overwrite them: choose another --out, or pass --force")
            for stale in RUN_FILES:  # nothing of an earlier run survives (`.lock` does)
                self.file(stale).unlink(missing_ok=True)
            for folder in ("tickets", "sanity"):
                if self.file(folder).is_dir():
                    shutil.rmtree(self.file(folder))
            if held_a_run:  # what other commands wrote into it; in a folder new to gemminer these are the user's
                for stale in later_files(self.path):
                    stale.unlink(missing_ok=True)
                if self.file("tensorboard").is_dir():
                    shutil.rmtree(self.file("tensorboard"))
            write_atomic(self.file("config.yaml"), dump_yaml(config))

    def config_differences(self, config: RunConfig) -> dict[str, tuple[Any, Any]]:
        """The result keys whose values differ between the saved config and `config`: (saved, now), by key."""
        saved = result_config(load_run_config(self.file("config.yaml")))
        now = result_config(config)
        return {key: (saved.get(key), now.get(key)) for key in sorted(saved.keys() | now.keys())
                if saved.get(key) != now.get(key)}

    @property
    def computed_nothing(self) -> bool:
        """An unfinished run that stopped before its first metrics row or checkpoint (bad input found inside
        its search, such as too few batches for SNIP): under another config, nothing is lost by starting over."""
        return not any(self.file(name).exists() for name in ("summary.json", "checkpoint.pt", "metrics.jsonl"))

    def check_same_config(self, config: RunConfig) -> None:
        """Refuse to resume under another config, naming the keys that differ."""
        differing = self.config_differences(config)
        if differing:
            details = ", ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in list(differing.items())[:6])
            state = "a finished" if self.finished else "an unfinished"
            raise GemminerError(f"{self.path} holds {state} run with another config: {details}; "
                                "pass --force to start it over")

    def log(self, row: dict[str, Any]) -> None:
        """Append one metrics row to metrics.csv and metrics.jsonl (and TensorBoard)."""
        if not self.writer:
            return
        try:
            self._append_metrics(row)
        except OSError as err:
            raise GemminerError(f"cannot write metrics in {self.path}: {err.strerror}; the last checkpoint there "
                                "is intact") from err

    def _append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.file("metrics.jsonl"), "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.tensorboard.add_scalar(f"{row.get('phase', 'run')}/{key}", value, row.get("epoch", 0))
        path = self.file("metrics.csv")
        new = not path.exists()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, METRIC_COLUMNS, extrasaction="ignore", restval="")
            if new:
                writer.writeheader()
            writer.writerow(_format_row(row))

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace metrics.csv and metrics.jsonl by `rows` (on resume: rows after the checkpoint are cut)."""
        if not self.writer:
            return
        self.file("metrics.csv").unlink(missing_ok=True)
        self.file("metrics.jsonl").unlink(missing_ok=True)
        for row in rows:
            self.log(row)

    def write_state(self, state: dict[str, Tensor], name: str) -> None:
        if self.writer:
            save_state(state, self.file(name))
            self._wrote(name)

    def _wrote(self, name: str) -> None:
        self.written[name] = file_digest(self.file(name))

    def check_written(self, written: dict[str, str]) -> None:
        """Before a resume carries the files a run wrote forward (ticket, IMP's rounds.csv, ...): each must
        still hold the bytes the run wrote, or the resume is refused in one line (a damaged or edited file is
        not built on)."""
        for name, digest in written.items():
            path = self.file(name)
            if not path.is_file():
                problem = "is missing"
            else:
                try:
                    problem = "" if file_digest(path) == digest else "was changed or damaged since the run wrote it"
                except OSError as err:
                    problem = f"cannot be read ({err.strerror})"
            if problem:
                raise GemminerError(f"cannot resume the run in {self.path}: {name} {problem}; "
                                    "pass --force to start the run over")

    def write_table(self, rows: list[dict[str, Any]], name: str) -> None:
        """A CSV file of `rows` (columns: every key, in first-seen order), written atomically."""
        if not self.writer:
            return
        columns = list(dict.fromkeys(key for row in rows for key in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, restval="")
        writer.writeheader()
        writer.writerows(_format_row(row) for row in rows)
        write_atomic(self.file(name), buffer.getvalue())
        self._wrote(name)

    def write_ticket(self, ticket: Ticket, name: str) -> None:
        if self.writer:
            ticket.save(self.file(name))
            self._wrote(name)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write summary.json, with the code that computed the run (`compare` rows report it)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.writer:
            from gemminer import __version__

            summary = {**summary, "gemminer_version": __version__, "git_commit": code_commit()}
            write_atomic(self.file("summary.json"), json.dumps(summary, indent=2) + "\n")

    def summary(self) -> dict[str, Any]:
        if not self.finished:
            raise GemminerError(f"{self.path} holds no finished run (no summary.json)")
        return read_json(self.file("summary.json"), "run summary", "start the run over with --force")


@functools.cache
def code_commit() -> str:
    """The checkout's commit (``git describe --always --dirty``: a commit with uncommitted changes says
    so), once per process; empty outside a git checkout."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def version_line() -> str:
    """``gemminer VERSION (commit COMMIT)``: the package version and the checkout's commit (``git describe
    --always --dirty``; left out outside a git checkout)."""
    from gemminer import __version__

    commit = code_commit()
    return f"gemminer {__version__}" + (f" (commit {commit})" if commit else "")


def machine_description() -> str:
    """The hardware and software a result came from, in one line: CPU model and cores, the load average
    when asked (a shared machine slows wall clocks), torch, and the CUDA device where there is one."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [f"{cpu}, {usable} usable cores"]
    if hasattr(os, "getloadavg"):
        parts.append(f"load average {os.getloadavg()[0]:.1f}")
    parts.append(f"torch {torch.__version__}, Python {platform.python_version()}")
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())  # the process's current device
    return "; ".join(parts)


def later_files(folder: Path) -> list[Path]:
    """The default files that commands run on a finished run write into `folder`: `export`'s
    (``export-<weights>-<format>.<suffix>`` and an MNN file's ``.json`` beside it, whose names
    `gemminer.export` owns) and `report`'s charts (of the folder, of its ticket and gem)."""
    charts = [folder / name for name in ("layer_density.png", "ticket-density.png", "gem-density.png")]
    exports = [path for pattern in ("export-*-*.safetensors", "export-*-*.mnn", "export-*-*.mnn.json")
               for path in sorted(folder.glob(pattern))]
    return [*exports, *charts]


def summary_writer_class() -> Any:
    """TensorBoard's SummaryWriter, or one clear error when tensorboard is not installed (it is
    optional: metrics always go to CSV and JSONL)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise GemminerError("--tensorboard needs the tensorboard package (pip install tensorboard), or drop "
                            "--tensorboard: metrics.csv and metrics.jsonl are written either way") from None
    return SummaryWriter

