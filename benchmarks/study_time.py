"""How long a study grid takes: one cell of each variant timed, the whole grid's wall clock estimated.

    OMP_NUM_THREADS=1 python benchmarks/study_time.py [--grid experiments/mnist1d.yaml] [--jobs 2]
        [--out runs/study-time]

Each variant runs one cell at the grid's settings (seed 0, its highest density; one thread, as each of
`--jobs` workers on as many cores gets). Its seconds are the process's CPU seconds, which on one thread
are what the cell takes on an idle core, so a busy shared machine does not inflate them (its wall clock
is printed beside them). An IMP variant runs to 0.64 (two rounds and its ticket): its
cost is per round, and the study's IMP run takes `stop_round(lowest density)` rounds. The grid's
tasks (`compare.plan`: cells, IMP stops, sanity checks, in the order and with the dependencies
`compare` gives them) are then scheduled on `--jobs` workers with those durations: a sanity check
costs one ticket training per check, an IMP stop one ticket training. Finished cells in --out are reused
(their recorded seconds are used). Prints the per-cell table and the estimate.
"""

from __future__ import annotations

import argparse
import heapq
import json
import time
from pathlib import Path

from gemminer.compare import _run, plan
from gemminer.grid import load_grid
from gemminer.methods.imp import stop_round

PHASES = {"search": 0.0, "train": 0.0}  # CPU seconds of the search and of the ticket's training, this cell


def _timed(function, phase: str):
    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            PHASES[phase] += time.process_time() - start
    return wrapper


def measure(grid, out: Path) -> dict[str, dict[str, float]]:
    """Seconds of one cell per variant (and dense): wall, search, ticket training; for IMP per round."""
    from gemminer import experiment
    from gemminer.grid import Variant
    from gemminer.methods.base import PruningMethod

    PruningMethod.search = _timed(PruningMethod.search, "search")
    experiment.train_ticket = _timed(experiment.train_ticket, "train")
    timings = {}
    variants = [*grid.variants, *([Variant("dense", {"method": "dense"})] if grid.dense else [])]
    for variant in variants:
        density = 1.0 if variant.method == "dense" else max(grid.densities_of(variant))
        overrides = grid.cell_overrides(variant, density, grid.seeds[0])
        if variant.method == "imp":  # two rounds: 1 -> 0.8 -> 0.64
            overrides = {**overrides, "density": 0.64, "search": {**overrides.get("search", {}), "keep_densities": []}}
        folder = out / variant.name
        timed = out / f"{variant.name}.json"
        start, cpu = time.perf_counter(), time.process_time()
        PHASES.update(search=0.0, train=0.0)
        summary = _run(overrides, folder, False, False)
        if not timed.is_file():  # a reused cell keeps the times of the run that made it
            timed.write_text(json.dumps({"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                                         **PHASES}))
        clock = json.loads(timed.read_text())
        # one thread: the process's CPU seconds are what the cell takes on an idle core (a cell timed without
        # its phases: the run's own wall seconds per phase, scaled by the cell's CPU / wall)
        scale = clock["cpu"] / clock["wall"]
        search = clock.get("search", summary["search_seconds"] * scale)
        train = clock.get("train", summary["finetune_seconds"] * scale)
        timings[variant.name] = {"wall": clock["cpu"], "measured_wall": clock["wall"], "search": search,
                                 "train": train, "other": max(0.0, clock["cpu"] - search - train)}
        if variant.method == "imp":
            timings[variant.name]["round"] = search / 2
        print(f"measured {variant.name}: {timings[variant.name]}", flush=True)
    return timings


def durations(grid, timings: dict[str, dict[str, float]], out: Path) -> tuple[list, dict[str, float]]:
    """The grid's tasks with an estimated duration each."""
    cells, tasks = plan(grid, out)
    by_folder = {str(cell.folder): cell for cell in cells}
    seconds = {}
    for task in tasks:
        cell = by_folder.get(task.key) or by_folder.get(task.key.split("#")[0])
        name = cell.name
        measured = timings[name]
        if task.kind == "sanity":
            seconds[task.key] = len(task.args["checks"]) * (measured["train"] + measured["other"])
        elif task.kind == "stop":
            seconds[task.key] = measured["train"] + measured["other"]
        elif cell.variant is not None and cell.variant.method == "imp":
            rounds = stop_round(min(grid.densities_of(cell.variant)))
            seconds[task.key] = rounds * measured["round"] + measured["train"] + measured["other"]
        else:
            seconds[task.key] = measured["wall"]
    return tasks, seconds


def schedule(tasks: list, seconds: dict[str, float], jobs: int) -> float:
    """The wall clock of `compare.execute`: ready tasks (long IMP runs first) queue in order for `jobs`
    workers; a task becomes ready when everything it needs has finished."""
    pending = {task.key: task for task in tasks}
    queue: list[str] = []
    done: set[str] = set()
    running: list[tuple[float, str]] = []
    now = 0.0
    while pending or queue or running:
        for key, task in sorted(pending.items(), key=lambda item: not item[1].first):
            if all(need in done for need in task.needs):
                queue.append(key)
                del pending[key]
        while queue and len(running) < jobs:
            key = queue.pop(0)
            heapq.heappush(running, (now + seconds[key], key))
        if not running:
            break
        now, key = heapq.heappop(running)
        done.add(key)
    return now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="experiments/mnist1d.yaml")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="runs/study-time")
    args = parser.parse_args()
    grid = load_grid(args.grid)
    out = Path(args.out)
    timings = measure(grid, out)
    print("\n| variant | search s | ticket training s | other s | one cell, CPU s | one cell, wall s |\n"
          "|---|---|---|---|---|---|")
    for name, measured in timings.items():
        search = f"{measured['round']:.0f} a round" if "round" in measured else f"{measured['search']:.0f}"
        print(f"| {name} | {search} | {measured['train']:.0f} | {measured['other']:.0f} | {measured['wall']:.0f} "
              f"| {measured['measured_wall']:.0f} |")
    tasks, seconds = durations(grid, timings, out / "grid")
    serial = sum(seconds.values())
    wall = schedule(tasks, seconds, args.jobs)
    longest = max(seconds.values())
    print(f"\n{len(tasks)} tasks; one worker: {serial / 60:.0f} min; --jobs {args.jobs}: {wall / 60:.0f} min "
          f"(the longest task, an IMP run: {longest / 60:.0f} min)")


if __name__ == "__main__":
    main()
