"""Time and peak memory of one training step.

Peak memory is measured above what is held when the step begins (models, projections, optimizer
state, the batch):

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` at the start.
- CPU (Linux): the process's resident set. The step starts by returning freed heap memory to the
  system (``malloc_trim``) and resetting the high-water mark (``/proc/self/clear_refs``); the peak
  is ``VmHWM`` at the end minus ``VmRSS`` at the start. glibc keeps freed blocks below its mmap
  threshold in the heap, where a later step can reuse them unseen; :func:`fix_mmap_threshold`
  (called by ``fastkd distill`` and the benchmarks) makes every block of 1 MiB or more a mapping of
  its own, freed at once, so that the resident set follows the live tensors. Elsewhere: NaN.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import re
import time

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_GLIBC_MMAP_MAX = 65536  # glibc's default M_MMAP_MAX: blocks may have mappings of their own
_GLIBC_TRIM_THRESHOLD = 128 * 1024  # glibc's default M_TRIM_THRESHOLD
_NEVER_TRIM = (1 << 31) - 1  # the largest M_TRIM_THRESHOLD mallopt takes (an int)


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


_LIBC = _libc()


def _mallopt(*settings: tuple[int, int]) -> bool:
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return False
    return all(_LIBC.mallopt(param, value) == 1 for param, value in settings)


def fix_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Allocate blocks of ``nbytes`` or more with their own mapping, freed to the system at once
    (glibc ``mallopt``; this also undoes :func:`keep_freed_memory`, though what the heap kept
    until then stays resident until ``malloc_trim``); False if unavailable."""
    return _mallopt(
        (_M_MMAP_MAX, _GLIBC_MMAP_MAX), (_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD), (_M_MMAP_THRESHOLD, nbytes)
    )


def keep_freed_memory() -> bool:
    """Serve every block from the heap and keep what is freed there (glibc ``mallopt``: no
    mappings of their own, no trimming), so that a call reuses the pages an earlier call freed
    instead of mapping fresh ones, which the system must zero and fault in (a 262 MB gradient:
    tens of milliseconds, and on a virtual machine sometimes hundreds). tcmalloc and jemalloc,
    which PyTorch's CPU tuning guide recommends, keep freed memory in the same way. ``malloc_trim``
    (:func:`reset_cpu_peak`) still returns it. False if unavailable."""
    return _mallopt((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))


def proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_cpu_peak() -> bool:
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class StepMeter:
    """``start()`` before a step, ``stop()`` after it: ``(seconds, peak MiB above the start)``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._base = 0
        self._t0 = 0.0
        self._cpu_ok = False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._cpu_ok = reset_cpu_peak()
            self._base = proc_status_kb("VmRSS") or 0
        self._t0 = time.perf_counter()

    def stop(self) -> tuple[float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - self._t0
            peak = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return seconds, peak
        seconds = time.perf_counter() - self._t0
        hwm = proc_status_kb("VmHWM")
        if not self._cpu_ok or hwm is None:
            return seconds, math.nan
        return seconds, (hwm - self._base) / 1024
