"""The cost claim on MNIST-1D: Gem-Miner's ticket against IMP with warmup rewinding, same epochs per round.

    python benchmarks/cost_claim.py [--seeds 0,1,2] [--density 0.02] [--out runs/cost]

Gem-Miner searches E = 30 epochs (the MNIST-1D preset); IMP trains 30 epochs per round, prunes 20% of
the survivors per round and rewinds to epoch 0.52 of the first round (2.6 of 150 epochs, the official
ResNet-20 comparison's iteration 1000, scaled to the same fraction of training). Both tickets are then
trained as their methods prescribe (Gem-Miner: fine-tuning at lr 0.01 from the initial weights; IMP: its
last round from the rewind point). epochs_to_ticket counts every training epoch before the ticket
exists, wall-clock seconds the search alone. Finished runs in --out are reused.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from gemminer.compare import _run

REWIND = "epoch:0.52"


def mean_std(values: list[float], digits: int = 1) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--density", type=float, default=0.02)
    parser.add_argument("--out", default="runs/cost")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = {"gemminer": {"method": "gemminer"},
                f"imp --search-rewind {REWIND}": {"method": "imp", "search": {"rewind": REWIND}}}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for seed in seeds:
        for name, overrides in variants.items():
            folder = Path(args.out) / f"{overrides['method']}-s{seed}"
            results[name].append(_run({**overrides, "density": args.density, "seed": seed}, folder, False, False))
    print(f"MNIST-1D, cnn1d, density {args.density}, seeds {args.seeds}\n")
    print("| method | epochs_to_ticket | search seconds | acc. after training (%) |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} | {mean_std([r['epochs_to_ticket'] for r in rows])} "
              f"| {mean_std([r['search_seconds'] for r in rows])} "
              f"| {mean_std([100 * r['acc_after_finetune'] for r in rows])} |")
    gem, imp = results["gemminer"], results[f"imp --search-rewind {REWIND}"]
    epoch_ratio = [i["epochs_to_ticket"] / g["epochs_to_ticket"] for g, i in zip(gem, imp, strict=True)]
    second_ratio = [i["search_seconds"] / g["search_seconds"] for g, i in zip(gem, imp, strict=True)]
    difference = [100 * (g["acc_after_finetune"] - i["acc_after_finetune"]) for g, i in zip(gem, imp, strict=True)]
    print(f"\nIMP / Gem-Miner: {mean_std(epoch_ratio)}x the epochs, {mean_std(second_ratio)}x the seconds; "
          f"Gem-Miner minus IMP, accuracy after training: {mean_std(difference)} points (per-seed pairs)")


if __name__ == "__main__":
    main()
