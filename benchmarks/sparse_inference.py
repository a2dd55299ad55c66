"""Does a ticket run faster? Dense PyTorch vs. the exactly compacted network, on Gem-Miner masks.

Mines short Gem-Miner searches (the mask's shape decides what compaction removes, so masks come from a
search, not from random draws): cnn1d on MNIST-1D at densities 0.02 and 0.005; ResNet-20 on a CIFAR-10
subset at 0.0372, 0.0144 and 0.0059 (and VGG-16 at 0.014 with --vgg). Each ticket is exported with
``gemminer export --format compact --verify``, then the dense masked model (pruned weights stored as
zeros) and the compacted one are timed alternately in one process, at batch 1 and 256, on 1 thread and on
all threads: median of the repeats with the spread (min-max), and the machine's load average before and
after. Finished runs are reused. On a machine with a CUDA GPU, ``--device cuda`` times the same pairs there.

    python benchmarks/sparse_inference.py --cifar PATH [--out runs/sparse-inference] [--vgg] [--seconds 4]

PATH is an unpacked CIFAR-10 image folder (PATH/train/<class>/*.jpg, PATH/test/<class>/*.jpg).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from gemminer.compact import load_compact
from gemminer.export import load_model
from gemminer.runs import RunFolder
from gemminer.ticket import Ticket, decode_header, read_safetensors

SHORT_SEARCH = {  # short searches on a data subset: enough for the mask's shape, not for its accuracy
    "cnn1d": ["--data", "mnist1d", "--epochs", "10", "--search-freeze-period", "1"],
    "resnet20": ["--epochs", "5", "--search-freeze-period", "1", "--data-limit", "2000"],
    "vgg16": ["--epochs", "5", "--search-freeze-period", "1", "--data-limit", "2000"],
}
TICKETS = [("cnn1d", 0.02), ("cnn1d", 0.005), ("resnet20", 0.0372), ("resnet20", 0.0144), ("resnet20", 0.0059)]


def make_run(out: Path, model: str, density: float, cifar: str | None) -> Path:
    run = out / f"{model}-d{density:g}"
    if not RunFolder(run).finished:
        data = [] if model == "cnn1d" else ["--data", f"imagefolder:{cifar}"]
        subprocess.run([sys.executable, "-m", "gemminer", "mine", "--model", model, "--density", str(density),
                        *SHORT_SEARCH[model], *data, "--finetune-epochs", "1", "--eval-every", "100", "--seed", "0",
                        "--quiet", "--out", str(run)], check=True, stdout=subprocess.DEVNULL)
    for export_format in ("dense", "compact"):
        extra = ["--verify"] if export_format == "compact" else []
        subprocess.run([sys.executable, "-m", "gemminer", "export", "--run", str(run), "--format", export_format,
                        *extra], check=True, stdout=subprocess.DEVNULL)
    return run


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def paired_times(models: list[torch.nn.Module], batch: torch.Tensor, seconds: float) -> list[list[float]]:
    """ms per forward pass of each model, timed alternately (load from other processes hits all alike),
    for about `seconds` in all (at least 3, at most 200 repeats)."""
    device = batch.device
    for model in models:  # warm-up, and the time of one pass
        model(batch)
    start = time.perf_counter()
    for model in models:
        model(batch)
    synchronize(device)
    one_round = max(time.perf_counter() - start, 1e-6)
    repeats = int(min(200, max(3, seconds / one_round)))
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for model, record in zip(models, times, strict=True):
            synchronize(device)
            begin = time.perf_counter()
            model(batch)
            synchronize(device)
            record.append(1000 * (time.perf_counter() - begin))
    return times


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def measure(run: Path, device: torch.device, seconds: float, threads: list[int]) -> tuple[list[dict], dict]:
    dense = load_model(run / "export-finetuned-dense.safetensors", sparse=False).to(device)
    compacted = load_compact(run / "export-finetuned-compact.safetensors", device)
    _, header = read_safetensors(run / "export-finetuned-compact.safetensors", what="compacted model")
    meta = decode_header(header, keep_strings=("plan",))
    ticket = Ticket.load(run / "ticket.safetensors")
    spec = meta["model_spec"]
    info = {"run": run.name, "model": spec["name"], "density": ticket.density,
            "macs_density": meta["macs_remaining"] / meta["macs_total"],
            "compact_macs": meta["macs_compact"] / meta["macs_total"], "layers": meta["layers"],
            "layer_density": {layer.name: layer.density for layer in ticket.layers()}}
    rows = []
    for batch_size in (1, 256):
        batch = torch.randn(batch_size, *spec["input_shape"], device=device)
        for count in threads if device.type == "cpu" else [torch.get_num_threads()]:
            torch.set_num_threads(count)
            dense_ms, compact_ms = paired_times([dense, compacted], batch, seconds)
            rows.append({**{k: info[k] for k in ("model", "density", "macs_density", "compact_macs")},
                         "batch": batch_size, "threads": count, "dense_ms": dense_ms, "compact_ms": compact_ms,
                         "speedup": statistics.median(dense_ms) / statistics.median(compact_ms)})
    return rows, info


def table(rows: list[dict], device: torch.device) -> str:
    lines = ["| model | weight density | MAC density | compacted MACs | batch | threads | dense PyTorch ms | "
             "compacted ms | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        threads = row["threads"] if device.type == "cpu" else device.type
        lines.append(f"| {row['model']} | {row['density']:.4f} | {row['macs_density']:.4f} | "
                     f"{row['compact_macs']:.4f} | {row['batch']} | {threads} | {spread(row['dense_ms'])} | "
                     f"{spread(row['compact_ms'])} | {row['speedup']:.2f}x |")
    return "\n".join(lines)


def layer_table(info: dict) -> str:
    lines = [f"{info['run']}: layer, density, input channels kept, output channels kept"]
    for name, (kept_in, full_in, kept_out, full_out) in info["layers"].items():
        density = info["layer_density"].get(name)
        lines.append(f"  {name}: {density:.4f}  in {kept_in}/{full_in}  out {kept_out}/{full_out}"
                     if density is not None else f"  {name}: dense  in {kept_in}/{full_in}  out {kept_out}/{full_out}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sparse-inference")
    parser.add_argument("--cifar", help="CIFAR-10 image folder (train/ and test/ of class folders)")
    parser.add_argument("--vgg", action="store_true", help="add VGG-16 at density 0.014")
    parser.add_argument("--only", help="comma-separated models to run (default: all)")
    parser.add_argument("--seconds", type=float, default=4.0, help="timing budget per pair and setting")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    device = torch.device(args.device)
    tickets = TICKETS + ([("vgg16", 0.014)] if args.vgg else [])
    if args.only:
        tickets = [ticket for ticket in tickets if ticket[0] in args.only.split(",")]
    if any(model != "cnn1d" for model, _ in tickets) and not args.cifar:
        parser.error("the image models need --cifar PATH")
    threads = sorted({1, os.cpu_count() or 1})
    load_before = os.getloadavg()
    rows, infos = [], []
    for model, density in tickets:
        run = make_run(Path(args.out), model, density, args.cifar)
        found, info = measure(run, device, args.seconds, threads)
        rows += found
        infos.append(info)
        print(table(found, device), flush=True)
    load_after = os.getloadavg()
    print(f"\ntorch {torch.__version__}, device {device}, {os.cpu_count()} CPUs; load average (1, 5, 15 min) "
          f"before {', '.join(f'{v:.2f}' for v in load_before)}, after {', '.join(f'{v:.2f}' for v in load_after)}")
    print(table(rows, device))
    for info in infos:
        print(layer_table(info))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "tickets": infos, "load_before": load_before,
                                               "load_after": load_after}, indent=1))


if __name__ == "__main__":
    main()
