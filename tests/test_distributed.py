"""Two processes on CPU (gloo) under torchrun: identical masks on both ranks, and the same
ticket as one process up to float reduction order."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from gemminer.ticket import Ticket

FLAGS = ["--model", "mlp", "--model-width", "32", "--finetune-epochs", "2", "--data-num-samples", "1000",
         "--data-batch-size", "64", "--quiet"]
METHOD_FLAGS = {
    "gemminer": ["--density", "0.05", "--epochs", "4", "--search-freeze-period", "1"],
    "snip": ["--method", "snip", "--density", "0.05", "--search-batches", "2"],
    "imp": ["--method", "imp", "--density", "0.5", "--epochs", "2", "--search-rewind", "epoch:0.5"],
}
# every rank writes the masks its own search found, so the test can compare the ranks
RANK_DUMP = """
import sys, torch
from gemminer import cli, distributed
from gemminer.methods.base import PruningMethod
original = PruningMethod.search
prefix = sys.argv.pop()
def spy(self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    torch.save(dict(result.ticket.masks), f"{prefix}.rank{distributed.rank()}.pt")
    return result
PruningMethod.search = spy
sys.exit(cli.main(sys.argv[1:]))
"""


def failure_lines(stderr: str) -> str:
    """What the ranks said before torchrun's summary (which alone fills the tail): errors, aborts."""
    said = [line for line in stderr.splitlines() if any(word in line for word in ("rror", "terminate", "what()",
                                                                                    "enforce", "Abort"))]
    return "\n".join(said[:40]) + "\n...\n" + stderr[-1500:]


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
@pytest.mark.parametrize("method", sorted(METHOD_FLAGS))
def test_two_process_gloo_run_matches_one_process(method, tmp_path, data_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = tmp_path / "spy.py"
    script.write_text(RANK_DUMP)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = tmp_path / "two"
    flags = [*FLAGS, *METHOD_FLAGS[method]]
    # --standalone: a free port of its own, so two runs at once (another suite, a study) never meet
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), "mine", "--out", str(two),
                             *flags, "--data-dir", data_dir, str(tmp_path / "masks")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, failure_lines(result.stderr)
    rank0 = torch.load(tmp_path / "masks.rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "masks.rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)

    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "gemminer", "mine", "--out", str(one), *flags, "--data-dir", data_dir],
                   env=env, check=True, capture_output=True, timeout=300)
    first, second = Ticket.load(one / "ticket.safetensors"), Ticket.load(two / "ticket.safetensors")
    agree = sum(int((first.masks[n] == second.masks[n]).sum()) for n in first.masks) / first.total
    assert agree >= 0.999
    summaries = [json.loads((path / "summary.json").read_text()) for path in (one, two)]
    assert summaries[1]["processes"] == 2 and summaries[0]["processes"] == 1
    assert abs(summaries[0]["acc_after_finetune"] - summaries[1]["acc_after_finetune"]) <= 0.01
    assert abs(summaries[0]["acc_ticket_at_init"] - summaries[1]["acc_ticket_at_init"]) <= 0.01


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_a_run_rank_0_refuses_stops_every_rank(tmp_path, data_dir):
    """The run folder is in use: rank 0 cannot lock it, and rank 1 stops with the same one line
    instead of waiting at a barrier until torchrun tears it down."""
    from gemminer.runs import folder_lock

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "busy"
    with folder_lock(out):  # another writer holds it
        result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "gemminer", "mine", "--out",
                                 str(out), *FLAGS, *METHOD_FLAGS["gemminer"], "--data-dir", data_dir],
                                env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.startswith("gemminer: error:")]
    assert result.returncode != 0
    # both ranks stop with the same line; the first to exit makes torchrun end the other, which may not
    # have printed its own yet (seen once in twenty runs), so one line or two equal ones
    assert lines and all(line == lines[0] for line in lines) and "in use" in lines[0], result.stderr[-2000:]
    assert len(lines) <= 2
