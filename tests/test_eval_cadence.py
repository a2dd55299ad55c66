"""--eval-every: which rows carry a test accuracy, that it changes no result, and the
result-neutral keys (eval cadence and batch) that never make a run or a grid cell stale."""

import json

import pytest

from gemminer.cli import main
from gemminer.config import resolve
from gemminer.experiment import mine
from gemminer.runs import RunFolder
from gemminer.ticket import Ticket
from tests.conftest import tiny_overrides


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["gemminer", "edge-popup", "imp"])
def test_eval_every_measures_every_nth_and_the_last_epoch(tmp_path, data_dir, method):
    overrides = tiny_overrides(data_dir, method=method, eval_every=2, search={"epochs": 5}, finetune={"epochs": 5})
    if method != "gemminer":
        del overrides["search"]["freeze_period"]
    if method == "imp":
        overrides.update(density=0.5, finetune={})
    config = resolve(overrides)
    summary = mine(config, tmp_path / "run", progress=False)
    rows = _rows(tmp_path / "run")
    phases = {row["phase"] for row in rows}
    for phase in phases:
        measured = [row["epoch"] for row in rows if row["phase"] == phase and "test_acc" in row]
        last = max(row["epoch"] for row in rows if row["phase"] == phase)
        assert measured == [e for e in range(1, last + 1) if e % 2 == 0 or e == last], (phase, measured)
    assert summary["acc_after_finetune"] == [r for r in rows if r["phase"] == "finetune" or
                                             r["phase"].startswith("imp-round")][-1]["test_acc"]


def test_eval_every_changes_no_result(tmp_path, data_dir):
    every = mine(resolve(tiny_overrides(data_dir)), tmp_path / "a", progress=False)
    sparse = mine(resolve(tiny_overrides(data_dir, eval_every=3, data={"eval_batch_size": 7})), tmp_path / "b",
                  progress=False)
    for key in ("density_actual", "acc_before_finetune", "acc_after_finetune"):
        assert every[key] == sparse[key], key
    first, second = (Ticket.load(tmp_path / run / "ticket.safetensors") for run in ("a", "b"))
    assert first.same_masks(second)
    for name in ("ticket.safetensors", "gem.safetensors", "finetuned.safetensors"):  # neutral keys not in headers
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # a measurement does not depend on how many came before it (BatchNorm recalibrates on the same batches)
    measured = {(row["phase"], row["epoch"]): row["test_acc"] for row in _rows(tmp_path / "b") if "test_acc" in row}
    every_epoch = {(row["phase"], row["epoch"]): row["test_acc"] for row in _rows(tmp_path / "a")}
    assert measured and all(every_epoch[key] == value for key, value in measured.items())


def test_eval_cadence_and_batch_do_not_make_a_run_stale(tmp_path, data_dir):
    mine(resolve(tiny_overrides(data_dir)), tmp_path / "run", progress=False)
    folder = RunFolder(tmp_path / "run")
    folder.check_same_config(resolve(tiny_overrides(data_dir, eval_every=4, checkpoint_every=0,
                                                    data={"eval_batch_size": 32})))
    with pytest.raises(Exception, match="another config"):
        folder.check_same_config(resolve(tiny_overrides(data_dir, seed=1)))


def test_eval_batch_size_auto_and_bad_values(data_dir, capsys):
    assert resolve({"data": {"eval_batch_size": "auto"}}).data.eval_batch_size is None
    assert resolve({}).data.eval_batch_size is None
    for flag, value in (("--eval-every", "0"), ("--data-eval-batch-size", "0")):
        assert main(["mine", flag, value, "--out", "unused", "--data-dir", data_dir]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
