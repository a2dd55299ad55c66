"""The sweeps behind the MNIST-1D presets of the baselines, on a validation split (never the test set).

    python benchmarks/preset_sweep.py dense        # the dense recipe (what IMP, PaI and random tickets train with)
    python benchmarks/preset_sweep.py edge-popup   # edge-popup's search lr and weight decay

Every point is a `gemminer mine` run on 3500 training / 500 validation samples of MNIST-1D with
`--data-eval-split val`; the table gives the validation accuracy, seed 0.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from gemminer.config import resolve
from gemminer.experiment import mine

VAL = {"data": {"val_size": 500, "eval_split": "val"}, "preset": "paper"}

SWEEPS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    # the dense recipe: plain training of cnn1d, 30 epochs, multistep x0.1 at [15, 20], weight decay 1e-4
    "dense": [(f"lr {lr}, wd {wd}", {"method": "dense", "finetune": {"epochs": 30, "lr": lr, "weight_decay": wd}})
              for lr in (0.01, 0.03, 0.1, 0.3) for wd in (1e-4, 5e-4)],
    # edge-popup at density 0.02: its subnetwork at init (the search), 30 epochs, cosine
    "edge-popup": [(f"lr {lr}, wd {wd}", {"method": "edge-popup", "density": 0.02, "finetune": {"epochs": 0},
                                         "search": {"epochs": 30, "lr": lr, "weight_decay": wd}})
                   for lr in (0.1, 0.3, 1.0) for wd in (5e-4, 1e-4, 0.0)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", choices=sorted(SWEEPS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| setting | val. acc. before training (%) | val. acc. after training (%) |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for index, (label, overrides) in enumerate(SWEEPS[args.sweep]):
            config = resolve({**VAL, **overrides, "seed": args.seed,
                              "data": {**VAL["data"], **overrides.get("data", {})}})
            summary = mine(config, Path(scratch) / str(index), progress=False)
            before, after = 100 * summary["acc_before_finetune"], 100 * summary["acc_after_finetune"]
            print(f"| {label} | {before:.1f} | {after:.1f} |", flush=True)


if __name__ == "__main__":
    main()
