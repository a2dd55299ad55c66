"""Seconds per CPU training epoch with glibc malloc's default thresholds and with
`gemminer.allocator.keep_freed_memory`, in fresh processes taking turns (the setting is per process).

    python benchmarks/cpu_allocator.py [--processes 4] [--epochs 12] [--model cnn1d]

Each process trains `--epochs` dense epochs (MNIST-1D, batch 128, SGD) and reports the median epoch
after two warm-up epochs; the line printed has every process's median and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import copy, json, statistics, sys, time
import torch
from gemminer.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "kept" else False
from gemminer.config import resolve
from gemminer.experiment import setup
from gemminer.train import train_epoch
run = setup(resolve({"data": {"name": "mnist1d"}, "model": {"name": sys.argv[2]}}))
model = copy.deepcopy(run.model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
batches = run.batches("allocator-benchmark")
seconds = []
for _ in range(int(sys.argv[3])):
    start = time.perf_counter()
    train_epoch(model, batches, optimizer)
    seconds.append(time.perf_counter() - start)
print(json.dumps({"applied": applied, "epoch_s": statistics.median(seconds[2:])}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4, help="processes per setting")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--model", default="cnn1d")
    args = parser.parse_args()
    env = {key: value for key, value in os.environ.items() if key != "GEMMINER_KEEP_MALLOC"}
    results: dict[str, list[float]] = {"default": [], "kept": []}
    for turn in range(args.processes):
        for setting in ("default", "kept") if turn % 2 == 0 else ("kept", "default"):
            done = subprocess.run([sys.executable, "-c", CHILD, setting, args.model, str(args.epochs)], env=env,
                                  capture_output=True, text=True, check=True)
            line = json.loads(done.stdout.strip().splitlines()[-1])
            if setting == "kept" and not line["applied"]:
                raise SystemExit("keep_freed_memory() does not apply here (not glibc, or MALLOC_* settings)")
            results[setting].append(round(line["epoch_s"], 4))
    default, kept = (statistics.median(results[name]) for name in ("default", "kept"))
    print(json.dumps({"model": args.model, "threads": os.cpu_count(), "default_epoch_s": results["default"],
                      "kept_epoch_s": results["kept"], "median_default": round(default, 4),
                      "median_kept": round(kept, 4), "kept_over_default": round(kept / default, 3)}))


if __name__ == "__main__":
    main()
