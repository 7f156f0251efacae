"""``python benchmarks/divergence_loop.py``: fastkd.logit_kl (N=2048, V=32000, float32, T=2, ~10 %
of the rows masked, CPU) with each divergence and with labels, called in turn with nothing else in
between, as a training loop calls a loss: forward + backward time of each variant (median and min
over 8 calls each, after 2 warm-up calls each, the variants interleaved call by call) and its ratio
to ``"forward"``'s median."""

from __future__ import annotations

import statistics
import time

import torch

import fastkd

VARIANTS = {
    "forward": {},
    "reverse": {"divergence": "reverse"},
    "jsd": {"divergence": "jsd", "beta": 0.5},
    "tvd": {"divergence": "tvd"},
    "forward + labels": {"ce_weight": 0.5},
}


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(2048, 32000, generator=gen) * 3).requires_grad_()
    teacher = torch.randn(2048, 32000, generator=gen) * 3
    mask = torch.rand(2048, generator=gen) < 0.9
    labels = torch.randint(0, 32000, (2048,), generator=gen).masked_fill(torch.rand(2048, generator=gen) < 0.05, -100)
    times = {name: [] for name in VARIANTS}
    for call in range(10):
        for name, options in VARIANTS.items():
            extra = {"labels": labels} if "ce_weight" in options else {}
            start = time.perf_counter()
            loss = fastkd.logit_kl(student, teacher, mask=mask, temperature=2.0, **options, **extra)
            (grad,) = torch.autograd.grad(loss, student)
            elapsed = time.perf_counter() - start
            del grad
            if call >= 2:
                times[name].append(elapsed * 1e3)
    base = statistics.median(times["forward"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:18s} median {median:7.1f} ms  min {min(values):7.1f} ms  {median / base:5.2f}x forward")


if __name__ == "__main__":
    main()
