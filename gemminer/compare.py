"""Methods x densities x seeds, run by `mine`, gathered into one table.

`random` is matched to the Gem-Miner ticket of the same density and seed (same number
of weights per layer), so it is the layerwise-random control the paper compares to.
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any

from gemminer.config import merge, resolve
from gemminer.errors import GemminerError
from gemminer.experiment import mine
from gemminer.methods import method_class
from gemminer.runs import RunFolder

COLUMNS = ["method", "density_target", "density_actual", "seed", "acc_before_finetune", "acc_after_finetune",
           "epochs_to_ticket", "search_seconds", "finetune_seconds"]


def _run(overrides: dict[str, Any], out: Path, force: bool, progress: bool) -> dict[str, Any]:
    folder = RunFolder(out)
    config = resolve(overrides)
    if folder.finished and not force:
        folder.check_same_config(config)  # a changed sweep must not report stale numbers
        return folder.summary()  # finished runs are reused, so an interrupted compare picks up where it was
    return mine(config, out, force=force, progress=progress)  # resumes an unfinished run


def compare(overrides: dict[str, Any], methods: list[str], densities: list[float], seeds: list[int],
            out: str | Path, dense: bool = True, force: bool = False, progress: bool = True) -> str:
    """Run every combination into `out/<method>-d<density>-s<seed>`, write results.csv and
    results.md there, and return the markdown table (mean and std over seeds)."""
    for name in methods:
        method_class(name)
    if "random" in methods and "gemminer" not in methods:
        raise GemminerError("compare matches 'random' to the gemminer ticket: add gemminer to --methods")
    out = Path(out)
    search = overrides.get("search", {})
    base = {key: value for key, value in overrides.items() if key not in ("search", "method", "density")}
    # every method fine-tunes as long as Gem-Miner searched, unless told otherwise
    epochs = resolve(merge(base, {"method": "gemminer", "search": search})).finetune.epochs
    base = merge(base, {"finetune": {"epochs": epochs}})
    rows = []
    for seed in seeds:
        for density in densities:
            for name in methods:
                run = merge(base, {"method": name, "density": density, "seed": seed})
                if name == "gemminer":
                    run["search"] = search
                elif name == "random":
                    run["search"] = {"like_ticket": str(out / f"gemminer-d{density:g}-s{seed}" / "ticket.safetensors")}
                rows.append(_run(run, out / f"{name}-d{density:g}-s{seed}", force, progress))
        if dense:
            rows.append(_run(merge(base, {"method": "dense", "density": 1.0, "seed": seed}),
                             out / f"dense-s{seed}", force, progress))
    _write_csv(rows, out / "results.csv")
    table = markdown_table(rows)
    (out / "results.md").write_text(table + "\n")
    return table


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue())


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per (method, density): accuracies in %, mean ± std over seeds."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], float(row["density_target"])), []).append(row)
    lines = ["| method | density | seeds | acc. before fine-tuning (%) | acc. after fine-tuning (%) "
             "| search epochs | search s | fine-tune s |",
             "|---|---|---|---|---|---|---|---|"]
    for (method, _), group in groups.items():
        def pick(key: str, group: list[dict[str, Any]] = group) -> list[float]:
            return [float(row[key]) for row in group]

        lines.append(
            f"| {method} | {_mean_std(pick('density_actual'), digits=4)} | {len(group)} "
            f"| {_mean_std(pick('acc_before_finetune'), 100)} | {_mean_std(pick('acc_after_finetune'), 100)} "
            f"| {group[0]['epochs_to_ticket']} | {_mean_std(pick('search_seconds'))} "
            f"| {_mean_std(pick('finetune_seconds'))} |")
    return "\n".join(lines)
