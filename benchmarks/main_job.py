"""The main job's accuracy target: Gem-Miner beats a random ticket of the same layerwise
density by >= 10 points before and >= 10 points after fine-tuning (MNIST-1D, density 0.02).

    python benchmarks/main_job.py [--seeds 0,1,2] [--out runs/main-benchmark]

Runs `gemminer compare` with the default settings, then checks the target per seed and
on the mean. Prints the table and one JSON line; exits 1 if the target is missed.
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
    table = compare({}, ["gemminer", "random"], [args.density], seeds, args.out, dense=True, force=args.force,
                    progress=False)
    seconds = time.perf_counter() - start
    rows = list(csv.DictReader(open(Path(args.out) / "results.csv")))
    by = {(row["method"], int(row["seed"])): row for row in rows}
    gaps = {"before": [], "after": []}
    for seed in seeds:
        gem, rand = by[("gemminer", seed)], by[("random", seed)]
        gaps["before"].append(100 * (float(gem["acc_before_finetune"]) - float(rand["acc_before_finetune"])))
        gaps["after"].append(100 * (float(gem["acc_after_finetune"]) - float(rand["acc_after_finetune"])))
    passed = all(gap >= TARGET_POINTS for values in gaps.values() for gap in values)
    print(table)
    print(json.dumps({"seeds": seeds, "gap_before_points": [round(g, 1) for g in gaps["before"]],
                      "gap_after_points": [round(g, 1) for g in gaps["after"]],
                      "mean_gap_before": round(statistics.fmean(gaps["before"]), 1),
                      "mean_gap_after": round(statistics.fmean(gaps["after"]), 1),
                      "target_points": TARGET_POINTS, "passed": passed, "wall_seconds": round(seconds, 1)}))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
