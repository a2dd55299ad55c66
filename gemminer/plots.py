"""Pictures of a comparison grid (PNG, matplotlib), in the style of the "Rare Gems" paper's figures.

`plot_grid(rows, out_dir)` draws, from the grid's result rows (one per cell):

- `accuracy_after.png`: test accuracy after training vs weights remaining (log x, density falling to the right),
  one line per variant (mean over seeds, ± std band with >= 2 seeds), dense training as a dashed line;
- `accuracy_before.png`: the same before training, for variants measured on untrained weights only;
- `sanity_drops.png`: accuracy lost by the sanity checks (shuffle / reinit / invert), per variant and density;
- `layer_density.png`: per-layer density of each variant's ticket at one density.

Accuracies in rows are fractions in [0, 1]; the plots show percent. Missing, None and NaN values are skipped.
"""

from __future__ import annotations

import math
import os
import statistics
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemminer.errors import GemminerError
from gemminer.ticket import Ticket

REFERENCE_WIDTH, OTHER_WIDTH = 2.8, 1.5
SANITY_CHECKS = ("shuffle", "reinit", "invert")
SANITY_HATCHES = {"shuffle": "", "reinit": "///", "invert": "..."}
DPI = 120


@dataclass
class Point:
    """One (variant, density) cell of a curve: x = weights remaining (%), y = mean accuracy (%) over seeds."""

    density: float
    remaining_pct: float
    mean: float
    std: float | None  # sample std over seeds; None with one seed
    seeds: int


def plot_grid(rows: list[dict[str, Any]], out_dir: str | os.PathLike, layer_density: float | None = None,
              reference: str = "gemminer") -> list[Path]:
    """Write the grid's plots into `out_dir` (created) and return their paths; a plot without data is skipped.

    `layer_density` picks the density of the per-layer plot (default: the smallest density that every
    non-dense variant has, else the smallest present); `reference` is the variant drawn first and thicker.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colors = variant_colors(rows, reference)
    written = [
        _plot_accuracy(rows, out / "accuracy_after.png", "acc_after_finetune", colors, reference,
                       "test accuracy after training", dense_line=True),
        _plot_accuracy(rows, out / "accuracy_before.png", "acc_before_finetune", colors, reference,
                       "test accuracy before training (untrained weights)", dense_line=False),
        _plot_sanity(rows, out / "sanity_drops.png", colors, reference),
        _plot_layer_density(rows, out / "layer_density.png", colors, reference, layer_density),
    ]
    return [path for path in written if path is not None]


# ---- data ---------------------------------------------------------------------------------------------------------
def number(value: Any) -> float | None:
    """`value` as a finite float, else None (missing, None, NaN, inf, not a number)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def variant_of(row: dict[str, Any]) -> str:
    return str(row.get("variant") or row.get("method") or "?")


def is_dense(row: dict[str, Any]) -> bool:
    density = number(row.get("density"))
    return variant_of(row) == "dense" or (density is not None and density >= 1.0 - 1e-9)


def variant_order(names: Any, reference: str = "gemminer") -> list[str]:
    """Sorted variant names, the reference first."""
    return sorted(set(names), key=lambda name: (name != reference, name))


def variant_colors(rows: list[dict[str, Any]], reference: str = "gemminer") -> dict[str, Any]:
    """One color per variant (the same in every plot), in `variant_order`."""
    from matplotlib import colormaps

    names = variant_order((variant_of(row) for row in rows), reference)
    palette = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: palette(index % palette.N) for index, name in enumerate(names)}


def _remaining_pct(row: dict[str, Any], density: float) -> float:
    remaining, total = number(row.get("remaining")), number(row.get("total"))
    return 100.0 * (remaining / total if remaining is not None and total else density)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) >= 2 else None


def accuracy_series(rows: list[dict[str, Any]], key: str, at_init_only: bool = False) -> dict[str, list[Point]]:
    """Per non-dense variant, the points (sorted by density, falling) of accuracy `key` in percent.

    With `at_init_only`, rows whose `acc_before_finetune_at_init` is not True (IMP with rewinding) are left out.
    """
    cells: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        density = number(row.get("density"))
        if is_dense(row) or density is None or number(row.get(key)) is None:
            continue
        if at_init_only and row.get("acc_before_finetune_at_init") is not True:
            continue
        cells[variant_of(row), round(density, 9)].append(row)
    series: dict[str, list[Point]] = defaultdict(list)
    for (variant, density), group in sorted(cells.items(), key=lambda item: (item[0][0], -item[0][1])):
        mean, std = _mean_std([100.0 * number(row[key]) for row in group])
        x = statistics.fmean(_remaining_pct(row, density) for row in group)
        series[variant].append(Point(density, x, mean, std, len(group)))
    return dict(series)


def dense_accuracy(rows: list[dict[str, Any]], key: str) -> dict[str, tuple[float, float | None]]:
    """Per dense variant, mean and std (percent) of accuracy `key` over seeds."""
    values: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if is_dense(row) and (value := number(row.get(key))) is not None:
            values[variant_of(row)].append(100.0 * value)
    return {variant: _mean_std(group) for variant, group in values.items()}


def sanity_drops(rows: list[dict[str, Any]]) -> dict[tuple[str, float], dict[str, list[float]]]:
    """Per (variant, density), per sanity check, the drops in percentage points (after - sanity) over seeds."""
    drops: dict[tuple[str, float], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        after, density = number(row.get("acc_after_finetune")), number(row.get("density"))
        if after is None or density is None:
            continue
        for check in SANITY_CHECKS:
            if (sanity := number(row.get(f"sanity_{check}"))) is not None:
                drops[variant_of(row), round(density, 9)][check].append(100.0 * (after - sanity))
    return {cell: dict(checks) for cell, checks in drops.items()}


def pick_layer_density(rows: list[dict[str, Any]]) -> float | None:
    """The smallest density that every non-dense variant has, else the smallest present (None without rows)."""
    by_variant: dict[str, set[float]] = defaultdict(set)
    for row in rows:
        if not is_dense(row) and (density := number(row.get("density"))) is not None:
            by_variant[variant_of(row)].add(round(density, 9))
    if not by_variant:
        return None
    common = set.intersection(*by_variant.values())
    return min(common) if common else min(set.union(*by_variant.values()))


def short_layer_name(name: str) -> str:
    """The last two dotted parts of a weight name without `.weight`: `layer1.0.conv1.weight` -> `0.conv1`."""
    parts = name.removesuffix(".weight").split(".")
    return ".".join(parts[-2:])


# ---- plots --------------------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=DPI)
    except OSError as err:
        raise GemminerError(f"cannot write the plot {path}: {err.strerror or err}") from err
    return path


def _width(variant: str, reference: str) -> float:
    return REFERENCE_WIDTH if variant == reference else OTHER_WIDTH


def _density_axis(axes: Any, targets: set[float]) -> None:
    """Log x axis of weights remaining (%), inverted (density falls to the right), ticked at the target densities."""
    from matplotlib.ticker import NullFormatter

    axes.set_xscale("log")
    ticks = sorted(100.0 * density for density in targets)
    if len(ticks) <= 12:
        axes.set_xticks(ticks, [f"{tick:.3g}" for tick in ticks])
        axes.xaxis.set_minor_formatter(NullFormatter())
    axes.invert_xaxis()
    axes.set_xlabel("weights remaining (%)")


def _plot_accuracy(rows: list[dict[str, Any]], path: Path, key: str, colors: dict[str, Any], reference: str,
                   title: str, dense_line: bool) -> Path | None:
    series = accuracy_series(rows, key, at_init_only=not dense_line)
    dense = dense_accuracy(rows, key) if dense_line else {}
    if not series:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    try:
        for variant in variant_order(series, reference):
            points = series[variant]
            x, y = [p.remaining_pct for p in points], [p.mean for p in points]
            width = _width(variant, reference)
            axes.plot(x, y, marker="o", markersize=4 + width, linewidth=width, color=colors[variant],
                      label=variant, zorder=3 if variant == reference else 2)
            if max(p.seeds for p in points) >= 2:
                low = [p.mean - (p.std or 0.0) for p in points]
                high = [p.mean + (p.std or 0.0) for p in points]
                axes.fill_between(x, low, high, color=colors[variant], alpha=0.2, linewidth=0)
        for variant in variant_order(dense, reference):
            mean, std = dense[variant]
            label = f"{variant} ({mean:.1f}{f' ± {std:.1f}' if std is not None else ''}%)"
            axes.axhline(mean, color=colors[variant], linestyle="--", linewidth=OTHER_WIDTH, label=label)
        _density_axis(axes, {p.density for points in series.values() for p in points})
        axes.set_ylabel("test accuracy (%)")
        seeds = max(p.seeds for points in series.values() for p in points)
        axes.set_title(f"{title}; mean{' ± std' if seeds >= 2 else ''} over seeds", fontsize=10)
        axes.grid(True, which="major", alpha=0.3)
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        return _save(figure, path)
    finally:
        plt.close(figure)


def _plot_sanity(rows: list[dict[str, Any]], path: Path, colors: dict[str, Any], reference: str) -> Path | None:
    drops = sanity_drops(rows)
    if not drops:
        return None
    checks = [check for check in SANITY_CHECKS if any(check in cell for cell in drops.values())]
    order = variant_order((variant for variant, _ in drops), reference)
    cells = sorted(drops, key=lambda cell: (order.index(cell[0]), -cell[1]))
    plt = _pyplot()
    from matplotlib.patches import Patch

    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(cells) + 2.5), 4.5))
    try:
        bar = 0.8 / len(checks)
        for index, cell in enumerate(cells):
            variant = cell[0]
            for offset, check in enumerate(checks):
                values = drops[cell].get(check)
                if not values:
                    continue
                mean, std = _mean_std(values)
                axes.bar(index + (offset - (len(checks) - 1) / 2) * bar, mean, bar, color=colors[variant],
                         hatch=SANITY_HATCHES[check], edgecolor="black",
                         linewidth=1.2 if variant == reference else 0.5,
                         yerr=std, capsize=2, error_kw={"linewidth": 0.8})
        axes.axhline(0.0, color="black", linewidth=0.8)
        axes.set_xticks(range(len(cells)), [f"{variant} @ {density:g}" for variant, density in cells],
                        rotation=45 if len(cells) > 4 else 0, ha="right" if len(cells) > 4 else "center", fontsize=8)
        for label, (variant, _) in zip(axes.get_xticklabels(), cells, strict=True):
            label.set_color(colors[variant])
            if variant == reference:
                label.set_fontweight("bold")
        axes.set_xlabel("variant @ density")
        axes.set_ylabel("accuracy drop (percentage points)")
        axes.set_title("sanity checks: accuracy after training minus the sanity variant's (mean ± std over seeds)")
        axes.title.set_fontsize(10)
        handles = [Patch(facecolor="white", edgecolor="black", hatch=SANITY_HATCHES[check], label=check)
                   for check in checks]
        axes.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        axes.grid(True, axis="y", alpha=0.3)
        return _save(figure, path)
    finally:
        plt.close(figure)


def _ticket_rows(rows: list[dict[str, Any]], density: float) -> tuple[int | None, dict[str, Ticket]]:
    """The smallest seed at `density`, and each non-dense variant's ticket of that seed (missing ones skipped)."""
    at_density = [row for row in rows if not is_dense(row) and (d := number(row.get("density"))) is not None
                  and math.isclose(d, density, rel_tol=1e-6, abs_tol=1e-12)]
    seeds = [int(seed) for row in at_density if (seed := number(row.get("seed"))) is not None]
    seed = min(seeds) if seeds else None
    tickets: dict[str, Ticket] = {}
    for row in at_density:
        if variant_of(row) in tickets or (seed is not None and number(row.get("seed")) != seed) or not row.get("run"):
            continue
        file = Path(row["run"]) / "ticket.safetensors"
        if not file.is_file():
            continue
        try:
            tickets[variant_of(row)] = Ticket.load(file)
        except GemminerError as err:
            warnings.warn(f"layer density plot: skipping {variant_of(row)}: {err}", stacklevel=3)
    return seed, tickets


def _plot_layer_density(rows: list[dict[str, Any]], path: Path, colors: dict[str, Any], reference: str,
                        density: float | None) -> Path | None:
    density = pick_layer_density(rows) if density is None else density
    if density is None:
        return None
    seed, tickets = _ticket_rows(rows, density)
    if not tickets:
        return None
    order = variant_order(tickets, reference)
    names: list[str] = []  # layer order: the first ticket's, then any other names
    for variant in order:
        names += [name for name in tickets[variant].masks if name not in names]
    index = {name: position for position, name in enumerate(names)}
    largest = max(layer.parameters for ticket in tickets.values() for layer in ticket.layers())
    floor = 0.5 / largest  # a collapsed layer (density 0) still shows on the log axis, marked with an x
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(min(14.0, max(6.5, 0.35 * len(names) + 3.5)), 4.5))
    try:
        collapsed = 0
        for variant in order:
            layers = tickets[variant].layers()
            x = [index[layer.name] for layer in layers]
            y = [max(layer.density, floor) for layer in layers]
            width = _width(variant, reference)
            axes.plot(x, y, marker="o", markersize=3 + width, linewidth=width, color=colors[variant],
                      label=f"{variant} (overall {tickets[variant].density:.4g})",
                      zorder=3 if variant == reference else 2)
            zero = [(xi, yi) for xi, yi, layer in zip(x, y, layers, strict=True) if layer.remaining == 0]
            if zero:
                collapsed += len(zero)
                axes.scatter(*zip(*zero, strict=True), marker="x", s=60, color=colors[variant], zorder=4)
        axes.axhline(density, color="gray", linestyle=":", linewidth=1.0, label=f"target density {density:g}")
        axes.set_yscale("log")
        if len(names) <= 30:
            axes.set_xticks(range(len(names)), [f"{i} {short_layer_name(name)}" for i, name in enumerate(names)],
                            rotation=60, ha="right", fontsize=7)
        axes.set_xlabel("layer index")
        axes.set_ylabel("layer density (remaining / parameters)")
        note = f"\n{collapsed} collapsed layer(s) marked x (drawn at {floor:.2g})" if collapsed else ""
        axes.set_title(f"per-layer density of the tickets at density {density:g}, seed {seed}{note}", fontsize=10)
        axes.grid(True, which="major", alpha=0.3)
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        return _save(figure, path)
    finally:
        plt.close(figure)
