"""Seconds for one pass over the test split per evaluation batch size: the measurement
behind ``data.eval_batch_size: auto`` (`gemminer.data.AUTO_EVAL_BATCH`).

    python benchmarks/eval_batch.py [--model resnet20] [--device auto] [--batches 128,256,1000]

Random inputs of the data set's shape (no data files needed); each size runs `--repeats`
passes after one warm-up pass, and the median is printed as one JSON line per model. On CUDA,
images and convolutions are channels_last, as gemminer lays them out there (`Setup.channels_last`).
`--samples` and `--width` shrink it (the GPU check's dry run).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from gemminer.models import build_model
from gemminer.train import evaluate, resolve_device

SHAPES = {"resnet20": ((3, 32, 32), 10, 10_000), "cnn1d": ((1, 40), 10, 1_000)}


def seconds_per_pass(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch: int,
                     repeats: int) -> float:
    batches = [(inputs[i:i + batch], targets[i:i + batch]) for i in range(0, len(inputs), batch)]
    evaluate(model, batches)  # warm-up
    times = []
    for _ in range(repeats):
        if inputs.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        evaluate(model, batches)
        if inputs.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20,cnn1d", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", default="128,256,512,1000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=None, help="inputs per pass (default: the test split's size)")
    parser.add_argument("--width", type=int, default=None, help="the model's width (default: its own)")
    args = parser.parse_args()
    optional = [value for value in (args.samples, args.width) if value is not None]
    if min([args.repeats, *optional]) < 1:
        parser.error("--repeats, --samples and --width must be at least 1")
    try:
        batches = [int(batch) for batch in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches takes comma-separated whole numbers, got {args.batches!r}")
    if min(batches) < 1:
        parser.error("every --batches size must be at least 1")
    unknown = sorted(set(args.model.split(",")) - set(SHAPES))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    device = resolve_device(args.device)
    generator = torch.Generator().manual_seed(0)
    for name in args.model.split(","):
        shape, classes, count = SHAPES[name]
        count = args.samples if args.samples is not None else count
        model = build_model(name, shape, classes, width=args.width).to(device)
        inputs = torch.randn((count, *shape), generator=generator).to(device)
        channels_last = device.type == "cuda" and len(shape) == 3
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        targets = torch.randint(0, classes, (count,), generator=generator).to(device)
        seconds = {str(batch): round(seconds_per_pass(model, inputs, targets, batch, args.repeats), 4)
                   for batch in batches}
        print(json.dumps({"model": name, "samples": count, "device": str(device), "threads": torch.get_num_threads(),
                          "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "channels_last": channels_last, "seconds_per_pass": seconds}))


if __name__ == "__main__":
    main()
