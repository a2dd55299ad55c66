"""What a ticket buys at deployment: file size and CPU inference latency, sparse vs dense.

For each model (mlp: Linear layers only; cnn1d: convolutions dominate) and density (0.02, 0.10), mine and
fine-tune a Gem-Miner ticket on MNIST-1D (the data set's preset: 30 search + 30 fine-tuning epochs), export
it dense and sparse with `gemminer export`, and measure in one process, on the same batch: file size, median
latency of the dense model (pruned weights stored as zeros) and of the sparse model (Linear layers as CSR
matmuls; convolutions stay dense: PyTorch has no sparse convolution on CPU). Finished runs are reused.

    python benchmarks/sparse_deploy.py [--out runs/sparse-deploy] [--threads 1] [--repeats 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from gemminer.export import load_model
from gemminer.runs import RunFolder

MINE_FLAGS = ["--seed", "0", "--quiet"]  # the MNIST-1D preset: search 30 epochs, fine-tune 30


def make_run(out: Path, model: str, density: float) -> Path:
    run = out / f"{model}-d{density:g}"
    if not RunFolder(run).finished:
        subprocess.run([sys.executable, "-m", "gemminer", "mine", "--model", model, "--density", str(density),
                        "--out", str(run), *MINE_FLAGS], check=True, stdout=subprocess.DEVNULL)
    for export_format in ("dense", "sparse"):
        subprocess.run([sys.executable, "-m", "gemminer", "export", "--run", str(run), "--format", export_format],
                       check=True, stdout=subprocess.DEVNULL)
    return run


@torch.no_grad()
def paired_median_ms(first: torch.nn.Module, second: torch.nn.Module, batch: torch.Tensor,
                     repeats: int) -> tuple[float, float]:
    """Median ms per forward pass of each model, the two timed alternately so that load
    from other processes on a shared machine hits both alike."""
    for _ in range(10):
        first(batch), second(batch)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for model, record in zip((first, second), times, strict=True):
            start = time.perf_counter()
            model(batch)
            record.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[0]), 1000 * statistics.median(times[1])


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sparse-deploy")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: least noise)")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from gemminer.data import load_dataset

    test = load_dataset("mnist1d").test
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} forward passes each, "
          f"dense and sparse alternating; load average {os.getloadavg()[0]:.1f}\n")
    print("| model | density | dense file (KB) | sparse file (KB) | size ratio | batch | dense ms | sparse ms "
          "| speed-up | test acc. dense / sparse |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model_name in ("mlp", "cnn1d"):
        for density in (0.02, 0.10):
            run = make_run(Path(args.out), model_name, density)
            dense_file, sparse_file = (run / f"export-finetuned-{f}.safetensors" for f in ("dense", "sparse"))
            dense, sparse = load_model(dense_file, sparse=False), load_model(sparse_file, sparse=True)
            sizes = dense_file.stat().st_size / 1024, sparse_file.stat().st_size / 1024
            accuracies = f"{accuracy(dense, test.x, test.y):.3f} / {accuracy(sparse, test.x, test.y):.3f}"
            for batch_size in (1, 256):
                batch = test.x[:batch_size]
                dense_ms, sparse_ms = paired_median_ms(dense, sparse, batch, args.repeats)
                print(f"| {model_name} | {density:.2f} | {sizes[0]:.1f} | {sizes[1]:.1f} | {sizes[0] / sizes[1]:.1f}x "
                      f"| {batch_size} | {dense_ms:.3f} | {sparse_ms:.3f} | {dense_ms / sparse_ms:.2f}x "
                      f"| {accuracies} |", flush=True)


if __name__ == "__main__":
    main()
