"""Wall clock of one grid, serially, with --jobs 2, and on a local Ray instance (MNIST-1D presets).

    python benchmarks/grid_wallclock.py [--modes serial,jobs2,ray]

The grid: gemminer, snip and random at densities 0.05 and 0.02, seed 0, plus dense (7 cells);
every mode starts from an empty folder. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from gemminer.compare import compare
from gemminer.grid import grid_from_flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="serial,jobs2,ray")
    args = parser.parse_args()
    print("| mode | cells | wall clock (s) |")
    print("|---|---|---|")
    for mode in args.modes.split(","):
        grid = grid_from_flags({}, ["gemminer", "snip", "random"], [0.05, 0.02], [0], sanity=[])
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            compare(grid, Path(out), jobs=2 if mode == "jobs2" else 1, ray_address="local" if mode == "ray" else None,
                    progress=False, report=None)
            seconds = time.perf_counter() - start
        print(f"| {mode} | {len(grid.variants) * 2 + 1} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
