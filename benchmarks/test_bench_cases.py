"""Forward + backward of every case and implementation of ``fastkd.bench.cases`` (the cases
``fastkd bench`` runs), timed by pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

``FASTKD_BENCH_DEVICE`` (default: cuda when available, else cpu) and ``FASTKD_BENCH_SIZE``
(``tiny``, ``quick`` or ``default``; default: ``quick`` on CPU, ``default`` on CUDA) pick the cases.
Benchmarks are grouped by case; each one's ``extra_info`` holds the peak memory above the inputs
and the case's floor bytes and FLOPs.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastkd.bench.cases import select_cases
from fastkd.bench.harness import dtype_name, peak_memory_mb, run_step, sync

DEVICE = os.environ.get("FASTKD_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
SIZE = os.environ.get("FASTKD_BENCH_SIZE", "default" if DEVICE == "cuda" else "quick")

PARAMS = [
    pytest.param(case, impl, id=f"{case.op}-{case.shape}-{impl}")
    for case in select_cases(DEVICE, SIZE)
    for impl in case.impls
]


@pytest.mark.parametrize(("case", "impl"), PARAMS)
def test_forward_backward(benchmark, checked_inputs, case, impl):
    inputs = checked_inputs(case)
    fn = case.impls[impl]

    def step():
        run_step(case, fn, inputs)
        sync(DEVICE)

    benchmark.group = f"{case.op} {case.shape} {dtype_name(case.dtype)} {DEVICE}"
    benchmark.extra_info.update(
        op=case.op,
        impl=impl,
        shape=case.shape,
        bytes=case.bytes,
        flops=case.flops,
        peak_mem_mb=peak_memory_mb(step, DEVICE),
    )
    benchmark.pedantic(step, warmup_rounds=1, rounds=5, iterations=1)
