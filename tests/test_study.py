"""The MNIST-1D study files: what they hold, and a shrunken copy of the headline run end to end."""

import csv
from pathlib import Path

import pytest
import yaml

from gemminer.cli import main
from gemminer.grid import load_grid
from gemminer.sanity import invertible

ROOT = Path(__file__).resolve().parents[1]
HEADLINE, FULL = ROOT / "experiments" / "mnist1d.yaml", ROOT / "experiments" / "mnist1d-full.yaml"


def test_the_headline_study_holds_the_paper_s_densities_and_checks():
    grid = load_grid(HEADLINE)  # every cell's config resolves
    assert grid.densities == [0.02, 0.01, 0.005, 0.002] and grid.seeds == [0, 1, 2] and grid.dense
    variants = {variant.name: variant for variant in grid.variants}
    assert {name: variant.method for name, variant in variants.items()} == {
        "gemminer": "gemminer", "imp-warmup": "imp", "synflow": "synflow", "edge-popup": "edge-popup",
        "random-erk": "random"}
    for name, variant in variants.items():
        assert variant.sanity == (["shuffle", "reinit"] if name in ("gemminer", "synflow", "imp-warmup") else [])
        assert variant.densities is None
    assert "reg_lambda" not in (variants["gemminer"].overrides.get("search") or {})  # the preset's lambda
    assert variants["imp-warmup"].overrides["search"]["rewind"] == "epoch:0.52"


def test_the_full_study_has_every_method_every_check_and_a_width_16_set():
    from gemminer.methods import METHODS

    grid = load_grid(FULL)
    assert grid.densities == [0.05, 0.02, 0.01, 0.005, 0.002, 0.001]
    assert {variant.method for variant in grid.variants} == set(METHODS) - {"dense"}
    for variant in grid.variants:
        if variant.name.endswith("-w16"):
            assert variant.overrides["model"]["width"] == 16 and variant.densities == [0.2, 0.1, 0.05, 0.02, 0.01]
        elif variant.method != "random":
            assert ("invert" in variant.sanity) == invertible(variant.method)
            assert {"shuffle", "reinit"} <= set(variant.sanity)
    assert {v.method for v in grid.variants if v.name.endswith("-w16")} == {"gemminer", "imp", "synflow", "random"}


SHORT = {"gemminer": {"epochs": 2, "freeze_period": 1}, "imp": {"epochs": 1}, "synflow": {"iterations": 3},
         "edge-popup": {"epochs": 1}}


@pytest.mark.filterwarnings("ignore::gemminer.experiment.LayerCollapse")  # width 8 at 1% may empty a layer
def test_a_shrunken_headline_study_runs_end_to_end(tmp_path, data_dir):
    """The headline file with 1-2 epochs, 500 samples, width 8, one seed and two densities, through the CLI."""
    document = yaml.safe_load(HEADLINE.read_text())
    document["base"].update(data={"name": "mnist1d", "dir": data_dir, "num_samples": 500, "batch_size": 64},
                            model={"width": 8}, bn_recalibration_batches=3)
    document["densities"], document["seeds"] = [0.02, 0.01], [0]
    for variant in document["variants"].values():
        variant["search"] = {**(variant.get("search") or {}), **SHORT.get(variant["method"], {})}
        for density in set(variant.get("by_density") or {}) - set(document["densities"]):
            del variant["by_density"][density]  # the recipes tuned at 0.005, for densities not run here
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(document))
    out = tmp_path / "out"
    assert main(["compare", "--grid", str(path), "--out", str(out), "--quiet"]) == 0
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((row["variant"], row["density"]) for row in rows) == sorted(
        [(name, density) for name in document["variants"] for density in ("0.02", "0.01")] + [("dense", "1.0")])
    for row in rows:
        checked = row["variant"] in ("gemminer", "synflow", "imp-warmup")
        assert (row["sanity_shuffle"] != "" and row["sanity_reinit"] != "") == checked
    imp = {row["density"]: row for row in rows if row["variant"] == "imp-warmup"}
    # 0.02 branches off round 17 (0.8^17), 0.01 off round 20: 18 and 21 rounds of 1 epoch, as full rounds
    assert (float(imp["0.02"]["epochs_to_ticket_full"]), float(imp["0.01"]["epochs_to_ticket_full"])) == (18, 21)
    text = (out / "results.md").read_text()
    assert "Cost to ticket" in text and "| imp-warmup | 0.01 | 1 |" in text


@pytest.mark.parametrize("study, folder", [(HEADLINE, "mnist1d"), (FULL, "mnist1d-full")])
def test_the_committed_results_hold_every_cell_of_their_study_file(study, folder):
    """results/<folder>/ was made by its study file: every variant, density and seed, with a provenance README."""
    grid = load_grid(study)
    expected = {(variant.name, density, seed) for variant in grid.variants
                for density in (variant.densities or grid.densities) for seed in grid.seeds}
    expected |= {("dense", 1.0, seed) for seed in grid.seeds} if grid.dense else set()
    results = ROOT / "results" / folder
    with open(results / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(row["variant"], float(row["density"]), int(row["seed"])) for row in rows} == expected
    for variant in grid.variants:  # every check the file asks for has a number in every cell
        for check in variant.sanity:
            assert all(row[f"sanity_{check}"] for row in rows if row["variant"] == variant.name)
    readme = (results / "README.md").read_text()
    assert f"--grid experiments/{study.name}" in readme and "Wall clock" in readme
