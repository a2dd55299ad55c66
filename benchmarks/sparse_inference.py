"""Does a ticket run faster? Dense PyTorch vs. the exactly compacted network, on Gem-Miner masks.

Mines short Gem-Miner searches (the mask's shape decides what compaction removes, so masks come from a
search, not from random draws): cnn1d on MNIST-1D at densities 0.02 and 0.005; ResNet-20 on a CIFAR-10
subset at 0.0372, 0.0144 and 0.0059 (and VGG-16 at 0.014 with --vgg). Each ticket is exported with
``gemminer export --format compact --verify``, then the dense masked model (pruned weights stored as
zeros) and the compacted one are timed alternately in one process, at batch 1 and 256, on 1 thread and on
all threads: median of the repeats with the spread (min-max), and the machine's load average before and
after. With --mnn (the mnn extra) MNN's CPU runtime joins: the masked model converted dense and with
sparse weight detection (``gemminer export --format mnn``). Speed-ups are given over dense PyTorch and
over the fastest dense runtime (PyTorch or MNN dense). Finished runs are reused. On a machine with a CUDA
GPU, ``--device cuda`` times dense vs. compacted there.

    python benchmarks/sparse_inference.py --cifar PATH [--out runs/sparse-inference] [--mnn] [--vgg] [--seconds 4]

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


def mnn_files(run: Path) -> dict[str, Path]:
    """The masked model as MNN files: converted dense, and with sparse weight detection."""
    from gemminer.mnn_export import export_mnn

    files = {"mnn dense": run / "bench-mnn-dense.mnn", "mnn sparse": run / "bench-mnn-sparse.mnn"}
    model = load_model(run / "export-finetuned-dense.safetensors", sparse=False)
    shape = tuple(model_spec(run)["input_shape"])
    for name, path in files.items():
        if not path.is_file():
            export_mnn(model, shape, path, sparse=name == "mnn sparse")
    return files


def model_spec(run: Path) -> dict:
    _, header = read_safetensors(run / "export-finetuned-compact.safetensors", what="compacted model")
    return decode_header(header, keep_strings=("plan",))["model_spec"]


def measure(run: Path, device: torch.device, seconds: float, threads: list[int],
            use_mnn: bool) -> tuple[list[dict], dict]:
    dense = load_model(run / "export-finetuned-dense.safetensors", sparse=False).to(device)
    compacted = load_compact(run / "export-finetuned-compact.safetensors", device)
    files = mnn_files(run) if use_mnn else {}
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
            from gemminer.mnn_export import MNNModel

            runtimes = {name: MNNModel(path, threads=count) for name, path in files.items()}
            times = paired_times([dense, compacted, *runtimes.values()], batch, seconds)
            row = {**{k: info[k] for k in ("model", "density", "macs_density", "compact_macs")},
                   "batch": batch_size, "threads": count, "dense_ms": times[0], "compact_ms": times[1],
                   **{f"{name}_ms": found for name, found in zip(runtimes, times[2:], strict=True)}}
            fastest_dense = min(statistics.median(row[key]) for key in ("dense_ms", "mnn dense_ms") if key in row)
            fastest = min(statistics.median(row[key]) for key in ("compact_ms", "mnn sparse_ms") if key in row)
            row.update(speedup=statistics.median(times[0]) / fastest,
                       speedup_over_fastest_dense=fastest_dense / fastest)
            rows.append(row)
    return rows, info


def table(rows: list[dict], device: torch.device) -> str:
    """Latencies in ms, median (min-max); the speed-ups take the faster of compacted PyTorch and MNN sparse."""
    mnn = any("mnn dense_ms" in row for row in rows)
    extra = " MNN dense ms | MNN sparse ms |" if mnn else ""
    lines = ["| model | weight density | MAC density | compacted MACs | batch | threads | dense PyTorch ms | "
             f"compacted ms |{extra} speed-up over dense PyTorch | over the fastest dense runtime |",
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if mnn else "") + "---|---|"]
    for row in rows:
        threads = row["threads"] if device.type == "cpu" else device.type
        runtimes = f" {spread(row['mnn dense_ms'])} | {spread(row['mnn sparse_ms'])} |" if mnn else ""
        lines.append(f"| {row['model']} | {row['density']:.4f} | {row['macs_density']:.4f} | "
                     f"{row['compact_macs']:.4f} | {row['batch']} | {threads} | {spread(row['dense_ms'])} | "
                     f"{spread(row['compact_ms'])} |{runtimes} {row['speedup']:.2f}x | "
                     f"{row['speedup_over_fastest_dense']:.2f}x |")
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
    parser.add_argument("--mnn", action="store_true", help="add MNN dense and MNN sparse (the mnn extra; CPU)")
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
        found, info = measure(run, device, args.seconds, threads, args.mnn and device.type == "cpu")
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
