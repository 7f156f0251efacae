"""``python benchmarks/one_pass_loop.py``: fastkd.logit_kl (N=2048, V=32000, float32, T=2, CPU)
on its one-pass and its two-pass path, called in turn with nothing else in between, as a training
loop calls a loss: forward + backward time of each call (median and min over 10 calls each, after
2 warm-up calls each), then the resident memory held between the forward and the backward and the
peak of forward + backward (VmRSS/VmHWM of /proc/self/status, after malloc_trim)."""

from __future__ import annotations

import ctypes
import statistics
import time

import torch

import fastkd


def status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def main() -> None:
    student = torch.randn(2048, 32000, requires_grad=True)
    teacher = torch.randn(2048, 32000)
    times = {"auto": [], "two": []}
    for call in range(24):
        mode = ("auto", "two")[call % 2]
        fastkd.set_passes(mode)
        start = time.perf_counter()
        torch.autograd.grad(fastkd.logit_kl(student, teacher, temperature=2.0), student)
        times[mode].append((time.perf_counter() - start) * 1e3)
    for mode, ms in times.items():
        ms = ms[2:]
        print(f"{mode:4s}: median {statistics.median(ms):6.1f} ms, min {min(ms):6.1f} ms")
    libc = ctypes.CDLL("libc.so.6")
    for mode in ("auto", "two"):
        fastkd.set_passes(mode)
        libc.malloc_trim(0)
        open("/proc/self/clear_refs", "w").write("5")
        before = status_mb("VmRSS")
        loss = fastkd.logit_kl(student, teacher, temperature=2.0)
        held = status_mb("VmRSS") - before
        torch.autograd.grad(loss, student)
        print(f"{mode:4s}: held after forward {held:6.1f} MB, peak of forward + backward "
              f"{status_mb('VmHWM') - before:6.1f} MB")
    fastkd.set_passes("auto")


if __name__ == "__main__":
    main()
