"""The grid's pictures: files written, skipped without data, IMP-with-rewinding rows kept out of plot 2."""

import math

import pytest
import torch

from gemminer.plots import (
    accuracy_series,
    pick_layer_density,
    plot_grid,
    sanity_drops,
    short_layer_name,
    variant_colors,
)
from gemminer.ticket import Ticket

VARIANTS = ("gemminer", "imp-warmup", "random-erk")
DENSITIES = (0.2, 0.05, 0.01)
SEEDS = (0, 1)
SHAPES = {"features.0.weight": (16, 8), "features.2.weight": (32, 16), "classifier.weight": (10, 32)}
PNG = b"\x89PNG"


def _ticket(run, density: float, seed: int, variant: int) -> tuple[int, int]:
    generator = torch.Generator().manual_seed(100 * variant + seed)
    masks = {name: torch.rand(shape, generator=generator) < density for name, shape in SHAPES.items()}
    masks["classifier.weight"][0, 0] = True  # no collapsed layer by chance, except the one made on purpose below
    if density == 0.01 and seed == 0 and variant == 2:
        masks["features.2.weight"][:] = False
    run.mkdir(parents=True)
    ticket = Ticket(masks, {"method": "test", "density_target": density, "seed": seed})
    ticket.save(run / "ticket.safetensors")
    return ticket.remaining, ticket.total


def _rows(tmp_path, sanity: bool = True) -> list[dict]:
    rows = []
    for v, variant in enumerate(VARIANTS):
        for d, density in enumerate(DENSITIES):
            for seed in SEEDS:
                run = tmp_path / "runs" / f"{variant}-{density}-{seed}"
                remaining, total = _ticket(run, density, seed, v)
                after = 0.9 - 0.05 * d - 0.03 * v + 0.01 * seed
                row = {"variant": variant, "method": variant.split("-")[0], "density": density, "seed": seed,
                       "acc_before_finetune": 0.6 - 0.1 * d - 0.1 * v,
                       "acc_before_finetune_at_init": variant != "imp-warmup",  # IMP rewinds to a trained point
                       "acc_after_finetune": after, "remaining": remaining, "total": total, "run": str(run)}
                if sanity:
                    row.update(sanity_shuffle=after - 0.2, sanity_reinit=after - 0.1 if v else None,
                               sanity_invert=float("nan") if seed else after - 0.3)
                rows.append(row)
    rows += [{"variant": "dense", "method": "dense", "density": 1.0, "seed": seed, "acc_before_finetune": 0.1,
              "acc_before_finetune_at_init": True, "acc_after_finetune": 0.93 + 0.01 * seed, "run": None}
             for seed in SEEDS]
    return rows


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:4] == PNG


def test_four_plots(tmp_path):
    rows = _rows(tmp_path)
    out = tmp_path / "plots" / "nested"
    paths = plot_grid(rows, out)
    assert [path.name for path in paths] == ["accuracy_after.png", "accuracy_before.png", "sanity_drops.png",
                                              "layer_density.png"]
    assert all(path.parent == out and _is_png(path) for path in paths)


def test_before_training_leaves_out_rewound_rows(tmp_path):
    rows = _rows(tmp_path)
    before = accuracy_series(rows, "acc_before_finetune", at_init_only=True)
    assert sorted(before) == ["gemminer", "random-erk"]  # no imp-warmup, no dense
    assert [point.density for point in before["gemminer"]] == [0.2, 0.05, 0.01]
    assert all(point.seeds == 2 for point in before["gemminer"])
    assert sorted(accuracy_series(rows, "acc_after_finetune")) == list(VARIANTS)
    point = accuracy_series(rows, "acc_after_finetune")["gemminer"][0]
    assert point.mean == pytest.approx(90.5) and point.std == pytest.approx(math.sqrt(0.5))

    imp_only = [row for row in rows if row["variant"] in ("imp-warmup", "dense")]
    paths = plot_grid(imp_only, tmp_path / "imp")
    assert [path.name for path in paths] == ["accuracy_after.png", "sanity_drops.png", "layer_density.png"]
    assert not (tmp_path / "imp" / "accuracy_before.png").exists()


def test_no_sanity_data_no_sanity_plot(tmp_path):
    rows = _rows(tmp_path, sanity=False)
    assert sanity_drops(rows) == {}
    paths = plot_grid(rows, tmp_path / "out")
    assert "sanity_drops.png" not in [path.name for path in paths]
    assert not (tmp_path / "out" / "sanity_drops.png").exists()
    assert len(paths) == 3 and all(_is_png(path) for path in paths)


def test_sanity_drops_skip_missing_and_nan(tmp_path):
    drops = sanity_drops(_rows(tmp_path))
    gem = drops["gemminer", 0.2]
    assert "reinit" not in gem  # None everywhere for gemminer
    assert gem["shuffle"] == pytest.approx([20.0, 20.0]) and gem["invert"] == pytest.approx([30.0])  # NaN skipped


def test_layer_density_choice_and_missing_tickets(tmp_path):
    rows = _rows(tmp_path)
    assert pick_layer_density(rows) == 0.01  # every non-dense variant has it
    moved = [{**row, "density": 0.001} if row["variant"] == "gemminer" and row["density"] == 0.01 else row
             for row in rows]
    assert pick_layer_density(moved) == 0.05  # the smallest common one
    apart = [{"variant": "a", "density": 0.1}, {"variant": "b", "density": 0.02}, {"variant": "dense", "density": 1.0}]
    assert pick_layer_density(apart) == 0.02  # none in common: the smallest present
    no_tickets = [{**row, "run": str(tmp_path / "nowhere")} for row in rows]
    paths = plot_grid(no_tickets, tmp_path / "none", layer_density=0.05)
    assert "layer_density.png" not in [path.name for path in paths] and len(paths) == 3
    # one variant's ticket missing: the plot is still drawn from the others
    (tmp_path / "runs" / "random-erk-0.05-0" / "ticket.safetensors").unlink()
    assert "layer_density.png" in [path.name for path in plot_grid(rows, tmp_path / "some", layer_density=0.05)]


def test_robust_to_none_and_nan(tmp_path):
    rows = _rows(tmp_path)
    rows[0]["acc_after_finetune"] = None
    rows[1]["acc_after_finetune"] = float("nan")
    rows[2].pop("remaining")
    rows.append({"variant": "odd", "density": None, "acc_after_finetune": 0.5})
    assert len(plot_grid(rows, tmp_path / "out")) == 4
    assert plot_grid([], tmp_path / "empty") == [] and (tmp_path / "empty").is_dir()


def test_helpers():
    assert short_layer_name("layer1.0.conv1.weight") == "0.conv1" and short_layer_name("fc.weight") == "fc"
    colors = variant_colors([{"variant": name} for name in ("zeta", "gemminer", "alpha", "gemminer")])
    assert list(colors) == ["gemminer", "alpha", "zeta"] and len(set(colors.values())) == 3
