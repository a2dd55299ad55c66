"""Seconds per training epoch at 1 and 2 CPU threads and at `--threads auto`, for cnn1d (MNIST-1D shapes)
and ResNet-20 (CIFAR-10 shapes), on the machine as it is ("idle") and beside a CPU hog this script starts
and stops itself.

    python benchmarks/threads.py [--epochs 2] [--resnet-samples 512] [--cnn-samples 4000]

Each measurement runs in a fresh process (torch's thread pool is set once per process) on random tensors
of the data set's shape (the speed of a step does not depend on the values), with SGD + momentum and
batch 128 as the runs train. One epoch is run first and not timed. The load average is printed beside
each condition: on a shared machine the "idle" column is only as idle as the machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = {"cnn1d": ((1, 40), 10), "resnet20": ((3, 32, 32), 10)}
SETTINGS = ["1", "2", "auto"]
BATCH = 128


def worker(model_name: str, threads: str, epochs: int, samples: int) -> dict:
    import torch
    import torch.nn.functional as F

    from gemminer.models import build_model
    from gemminer.report import layer_macs
    from gemminer.threads import auto_threads

    shape, classes = MODELS[model_name]
    torch.manual_seed(0)
    model = build_model(model_name, shape, classes)
    if threads == "auto":  # as a run's setup decides it (gemminer.experiment.apply_threads)
        chosen = auto_threads(sum(layer_macs(model, shape).values()) * BATCH)
    else:
        chosen = int(threads)
    torch.set_num_threads(chosen)
    inputs, targets = torch.randn(samples, *shape), torch.randint(0, classes, (samples,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    times = []
    for epoch in range(epochs + 1):
        started = time.perf_counter()
        for start in range(0, samples, BATCH):
            optimizer.zero_grad()
            F.cross_entropy(model(inputs[start:start + BATCH]), targets[start:start + BATCH]).backward()
            optimizer.step()
        if epoch:  # the first epoch warms up allocator and kernels
            times.append(time.perf_counter() - started)
    return {"model": model_name, "setting": threads, "threads": chosen, "seconds": statistics.median(times)}


def measure(model_name: str, threads: str, epochs: int, samples: int) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}  # auto sees the cores
    output = subprocess.run([sys.executable, __file__, "--worker", model_name, threads, str(epochs), str(samples)],
                            capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per measurement (default 2)")
    parser.add_argument("--cnn-samples", type=int, default=4000, help="cnn1d epoch size (MNIST-1D's train split)")
    parser.add_argument("--resnet-samples", type=int, default=512, help="ResNet-20 epoch size (a subset)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, threads, epochs, samples = args.worker
        print(json.dumps(worker(name, threads, int(epochs), int(samples))))
        return
    samples = {"cnn1d": args.cnn_samples, "resnet20": args.resnet_samples}
    rows = []
    for condition in ("idle", "hog"):
        hog = None
        if condition == "hog":
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(2)
        try:
            for name in MODELS:
                for threads in SETTINGS:
                    load = os.getloadavg()[0]  # before each measurement: other users' work comes and goes
                    result = measure(name, threads, args.epochs, samples[name])
                    rows.append({**result, "condition": condition, "load": round(load, 2)})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            if hog is not None:
                hog.terminate()
                hog.wait()
    print(f"\ncores: {os.cpu_count()}; epochs timed: {args.epochs}; samples: {samples}\n")
    print("| model | condition | load avg (1 min, at 1 thread) | 1 thread s/epoch | 2 threads s/epoch "
          "| auto s/epoch (threads) | auto vs best |")
    print("|---|---|---|---|---|---|---|")
    for condition in ("idle", "hog"):
        for name in MODELS:
            cell = {row["setting"]: row for row in rows if row["model"] == name and row["condition"] == condition}
            best = min(row["seconds"] for row in cell.values())
            auto = cell["auto"]
            print(f"| {name} | {condition} | {cell['1']['load']} | {cell['1']['seconds']:.3f} | "
                  f"{cell['2']['seconds']:.3f} | {auto['seconds']:.3f} ({auto['threads']}) | "
                  f"{100 * (auto['seconds'] / best - 1):+.0f}% |")


if __name__ == "__main__":
    main()
