"""The cost claim on MNIST-1D: Gem-Miner's ticket against IMP with warmup rewinding, same epochs per round.

    python benchmarks/cost_claim.py [--seeds 0,1,2] [--density 0.02] [--out runs/cost]

Gem-Miner searches E = 30 epochs (the MNIST-1D preset); IMP trains 30 epochs per round, prunes 20% of
the survivors per round and rewinds to epoch 0.52 of the first round (2.6 of 150 epochs, the official
ResNet-20 comparison's iteration 1000, scaled to the same fraction of training). Both tickets are then
trained as their methods prescribe (Gem-Miner: its preset's fine-tuning from the initial weights; IMP: its
last round from the rewind point). epochs_to_ticket counts every training epoch before the ticket
exists, wall-clock seconds the search alone. After the rewind IMP's rounds train the remaining schedule
(E_total - E epochs, OpenLTH; `--round-length full`: a full round of E_total, the official Gem-Miner
code); the ratio is printed under both counts. Finished runs in --out are reused.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from gemminer.compare import _rounds_row, _run
from gemminer.config import load_run_config
from gemminer.ticket import Ticket

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
    parser.add_argument("--round-length", default="remaining", choices=["remaining", "full"],
                        help="how IMP's rounds after the rewind train (the other count is printed too)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    imp_search = {"rewind": REWIND, "round_length": args.round_length}
    imp_name = f"imp --search-rewind {REWIND}" + (" --search-round-length full" if args.round_length == "full" else "")
    variants = {"gemminer": {"method": "gemminer"}, imp_name: {"method": "imp", "search": imp_search}}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    both: dict[str, list[float]] = {"remaining": [], "full": []}  # IMP's epochs to ticket under each round length
    for seed in seeds:
        for name, overrides in variants.items():
            suffix = "" if overrides["method"] != "imp" or args.round_length == "remaining" else "-full"
            folder = Path(args.out) / f"{overrides['method']}{suffix}-s{seed}"
            results[name].append(_run({**overrides, "density": args.density, "seed": seed}, folder, False, False))
            if overrides["method"] == "imp":
                ticket = Ticket.load(folder / "ticket.safetensors")
                row = _rounds_row(folder, ticket.remaining, ticket.total)
                per_round = load_run_config(folder / "config.yaml").search.epochs
                older = {"remaining": row["epochs"], "full": int(row["round"]) * per_round}  # tables before both
                for length in both:
                    both[length].append(float(row.get(f"epochs_{length}") or older[length]))
    print(f"MNIST-1D, cnn1d, density {args.density}, seeds {args.seeds}\n")
    print("| method | epochs_to_ticket | search seconds | acc. after training (%) |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} | {mean_std([r['epochs_to_ticket'] for r in rows])} "
              f"| {mean_std([r['search_seconds'] for r in rows])} "
              f"| {mean_std([100 * r['acc_after_finetune'] for r in rows])} |")
    gem, imp = results["gemminer"], results[imp_name]
    epoch_ratio = [i["epochs_to_ticket"] / g["epochs_to_ticket"] for g, i in zip(gem, imp, strict=True)]
    second_ratio = [i["search_seconds"] / g["search_seconds"] for g, i in zip(gem, imp, strict=True)]
    difference = [100 * (g["acc_after_finetune"] - i["acc_after_finetune"]) for g, i in zip(gem, imp, strict=True)]
    print(f"\nIMP / Gem-Miner: {mean_std(epoch_ratio)}x the epochs, {mean_std(second_ratio)}x the seconds; "
          f"Gem-Miner minus IMP, accuracy after training: {mean_std(difference)} points (per-seed pairs)")
    for length, label in (("remaining", "rounds after the rewind train the remaining schedule (OpenLTH)"),
                          ("full", "every round trains a full schedule (the official Gem-Miner code)")):
        ratio = [epochs / g["epochs_to_ticket"] for g, epochs in zip(gem, both[length], strict=True)]
        print(f"IMP / Gem-Miner epochs, {label}: {mean_std(both[length])} / "
              f"{mean_std([g['epochs_to_ticket'] for g in gem])} = {mean_std(ratio)}x")


if __name__ == "__main__":
    main()
