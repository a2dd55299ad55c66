"""The main job's accuracy target: Gem-Miner beats a uniform random ticket by >= 10 points before
and >= 10 points after training (MNIST-1D, density 0.02); its layerwise shuffle is reported beside.

    python benchmarks/main_job.py [--seeds 0,1,2] [--out runs/main-benchmark]

Runs `gemminer compare` with the default settings (gemminer and random, the gemminer ticket's
shuffle sanity check, dense), then checks the target per seed. Prints the table and one JSON line;
exits 1 if the target is missed.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

from gemminer.compare import compare
from gemminer.grid import grid_from_flags

TARGET_POINTS = 10.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--density", type=float, default=0.02)
    parser.add_argument("--out", default="runs/main-benchmark")
    parser.add_argument("--force", action="store_true", help="rerun finished runs")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    start = time.perf_counter()
    grid = grid_from_flags({}, ["gemminer", "random"], [args.density], seeds, sanity=["shuffle"])
    table = compare(grid, args.out, force=args.force, progress=False, report=None)
    seconds = time.perf_counter() - start
    rows = list(csv.DictReader(open(Path(args.out) / "results.csv")))
    by = {(row["variant"], int(row["seed"])): row for row in rows}
    gaps = {"before": [], "after": [], "shuffle_drop": []}
    for seed in seeds:
        gem, rand = by[("gemminer", seed)], by[("random", seed)]
        gaps["before"].append(100 * (float(gem["acc_before_finetune"]) - float(rand["acc_before_finetune"])))
        gaps["after"].append(100 * (float(gem["acc_after_finetune"]) - float(rand["acc_after_finetune"])))
        gaps["shuffle_drop"].append(100 * (float(gem["acc_after_finetune"]) - float(gem["sanity_shuffle"])))
    passed = all(gap >= TARGET_POINTS for key in ("before", "after") for gap in gaps[key])
    print(table)
    print(json.dumps({"seeds": seeds, "gap_before_points": [round(g, 1) for g in gaps["before"]],
                      "gap_after_points": [round(g, 1) for g in gaps["after"]],
                      "mean_gap_before": round(statistics.fmean(gaps["before"]), 1),
                      "mean_gap_after": round(statistics.fmean(gaps["after"]), 1),
                      "shuffle_drop_points": [round(g, 1) for g in gaps["shuffle_drop"]],
                      "target_points": TARGET_POINTS, "passed": passed, "wall_seconds": round(seconds, 1)}))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
