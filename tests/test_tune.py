"""`gemminer tune`: studies on tiny data, top-ups, refusals, killed trials, several processes, PostgreSQL."""

import csv
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna", reason="tune needs optuna (pip install 'gemminer[tune]')")

from conftest import tiny_overrides  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from gemminer import experiment  # noqa: E402
from gemminer.cli import main  # noqa: E402
from gemminer.config import merge, resolve  # noqa: E402
from gemminer.errors import GemminerError  # noqa: E402
from gemminer.grid import load_grid  # noqa: E402
from gemminer.tune import chosen_spaces, open_storage, spaces, tune  # noqa: E402


def overrides(data_dir, **extra):
    """A trial that takes well under a second: 3 search epochs, 1 fine-tuning epoch, 100 validation samples."""
    return merge(tiny_overrides(data_dir, data={"val_size": 100}, search={"epochs": 3}, finetune={"epochs": 1}), extra)


def load(out, name="gemminer-d0.1"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{Path(out) / 'study.db'}")


def test_three_trial_study_writes_its_files_and_tops_up(tmp_path, data_dir):
    out = tmp_path / "study"
    lines = []
    result = tune(overrides(data_dir), out, trials=3, progress=False, report=lines.append)
    assert result.finished == 3
    study = load(out)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for name in ("tune.yaml", "study.db", "trials.csv", "best.yaml", "plots/history.png"):
        assert (out / name).is_file(), name
    record = yaml.safe_load((out / "tune.yaml").read_text())
    assert record["params"] == ["search.lr", "finetune.lr", "finetune.weight_decay"]  # lambda is not tuned
    assert record["spaces"]["finetune.lr"] == {"type": "float", "low": 1e-3, "high": 1.0, "log": True}
    assert record["sampler"]["seed"] == 0 and record["config"]["data.eval_split"] == "val"
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert [int(row["number"]) for row in rows] == [0, 1, 2]
    assert all(float(row["finetune.lr"]) > 0 for row in rows)
    # each trial is a run folder measured on the validation split
    summary = json.loads((out / "trials" / "0000" / "summary.json").read_text())
    assert summary["acc_after_finetune"] == pytest.approx(trials[0].value)
    # the best settings: a mine config and a grid variant
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["method"] == "gemminer" and "density" not in best and "seed" not in best
    assert "val_size" not in best.get("data", {}) and "eval_split" not in best.get("data", {})
    winner = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert best["finetune"]["lr"] == winner.params["finetune.lr"] and best["search"]["lr"] == winner.params["search.lr"]
    config = resolve(merge(best, {"density": 0.1}))
    assert config.finetune.lr == winner.params["finetune.lr"] and config.data.val_size == 0
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"densities": [0.1], "variants": {"tuned": best}}))
    assert load_grid(grid).variants[0].overrides["search"]["lr"] == winner.params["search.lr"]
    # a rerun with as many trials runs none; more trials top the study up, keeping the first three
    before = [(t.number, t.state, t.value, t.params) for t in trials]
    assert tune(overrides(data_dir), out, trials=3, progress=False, report=None).finished == 3
    assert tune(overrides(data_dir), out, trials=4, progress=False, report=None).finished == 4
    after = load(out).get_trials()
    assert [(t.number, t.state, t.value, t.params) for t in after[:3]] == before and len(after) == 4


def test_changed_settings_are_refused_in_one_line(tmp_path, data_dir, capsys):
    out = tmp_path / "study"
    tune(overrides(data_dir), out, params=["finetune.lr"], trials=1, progress=False, report=None)
    with pytest.raises(GemminerError, match=r"other settings \(params finetune.lr there, finetune.lr,"):
        tune(overrides(data_dir), out, params=["finetune.lr", "finetune.weight_decay"], trials=1, report=None)
    with pytest.raises(GemminerError, match=r"other settings \(density 0\.1 there, 0\.2 here"):
        tune(overrides(data_dir, density=0.2), out, params=["finetune.lr"], trials=1, report=None)
    with pytest.raises(GemminerError, match=r"data\.num_samples 500 there, 600 here"):
        tune(overrides(data_dir, data={"num_samples": 600}), out, params=["finetune.lr"], trials=1, report=None)
    with pytest.raises(GemminerError, match="one-process study"):
        tune(overrides(data_dir), out, params=["finetune.lr"], trials=1, jobs=2, report=None)
    flags = ["tune", "--out", str(out), "--density", "0.1", "--data-dir", data_dir, "--data-num-samples", "500",
             "--data-val-size", "100", "--params", "search.lr", "--trials", "1"]
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings" in err and "Traceback" not in err
    assert len(load(out).get_trials()) == 1  # nothing ran


def test_bad_tune_input(tmp_path, data_dir):
    with pytest.raises(GemminerError, match="give --data-val-size"):
        tune(tiny_overrides(data_dir), tmp_path / "a", trials=1, report=None)
    with pytest.raises(GemminerError, match=r"search\.momentum has no search space for gemminer; tunable: .*lr"):
        tune(overrides(data_dir), tmp_path / "b", params=["search.momentum"], trials=1, report=None)
    with pytest.raises(GemminerError, match="drop --data-eval-split"):
        tune(overrides(data_dir, data={"eval_split": "test"}), tmp_path / "c", trials=1, report=None)
    with pytest.raises(GemminerError, match=r"finetune\.lr is tuned, so it cannot also be set"):
        tune(overrides(data_dir, finetune={"lr": 0.1}), tmp_path / "d", trials=1, report=None)
    assert not (tmp_path / "b" / "tune.yaml").exists()


def test_spaces_are_declared_on_the_fields():
    gem = spaces("gemminer")
    assert gem["search.reg_lambda"].kind == "float" and gem["search.reg_lambda"].log  # only when --params names it
    assert gem["search.freeze_period"].kind == "int"
    assert gem["finetune.lr_schedule"].choices == ("multistep", "cosine")
    assert [s.name for s in chosen_spaces("imp", None)] == ["finetune.lr", "finetune.weight_decay"]
    assert [s.name for s in chosen_spaces("snip", None)] == ["finetune.lr", "finetune.weight_decay"]
    assert "search.lr" in [s.name for s in chosen_spaces("edge-popup", None)]


def test_the_test_split_is_never_read(tmp_path, data_dir, monkeypatch):
    class Poisoned:
        """Any use of the test split fails the test."""

        def __getattr__(self, name):
            raise AssertionError(f"the test split was read ({name})")

        def __len__(self):
            raise AssertionError("the test split was read (len)")

    real = experiment.load_dataset

    def without_test(*args, **kwargs):
        dataset = real(*args, **kwargs)
        dataset.test = Poisoned()
        return dataset

    monkeypatch.setattr(experiment, "load_dataset", without_test)
    result = tune(overrides(data_dir), tmp_path / "study", trials=2, progress=False, report=None)
    assert result.finished == 2 and result.best_value is not None
    with pytest.raises((AssertionError, GemminerError), match="the test split was read"):  # the poison bites
        experiment.mine(resolve(tiny_overrides(data_dir)), tmp_path / "run", progress=False)


def _tune_command(out, data_dir, trials, epochs):
    return [sys.executable, "-m", "gemminer", "tune", "--out", str(out), "--density", "0.1", "--quiet",
            "--data-dir", data_dir, "--data-num-samples", "500", "--data-batch-size", "64", "--model-width", "8",
            "--data-val-size", "100", "--epochs", str(epochs), "--search-freeze-period", "1",
            "--finetune-epochs", str(epochs), "--bn-recalibration-batches", "3", "--trials", str(trials)]


def _wait_for_the_second_trial(process, out):
    """Until the second trial of a `tune` process has written an epoch (so the first one has finished)."""
    deadline = time.monotonic() + 120
    second = out / "trials" / "0001" / "metrics.jsonl"
    while not (second.is_file() and second.stat().st_size > 0):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the second trial did not start"
        time.sleep(0.05)


def test_sigkill_mid_trial_then_rerun_keeps_finished_trials_and_fails_the_stale_one(tmp_path, data_dir):
    out = tmp_path / "study"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(_tune_command(out, data_dir, 3, 12), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        _wait_for_the_second_trial(process, out)
        assert (out / "trials" / "0000" / "summary.json").is_file()
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
        process.stderr.close()
    before = load(out).get_trials()
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.RUNNING]
    lines = []
    result = tune(merge(overrides(data_dir), {"search": {"epochs": 12, "freeze_period": 1},
                                              "finetune": {"epochs": 12}}),
                  out, trials=3, progress=False, report=lines.append)
    assert result.finished == 3
    after = load(out).get_trials()
    assert (after[0].state, after[0].value, after[0].params) == (TrialState.COMPLETE, before[0].value, before[0].params)
    assert after[1].state == TrialState.FAIL
    retried = [t for t in after if t.system_attrs.get("failed_trial") == 1]
    assert len(retried) == 1 and retried[0].params == before[1].params and retried[0].state != TrialState.FAIL
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in after) == 3
    assert any("left running" in line and "1" in line for line in lines)
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert rows[1]["state"] == "fail" and rows[retried[0].number]["retry_of"] == "1"


def test_sigint_mid_trial_queues_it_again_and_writes_the_history(tmp_path, data_dir):
    out = tmp_path / "study"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(_tune_command(out, data_dir, 3, 12), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        _wait_for_the_second_trial(process, out)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and "stopped by SIGINT" in err.decode()
    trials = load(out).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert trials[2].system_attrs["fixed_params"] == trials[1].params  # the stopped trial runs again first
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert [row["state"] for row in rows] == ["complete", "fail", "waiting"] and (out / "best.yaml").is_file()
    assert rows[2]["finetune.lr"] == rows[1]["finetune.lr"] and rows[2]["retry_of"] == "1"


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_journal_heartbeat_fails_a_silent_trial_and_queues_it_again(tmp_path):
    storage = open_storage(tmp_path, "journal", None, (1, 1))
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    storage.record_heartbeat(trial._trial_id)
    optuna.storages.fail_stale_trials(study)
    assert study.get_trials()[0].state == TrialState.RUNNING  # its heartbeat is fresh
    time.sleep(1.6)
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert trials[1].state == TrialState.WAITING and trials[1].params == trials[0].params


def test_two_processes_share_one_journal_study(tmp_path, data_dir):
    out = tmp_path / "study"
    result = tune(overrides(data_dir), out, params=["finetune.lr"], trials=4, jobs=2, progress=False, report=None)
    assert (out / "journal.log").is_file() and not (out / "study.db").exists()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="gemminer-d0.1",
                              storage=JournalStorage(JournalFileBackend(str(out / "journal.log"))))
    finished = [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 4 <= len(finished) == result.finished <= 5  # a worker may start one more while the last one runs
    pids = {t.user_attrs["pid"] for t in finished}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, neither of them this one
    assert len({t.number for t in finished}) == len(finished)
    assert len({t.params["finetune.lr"] for t in finished}) == len(finished)  # the workers' samplers draw apart


def _postgres_tools():
    found = {name: shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
             for name in ("initdb", "pg_ctl")}
    return found if all(found.values()) else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server in a temporary folder, on a Unix socket there; skipped where the machine
    has no initdb/pg_ctl or no psycopg."""
    pytest.importorskip("psycopg", reason="the PostgreSQL storage needs psycopg (pip install 'gemminer[tune]')")
    pytest.importorskip("sqlalchemy", reason="the database storage needs SQLAlchemy (pip install 'gemminer[tune]')")
    tools = _postgres_tools()
    if tools is None:
        pytest.skip("no PostgreSQL server on this machine (initdb and pg_ctl not found)")
    user = None
    if os.geteuid() == 0:  # initdb refuses root
        for name in ("postgres", "nobody"):
            try:
                user = pwd.getpwnam(name)
                break
            except KeyError:
                continue
        if user is None:
            pytest.skip("running as root with no other user for the PostgreSQL server")
    folder = Path(tempfile.mkdtemp(prefix="gmpg"))  # short: a Unix socket path has a length limit
    if user is not None:
        os.chown(folder, user.pw_uid, user.pw_gid)
    run_as = {"user": user.pw_uid} if user is not None else {}
    port = 40000 + os.getpid() % 20000
    try:
        subprocess.run([tools["initdb"], "-D", str(folder / "data"), "-U", "postgres", "--auth=trust", "--no-sync"],
                       check=True, capture_output=True, **run_as)
        subprocess.run([tools["pg_ctl"], "-D", str(folder / "data"), "-l", str(folder / "log"), "-w", "-o",
                        f"-p {port} -k {folder} -c listen_addresses=''", "start"],
                       check=True, capture_output=True, **run_as)
    except subprocess.CalledProcessError as err:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"the local PostgreSQL server did not start: {err.stderr.decode(errors='replace')[-200:]}")
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={folder}&port={port}"
    finally:
        subprocess.run([tools["pg_ctl"], "-D", str(folder / "data"), "-m", "immediate", "-w", "stop"],
                       capture_output=True, **run_as)
        shutil.rmtree(folder, ignore_errors=True)


def test_postgresql_storage_shares_one_study(tmp_path, data_dir, postgres_url):
    first = tune(overrides(data_dir), tmp_path / "machine-a", params=["finetune.lr"], trials=2, storage=postgres_url,
                 progress=False, report=None)
    assert first.finished == 2 and not (tmp_path / "machine-a" / "study.db").exists()
    # a second machine (another folder) tops up the same study
    second = tune(overrides(data_dir), tmp_path / "machine-b", params=["finetune.lr"], trials=3, storage=postgres_url,
                  progress=False, report=None)
    assert second.finished == 3
    study = optuna.load_study(study_name="gemminer-d0.1", storage=postgres_url)
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 3
    # a machine with other settings is refused by the study's own record
    with pytest.raises(GemminerError, match=r"study 'gemminer-d0\.1' holds a study of other settings"):
        tune(overrides(data_dir), tmp_path / "machine-c", params=["finetune.weight_decay"], trials=3,
             storage=postgres_url, report=None)
