"""Checkpoint, resume and faults: a real SIGKILL, corrupt files, divergence, config mismatch, disk full."""

import csv
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gemminer.checkpoint import load_checkpoint, save_checkpoint
from gemminer.cli import main
from gemminer.errors import GemminerError
from gemminer.ticket import Ticket
from tests.conftest import not_exact_on_cuda

RUN_FLAGS = ["--density", "0.05", "--epochs", "8", "--search-freeze-period", "2", "--finetune-epochs", "2",
             "--model-width", "16", "--data-num-samples", "1000", "--data-batch-size", "32",
             "--bn-recalibration-batches", "3", "--quiet"]
NOT_EXACT = ("bit-exact resume needs deterministic algorithms, which gemminer does not switch on; "
             "benchmarks/gpu_check.sh checks it with them, and within the CUDA tolerance of docs/runs.md without")


def run_flags(device: torch.device) -> list[str]:
    return [*RUN_FLAGS, "--device", str(device)]


def mine_command(out: Path, data_dir: str, device: torch.device) -> list[str]:
    return [sys.executable, "-m", "gemminer", "mine", "--out", str(out), *run_flags(device), "--data-dir", data_dir]


# one thread per process: the suite shares two cores with the test runner (and, on a busy machine, more)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def metrics_without_clock(path: Path) -> list[dict]:
    with open(path) as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def search_rows(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.startswith("search,"))
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir, device):
    out = tmp_path_factory.mktemp("resume") / "reference"
    subprocess.run(mine_command(out, data_dir, device), check=True, capture_output=True, env=ENV)
    return out


def test_sigkill_mid_search_then_resume_gives_the_same_ticket(uninterrupted, tmp_path, data_dir, device, request):
    not_exact_on_cuda(request, device, NOT_EXACT)
    out = tmp_path / "killed"
    process = subprocess.Popen(mine_command(out, data_dir, device), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 120
    while search_rows(out / "metrics.csv") < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "summary.json").exists()
    assert 3 <= search_rows(out / "metrics.csv") < 8

    resumed = subprocess.run(mine_command(out, data_dir, device), capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the unfinished run" in resumed.stderr
    first, second = Ticket.load(uninterrupted / "ticket.safetensors"), Ticket.load(out / "ticket.safetensors")
    assert all(torch.equal(first.masks[name], second.masks[name]) for name in first.masks)
    assert metrics_without_clock(out / "metrics.csv") == metrics_without_clock(uninterrupted / "metrics.csv")
    assert not (out / "checkpoint.pt").exists()  # a finished run drops its checkpoint


def test_sigterm_checkpoints_mid_epoch_and_resumes_exactly(uninterrupted, tmp_path, data_dir, device, request):
    not_exact_on_cuda(request, device, NOT_EXACT)
    out = tmp_path / "stopped"
    process = subprocess.Popen(mine_command(out, data_dir, device), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=ENV)
    while search_rows(out / "metrics.csv") < 2 and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate()
    assert process.returncode == 143 and "run the same command again to resume" in stderr
    assert (out / "checkpoint.pt").is_file()
    assert subprocess.run(mine_command(out, data_dir, device), capture_output=True, env=ENV).returncode == 0
    assert metrics_without_clock(out / "metrics.csv") == metrics_without_clock(uninterrupted / "metrics.csv")


def test_resume_with_another_config_names_the_keys(uninterrupted, tmp_path, data_dir, device, capsys):
    out = tmp_path / "unfinished"
    out.mkdir()
    for name in ("config.yaml", "init.safetensors", "metrics.jsonl"):  # a run that has computed something
        (out / name).write_bytes((uninterrupted / name).read_bytes())
    flags = [*run_flags(device), "--data-dir", data_dir]
    flags[flags.index("--density") + 1] = "0.1"
    assert main(["mine", "--out", str(out), *flags]) == 2
    error = capsys.readouterr().err
    assert "another config" in error and "density (0.05 -> 0.1)" in error
    assert main(["mine", "--resume", "--out", str(tmp_path / "nothing"), *flags]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_corrupt_checkpoint_is_detected(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"weights": torch.arange(100.0), "epoch": 3})
    assert load_checkpoint(path)["epoch"] == 3
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(GemminerError, match="corrupt or truncated"):
        load_checkpoint(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(GemminerError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_corrupt_ticket_is_detected(uninterrupted, tmp_path):
    raw = bytearray((uninterrupted / "ticket.safetensors").read_bytes())
    raw[-1] ^= 0x01  # flip one mask bit: the file still parses
    (tmp_path / "t.safetensors").write_bytes(bytes(raw))
    with pytest.raises(GemminerError, match="corrupt"):
        Ticket.load(tmp_path / "t.safetensors")


def test_divergence_stops_with_a_clear_error(tmp_path, data_dir, capsys):
    out = tmp_path / "nan"
    flags = ["--method", "dense", "--model", "mlp", "--finetune-lr", "1e6", "--finetune-epochs", "2",
             "--model-width", "8", "--data-num-samples", "500", "--data-dir", data_dir, "--quiet"]
    assert main(["mine", "--out", str(out), *flags]) == 2
    assert "diverged" in capsys.readouterr().err
    assert not (out / "summary.json").exists()


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})
    real_fsync = os.fsync

    def full(fd):
        real_fsync(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(GemminerError, match=r"disk is full.*previous checkpoint .* is intact"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


def test_layer_collapse_warns_and_is_recorded(tmp_path, data_dir):
    import json

    from gemminer.config import resolve
    from gemminer.experiment import LayerCollapse, mine, setup
    from gemminer.methods.random import RandomTicket
    from tests.conftest import tiny_overrides

    overrides = tiny_overrides(data_dir, method="random")
    overrides["search"] = {}
    reference = RandomTicket(0.3).find(setup(resolve(overrides)).model, [])
    first = next(iter(reference.masks))
    reference.masks[first][:] = False  # the first layer keeps nothing
    reference.save(tmp_path / "collapsed.safetensors")
    overrides["search"] = {"like_ticket": str(tmp_path / "collapsed.safetensors")}
    with pytest.warns(LayerCollapse, match=first):
        mine(resolve(overrides), tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["layer_collapse"] == [first]
