"""Run a comparison grid (serially, in N processes, or as Ray tasks) and gather its tables and plots.

Cells are `mine` runs in ``OUT/<variant>-d<density>-s<seed>`` (``OUT/dense-s<seed>`` for the dense
reference). Finished cells are reused when their config matches and unfinished ones resume, so a
killed grid started again loses nothing. Tasks wait for what they need: an IMP run's other densities
and every sanity check start when their cell's run has finished.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import hashlib
import io
import json
import multiprocessing
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemminer.allocator import keep_freed_memory
from gemminer.checkpoint import StopFlag, StopRequested
from gemminer.config import load_run_config, resolve, result_config, to_dict
from gemminer.errors import GemminerError, reading
from gemminer.grid import Grid, Variant
from gemminer.runs import RunFolder, machine_description, output_folder, read_json, version_line, write_atomic
from gemminer.sanity import CHECKS

COLUMNS = ["variant", "method", "density", "density_actual", "seed", "acc_before_finetune",
           "acc_before_finetune_at_init", "acc_after_finetune", *[f"sanity_{check}" for check in CHECKS],
           "epochs_to_ticket", "epochs_to_ticket_remaining", "epochs_to_ticket_full", "search_seconds",
           "finetune_seconds", "remaining", "total", "macs_total", "macs_remaining", "layer_collapse",
           "density_on_path", "reg_lambda", "run", "gemminer_version", "git_commit", "config_hash"]


@dataclass
class Task:
    """One unit of work: a `mine` run, the training of an IMP stop's ticket, or a sanity check."""

    key: str
    kind: str  # mine | stop | sanity
    args: dict[str, Any]
    needs: list[str] = field(default_factory=list)
    first: bool = False  # a long task (an IMP run): started before the others that are ready, so
    # parallel workers do not end on one long run while the rest idle


def _run(overrides: dict[str, Any], out: Path, force: bool, progress: bool) -> dict[str, Any]:
    """A finished run with the same config is reused; an unfinished one resumes."""
    from gemminer.experiment import mine

    folder = RunFolder(out)
    config = resolve(overrides)
    if folder.finished and not force:
        folder.check_same_config(config)  # a changed grid must not report stale numbers
        return folder.summary()
    return mine(config, out, force=force, progress=progress)


def _train_stop(run: str, density: float, out: str, force: bool, progress: bool,
                threads: int | None = None) -> dict[str, Any]:
    """Train the ticket an IMP run kept at `density` from its own start weights."""
    from gemminer.experiment import _density_name, finetune_saved, load_run, read_start
    from gemminer.ticket import Ticket, read_safetensors

    folder = RunFolder(run)
    target = RunFolder(out)
    if target.finished and not force:
        return target.summary()
    config, _, _, init = load_run(run)
    if threads:
        config.threads = threads  # a worker's share of the cores, not the IMP run's own setting
    name = _density_name(density)
    ticket = Ticket.load(folder.file(f"tickets/{name}.safetensors"))
    own_start = folder.file(f"tickets/{name}-start.safetensors")
    start = read_safetensors(own_start, "start weights")[0] if own_start.is_file() else read_start(folder)
    return finetune_saved(config, ticket, start if start is not None else init, out, force=force, progress=progress)


def run_task(task: Task, threads: int | None = None, device: str | None = None, force: bool = False,
             progress: bool = False) -> dict[str, Any]:
    """Execute one task (in this process, a worker process or a Ray worker)."""
    import torch

    from gemminer.sanity import sanity

    keep_freed_memory()  # a pool or Ray worker is a process of its own (gemminer.allocator)
    if threads:
        torch.set_num_threads(threads)
    args = task.args
    if task.kind == "mine":  # a worker's share of the threads (`--jobs`, Ray) replaces the grid's --threads
        overrides = dict(args["overrides"], **({"device": device} if device else {}),
                         **({"threads": threads} if threads else {}))
        return _run(overrides, Path(args["out"]), force, progress)
    if task.kind == "stop":
        return _train_stop(args["run"], args["density"], args["out"], force, progress, threads)
    return sanity(args["run"], args["checks"], force=force, progress=progress, report=None, threads=threads)


@dataclass
class Cell:
    variant: Variant | None  # None: the dense reference
    density: float
    seed: int
    folder: Path
    imp_run: Path | None = None  # the IMP run this cell's ticket comes from, where it is another density

    @property
    def name(self) -> str:
        return self.variant.name if self.variant else "dense"


def plan(grid: Grid, out: Path) -> tuple[list[Cell], list[Task]]:
    """The grid's cells and the tasks that make them, with their dependencies."""
    cells, tasks = [], []
    for seed in grid.seeds:
        for variant in grid.variants:
            lowest = min(grid.densities_of(variant))
            imp_run = out / f"{variant.name}-d{lowest:g}-s{seed}"
            for density in grid.densities_of(variant):
                folder = out / f"{variant.name}-d{density:g}-s{seed}"
                if variant.method == "imp" and density != lowest:
                    cells.append(Cell(variant, density, seed, folder, imp_run))
                    tasks.append(Task(str(folder), "stop", {"run": str(imp_run), "density": density,
                                                            "out": str(folder)}, needs=[str(imp_run)]))
                else:
                    cells.append(Cell(variant, density, seed, folder))
                    tasks.append(Task(str(folder), "mine", {"overrides": grid.cell_overrides(variant, density, seed),
                                                            "out": str(folder)}, first=variant.method == "imp"))
                if variant.sanity:
                    tasks.append(Task(f"{folder}#sanity", "sanity", {"run": str(folder), "checks": variant.sanity},
                                      needs=[str(folder)]))
        if grid.dense:
            folder = out / f"dense-s{seed}"
            dense = Variant("dense", {"method": "dense"})
            overrides = grid.cell_overrides(dense, 1.0, seed)
            cells.append(Cell(None, 1.0, seed, folder))
            tasks.append(Task(str(folder), "mine", {"overrides": overrides, "out": str(folder)}))
    return cells, tasks


def check_inputs(tasks: list[Task], force: bool = False) -> None:
    """What every cell's run would refuse at its start, checked once before anything is written or run:
    bad input the whole grid shares (an unknown model, missing data, an unavailable device) is one error
    line, not one per cell beside empty tables. Each `mine` cell still to run has its config resolved;
    each distinct data set and model is loaded and built once on the CPU (the data's decoded cache is the
    one the cells use). Finished cells are only read back, so they need neither (tables can be rebuilt
    on a machine without the cells' device or data)."""
    from gemminer.experiment import check_bf16, setup
    from gemminer.runs import summary_writer_class
    from gemminer.train import resolve_device

    checked: set[str] = set()
    for task in tasks:
        if task.kind != "mine" or (RunFolder(task.args["out"]).finished and not force):
            continue
        config = resolve(task.args["overrides"])
        model = config.model  # what building it depends on (not its init scheme, which `resolve` checked)
        key = json.dumps([to_dict(config.data), model.name, model.width, model.bias, model.affine_bn,
                          model.prune_first, model.prune_last, config.device, config.bf16, config.tensorboard])
        if key in checked:
            continue
        checked.add(key)
        check_bf16(config, resolve_device(config.device))
        if config.tensorboard:
            summary_writer_class()
        config.device, config.bf16 = "cpu", False  # no device memory held by this process while cells run
        setup(config)


def check_folders(tasks: list[Task], force: bool = False) -> None:
    """Refuse the grid, before anything runs or is written, where a cell's folder holds a run of another
    config that its `mine` would refuse (a changed grid): its finished results and tables stay as they are."""
    if force:
        return
    for task in tasks:
        if task.kind != "mine":
            continue
        folder = RunFolder(task.args["out"])
        if not folder.file("config.yaml").is_file():
            continue
        if not folder.finished and folder.computed_nothing:
            continue  # an earlier try stopped at bad input: the cell starts over
        differing = {key: values for key, values in folder.config_differences(resolve(task.args["overrides"])).items()
                     if key != "device"}  # workers on several GPUs run cells on cuda:N
        if differing:
            details = ", ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in list(differing.items())[:4])
            state = "a finished" if folder.finished else "an unfinished"
            raise GemminerError(f"{folder.path} holds {state} run with another config: {details}; nothing was run "
                                "or written: restore the grid, choose another --out, or pass --force to rerun the "
                                "changed cells")


def execute(tasks: list[Task], jobs: int = 1, ray_address: str | None = None, force: bool = False,
            progress: bool = True, report: Callable[[str], None] | None = print) -> dict[str, str]:
    """Run every task once its needs are done: serially, in `jobs` processes, or on Ray.
    Returns {task key: error line} for the tasks that failed (and those that needed them)."""
    pending = {task.key: task for task in tasks}
    done: set[str] = set()
    failed: dict[str, str] = {}
    if ray_address is not None:
        runner = _RayRunner(ray_address, force)
    elif jobs > 1:
        runner = _ProcessRunner(jobs, force)
    else:
        runner = _SerialRunner(force, progress)
    running: dict[Any, str] = {}
    total = len(tasks)
    try:
        while pending or running:
            for key, task in sorted(pending.items(), key=lambda item: not item[1].first):  # stable
                if any(need in failed for need in task.needs):
                    failed[key] = f"not run: {', '.join(n for n in task.needs if n in failed)} failed"
                    del pending[key]
                elif all(need in done for need in task.needs):
                    running[runner.submit(task)] = key
                    del pending[key]
            if not running:
                break
            for handle, outcome in runner.wait(list(running)):
                key = running.pop(handle)
                if isinstance(outcome, BaseException):
                    failed[key] = str(outcome).splitlines()[0] if str(outcome) else type(outcome).__name__
                    if not isinstance(outcome, GemminerError) and report is not None:
                        report(f"cell {key} failed: {type(outcome).__name__}: {outcome}")
                else:
                    done.add(key)
                if report is not None:
                    state = "failed: " + failed[key] if key in failed else "done"
                    report(f"[{len(done) + len(failed)}/{total}] {state}: {key}")
    finally:
        runner.close()
    return failed


class _SerialRunner:
    def __init__(self, force: bool, progress: bool) -> None:
        self.force, self.progress, self.results = force, progress, {}

    def submit(self, task: Task) -> str:
        try:
            self.results[task.key] = run_task(task, force=self.force, progress=self.progress)
        except GemminerError as err:
            self.results[task.key] = err
        return task.key

    def wait(self, handles: list[Any]) -> list[tuple[Any, Any]]:
        return [(handle, self.results.pop(handle)) for handle in handles]

    def close(self) -> None:
        pass


def _worker_devices(jobs: int) -> list[str | None]:
    import torch

    count = torch.cuda.device_count()
    return [f"cuda:{index % count}" for index in range(jobs)] if count > 1 else [None] * jobs


def _stop_with_parent() -> None:
    """Worker initializer: on Linux, SIGTERM this worker when the grid process dies (even by SIGKILL),
    so its run checkpoints and stops instead of running on unsupervised."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides


class _ProcessRunner:
    """`jobs` worker processes (spawned: no state shared with this one); the CPU threads are split
    evenly between them, and with several GPUs each worker takes one. SIGINT or SIGTERM to the grid
    process stops the workers' runs with a checkpoint each, so the same command resumes them."""

    def __init__(self, jobs: int, force: bool) -> None:
        self.force = force
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self.devices = _worker_devices(jobs)
        self.slot = 0
        self.pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                           initializer=_stop_with_parent)
        self.stop = StopFlag().__enter__()

    def submit(self, task: Task) -> concurrent.futures.Future:
        device = self.devices[self.slot % len(self.devices)]
        self.slot += 1
        return self.pool.submit(run_task, task, self.threads, device, self.force, False)

    def wait(self, handles: list[Any]) -> list[tuple[Any, Any]]:
        while True:
            finished, _ = concurrent.futures.wait(handles, timeout=0.5,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
            if self.stop.signal_name is not None:
                raise StopRequested(self.stop.signal_name)
            if finished:
                return [(future, future.exception() or future.result()) for future in finished]

    def close(self) -> None:
        self.stop.__exit__()
        if self.stop.signal_name is None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            return
        # stopped: each worker checkpoints its run and exits (an idle one just exits); the pool itself is not
        # waited on, since a worker ended by a signal can leave its bookkeeping waiting forever
        processes = list(getattr(self.pool, "_processes", {}).values())
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(timeout=60)  # a run stops after its current step
            if process.is_alive():
                process.kill()


class _RayRunner:
    """Cells as Ray tasks; `address` "" or "local" starts a local Ray instance. Every task writes its
    run folder under the grid's output folder, which must be shared storage on a real cluster."""

    def __init__(self, address: str, force: bool) -> None:
        try:
            import ray
        except ImportError:
            raise GemminerError("--ray needs the ray package: pip install 'gemminer[ray]'") from None
        self.ray, self.force = ray, force
        if not ray.is_initialized():
            try:
                ray.init(address=None if address in ("", "local") else address, include_dashboard=False,
                         log_to_driver=False, ignore_reinit_error=True)
            except Exception as err:  # Ray's failures to connect take many types
                if os.environ.get("GEMMINER_DEBUG"):
                    raise
                detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                raise GemminerError(f"cannot connect to Ray at {address or 'a local instance'}: {detail}") from None
        self.remote = ray.remote(num_cpus=1)(run_task)

    def submit(self, task: Task) -> Any:
        return self.remote.remote(task, 1, None, self.force, False)

    def wait(self, handles: list[Any]) -> list[tuple[Any, Any]]:
        ready, _ = self.ray.wait(handles, num_returns=1)
        results = []
        for ref in ready:
            try:
                results.append((ref, self.ray.get(ref)))
            except Exception as err:  # a task's exception arrives wrapped by Ray
                cause = getattr(err, "cause", None)
                results.append((ref, cause if isinstance(cause, BaseException) else err))
        return results

    def close(self) -> None:
        pass


# Two-sided 5% critical values of Student's t by degrees of freedom (a paired test of n seeds has n - 1);
# a df between two listed ones uses the lower (larger, so stricter) value.
T_CRITICAL = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
              10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def paired_verdict(differences: list[float], reference: str) -> str:
    """'beats REF', 'below REF' or 'level with REF' from per-seed differences (variant minus REF): a
    difference counts only where a two-sided paired t-test at 5% rejects "no difference"; a single pair
    cannot be tested."""
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return ("ahead of " if mean > 0 else "behind " if mean < 0 else "level with ") + reference + \
            " (one seed: untested)"
    spread = statistics.stdev(differences)
    df = len(differences) - 1
    critical = T_CRITICAL[max(k for k in T_CRITICAL if k <= df)]
    if (spread == 0 and mean != 0) or (spread > 0 and abs(mean) / (spread / len(differences) ** 0.5) > critical):
        return ("beats " if mean > 0 else "below ") + reference
    return "level with " + reference


def provenance(command: str | None, machine: str, seconds: float, cells: int, reused: int) -> str:
    """The line under a grid's tables: command, version and commit, date, machine, wall clock, and how
    many cells an earlier call had finished (their seconds are not in this call's wall clock)."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f"Made by `{command or 'gemminer.compare.compare(...)'}`: {version_line()}, {when}, on {machine}. "
            "This call took "
            f"{seconds / 60:.1f} min of wall clock; {reused} of the grid's {cells} cells were finished before it "
            "and reused.")


def compare(grid: Grid, out: str | Path, jobs: int = 1, ray_address: str | None = None, force: bool = False,
            progress: bool = True, report: Callable[[str], None] | None = print, command: str | None = None) -> str:
    """Run `grid` into `out`; write results.csv, results.md and plots/ there; return results.md. The
    tables end with where they came from: `command`, the code's version and commit, the date, the
    machine, and the wall clock of this call (cells finished by an earlier call are reused, not rerun)."""
    started, machine = time.time(), machine_description()
    out = output_folder(out, "grid output folder")
    cells, tasks = plan(grid, out)
    check_folders(tasks, force)  # a refused grid writes nothing, not even empty tables
    if ray_address is not None:  # a cluster's workers may hold data (or devices) that this machine lacks
        from gemminer.raycheck import check_ray_address

        check_ray_address(ray_address)  # before Ray starts: a bounded wait and one line, no folder
    else:
        check_inputs(tasks, force)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GemminerError(f"cannot create output folder {out}: {err.strerror}") from err
    cell_tasks = [task for task in tasks if task.kind in ("mine", "stop")]
    reused = 0 if force else sum(RunFolder(task.key).finished for task in cell_tasks)
    failed = execute(tasks, jobs, ray_address, force, progress and jobs == 1 and ray_address is None, report)
    rows = [row for cell in cells if str(cell.folder) not in failed and (row := cell_row(cell)) is not None]
    write_csv(rows, out / "results.csv")
    text = results_markdown(rows, grid)
    text += "\n\n" + provenance(command, machine, time.time() - started, len(cell_tasks), reused)
    write_atomic(out / "results.md", text + "\n")
    from gemminer.plots import plot_grid

    plot_grid(rows, out / "plots")
    if failed:
        lines = "; ".join(f"{Path(key).name}: {error}" for key, error in list(failed.items())[:5])
        raise GemminerError(f"{len(failed)} of {len(tasks)} grid tasks failed ({lines}); the tables hold the "
                            "rest; run the same command again to retry them")
    return text


# ---- rows ---------------------------------------------------------------------------

_MACS_CACHE: dict[str, dict[str, int]] = {}


def _macs(folder: Path) -> dict[str, int] | None:
    """Dense MACs per layer of the cell's model (one per model config), from `report`."""
    from gemminer.experiment import setup
    from gemminer.report import layer_macs

    try:
        config = load_run_config(folder / "config.yaml")
    except GemminerError:
        return None
    key = json.dumps([to_dict(config.model), config.data.name, config.data.num_samples], sort_keys=True)
    if key not in _MACS_CACHE:  # the model and the input shape decide the MACs, not the weights, seed or density
        try:
            config.device = "cpu"
            run = setup(config)
            _MACS_CACHE[key] = layer_macs(run.model, run.dataset.input_shape)
        except GemminerError:
            return None
    return _MACS_CACHE[key]


def _rounds_row(run: Path, remaining: int, total: int) -> dict[str, Any] | None:
    """The IMP round that pruned to exactly `remaining` of `total` weights (rounds.csv of runs made before
    its `kept` column: kept = round(total x pruned_to), as IMP computes it)."""
    path = run / "rounds.csv"
    if not path.is_file():
        return None
    with reading(path, "IMP rounds table", "start the IMP run over with --force"), open(path) as handle:
        for row in csv.DictReader(handle):
            kept = int(row["kept"]) if row.get("kept") else round(total * float(row["pruned_to"]))
            if kept == remaining:
                return row
    return None


def cell_row(cell: Cell) -> dict[str, Any] | None:
    """One results row from a finished cell's folder (and its sanity.json)."""
    from gemminer.ticket import Ticket

    folder = RunFolder(cell.folder)
    if not folder.finished:
        return None
    summary = folder.summary()
    ticket = Ticket.load(folder.file("ticket.safetensors"))
    # the hash of what decides the numbers: cells that differ in eval cadence or batch hash alike
    config_text = json.dumps(result_config(load_run_config(folder.file("config.yaml"))), sort_keys=True)
    row: dict[str, Any] = {
        "variant": cell.name, "method": cell.variant.method if cell.variant else "dense", "density": cell.density,
        "density_actual": ticket.density, "seed": cell.seed,
        "acc_before_finetune": summary.get("acc_before_finetune", summary.get("acc_ticket_at_init")),
        "acc_before_finetune_at_init": summary.get("acc_before_finetune_at_init", True),
        "acc_after_finetune": summary["acc_after_finetune"],
        "epochs_to_ticket": summary.get("epochs_to_ticket"), "search_seconds": summary.get("search_seconds"),
        "finetune_seconds": summary.get("finetune_seconds"), "remaining": ticket.remaining, "total": ticket.total,
        "layer_collapse": ";".join(layer.name for layer in ticket.layers() if layer.remaining == 0),
        "density_on_path": summary.get("density_on_path", ""), "reg_lambda": summary.get("reg_lambda", ""),
        # the code that computed the cell (its summary says; empty for runs made before it did), not this checkout
        "run": str(cell.folder), "gemminer_version": summary.get("gemminer_version", ""),
        "git_commit": summary.get("git_commit", ""),
        "config_hash": hashlib.sha256(config_text.encode()).hexdigest()[:16],
    }
    if cell.imp_run is not None:  # a stop of an IMP run: its cost is the rounds up to that stop
        imp = RunFolder(cell.imp_run).summary()
        row["acc_before_finetune_at_init"] = imp.get("acc_before_finetune_at_init", True)
    if row["method"] == "imp":  # its rounds up to this stop, under both round lengths after a rewind
        rounds = _rounds_row(cell.imp_run or cell.folder, ticket.remaining, ticket.total)
        if rounds is not None:
            row["epochs_to_ticket"] = _number(rounds["epochs"])
            row["search_seconds"] = float(rounds["seconds"])
            for length in ("remaining", "full"):
                if rounds.get(f"epochs_{length}"):  # (not in rounds tables written before both were counted)
                    row[f"epochs_to_ticket_{length}"] = _number(rounds[f"epochs_{length}"])
    macs = _macs(cell.folder)
    if macs:
        row["macs_total"] = sum(macs.values())
        row["macs_remaining"] = sum(macs[layer.name] * layer.remaining // layer.parameters
                                    for layer in ticket.layers() if layer.name in macs)
    sanity_file = folder.file("sanity.json")
    if sanity_file.is_file():
        for check, result in read_json(sanity_file, "sanity results", "delete it and run the grid again").get(
                "checks", {}).items():
            row[f"sanity_{check}"] = result["acc_after_finetune"]
    return row


def _number(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() else value


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


# ---- tables -------------------------------------------------------------------------
def _mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["variant"], float(row["density"])), []).append(row)
    return groups


def _epochs(group: list[dict[str, Any]]) -> str:
    """Epochs to ticket as run, and under the other round length after a rewind where that differs."""
    text = _mean_std([row["epochs_to_ticket"] for row in group], digits=1)
    for length in ("remaining", "full"):
        other = [row.get(f"epochs_to_ticket_{length}") for row in group]
        if all(value not in (None, "") for value in other) and any(
                value != row["epochs_to_ticket"] for value, row in zip(other, group, strict=True)):
            text += f" ({length} rounds: {_mean_std(other, digits=1)})"
    return text


def _references(grid: Grid | None, reference: str) -> dict[str, str]:
    """Each variant's paired reference: the variant of the reference's method on the same model, so a width-16
    variant is compared with width-16 Gem-Miner, not width 64's; `reference` itself without a grid or a match."""
    if grid is None:
        return {}
    variants = {variant.name: variant for variant in grid.variants}
    if reference not in variants:
        return {}
    method = variants[reference].method
    chosen = {}
    for variant in grid.variants:
        same_model = [other.name for other in grid.variants
                      if other.method == method and other.overrides.get("model") == variant.overrides.get("model")]
        chosen[variant.name] = reference if reference in same_model or not same_model else same_model[0]
    return chosen


def _reference_words(references: dict[str, str], reference: str) -> tuple[str, str]:
    """How the tables name the reference: `reference`, or "its reference" with a note where variants on
    another model have their own (the note is empty when there is one reference)."""
    if set(references.values()) <= {reference}:
        return reference, ""
    return "its reference", f" ({reference}, or the {reference} variant on the same model)"


def _cost_lines(groups: dict[tuple[str, float], list[dict[str, Any]]], references: dict[str, str],
                reference: str) -> list[str]:
    """IMP's epochs to ticket over its reference's at the same density and seed, with each round after a
    rewind training the rest of the schedule (OpenLTH) and a full round (the official Gem-Miner code)."""
    name, note = _reference_words(references, reference)
    own = {(variant, density, row["seed"]): row["epochs_to_ticket"] for (variant, density), group in groups.items()
           for row in group if row.get("epochs_to_ticket")}
    lines = []
    for (variant, density), group in groups.items():
        other = references.get(variant, reference)
        pairs = [(row, own[(other, density, row["seed"])]) for row in group if (other, density, row["seed"]) in own
                 and all(row.get(f"epochs_to_ticket_{length}") not in (None, "") for length in ("remaining", "full"))]
        if variant == other or not pairs:
            continue
        cells = [_mean_std([row[f"epochs_to_ticket_{length}"] for row, _ in pairs], digits=1)
                 for length in ("remaining", "full")]
        cells += [_mean_std([row[f"epochs_to_ticket_{length}"] / epochs for row, epochs in pairs], digits=1) + "x"
                  for length in ("remaining", "full")]
        named = f" {other} |" if note else ""  # the reference column, where there are several
        lines.append(f"| {variant} | {density:g} | {len(pairs)} | {' | '.join(cells)} |{named}")
    if not lines:
        return []
    return ["", f"Cost to ticket: training epochs before the ticket exists, over {name}'s at the same density "
            f"and seed{note}; after a rewind to epoch E each round trains the remaining schedule (E_total - E "
            "epochs, OpenLTH) or a full round (E_total epochs, the official Gem-Miner code).", "",
            f"| variant | density | pairs | epochs, remaining rounds | epochs, full rounds | x {name}, remaining "
            f"| x {name}, full |" + (" reference |" if note else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if note else ""), *lines]


def results_markdown(rows: list[dict[str, Any]], grid: Grid | None = None, reference: str = "gemminer") -> str:
    """Mean ± std over seeds per variant and density; sanity drops; paired differences to `reference` (for a
    variant on another model, to the variant of `reference`'s method on that model)."""
    groups = _groups(rows)
    references = _references(grid, reference)
    lines = ["| variant | method | density | seeds | acc. before training (%) | acc. after training (%) "
             "| epochs to ticket | search s | training s |", "|---|---|---|---|---|---|---|---|---|"]
    for (variant, density), group in groups.items():
        at_init = all(row.get("acc_before_finetune_at_init", True) for row in group)
        before = _mean_std([row["acc_before_finetune"] for row in group], 100)
        if not at_init:
            before = f"({before}, trained weights: not comparable)"
        lines.append(
            f"| {variant} | {group[0]['method']} | {density:g} | {len(group)} | {before} "
            f"| {_mean_std([row['acc_after_finetune'] for row in group], 100)} "
            f"| {_epochs(group)} "
            f"| {_mean_std([row['search_seconds'] for row in group])} "
            f"| {_mean_std([row['finetune_seconds'] for row in group])} |")
    lines += _cost_lines(groups, references, reference)
    sanity_lines = []
    for (variant, density), group in groups.items():
        for check in CHECKS:
            drops = [row["acc_after_finetune"] - row[f"sanity_{check}"] for row in group
                     if row.get(f"sanity_{check}") not in (None, "")]
            if drops:
                sanity_lines.append(f"| {variant} | {density:g} | {check} | "
                                    f"{_mean_std([row[f'sanity_{check}'] for row in group if row.get(f'sanity_{check}') not in (None, '')], 100)} "  # noqa: E501
                                    f"| {_mean_std(drops, 100)} |")
    if sanity_lines:
        lines += ["", "Sanity checks: accuracy after training of each variant, and its drop from the ticket's "
                  "(points; a real ticket drops, a ratio-only ticket does not).", "",
                  "| variant | density | check | acc. after training (%) | drop (points) |", "|---|---|---|---|---|",
                  *sanity_lines]
    accuracy = {(row["variant"], float(row["density"]), row["seed"]): row["acc_after_finetune"] for row in rows}
    paired = []
    for (variant, density), group in groups.items():
        other = references.get(variant, reference)
        if variant == other or variant == "dense":
            continue
        differences = [row["acc_after_finetune"] - accuracy[(other, density, row["seed"])]
                       for row in group if (other, density, row["seed"]) in accuracy]
        if differences:
            verdict = paired_verdict(differences, other)
            paired.append(f"| {variant} | {density:g} | {len(differences)} | {_mean_std(differences, 100)} "
                          f"| {verdict} |")
    if paired:
        name, note = _reference_words(references, reference)
        lines += ["", f"Paired by seed: accuracy after training minus {name}'s{note} (points, mean ± std of the "
                  "per-seed differences; 'beats' or 'below' where a two-sided paired t-test at 5% says so, "
                  "'level' where the seeds cannot tell).", "",
                  f"| variant | density | pairs | minus {name} | |", "|---|---|---|---|---|", *paired]
    return "\n".join(lines)

