"""The run folder's lock: a second writer is refused and touches nothing; a killed holder's lock goes with it."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemminer.cli import main
from gemminer.config import resolve
from gemminer.errors import GemminerError
from gemminer.experiment import mine
from gemminer.runs import RunFolder, folder_lock
from tests.conftest import tiny_overrides

pytest.importorskip("fcntl")

RUN_FLAGS = ["--density", "0.05", "--epochs", "8", "--search-freeze-period", "2", "--finetune-epochs", "2",
             "--model-width", "16", "--data-num-samples", "1000", "--data-batch-size", "32",
             "--bn-recalibration-batches", "3", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process: two cores are shared


def mine_command(out: Path, data_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gemminer", "mine", "--out", str(out), *RUN_FLAGS, "--data-dir", data_dir, *extra]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(folder.iterdir())}


def search_rows(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.startswith("search,"))
    except FileNotFoundError:
        return 0


def test_a_second_writer_is_refused_and_touches_nothing(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("density: 0.5\n")  # an unfinished run of another config
    (out / "checkpoint.pt").write_bytes(b"not really a checkpoint")
    with folder_lock(out):
        assert (out / ".lock").read_text() == f"pid {os.getpid()} on host {socket.gethostname()}\n"
        before = snapshot(out)
        refused = subprocess.run(mine_command(out, data_dir, "--force"), capture_output=True, text=True, env=ENV)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("gemminer: error: ")
        assert f"{out} is in use by pid {os.getpid()} on host" in refused.stderr
        assert "(another gemminer run writes there); wait for it or choose another --out" in refused.stderr
        assert snapshot(out) == before  # --force deleted nothing, wrote no config and no metrics
        # another open file of the same process is refused just the same (flock locks open files)
        assert main(["mine", "--out", str(out), *RUN_FLAGS, "--data-dir", data_dir]) == 2
        assert "in use by pid" in capsys.readouterr().err
        assert snapshot(out) == before
    assert snapshot(out) == before


def test_a_killed_holder_releases_the_lock_and_its_run_resumes(tmp_path, data_dir, capsys):
    out = tmp_path / "killed"
    holder = subprocess.Popen(mine_command(out, data_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=ENV)
    deadline = time.monotonic() + 120
    while search_rows(out / "metrics.csv") < 3 and holder.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    holder.send_signal(signal.SIGSTOP)  # frozen mid-search, still holding the lock
    try:
        assert holder.poll() is None, "the run finished before it could be stopped"
        before = snapshot(out)
        assert main(["mine", "--out", str(out), *RUN_FLAGS, "--data-dir", data_dir, "--force"]) == 2
        assert f"in use by pid {holder.pid} on host" in capsys.readouterr().err
        assert snapshot(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()

    resumed = subprocess.run(mine_command(out, data_dir), capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the unfinished run" in resumed.stderr
    assert (out / "summary.json").is_file() and search_rows(out / "metrics.csv") == 8


def test_the_lock_is_released_after_a_run_and_a_failed_one(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    mine(resolve(tiny_overrides(data_dir)), out, progress=False)
    assert (out / ".lock").is_file() and RunFolder(out).finished
    flags = ["--density", "0.1", "--model-width", "8", "--data-num-samples", "500", "--data-dir", data_dir, "--quiet"]
    assert main(["mine", "--out", str(out), *flags]) == 2
    error = capsys.readouterr().err
    assert "holds a finished run" in error and "in use" not in error
    with folder_lock(out):  # free again
        pass

    with pytest.raises(RuntimeError, match="boom"):  # an exception inside the session releases it too
        with folder_lock(out):
            raise RuntimeError("boom")
    with folder_lock(out):
        pass


def test_force_keeps_the_lock_file_and_a_new_empty_folder_is_not_left_behind(tmp_path, data_dir):
    config = resolve(tiny_overrides(data_dir))
    folder = RunFolder(tmp_path / "run")
    with folder.lock():
        with folder.lock():  # re-entrant within one RunFolder
            folder.start(config, force=True)
        assert (folder.path / ".lock").is_file() and (folder.path / "config.yaml").is_file()
        with pytest.raises(GemminerError, match="in use by pid"):  # another writer cannot start it over
            RunFolder(folder.path).start(config, force=True)
    assert (folder.path / "config.yaml").is_file()

    empty = tmp_path / "new" / "run"
    with folder_lock(empty):
        assert (empty / ".lock").is_file()
    assert not (tmp_path / "new").exists()  # only the lock was there: no folder is left behind

    other_rank = RunFolder(tmp_path / "rank1", writer=False)
    with other_rank.lock():
        assert not other_rank.path.exists()  # under torchrun only rank 0 takes the lock
