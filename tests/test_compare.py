"""Comparison grids end to end: files, table shapes, IMP once per seed, kill and restart, --jobs, Ray,
and the experiment files shipped with the project."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gemminer.cli import main
from gemminer.compare import compare
from gemminer.config import merge, resolve
from gemminer.errors import GemminerError
from gemminer.grid import load_grid

ROOT = Path(__file__).resolve().parents[1]
TINY_BASE = {"data": {"num_samples": 500, "batch_size": 64}, "model": {"width": 8}, "bn_recalibration_batches": 3,
             "finetune": {"epochs": 2}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_grid(tmp_path: Path, data_dir: str, variants: dict, densities=(0.2, 0.1), seeds=(0,), **extra) -> Path:
    base = {**TINY_BASE, "data": {**TINY_BASE["data"], "dir": data_dir}}
    document = {"base": base, "densities": list(densities), "seeds": list(seeds), "variants": variants, **extra}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


GEM = {"method": "gemminer", "search": {"epochs": 3, "freeze_period": 1}}


def rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as handle:
        return list(csv.DictReader(handle))


def test_tiny_grid_end_to_end(tmp_path, data_dir):
    grid = load_grid(write_grid(tmp_path, data_dir, {"gemminer": {**GEM, "sanity": ["shuffle"]},
                                                     "snip": {"method": "snip"}}))
    out = tmp_path / "out"
    text = compare(grid, out, progress=False, report=None)
    table = rows(out)
    assert len(table) == 2 * 2 + 1  # variants x densities, plus dense
    cells = {(row["variant"], row["density"]) for row in table}
    assert cells == {("gemminer", "0.2"), ("gemminer", "0.1"), ("snip", "0.2"), ("snip", "0.1"), ("dense", "1.0")}
    for row in table:
        assert row["acc_after_finetune"] and row["macs_remaining"] and row["config_hash"] and row["gemminer_version"]
        assert (row["sanity_shuffle"] != "") == (row["variant"] == "gemminer")
        if row["variant"] != "dense":
            assert int(row["remaining"]) == round(int(row["total"]) * float(row["density"]))
    first = text.split("\n\n")[0]
    assert len(first.splitlines()) == 2 + 5  # header, rule, one line per variant and density
    assert "| gemminer | 0.2 | shuffle |" in text and "| snip | 0.1 | 1 |" in text  # sanity and paired tables
    assert (out / "results.md").read_text().strip() == text.strip()
    made = text.strip().splitlines()[-1]  # where the tables came from: code, date, machine, wall clock
    assert made.startswith("Made by `gemminer.compare.compare(...)`: gemminer ") and " usable cores" in made
    assert "min of wall clock; 0 of the grid's 5 cells were finished before it" in made
    again = compare(grid, out, progress=False, report=None)  # a second call reuses every cell
    assert "5 of the grid's 5 cells were finished before it and reused" in again.strip().splitlines()[-1]
    for name in ("accuracy_after.png", "accuracy_before.png", "sanity_drops.png", "layer_density.png"):
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_imp_trains_once_per_seed_and_serves_every_density(tmp_path, data_dir):
    imp = {"method": "imp", "search": {"epochs": 1, "rewind": "epoch:0.5"}}
    grid = load_grid(write_grid(tmp_path, data_dir, {"gemminer": GEM, "imp": imp}, densities=(0.5, 0.3), dense=False))
    out = tmp_path / "out"
    text = compare(grid, out, progress=False, report=None)
    assert (out / "imp-d0.3-s0" / "tickets" / "d0.5.safetensors").is_file()  # one run, at the lowest density
    assert not (out / "imp-d0.5-s0" / "rounds.csv").exists()  # the other density trains that run's ticket
    by_density = {row["density"]: row for row in rows(out) if row["variant"] == "imp"}
    # 0.5 branches off round 4 (0.8^3 = 0.512), 0.3 off round 6 (0.8^5); rounds after the first train 1 - 4/7
    # epochs (the rewind is step 4 of 7), or 1 as full rounds
    for density, rounds in (("0.5", 4), ("0.3", 6)):
        row = by_density[density]
        assert float(row["epochs_to_ticket"]) == float(row["epochs_to_ticket_remaining"]) == pytest.approx(
            1 + (rounds - 1) * 3 / 7, abs=1e-5)
        assert float(row["epochs_to_ticket_full"]) == rounds
    assert "| imp | 0.3 | 1 | 3.1 | 6.0 | 1.0x | 2.0x |" in text  # cost over Gem-Miner's 3 epochs, both ways
    assert "3.1 (full rounds: 6.0)" in text


GRID_COMMAND = [sys.executable, "-m", "gemminer", "compare", "--quiet"]


def test_killed_grid_restarted_reuses_finished_cells(tmp_path, data_dir):
    path = write_grid(tmp_path, data_dir, {"gemminer": GEM, "random": {"method": "random"}}, dense=False)
    out = tmp_path / "out"
    command = [*GRID_COMMAND, "--grid", str(path), "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    first = out / "gemminer-d0.2-s0" / "summary.json"
    deadline = time.monotonic() + 120
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.exists() and not (out / "results.csv").exists(), "the grid finished before it could be killed"
    stamp = first.stat().st_mtime_ns
    subprocess.run(command, check=True, capture_output=True, env=ENV)
    assert first.stat().st_mtime_ns == stamp  # the finished cell was reused, not recomputed
    assert len(rows(out)) == 4


def test_jobs_run_cells_in_parallel_processes(tmp_path, data_dir, capsys):
    path = write_grid(tmp_path, data_dir, {"gemminer": GEM, "magnitude": {"method": "magnitude"}},
                      densities=(0.1,), dense=False)
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert main(["compare", "--grid", str(path), "--out", str(serial), "--quiet"]) == 0
    assert main(["compare", "--grid", str(path), "--out", str(parallel), "--jobs", "2", "--quiet"]) == 0
    key = lambda row: (row["variant"], row["density"])  # noqa: E731
    assert [(key(r), r["acc_after_finetune"]) for r in rows(serial)] == \
        [(key(r), r["acc_after_finetune"]) for r in rows(parallel)]  # one thread each: the same numbers


def test_simple_flags_make_a_grid(tmp_path, data_dir, capsys):
    out = tmp_path / "out"
    flags = ["--data-dir", data_dir, "--data-num-samples", "500", "--model-width", "8", "--epochs", "3",
             "--search-freeze-period", "1", "--finetune-epochs", "2", "--bn-recalibration-batches", "3"]
    assert main(["compare", "--methods", "gemminer,random", "--densities", "0.1", "--out", str(out), "--quiet",
                 *flags]) == 0
    table = rows(out)
    assert [row["variant"] for row in table] == ["gemminer", "random", "dense"]
    assert table[0]["sanity_shuffle"] != "" and table[1]["sanity_shuffle"] == ""  # the main job's shuffle
    assert main(["compare", "--grid", "x.yaml", "--methods", "snip", "--out", str(out)]) == 2
    assert "drop --methods" in capsys.readouterr().err
    # a flag at its default value is still given: not silently replaced by the grid's seeds
    assert main(["compare", "--grid", "x.yaml", "--seeds", "0", "--out", str(out)]) == 2
    assert "drop --seeds" in capsys.readouterr().err
    grid_file = write_grid(tmp_path, data_dir, {"gemminer": GEM})
    assert main(["compare", "--grid", str(grid_file), "--search-lr", "0.1", "--out", str(out)]) == 2
    assert "go in its variant" in capsys.readouterr().err


def test_same_training_forces_one_recipe(tmp_path, data_dir):
    grid = load_grid(write_grid(tmp_path, data_dir, {"gemminer": GEM, "snip": {"method": "snip"}},
                                same_training=True))
    recipes = {variant.name: grid.cell_overrides(variant, 0.1, 0)["finetune"] for variant in grid.variants}
    dense = resolve(merge(grid.base, {"method": "dense"})).finetune  # the recipe chosen for dense training
    for recipe in recipes.values():  # every ticket: the dense recipe, for Gem-Miner's search epochs
        assert (recipe["lr"], recipe["weight_decay"], recipe["lr_schedule"]) == \
            (dense.lr, dense.weight_decay, dense.lr_schedule)
        assert recipe["epochs"] == resolve(merge(grid.base, {"method": "gemminer"})).finetune.epochs
    assert dense.lr != resolve(merge(grid.base, {"method": "gemminer"})).finetune.lr  # not Gem-Miner's own recipe
    grid.same_training = False
    assert grid.cell_overrides(grid.variants[1], 0.1, 0)["finetune"].get("lr") is None  # snip's own recipe
    grid.same_training, grid.base = True, {**grid.base, "search": {"epochs": 2}}  # the base method's search
    assert grid.cell_overrides(grid.variants[1], 0.1, 0)["finetune"]["lr"] == dense.lr


def test_bad_grids_are_one_line(tmp_path, data_dir):
    for variants, message in (({"bad name": GEM}, "bad variant name"), ({"x": {"method": "nope"}}, "unknown method"),
                              ({"r": {"method": "random", "sanity": ["invert"]}}, "cannot be inverted"),
                              ({"g": {**GEM, "density": 0.3}}, "sets density"),
                              ({"g": [1, 2]}, "must be a mapping"), ({"g": {"method": "snip", "search": 3}},
                                                                       "must be a mapping"),
                              ({"i": {"method": "imp", "by_density": {0.2: {"seed": 1}}}}, "lowest density")):
        with pytest.raises(GemminerError, match=message):
            load_grid(write_grid(tmp_path, data_dir, variants))


def test_a_variant_may_run_at_densities_of_its_own(tmp_path, data_dir):
    from gemminer.compare import plan

    narrow = {"model": {"width": 4}, "densities": [0.5, 0.3]}
    grid = load_grid(write_grid(tmp_path, data_dir, {"random": {"method": "random"},
                                                     "random-w4": {"method": "random", **narrow},
                                                     "imp-w4": {"method": "imp", "search": {"epochs": 1}, **narrow}}))
    variants = {v.name: v for v in grid.variants}
    assert {name: grid.densities_of(v) for name, v in variants.items()} == {
        "random": [0.2, 0.1], "random-w4": [0.5, 0.3], "imp-w4": [0.5, 0.3]}
    assert grid.cell_overrides(variants["imp-w4"], 0.3, 0)["search"]["keep_densities"] == [0.5]  # its own stops
    assert "densities" not in grid.cell_overrides(variants["random-w4"], 0.5, 0)  # not a run setting
    cells, _ = plan(grid, tmp_path / "out")
    assert sorted(cell.folder.name for cell in cells) == [
        "dense-s0", "imp-w4-d0.3-s0", "imp-w4-d0.5-s0", "random-d0.1-s0", "random-d0.2-s0", "random-w4-d0.3-s0",
        "random-w4-d0.5-s0"]
    assert next(c for c in cells if c.folder.name == "imp-w4-d0.5-s0").imp_run.name == "imp-w4-d0.3-s0"
    grid.variants, grid.dense = [variants["random"], variants["random-w4"]], False
    compare(grid, tmp_path / "out", progress=False, report=None)
    assert sorted((row["variant"], row["density"]) for row in rows(tmp_path / "out")) == [
        ("random", "0.1"), ("random", "0.2"), ("random-w4", "0.3"), ("random-w4", "0.5")]
    for variants, message in (({"r": {"method": "random", "densities": []}}, "must not be empty"),
                              ({"r": {"method": "random", "densities": [0.5, 1.5]}}, r"lie in \(0, 1\]"),
                              ({"r": {"method": "random", "densities": [0.5, 0.5]}}, "must not repeat"),
                              ({"r": {"method": "random", "densities": [0.5], "by_density": {0.2: {}}}},
                               "not one of its densities")):
        with pytest.raises(GemminerError, match=message):
            load_grid(write_grid(tmp_path, data_dir, variants))


def test_grid_on_a_local_ray_instance(tmp_path, data_dir):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'gemminer[ray]')")
    grid = load_grid(write_grid(tmp_path, data_dir, {"gemminer": GEM, "snip": {"method": "snip"}},
                                densities=(0.1,), dense=False))
    out = tmp_path / "out"
    compare(grid, out, ray_address="local", progress=False, report=None)
    assert {row["variant"] for row in rows(out)} == {"gemminer", "snip"}


EXPERIMENTS = sorted((ROOT / "experiments").rglob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_experiments_parse_and_resolve(path):
    grid = load_grid(path)  # resolves every cell's config
    assert grid.variants and grid.densities


def test_a_paper_experiment_runs_end_to_end_on_tiny_data(tmp_path, monkeypatch):
    from tests.test_datasets import write_cifar10_python

    write_cifar10_python(tmp_path / "cifar", per_batch=16)
    grid = load_grid(ROOT / "experiments" / "paper" / "resnet20-cifar10.yaml")
    grid.variants = [v for v in grid.variants if v.name in ("gemminer", "synflow")]
    for variant in grid.variants:
        variant.overrides["search"] = {"epochs": 2, "freeze_period": 1} if variant.method == "gemminer" else \
            {"iterations": 3}
        variant.by_density = {}
        variant.sanity = ["shuffle"]
    grid.densities, grid.dense = [0.0372], False
    grid.base.update({"data": {"name": "cifar10", "dir": str(tmp_path / "cifar"), "limit": 64, "batch_size": 32},
                      "model": {"name": "resnet20", "width": 4}, "bn_recalibration_batches": 2,
                      "finetune": {"epochs": 1}, "device": "cpu"})
    compare(grid, tmp_path / "out", progress=False, report=None)
    assert {row["variant"] for row in rows(tmp_path / "out")} == {"gemminer", "synflow"}


def test_sigterm_stops_a_parallel_grid_with_checkpoints_and_it_resumes(tmp_path, data_dir):
    slow = {"method": "gemminer", "search": {"epochs": 40, "freeze_period": 2}}
    path = write_grid(tmp_path, data_dir, {"gemminer": slow, "snip": {"method": "snip"}}, densities=(0.1,),
                      dense=False)
    out = tmp_path / "out"
    command = [*GRID_COMMAND, "--grid", str(path), "--out", str(out), "--jobs", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    metrics = out / "gemminer-d0.1-s0" / "metrics.csv"
    deadline = time.monotonic() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "stopped by SIGTERM" in stderr
    assert (out / "gemminer-d0.1-s0" / "checkpoint.pt").exists()  # the worker's run checkpointed and stopped
    rows_before = len(metrics.read_text().splitlines())
    time.sleep(1.0)
    assert len(metrics.read_text().splitlines()) == rows_before  # no worker runs on unsupervised
    resumed = subprocess.run(command, capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert len(rows(out)) == 2


def test_imp_rounds_tables_without_the_kept_column_still_give_a_stop_its_cost(tmp_path):
    from gemminer.compare import _rounds_row

    (tmp_path / "rounds.csv").write_text("round,density,pruned_to,test_acc,epochs,seconds\n"
                                         "1,1,0.800002,0.9,30,26\n2,0.800002,0.640001,0.9,60,52\n")
    assert _rounds_row(tmp_path, 59351, 92736)["round"] == "2"  # round(92736 x 0.640001) kept weights
    assert _rounds_row(tmp_path, 5, 92736) is None


def test_paired_verdict_needs_the_seeds_to_agree():
    from gemminer.compare import paired_verdict

    assert paired_verdict([0.020, 0.021, 0.019], "gemminer") == "beats gemminer"
    assert paired_verdict([-0.030, -0.031, -0.029], "gemminer") == "below gemminer"
    assert paired_verdict([-0.05, 0.03, 0.005], "gemminer") == "level with gemminer"  # the seeds disagree
    # 3 seeds: the mean must exceed 4.303 / sqrt(3) = 2.484 standard deviations of the differences
    assert paired_verdict([0.01, 0.02, 0.03], "g") == "level with g"  # mean / std = 2.0
    assert paired_verdict([0.02, 0.03, 0.04], "g") == "beats g"  # mean / std = 3.0
    assert paired_verdict([0.005, 0.005, 0.005], "g") == "beats g"  # no spread at all
    assert paired_verdict([0.01], "g") == "ahead of g (one seed: untested)"


def test_a_variant_on_another_model_is_paired_with_gemminer_on_that_model(tmp_path):
    """imp-w16 is compared with gemminer-w16, and imp (width 64) with gemminer, in both paired tables."""
    from gemminer.compare import results_markdown

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"densities": [0.1], "seeds": [0, 1, 2], "variants": {
        "gemminer": {"method": "gemminer"}, "imp": {"method": "imp"},
        "gemminer-w16": {"method": "gemminer", "model": {"width": 16}},
        "imp-w16": {"method": "imp", "model": {"width": 16}}}}))
    accuracy = {"gemminer": 0.90, "imp": 0.95, "gemminer-w16": 0.50, "imp-w16": 0.60}
    rows = [{"variant": name, "method": name.split("-")[0], "density": 0.1, "seed": seed,
             "acc_before_finetune": 0.1, "acc_after_finetune": acc + 0.001 * seed,
             "epochs_to_ticket": 30 if name.startswith("gemminer") else 300, "search_seconds": 1.0,
             "finetune_seconds": 1.0, **({} if name.startswith("gemminer") else
                                        {"epochs_to_ticket_remaining": 290, "epochs_to_ticket_full": 300})}
            for name, acc in accuracy.items() for seed in range(3)]
    text = results_markdown(rows, load_grid(path))
    assert "| imp | 0.1 | 3 | 5.0 ± 0.0 | beats gemminer |" in text
    assert "| imp-w16 | 0.1 | 3 | 10.0 ± 0.0 | beats gemminer-w16 |" in text
    assert "| gemminer-w16 | 0.1 |" not in text.split("Paired by seed")[1]  # a reference is not paired
    assert "| imp-w16 | 0.1 | 3 | 290.0 ± 0.0 | 300.0 ± 0.0 | 9.7 ± 0.0x | 10.0 ± 0.0x | gemminer-w16 |" in text
