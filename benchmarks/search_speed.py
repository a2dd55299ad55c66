"""Seconds per epoch: Gem-Miner search versus plain dense training, same model and data.

    python benchmarks/search_speed.py [--model cnn1d] [--epochs 6] [--repeats 3]

Both loops run in this one process on the same batches; the first epoch of each is a
warm-up and not counted. Evaluation is off in both. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import statistics

import torch

from gemminer.config import resolve
from gemminer.experiment import setup
from gemminer.finetune import finetune
from gemminer.methods.gemminer import GemMiner


def per_epoch(history: list[dict]) -> list[float]:
    seconds = [row["seconds"] for row in history]
    return [b - a for a, b in itertools.pairwise(seconds)]  # drops the warm-up epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn1d")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    config = resolve({"model": {"name": args.model, "width": args.width}, "device": args.device,
                      "density": 0.02, "search": {"epochs": args.epochs, "freeze_period": 1}})
    run = setup(config)
    search_times, dense_times = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        miner = GemMiner(config.density, config.search, device=run.device)
        search_times += per_epoch(miner.search(run.model, run.batches("search-order")).history)
        model = copy.deepcopy(run.model)
        dense_times += per_epoch(finetune(model, run.batches("finetune-order"), epochs=args.epochs,
                                          config=config.finetune))
    search, dense = statistics.median(search_times), statistics.median(dense_times)
    print(json.dumps({
        "model": config.model.name, "params": sum(p.numel() for p in run.model.parameters()),
        "device": str(run.device), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "batch_size": config.data.batch_size, "train_samples": len(run.dataset.train),
        "search_s_per_epoch": round(search, 4), "dense_s_per_epoch": round(dense, 4),
        "ratio": round(search / dense, 3), "epochs_timed": len(search_times)}))


if __name__ == "__main__":
    main()
