"""glibc's malloc, kept from handing memory back to the OS between training steps.

Every step allocates and frees activations of a few megabytes. With glibc's default thresholds,
blocks above a (dynamic) limit are mmap-ed and unmapped each time, and the heap top is trimmed
back to the OS, so the next step page-faults the same memory in again, zeroed. Keeping blocks
up to 32 MiB on the heap and trimming only above 256 MiB made a CPU training epoch 22%
shorter on the development machine (docs/benchmarks.md, "CPU allocator"); results are unchanged, since
where a tensor lives changes no arithmetic.

The command line applies it (`gemminer ...`, and every `compare` worker); library users may call
`keep_freed_memory()` themselves. It does nothing off glibc, where the user set glibc's own
MALLOC_* or GLIBC_TUNABLES variables, or with GEMMINER_KEEP_MALLOC=1 (glibc's defaults kept). The
price: a process may hold up to about 256 MiB of freed heap instead of returning it to the OS.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 256 << 20
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES",
                 "GEMMINER_KEEP_MALLOC")


def keep_freed_memory() -> bool:
    """Raise glibc malloc's mmap and trim thresholds for this process; True where applied. Calling
    it again sets the same values; where it does not apply (see the module docstring) it does nothing."""
    if not sys.platform.startswith("linux") or any(os.environ.get(name, "") not in ("", "0") for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success; musl and others lack it (AttributeError above) or refuse
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
