"""Images per second: the data path alone, dense training, and Gem-Miner search (ResNet-20 / CIFAR-10).

    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10-jpeg     # once, outside the repository
    python benchmarks/image_throughput.py --data imagefolder:/tmp/cifar10-jpeg --data-limit 2560 --epochs 3

Everything goes through the same `setup()` as `gemminer mine` (tensors on the device,
channels_last, batched augmentation). Dense training and the search each run `--epochs`
epochs on the same batches, `--repeats` times interleaved; the first epoch of each is a
warm-up and not counted; rates are medians. The data-only
pass iterates the same augmented, normalized training batches with no model. Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
from search_speed import per_epoch  # the sibling script: seconds per epoch, warm-up dropped

from gemminer.config import resolve
from gemminer.experiment import setup
from gemminer.finetune import finetune
from gemminer.methods.gemminer import GemMiner


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def data_only_images_per_second(run, passes: int) -> float:
    """Iterate the training batches (gather, crop, flip, normalize), touching each batch."""
    batches = run.batches("data-only")
    checksum = torch.zeros((), device=run.device)
    for inputs, _ in batches:  # warm-up pass
        checksum += inputs[0, 0, 0, 0]
    synchronize(run.device)
    start = time.perf_counter()
    for _ in range(passes):
        for inputs, _ in batches:
            checksum += inputs[0, 0, 0, 0]  # keeps the work from being skipped, without a host sync
    synchronize(run.device)
    return passes * len(run.dataset.train) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="imagefolder:/tmp/cifar10-jpeg")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--data-limit", type=int, default=2560, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="per loop; the first is not counted")
    parser.add_argument("--data-passes", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats, so load drift hits all alike")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last, for comparison")
    args = parser.parse_args()

    config = resolve({"data": {"name": args.data, "dir": args.data_dir, "limit": args.data_limit,
                               "batch_size": args.batch_size},
                      "model": {"name": args.model}, "device": args.device, "bf16": args.bf16, "density": 0.0144,
                      "search": {"epochs": args.epochs, "freeze_period": 1}})
    start = time.perf_counter()
    run = setup(config)
    setup_seconds = time.perf_counter() - start
    if args.contiguous:
        run.model = run.model.to(memory_format=torch.contiguous_format)
        channels_last_batches = run.batches

        def contiguous_batches(stream: str):
            batches = channels_last_batches(stream)
            to_nchw = batches.transform
            batches.transform = lambda images: to_nchw(images).contiguous()
            return batches

        run.batches = contiguous_batches
    images = len(run.dataset.train)

    data_rates, dense_times, search_times = [], [], []
    for _ in range(args.repeats):
        data_rates.append(data_only_images_per_second(run, args.data_passes))
        dense = finetune(copy.deepcopy(run.model), run.batches("dense-order"), epochs=args.epochs,
                         config=config.finetune)
        dense_times += per_epoch(dense)
        miner = GemMiner(config.density, config.search, device=run.device)
        search_times += per_epoch(miner.search(run.model, run.batches("search-order")).history)
    data_rate = statistics.median(data_rates)
    dense_rate = images / statistics.median(dense_times)
    search_rate = images / statistics.median(search_times)
    device_name = (torch.cuda.get_device_name(run.device) if run.device.type == "cuda"
                   else platform.processor() or platform.machine())
    print(json.dumps({
        "data": args.data, "model": config.model.name, "device": str(run.device), "device_name": device_name,
        "threads": torch.get_num_threads(), "bf16": args.bf16,
        "memory_format": "contiguous" if args.contiguous else "channels_last", "batch_size": args.batch_size,
        "train_images": images, "epochs_timed": args.repeats * (args.epochs - 1), "setup_s": round(setup_seconds, 2),
        "data_only_img_per_s": round(data_rate), "dense_train_img_per_s": round(dense_rate, 1),
        "gemminer_search_img_per_s": round(search_rate, 1),
        "data_only_over_dense": round(data_rate / dense_rate, 1)}))


if __name__ == "__main__":
    main()
