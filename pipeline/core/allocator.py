"""Keep glibc's malloc from handing large blocks back to the OS after every free.

PyTorch on CPU allocates its tensors with the C allocator. glibc serves blocks above a dynamic
threshold with fresh mmap()s and returns freed memory at the top of the heap to the OS, so a loop
that makes multi-megabyte temporaries every step (a train step's activations, EM's (B, K, N)
arrays) pays page faults on every new block. Fixing the mmap threshold at its maximum (32 MiB)
and never trimming keeps those blocks in the heap for reuse. Measured on the 2-core reference
machine (docs/speed.md): batched EM 1.1-1.7x faster, the untrained network's evaluation forward
1.4x; the TGMM train step within noise (92 vs 87 ms/step in separate processes).

Blocks above the 32 MiB ceiling would still get an mmap of their own, freed (munmap) and faulted
in again on every use: at the TGMM paper's size (12 x 128, 256 tasks of N <= 128) a step's MLP
activations are 34-67 MB, and such steps took 300-600 thousand page faults and 2-5 s of kernel
time each (of 8-12 s). So mmap for allocations is switched off too (M_MMAP_MAX = 0): every block
comes from the heap and is reused; glibc still maps a fresh region where the heap cannot grow.
Measured (docs/speed.md): the paper-size step with N = 105 / 116 from 9.9 / 9.9 s to 6.7 / 7.7 s.
The price is that the process keeps its peak heap until it exits, which the pipeline's short-lived
stage processes can afford. (Intel's PyTorch CPU guide gets the same with jemalloc / tcmalloc
preloaded; those are left alone.)

Applied at start by `python -m pipeline` and in every Ray Tune trial. Skipped where it does not
apply or the user chose: not glibc, an allocator in LD_PRELOAD, MALLOC_* / GLIBC_TUNABLES set,
or PIPELINE_MALLOC=default.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_NEVER = 2**31 - 1

_applied: bool | None = None


def _user_chose() -> bool:
    env = os.environ
    if env.get("PIPELINE_MALLOC", "").lower() == "default" or "GLIBC_TUNABLES" in env:
        return True
    if any(k.startswith("MALLOC_") for k in env):
        return True
    return any(a in env.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc"))


def tune_allocator() -> bool:
    """Set the three mallopt parameters once per process; -> whether they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or _user_chose():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # the mmap threshold first: setting the trim threshold alone would also freeze the
        # (then small, 128 KiB) mmap threshold, which is much slower than glibc's default
        _applied = (bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX))
                    and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_NEVER))
                    and bool(libc.mallopt(M_MMAP_MAX, 0)))
    except (OSError, AttributeError):
        _applied = False
    return _applied
