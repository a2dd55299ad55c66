"""benchmarks/search_speed.py: its pairing, its bound and both kinds of dense training (the benchmark's
numbers live in docs/benchmarks.md; this checks that it measures what it says, in seconds of tiny data)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from torch.nn.utils import parametrize

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "search_speed.py"


def load_benchmark(script: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_abba_pairs_alternate_who_goes_first():
    bench = load_benchmark()
    order = bench.abba(3)
    assert order == ["search", "dense", "dense", "search", "search", "dense"]
    # after each search turn, the dense turns up to the next search: every dense turn is counted once
    full = ["search", "dense", *order]
    counts = bench.dense_turns_after_each_search(full)
    assert counts == [1, 2, 0, 1] and sum(counts) == full.count("dense")


def test_upper_bound_lies_above_the_geometric_mean():
    bench = load_benchmark()
    logs = [0.01, 0.05, 0.07, 0.03, 0.06, 0.02]
    mean = sum(logs) / len(logs)
    assert bench.upper_bound(logs) > 2.718281828 ** mean
    assert bench.upper_bound([0.04] * 5) == pytest.approx(2.718281828 ** 0.04)


@pytest.mark.parametrize("dense", ["unmasked", "masked"])
def test_one_pair_runs_and_reports_its_settings(dense):
    done = subprocess.run([sys.executable, str(SCRIPT), "--pairs", "1", "--data-limit", "256", "--freeze-period",
                           "1", "--dense", dense], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["dense"] == dense and result["freeze_period"] == 1 and result["pairs"] == 1
    assert result["search_s_per_epoch"] > 0 and result["dense_s_per_epoch"] > 0 and result["ratio_median"] > 0


def test_masked_dense_training_trains_a_ticket_at_the_run_density():
    from gemminer.config import resolve
    from gemminer.experiment import setup

    bench = load_benchmark()
    run = setup(resolve({"data": {"limit": 64}, "density": 0.1}))
    model = bench.dense_model(run, masked=True)
    masks = [module.parametrizations.weight[0].mask for module in model.modules()
             if parametrize.is_parametrized(module, "weight")]
    assert len(masks) == len(run.prunable)
    kept = sum(float(mask.sum()) for mask in masks) / sum(mask.numel() for mask in masks)
    assert 0.08 < kept < 0.12
    assert not any(parametrize.is_parametrized(module) for module in bench.dense_model(run, masked=False).modules())


def test_eval_batch_refuses_bad_sizes_in_one_line():
    script = REPO / "benchmarks" / "eval_batch.py"
    for args in (["--samples", "0"], ["--repeats", "0"], ["--batches", "128,x"], ["--batches", "0"],
                 ["--model", "vgg"]):
        done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "error:" in done.stderr.splitlines()[-1], (args, done.stderr[-300:])


def test_search_overhead_splits_the_extra_into_whole_step_differences():
    script = REPO / "benchmarks" / "search_overhead.py"
    done = subprocess.run([sys.executable, str(script), "--batch", "8", "--repeats", "2"], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    steps = ["dense", "search", "weights_only", "parametrized", "search_no_clamp"]
    assert all(result[f"{name}_step_ms"] > 0 for name in steps)
    # the four differences add up to the search's extra over dense training
    parts = sum(result[f"in_step_{piece}_ms"] for piece in ("other", "parametrize", "mask", "clamp"))
    assert parts == pytest.approx(result["extra_step_ms"], abs=2e-3)


def test_search_overhead_weights_only_network_trains_the_prunable_weights_alone():
    import torch

    from gemminer.masking import owner, prunable_names
    from gemminer.models import build_model

    bench = load_benchmark(REPO / "benchmarks" / "search_overhead.py")
    dense = build_model("cnn1d", (1, 40), 10)
    names = prunable_names(dense)
    for parametrized in (False, True):
        model, optimizer = bench.prunable_weights_only(dense, names, parametrized)
        trained = [p for group in optimizer.param_groups for p in group["params"]]
        assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trained}
        originals = [owner(model, name).parametrizations.weight.original if parametrized else owner(model, name).weight
                     for name in names]
        assert [id(p) for p in trained] == [id(w) for w in originals]
        assert all(torch.equal(owner(model, name).weight, owner(dense, name).weight) for name in names)
        assert parametrize.is_parametrized(owner(model, names[0]), "weight") == parametrized
