"""`gemminer tune`: a method's settings tuned on the validation split with Optuna.

Every trial is a `mine` run measured on the validation split (``data.eval_split: val``; the test
split is never read), its objective the ticket's validation accuracy after training; the pruner sees
the validation accuracy of every evaluated epoch. Search spaces live beside the config fields, in
their metadata (``"tune": {"low": ..., "high": ..., "log": ...}`` or ``{"choices": [...]}``).

A study lives in ``DIR/study.db`` (SQLite, one process), in ``DIR/journal.log`` (Optuna's journal
file, several processes: ``jobs`` > 1) or in a database named by URL (several machines). ``--trials
N`` is the number of finished (complete or pruned) trials the study should hold: a rerun tops it up,
and trials a killed process left running are failed and retried with the same parameters.
"""

from __future__ import annotations

import csv
import dataclasses
import multiprocessing
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gemminer.config import FinetuneConfig, RunConfig, flatten, merge, resolve, result_config
from gemminer.errors import GemminerError
from gemminer.seeding import derive_seed

TUNE_FILE = "tune.yaml"
STUDY_DB = "study.db"
JOURNAL = "journal.log"
BEST_FILE = "best.yaml"
TRIALS_CSV = "trials.csv"

# Parameters tuned when --params is not given. Gem-Miner and edge-popup learn scores: their score
# learning rate, plus the ticket's training recipe (Gem-Miner's lambda stays as configured, "auto"
# where that is the default, unless --params names search.reg_lambda). Every other method's only
# training is its ticket's (IMP: every round's) recipe.
DEFAULT_PARAMS: dict[str, tuple[str, ...]] = {
    "gemminer": ("search.lr", "finetune.lr", "finetune.weight_decay"),
    "edge-popup": ("search.lr", "search.weight_decay", "finetune.lr", "finetune.weight_decay"),
}
RECIPE_PARAMS = ("finetune.lr", "finetune.weight_decay")

# Keys a study does not fix: where and how it is watched, not what a trial computes.
UNRECORDED = {"device", "eval_every", "checkpoint_every", "tensorboard", "data.eval_batch_size", "compile"}
# Keys of the tuning protocol, left out of the best settings (the final runs train on the training
# split and are measured on the test split).
PROTOCOL = {"density", "seed", "data.val_size", "data.eval_split", *UNRECORDED}

HEARTBEAT_SECONDS = 20  # a running trial's heartbeat interval
GRACE_SECONDS = 60  # a running trial without a heartbeat for this long is dead: failed, and retried
MAX_RETRIES = 2  # retries of a trial whose process died, with the same parameters
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
TPE_STARTUP_TRIALS = 10  # random trials before TPE models the results (Optuna's default)
PRUNER_STARTUP_TRIALS = 5  # trials that run to the end before the pruner compares (Optuna's default)


@dataclass(frozen=True)
class Space:
    """The range of one config field: a float or int in [low, high] (on a log scale where `log`),
    or one of `choices`."""

    name: str  # dotted config key: "finetune.lr"
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def record(self) -> dict[str, Any]:
        """The space as tune.yaml writes it."""
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        return {"type": self.kind, "low": self.low, "high": self.high, "log": self.log}


def _sections(method: str) -> dict[str, type]:
    from gemminer.methods import method_class

    return {"finetune": FinetuneConfig, "search": method_class(method).Config}


def spaces(method: str) -> dict[str, Space]:
    """Every field of `method`'s config that declares a search space, by dotted key."""
    import typing

    found = {}
    for section, cls in _sections(method).items():
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            declared = item.metadata.get("tune")
            if declared is None:
                continue
            key = f"{section}.{item.name}"
            if "choices" in declared:
                found[key] = Space(key, "categorical", choices=tuple(declared["choices"]))
                continue
            # the field's own number type; "float | str" (a field that also takes "auto") samples floats
            options = [t for t in typing.get_args(hints[item.name]) if t is not type(None)] or [hints[item.name]]
            kind = "int" if options[0] is int else "float"
            found[key] = Space(key, kind, declared["low"], declared["high"], bool(declared.get("log", False)))
    return found


def default_params(method: str) -> tuple[str, ...]:
    return DEFAULT_PARAMS.get(method, RECIPE_PARAMS)


def chosen_spaces(method: str, params: list[str] | None) -> list[Space]:
    """The spaces of `params` (default: the method's `default_params`), or one error naming the tunable keys."""
    available = spaces(method)
    names = list(params) if params else list(default_params(method))
    if len(set(names)) != len(names):
        raise GemminerError(f"--params names a key twice: {','.join(names)}")
    for name in names:
        if name not in available:
            raise GemminerError(f"{name} has no search space for {method}; tunable: {', '.join(sorted(available))}")
    return [available[name] for name in names]


def _nested(values: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in values.items():
        section, name = key.split(".", 1)
        tree.setdefault(section, {})[name] = value
    return tree


@dataclass
class TuneRecord:
    """What tune.yaml records: a rerun with other values is refused."""

    method: str
    density: float
    seed: int
    params: list[str]
    spaces: dict[str, dict[str, Any]]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    study: str
    storage: str  # sqlite | journal | the database URL, its password hidden
    config: dict[str, Any]  # every other setting a trial runs with

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def base_config(overrides: dict[str, Any]) -> RunConfig:
    """The trials' config before sampling: measured on the validation split, which must exist."""
    data = overrides.get("data") or {}
    if str(data.get("eval_split", "val")) != "val":
        raise GemminerError("tune measures every trial on the validation split: drop --data-eval-split")
    if not data.get("val_size"):
        raise GemminerError("tune measures on a validation split: give --data-val-size N (training samples held "
                            "out, e.g. 500 of MNIST-1D's 4000)")
    return resolve(merge(overrides, {"data": {"eval_split": "val"}}))


def describe(overrides: dict[str, Any], params: list[str] | None, sampler: str, pruner: str, storage: str,
             study_name: str | None) -> tuple[TuneRecord, list[Space], RunConfig]:
    """The study's record, its spaces and the trials' base config, checked before anything is written."""
    if sampler not in SAMPLERS:
        raise GemminerError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    if pruner not in PRUNERS:
        raise GemminerError(f"unknown pruner {pruner!r}; allowed: {', '.join(PRUNERS)}")
    config = base_config(overrides)
    chosen = chosen_spaces(config.method, params)
    names = {space.name for space in chosen}
    given = sorted(names & set(flatten(overrides)))
    if given:
        raise GemminerError(f"{given[0]} is tuned, so it cannot also be set (flag or --config): drop the setting, "
                            "or leave the key out of --params")
    fixed = {key: value for key, value in result_config(config).items()
             if key not in names and key not in UNRECORDED}
    sampler_record = {"name": sampler, "seed": config.seed}
    if sampler == "tpe":
        sampler_record.update(n_startup_trials=TPE_STARTUP_TRIALS, multivariate=True)
    pruner_record: dict[str, Any] = {"name": pruner}
    if pruner == "median":
        # the first phase's first third: early epochs are too noisy to stop a trial on
        first_phase = getattr(config.search, "epochs", None) or config.finetune.epochs
        pruner_record.update(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=max(first_phase // 3, 1))
    record = TuneRecord(config.method, config.density, config.seed, [space.name for space in chosen],
                   {space.name: space.record() for space in chosen}, sampler_record, pruner_record,
                   study_name or f"{config.method}-d{config.density:g}", storage, fixed)
    return record, chosen, config


def check_same_study(saved: dict[str, Any], record: TuneRecord, where: str) -> None:
    """One line naming the first difference between a recorded study and this command's."""
    wanted = record.record()
    for key in ("method", "density", "seed", "params", "spaces", "sampler", "pruner", "study", "storage", "config"):
        there, here = saved.get(key), wanted[key]
        if there == here:
            continue
        if key == "config" and isinstance(there, dict):
            diff = sorted(k for k in set(there) | set(here) if there.get(k, "(unset)") != here.get(k, "(unset)"))
            first = diff[0]
            detail = f"{first} {there.get(first, '(unset)')!r} there, {here.get(first, '(unset)')!r} here"
        else:
            detail = f"{key} {_short(there)} there, {_short(here)} here"
        raise GemminerError(f"{where} holds a study of other settings ({detail}); rerun with its settings to "
                            "top it up, or tune into another --out")


def _short(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return repr(value) if not isinstance(value, dict) else yaml.safe_dump(value, default_flow_style=True).strip()


# ---- storage ------------------------------------------------------------------------------------------------------
def _storage_name(url: str | None, out: Path, jobs: int) -> str:
    """sqlite (one process), journal (several) or the URL without its password; an existing study keeps its own."""
    if url:
        try:
            from sqlalchemy.engine import make_url

            return make_url(url).render_as_string(hide_password=True)
        except ImportError:
            return url
        except Exception as err:  # sqlalchemy's parse errors are several types
            raise GemminerError(f"--storage {url!r} is not a database URL: {err}") from None
    if (out / JOURNAL).is_file():
        return "journal"
    if (out / STUDY_DB).is_file():
        if jobs > 1:
            raise GemminerError(f"{out} holds a one-process study ({STUDY_DB}, SQLite): top it up with --jobs 1, "
                                "or tune with --jobs N into another --out")
        return "sqlite"
    return "journal" if jobs > 1 else "sqlite"


def open_storage(out: Path, name: str, url: str | None, heartbeat: tuple[int, int]) -> Any:
    """The study's storage, heartbeats on: a trial silent for the grace period is failed and retried."""
    import optuna

    interval, grace = heartbeat
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
    if name == "journal":
        return _journal_storage(out, interval, grace, retry)
    target = url if url else f"sqlite:///{out / STUDY_DB}"
    engine = {"connect_args": {"timeout": 60}} if target.startswith("sqlite") else None
    try:
        return optuna.storages.RDBStorage(target, engine_kwargs=engine, heartbeat_interval=interval,
                                          grace_period=grace, heartbeat_stale_trial_callback=retry)
    except ImportError as err:
        raise GemminerError(f"the storage {name} needs a driver that is not installed ({err.name}): "
                            "pip install 'gemminer[tune]'") from None
    except Exception as err:  # connection and schema errors of any database driver
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise GemminerError(f"cannot open the study storage {name}: {reason}") from None


def _journal_storage(out: Path, interval: int, grace: int, retry: Callable[..., None]) -> Any:
    """Optuna's journal file with heartbeats (the journal has none of its own): each running trial
    touches ``heartbeats/<trial id>``; a running trial whose file is older than `grace` is stale."""
    from optuna.storages import JournalStorage
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    beats = out / "heartbeats"

    class HeartbeatJournal(JournalStorage, BaseHeartbeat):
        def record_heartbeat(self, trial_id: int) -> None:
            beats.mkdir(exist_ok=True)
            (beats / str(trial_id)).touch()

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            now, stale = time.time(), []
            for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
                beat = beats / str(trial._trial_id)
                try:
                    last = beat.stat().st_mtime
                except FileNotFoundError:
                    last = trial.datetime_start.timestamp() if trial.datetime_start else now
                if now - last > grace:
                    stale.append(trial._trial_id)
            return stale

        def get_heartbeat_interval(self) -> int:
            return interval

        def get_heartbeat_stale_trial_callback(self) -> Callable[..., None]:
            return retry

    return HeartbeatJournal(JournalFileBackend(str(out / JOURNAL)))


def fail_left_running(study: Any, storage: Any) -> list[int]:
    """Fail every trial left running and queue its retry. Only for a study in DIR, whose lock this
    process holds: no other process can be running its trials (a database's trials wait for their
    heartbeats to go stale instead)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                failed.append(trial.number)
                storage.get_heartbeat_stale_trial_callback()(study, storage.get_trial(trial._trial_id))
        except UpdateFinishedTrialError:
            pass
    return failed


# ---- trials -------------------------------------------------------------------------------------------------------
def make_sampler(record: TuneRecord, finished: int, worker: int) -> Any:
    """A sampler seeded from (seed, finished trials, worker): a resumed study draws what an uninterrupted
    one would have drawn from the same trials, and workers draw apart."""
    import optuna

    seed = derive_seed(record.seed, f"tune-sampler:{finished}:{worker}") % 2**32
    if record.sampler["name"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=record.sampler["n_startup_trials"],
                                      multivariate=record.sampler["multivariate"], constant_liar=True)


def make_pruner(record: TuneRecord) -> Any:
    import optuna

    if record.pruner["name"] == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=record.pruner["n_startup_trials"],
                                       n_warmup_steps=record.pruner["n_warmup_steps"])


class _Pruning:
    """Reports each evaluated epoch's validation accuracy (step = evaluated epochs so far, over the
    search and the ticket's training) and stops the trial where the pruner says so."""

    def __init__(self, trial: Any) -> None:
        self.trial, self.step = trial, 0

    def __call__(self, row: dict[str, Any]) -> None:
        import optuna

        if "test_acc" not in row:  # under data.eval_split val this is the validation accuracy
            return
        self.trial.report(float(row["test_acc"]), self.step)
        self.step += 1
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at {row.get('phase')} epoch {row.get('epoch')}")


def _objective(overrides: dict[str, Any], chosen: list[Space], out: Path,
               progress: bool) -> Callable[[Any], float]:
    from gemminer.checkpoint import StopRequested
    from gemminer.experiment import mine
    from gemminer.train import Diverged

    def objective(trial: Any) -> float:
        import optuna

        values = {space.name: space.suggest(trial) for space in chosen}
        config = base_config(merge(overrides, _nested(values)))
        config.checkpoint_every = 0  # a dead trial is retried from its start: no per-epoch checkpoints
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", socket.gethostname())
        folder = out / "trials" / f"{trial.number:04d}"
        try:
            summary = mine(config, folder, force=True, progress=progress, resume=False, observe=_Pruning(trial))
        except Diverged as err:  # a hopeless setting spent its budget: counted as pruned, not retried
            trial.set_user_attr("diverged", True)
            raise optuna.TrialPruned(str(err).split(";")[0]) from None
        except StopRequested:
            trial.study.enqueue_trial(values, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
            raise
        finally:
            (folder / "checkpoint.pt").unlink(missing_ok=True)
        return float(summary["acc_after_finetune"])

    return objective


def _trial_line(trial: Any) -> str:
    params = ", ".join(f"{key} {_number(value)}" for key, value in trial.params.items())
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
        if trial.datetime_complete and trial.datetime_start else 0.0
    state = trial.state.name.lower()
    if state == "complete":
        outcome = f"val acc {trial.value:.4f}"
    elif state == "pruned":
        last = trial.intermediate_values
        outcome = "diverged" if trial.user_attrs.get("diverged") else \
            f"pruned at step {max(last)} (val acc {last[max(last)]:.4f})" if last else "pruned"
    else:
        outcome = state
    return f"trial {trial.number}: {outcome} | {params} ({seconds:.0f} s)"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def counts(study: Any) -> tuple[int, int]:
    """(finished, running) trials: complete and pruned count toward --trials, failed ones do not."""
    from optuna.trial import TrialState

    finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    return finished, len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def work(study: Any, record: TuneRecord, overrides: dict[str, Any], chosen: list[Space], out: Path, target: int,
         worker: int = 0, progress: bool = True, report: Callable[[str], None] | None = print) -> None:
    """Run trials until the study holds `target` finished ones (counting those running elsewhere)."""
    objective = _objective(overrides, chosen, out, progress)

    def said(study: Any, trial: Any) -> None:
        (out / "heartbeats" / str(trial._trial_id)).unlink(missing_ok=True)
        if report is not None:
            report(_trial_line(trial))

    while True:
        finished, running = counts(study)
        if finished + running >= target:
            return
        study.sampler = make_sampler(record, finished, worker)
        study.optimize(objective, n_trials=1, catch=(), callbacks=[said], gc_after_trial=False)


def _worker(arguments: dict[str, Any]) -> None:
    """A --jobs process: its own storage connection and RNG; one error line and exit 2 on bad input."""
    import torch

    from gemminer.checkpoint import StopRequested

    if "OMP_NUM_THREADS" not in os.environ:  # share the cores, not oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // arguments["jobs"]))
    _quiet_optuna()
    try:
        record = TuneRecord(**arguments["record"])
        out = Path(arguments["out"])
        storage = open_storage(out, record.storage if not arguments["url"] else "url", arguments["url"],
                               arguments["heartbeat"])
        study = _load(record, storage)
        work(study, record, arguments["overrides"], chosen_spaces(record.method, record.params), out,
             arguments["trials"], arguments["worker"], progress=False,
             report=lambda line: print(f"[{arguments['worker']}] {line}", flush=True))
    except GemminerError as err:
        print(f"gemminer: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except StopRequested as stop:
        sys.exit(130 if stop.signal_name == "SIGINT" else 143)
    except KeyboardInterrupt:
        sys.exit(130)


def _load(record: TuneRecord, storage: Any) -> Any:
    import optuna

    return optuna.create_study(study_name=record.study, storage=storage, direction="maximize",
                               load_if_exists=True, pruner=make_pruner(record))


def _quiet_optuna() -> None:
    """Optuna's per-trial log lines and experimental-feature warnings off: tune prints one line per trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")


# ---- the command --------------------------------------------------------------------------------------------------
@dataclass
class TuneResult:
    finished: int
    best_value: float | None
    best_params: dict[str, Any]
    files: list[Path]


def tune(overrides: dict[str, Any], out: str | Path, params: list[str] | None = None, trials: int = 20,
         jobs: int = 1, storage: str | None = None, study_name: str | None = None, sampler: str = "tpe",
         pruner: str = "median", progress: bool = True, report: Callable[[str], None] | None = print,
         heartbeat: tuple[int, int] = (HEARTBEAT_SECONDS, GRACE_SECONDS)) -> TuneResult:
    """Tune `params` of the run config `overrides` (a nested dict, as `mine` takes) until the study in
    `out` holds `trials` finished trials; write the best settings, the trial history and the plots."""
    from gemminer.checkpoint import StopRequested
    from gemminer.config import check_integer
    from gemminer.runs import folder_lock

    try:
        import optuna  # noqa: F401
    except ImportError:
        raise GemminerError("tune needs Optuna: pip install 'gemminer[tune]'") from None
    check_integer("--trials", trials, 1)
    check_integer("--jobs", jobs, 1)
    out = Path(out)
    _quiet_optuna()
    with folder_lock(out):  # one tune command per folder; its workers run under this lock
        storage_name = _storage_name(storage, out, jobs)
        record, chosen, _ = describe(overrides, params, sampler, pruner, storage_name, study_name)
        saved_path = out / TUNE_FILE
        if saved_path.is_file():
            from gemminer.config import load_yaml

            check_same_study(load_yaml(str(saved_path)), record, str(out))
        opened = open_storage(out, storage_name, storage, heartbeat)
        study = _load(record, opened)
        saved = study.user_attrs.get("gemminer_tune")
        if saved is not None:  # a shared database: every machine's command must describe the same study
            check_same_study(saved, record, f"study {record.study!r}")
        else:
            study.set_user_attr("gemminer_tune", record.record())
        if not saved_path.is_file():
            saved_path.write_text(yaml.safe_dump(record.record(), sort_keys=False))
        if not storage:
            failed = fail_left_running(study, opened)
            if failed and report is not None:
                report(f"trials left running by a stopped process failed and queued again: "
                       f"{', '.join(map(str, failed))}")
        finished, _ = counts(study)
        if report is not None:
            report(f"study {record.study} ({storage_name}): {finished} finished trials, {trials} wanted; tuning "
                   f"{', '.join(record.params)} of {record.method} at density {record.density:g}")
        try:
            if jobs == 1:
                work(study, record, overrides, chosen, out, trials, progress=progress, report=report)
            else:
                _run_workers(record, overrides, out, trials, jobs, storage, heartbeat)
        except (StopRequested, KeyboardInterrupt):
            write_outputs(study, record, overrides, out)  # the trials finished so far, for a study stopped early
            raise
        return write_outputs(study, record, overrides, out)


def _run_workers(record: TuneRecord, overrides: dict[str, Any], out: Path, trials: int, jobs: int, url: str | None,
                 heartbeat: tuple[int, int]) -> None:
    """`jobs` processes (spawned: each its own interpreter and RNG, never threads) on one study."""
    from gemminer.checkpoint import StopRequested

    context = multiprocessing.get_context("spawn")
    arguments = {"record": record.record(), "overrides": overrides, "out": str(out), "trials": trials,
                 "jobs": jobs, "url": url, "heartbeat": heartbeat}
    processes = [context.Process(target=_worker, args=({**arguments, "worker": worker},), daemon=False)
                 for worker in range(jobs)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        for process in processes:  # they got the SIGINT too and stop after their current step
            process.join()
        raise StopRequested("SIGINT") from None
    codes = [process.exitcode for process in processes]
    if any(code in (130, 143) for code in codes):
        raise StopRequested("SIGINT" if 130 in codes else "SIGTERM")
    bad = [f"worker {index} exit code {code}" for index, code in enumerate(codes) if code]
    if bad:
        raise GemminerError(f"tune workers failed ({', '.join(bad)}); their errors are printed above")


# ---- outputs ------------------------------------------------------------------------------------------------------
def best_settings(record: TuneRecord, overrides: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The settings `mine --config` and a grid variant take: the keys the command set (not the tuning
    protocol's: density, seed, validation split), as resolved, with the tuned values."""
    resolved = flatten(dataclasses.asdict(base_config(merge(overrides, _nested(values)))))
    keys = [key for key in flatten(overrides) if key not in PROTOCOL and key in resolved] + list(values)
    given = {key: resolved[key] for key in dict.fromkeys(keys)}
    given.pop("method", None)
    tree = _nested({key: value for key, value in given.items() if "." in key})
    return {"method": record.method, **{key: value for key, value in given.items() if "." not in key}, **tree}


def write_outputs(study: Any, record: TuneRecord, overrides: dict[str, Any], out: Path) -> TuneResult:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    files = [write_history(trials, record.params, out / TRIALS_CSV)]
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    finished, _ = counts(study)
    best_value, best_params = None, {}
    if complete:
        best = max(complete, key=lambda trial: (trial.value, -trial.number))
        best_value, best_params = best.value, dict(best.params)
        header = (f"# gemminer tune: the best of {finished} finished trials (trial {best.number}, validation accuracy "
                  f"{best.value:.4f})\n# {record.method} at density {record.density:g}, seed {record.seed}. Use: "
                  f"gemminer mine --config {out / BEST_FILE} --density {record.density:g} --out RUN\n")
        settings = best_settings(record, overrides, best_params)
        (out / BEST_FILE).write_text(header + yaml.safe_dump(settings, sort_keys=False))
        files.append(out / BEST_FILE)
    files += write_plots(study, out / "plots")
    return TuneResult(finished, best_value, best_params, files)


def write_history(trials: list[Any], params: list[str], path: Path) -> Path:
    """One row per trial (any state), its parameters and outcome, with the csv module."""
    columns = ["number", "state", "value", *params, "last_step", "last_intermediate", "retry_of", "diverged",
               "seconds", "started", "completed", "pid", "host"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for trial in trials:
            steps = trial.intermediate_values
            last = max(steps) if steps else None
            seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
                if trial.datetime_complete and trial.datetime_start else None
            retry_of = trial.system_attrs.get("failed_trial", trial.user_attrs.get("retry_of"))
            values = trial.params or trial.system_attrs.get("fixed_params") or {}  # a queued trial's are fixed
            writer.writerow({"number": trial.number, "state": trial.state.name.lower(), "value": trial.value,
                             **{name: values.get(name) for name in params}, "last_step": last,
                             "last_intermediate": steps[last] if last is not None else None, "retry_of": retry_of,
                             "diverged": bool(trial.user_attrs.get("diverged")),
                             "seconds": round(seconds, 3) if seconds is not None else None,
                             "started": trial.datetime_start.isoformat(timespec="seconds") if trial.datetime_start
                             else None,
                             "completed": trial.datetime_complete.isoformat(timespec="seconds")
                             if trial.datetime_complete else None,
                             "pid": trial.user_attrs.get("pid"), "host": trial.user_attrs.get("host")})
    return path


def write_plots(study: Any, folder: Path) -> list[Path]:
    """history.png (every complete trial's value and the best so far) and importances.png (each
    parameter's importance, Optuna's default estimate; it needs two complete trials with different values)."""
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    from gemminer.plots import _pyplot

    pyplot = _pyplot()
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    plots = [("history.png", optuna_plots.plot_optimization_history)]
    if len(complete) >= 2 and len({tuple(sorted(t.params.items())) for t in complete}) >= 2:
        plots.append(("importances.png", optuna_plots.plot_param_importances))
    for name, plot in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                axes = plot(study, target_name="validation accuracy")
            except (ValueError, RuntimeError):  # too few distinct trials for an importance estimate
                continue
        figure = axes.figure
        figure.set_size_inches(7, 4.5)
        figure.tight_layout()
        try:
            figure.savefig(folder / name, dpi=120)
        except OSError as err:
            raise GemminerError(f"cannot write the plot {folder / name}: {err.strerror or err}") from err
        finally:
            pyplot.close(figure)
        written.append(folder / name)
    return written

