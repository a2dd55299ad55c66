"""Seconds per epoch: Gem-Miner search versus plain dense training, same model and data, as a ratio
with a confidence bound tight enough to tell 1.05 from 1.10.

    python benchmarks/search_speed.py [--model cnn1d] [--pairs 30] [--processes 6] [--compile] [--profile 3]
    python benchmarks/search_speed.py --dense masked [--freeze-period 5]
    python benchmarks/search_speed.py --data cifar10 --data-dir DIR --data-limit 2560 --model resnet20

The search is the real one (`GemMiner.search`, a freezing event every `--freeze-period` epochs: 1 by
default, the most it can cost); dense training is fine-tuning's pass (`train_epoch` with fine-tuning's
SGD and schedule) over all weights, unmasked, or with `--dense masked` through a fixed mask at the run's
density, as fine-tuning trains a ticket (and as the GPU check's "dense training" is). They take turns
one epoch at a time in one thread: search, dense, dense, search, search, dense, ... (ABBA, so that neither always runs
first), so drift in machine load hits both alike. Each pair of turns gives a ratio of seconds
(search / dense); the first pair, which warms up (and compiles), is dropped. Printed as one JSON
line: the median ratio, the geometric mean and a one-sided 95% upper bound on it (bootstrap over
the pairs' log ratios). Evaluation is off in both. (One thread for both, not a thread per loop:
the OS keeps each thread on its own core, and with another job on one core that alone made two
identical dense loops differ by 14%.)

`--processes N` repeats the whole measurement in N fresh processes, one after the other, and prints
each one's line and then the median and range of their ratios. On a shared machine the ratio moves
between processes (1.04 to 1.09 seen here, same code) by more than one process's bound says: the
bound covers the pairs' noise, not a process's memory layout or its neighbours.

`--profile N` runs N epochs of each loop under torch.profiler instead and prints the operators that
take the most time in each (self CPU time, and CUDA time on a GPU): where the search's extra time
over dense training goes. Numbers need an idle machine: another job on the cores makes single
epochs noisy, and the bound wide.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from gemminer.allocator import keep_freed_memory
from gemminer.config import resolve
from gemminer.experiment import Setup, setup
from gemminer.finetune import finetune, paper_milestones
from gemminer.masking import attach_fixed_masks, weights
from gemminer.methods.gemminer import GemMiner
from gemminer.train import compiled, train_epoch


def abba(pairs: int) -> list[str]:
    """search, dense, dense, search, search, dense, ...: `pairs` pairs of turns."""
    return [name for k in range(pairs) for name in (("search", "dense") if k % 2 == 0 else ("dense", "search"))]


def dense_turns_after_each_search(order: list[str]) -> list[int]:
    """For each search turn in `order` (which starts with one), the dense turns that follow it."""
    counts: list[int] = []
    for name in order:
        if name == "search":
            counts.append(0)
        else:
            counts[-1] += 1
    return counts


def upper_bound(log_ratios: list[float], level: float = 0.95, draws: int = 20_000) -> float:
    """One-sided `level` bootstrap bound on the geometric mean ratio (percentile method, fixed seed)."""
    values = np.asarray(log_ratios)
    means = np.random.default_rng(0).choice(values, size=(draws, len(values)), replace=True).mean(axis=1)
    return math.exp(float(np.quantile(means, level)))


def dense_model(run: Setup, masked: bool) -> torch.nn.Module:
    """The network dense training trains: unmasked, or masked as fine-tuning trains a ticket (a random
    mask at the run's density through parametrize: the mask's values change no timing)."""
    model = copy.deepcopy(run.model)
    if masked:
        generator = torch.Generator().manual_seed(0)
        attach_fixed_masks(model, {name: torch.rand(weight.shape, generator=generator) < run.config.density
                                   for name, weight in weights(model, run.prunable).items()})
    return model


def interleaved(run: Setup, pairs: int, masked: bool = False) -> tuple[list[float], list[float]]:
    """Seconds of each search epoch and each dense epoch, `pairs` + 1 of each, in ABBA turns."""
    config = run.config
    epochs = pairs + 1
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    model = dense_model(run, masked)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.finetune.lr, momentum=config.finetune.momentum,
                                weight_decay=config.finetune.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, paper_milestones(epochs), gamma=0.1)
    batches = run.batches("finetune-order")
    dense_turns = dense_turns_after_each_search(["search", "dense", *abba(pairs)])
    search_seconds: list[float] = []
    dense_seconds: list[float] = []
    with compiled(model, optimizer) if config.compile else contextlib.nullcontext() as step:
        started = [time.perf_counter()]

        def end_of_search_epoch(row: dict) -> None:
            sync()
            search_seconds.append(time.perf_counter() - started[0])
            for _ in range(dense_turns[len(search_seconds) - 1]):
                start = time.perf_counter()
                train_epoch(model, batches, optimizer, step=step)
                scheduler.step()
                sync()
                dense_seconds.append(time.perf_counter() - start)
            started[0] = time.perf_counter()

        GemMiner(config.density, config.search, device=run.device, compile=config.compile).search(
            run.model, run.batches("search-order"), log=end_of_search_epoch)
    return search_seconds, dense_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", default="cnn1d")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--data", default="mnist1d")
    parser.add_argument("--data-dir", default=None, help="where --data lies (default: the data set's own)")
    parser.add_argument("--data-limit", type=int, default=None, help="training samples per epoch (data.limit)")
    parser.add_argument("--pairs", type=int, default=30, help="timed (search, dense) pairs of epochs")
    parser.add_argument("--freeze-period", type=int, default=1, metavar="T",
                        help="search epochs between freezing events (default 1: an event every epoch, the most "
                             "the search can cost; the paper's is 5)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="both loops under torch.compile")
    parser.add_argument("--dense", choices=("unmasked", "masked"), default="unmasked",
                        help="dense training of the plain network (default), or masked as fine-tuning trains a "
                             "ticket (what the GPU check's 'dense training' is)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile N epochs of each loop (torch.profiler) instead of timing pairs")
    parser.add_argument("--processes", type=int, default=1, help="repeat in N fresh processes (median, range)")
    args = parser.parse_args()
    if args.processes > 1 and args.profile:
        parser.error("--processes repeats the timing; --profile profiles once: give one of them")
    if args.freeze_period < 0:
        parser.error("--freeze-period must be at least 0 (0: no freezing)")
    if args.data_limit is not None and args.data_limit < 1:
        parser.error("--data-limit must be at least 1")
    keep_freed_memory()  # as the command line does (gemminer.allocator); GEMMINER_KEEP_MALLOC=1: glibc's defaults
    if args.processes > 1:
        repeat_in_processes(args.processes)
        return

    epochs = (args.profile or args.pairs) + 1  # the first is a warm-up
    data = {"name": args.data, **({"dir": args.data_dir} if args.data_dir else {}),
            **({"limit": args.data_limit} if args.data_limit else {})}
    config = resolve({"data": data, "model": {"name": args.model, "width": args.width},
                      "device": args.device, "density": 0.02, "compile": args.compile,
                      # a fixed lambda: the recorded ratios were measured with one, and --compile refuses auto
                      "search": {"epochs": epochs, "freeze_period": args.freeze_period, "reg_lambda": 3e-4}})
    run = setup(config)
    if args.profile:
        profile({
            "search": lambda log: GemMiner(config.density, config.search, device=run.device,
                                           compile=config.compile).search(run.model, run.batches("search-order"),
                                                                          log=log),
            "dense": lambda log: finetune(dense_model(run, args.dense == "masked"), run.batches("finetune-order"),
                                          epochs=epochs,
                                          config=config.finetune, log=log, compile=config.compile)}, run.device)
        return

    # without the warm-up pair
    search, dense = (times[1:] for times in interleaved(run, args.pairs, masked=args.dense == "masked"))
    log_ratios = [math.log(s / d) for s, d in zip(search, dense, strict=True)]
    print(json.dumps({
        "model": config.model.name, "params": sum(p.numel() for p in run.model.parameters()),
        "device": str(run.device), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "compile": config.compile,
        "batch_size": config.data.batch_size, "train_samples": len(run.dataset.train),
        "search_s_per_epoch": round(statistics.median(search), 4),
        "dense_s_per_epoch": round(statistics.median(dense), 4),
        "ratio_median": round(statistics.median(math.exp(v) for v in log_ratios), 4),
        "ratio_geomean": round(math.exp(statistics.fmean(log_ratios)), 4),
        "ratio_upper95": round(upper_bound(log_ratios), 4), "pairs": len(log_ratios),
        "freeze_period": config.search.freeze_period, "dense": args.dense}))


def repeat_in_processes(count: int) -> None:
    """This benchmark with the same arguments in `count` fresh processes in turn; each one's JSON
    line, then one line over them: the median and the range of the per-process ratios."""
    argv = [*sys.argv[1:], "--processes", "1"]  # the last one given wins: each child measures once
    results = []
    for _ in range(count):
        done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"a measuring process failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        line = done.stdout.strip().splitlines()[-1]
        print(line, flush=True)
        results.append(json.loads(line))
    ratios = [result["ratio_median"] for result in results]
    print(json.dumps({"processes": count, "ratio_median_of_processes": round(statistics.median(ratios), 4),
                      "ratio_min": min(ratios), "ratio_max": max(ratios),
                      "processes_at_or_below_1.05": sum(ratio <= 1.05 for ratio in ratios)}))


def profile(loops: dict[str, Callable[[Callable[[dict], None]], object]], device: torch.device) -> None:
    """Each loop (one after the other) under torch.profiler after its warm-up epoch; the top operators of each."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, loop in loops.items():
        profiler = torch.profiler.profile(activities=activities)
        seen = []

        def log(row: dict, profiler: torch.profiler.profile = profiler, seen: list = seen) -> None:
            seen.append(row)
            if len(seen) == 1:
                profiler.start()  # after the warm-up epoch

        loop(log)
        profiler.stop()
        print(f"== {name}: {len(seen) - 1} epochs after the warm-up")
        print(profiler.key_averages().table(sort_by=sort, row_limit=25))


if __name__ == "__main__":
    main()
