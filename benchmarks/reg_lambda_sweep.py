"""Gem-Miner's `reg_lambda: auto` against a sweep of fixed lambdas, judged on the validation split.

    OMP_NUM_THREADS=1 gemminer compare --grid benchmarks/grids/reg-lambda-sweep.yaml --jobs 2 --out runs/reg-lambda
    python benchmarks/reg_lambda_sweep.py runs/reg-lambda

Reads the grid's finished cells (``<variant>-d<density>-s<seed>``; cells still missing are left out and
counted) and prints, per density: every variant's accuracy after training on the validation split
(mean ± standard deviation over seeds), before training, the gem's density, the on-path density of the
ticket, and the verdict the comparison is about:
- `auto` is "within noise" of the best fixed lambda when its mean is at most one standard deviation
  (the larger of the two variants') below the best fixed lambda's mean;
- a cell has "collapsed" when its on-path density is below 0.5 or its accuracy is below twice chance
  (20% on 10 classes); `auto` should collapse nowhere some fixed lambda avoids it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

CELL = re.compile(r"^(?P<variant>.+)-d(?P<density>[0-9.e-]+)-s(?P<seed>\d+)$")
CHANCE = 0.1


def collapsed(summary: dict) -> bool:
    on_path = summary.get("density_on_path")
    return summary["acc_after_finetune"] < 2 * CHANCE or (on_path is not None and on_path < 0.5)


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def read_cells(out: Path) -> dict[float, dict[str, list[dict]]]:
    cells: dict[float, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for folder in sorted(out.iterdir()):
        match = CELL.match(folder.name)
        if not match or not (folder / "summary.json").is_file():
            continue
        summary = json.loads((folder / "summary.json").read_text())
        cells[float(match["density"])][match["variant"]].append(summary)
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="+",
                        help="compare output folders of benchmarks/grids/reg-lambda-sweep.yaml (one per seed, say)")
    args = parser.parse_args()
    cells: dict[float, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for out in args.out:
        for density, variants in read_cells(out).items():
            for name, rows in variants.items():
                cells[density][name].extend(rows)
    if not cells:
        print(f"no finished cells in {', '.join(map(str, args.out))}", file=sys.stderr)
        return 1
    print("| density | variant | seeds | λ (median over epochs) | val. acc. before (%) | val. acc. after (%) "
          "| gem density | on-path density | collapsed |")
    print("|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for density in sorted(cells, reverse=True):
        variants = cells[density]
        for name in sorted(variants, key=lambda n: (n != "auto", n)):
            rows = variants[name]
            lam = statistics.median(r.get("reg_lambda", 0.0) for r in rows)
            on_path = [r["density_on_path"] for r in rows if r.get("density_on_path") is not None]
            print(f"| {density:g} | {name} | {len(rows)} | {lam:.2e} "
                  f"| {mean_std([r['acc_before_finetune'] for r in rows])} "
                  f"| {mean_std([r['acc_after_finetune'] for r in rows])} "
                  f"| {mean_std([r['density_gem'] for r in rows], scale=1, digits=4)} "
                  f"| {mean_std(on_path, scale=1, digits=2)} | {sum(collapsed(r) for r in rows)}/{len(rows)} |")
        fixed = {n: rows for n, rows in variants.items() if n != "auto"}
        if "auto" not in variants or not fixed:
            continue
        after = {n: [r["acc_after_finetune"] for r in rows] for n, rows in variants.items()}
        best = max(fixed, key=lambda n: statistics.fmean(after[n]))
        spread = max((statistics.stdev(after[n]) if len(after[n]) > 1 else 0.0) for n in ("auto", best))
        gap = statistics.fmean(after[best]) - statistics.fmean(after["auto"])
        safe_fixed = [n for n, rows in fixed.items() if not any(collapsed(r) for r in rows)]
        auto_collapsed = any(collapsed(r) for r in variants["auto"])
        verdicts.append(f"| {density:g} | {best} | {100 * gap:+.1f} | {100 * spread:.1f} "
                        f"| {'yes' if gap <= spread else 'no'} | {'yes' if auto_collapsed else 'no'} "
                        f"| {', '.join(safe_fixed) or 'none'} |")
    print("\n| density | best fixed λ | best minus auto (points) | larger std (points) | auto within noise "
          "| auto collapsed | fixed λ without collapse |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
