"""How many CPU threads a run's tensor operations use: ``--threads N`` or ``auto`` (the default).

Every small operation of a multi-threaded step ends with its threads waiting for each other. On a
machine whose cores are busy with other work, each such wait can cost a whole scheduler time slice,
so a run with as many threads as cores can be several times slower than one with a single thread.
``auto`` decides once, when the run starts, from what can be known then:

1. the cores this process may use: its CPU affinity, a cgroup CPU quota, and ``OMP_NUM_THREADS``
   where it is set (an explicit cap from the user or a scheduler);
2. a model whose training step is small (under `SMALL_STEP_MACS` multiply-accumulates per batch,
   e.g. cnn1d on MNIST-1D) gets 1 thread: its operations are too short to pay for the waits;
3. otherwise the cores not busy with other work: the usable cores minus the other runnable tasks
   (the kernel's count in ``/proc/loadavg``, sampled a few times over about 50 ms; the 1-minute load
   average where that count is not available), rounded, at least 1.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path

SMALL_STEP_MACS = 1e9  # multiply-accumulates per training batch below which one thread is the fastest
SAMPLES, SAMPLE_GAP = 5, 0.01  # /proc/loadavg readings and the seconds between them


def usable_cores() -> int:
    """The cores this process may run on: affinity, cgroup v2/v1 quota and OMP_NUM_THREADS, the least."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    cap = os.environ.get("OMP_NUM_THREADS", "").strip()
    if cap.isdigit() and int(cap) > 0:
        cores = min(cores, int(cap))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    """CPUs the cgroup allows (cpu.max, or cfs_quota_us / cfs_period_us), None where unlimited or unknown."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def busy_cores() -> float:
    """How many cores other work keeps busy now: the runnable tasks besides this one (median of a few
    readings of /proc/loadavg), or the 1-minute load average where that file does not exist."""
    readings = []
    for index in range(SAMPLES):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
            readings.append(max(0, int(running) - 1))  # this process reads it: not other work
        except (OSError, ValueError, IndexError):
            break
        if index < SAMPLES - 1:
            time.sleep(SAMPLE_GAP)
    if readings:
        return float(statistics.median(readings))
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0


def auto_threads(step_macs: float | None, cores: int | None = None, busy: float | None = None) -> int:
    """The `auto` rule (module docstring): 1 for a small step, else the usable cores not busy, at least 1."""
    cores = usable_cores() if cores is None else cores
    if cores <= 1 or (step_macs is not None and step_macs < SMALL_STEP_MACS):
        return 1
    busy = busy_cores() if busy is None else busy
    return max(1, min(cores, math.floor(cores - busy + 0.5)))


def parse_threads(value: object) -> int | None:
    """``auto`` (None) or a whole number >= 1, from a flag, a YAML value or an API argument."""
    from gemminer.errors import GemminerError

    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        number = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or number < 1:
        raise GemminerError(f"threads must be auto or a whole number >= 1, got {value!r}")
    return number
