"""Run benchmark cases: check each implementation against the reference, then time it and
measure its peak memory, next to a floor derived from the machine's measured bandwidth.

What a row's numbers mean (``benchmarks/NOTES.md`` has the details):

- ``time_ms``: median wall time of one forward + backward after warm-up. CUDA: the runs of
  ``triton.testing.do_bench`` (CUDA events when Triton is absent). CPU: ``perf_counter``
  over rounds that run every implementation once in turn, so that load from other processes falls
  on all of them alike; the correctness check's call is the warm-up. Freed memory stays in the
  process while the calls are timed (``keep_freed_memory``, as tcmalloc and jemalloc keep it), so
  that a call reuses pages instead of faulting in fresh ones: the time is the work's.
- ``peak_mem_mb``: memory in use (MiB) at the peak of one forward + backward, above what was in use
  before it (the inputs). CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU:
  the process's peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) above
  its resident size before the call, with freed heap memory returned to the system first
  (``malloc_trim``), so that reused pages count again, and blocks of 1 MiB or more mapped on
  their own (``fix_mmap_threshold``), so that the resident set follows the tensors.
- ``floor_ms``: ``bytes / bandwidth`` (and ``flops / matmul throughput`` when larger), both
  measured in the same run (the fastest of several calls); ``floor_frac = floor_ms / time_ms``.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import importlib.util
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from fastkd.bench.cases import Case
from fastkd.runner.measure import (
    StepMeter,
    fix_mmap_threshold,
    keep_freed_memory,
    proc_status_kb,
    reset_cpu_peak,
)

MIN_RUNS = 3  # timed runs per implementation, at least (fewer only if ``reps`` asks for fewer)

# Accepted normalised error whatever the reference's own error, by input dtype.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}


class BenchmarkError(RuntimeError):
    """An implementation disagrees with the reference: the run stops instead of timing it."""


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Inputs and one step.


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def grad_inputs(inputs: dict[str, Any]) -> list[torch.Tensor]:
    """The input tensors that need a gradient, in order."""
    return [t for v in inputs.values() for t in _tensors(v) if t.requires_grad]


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(dtype).requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def run_step(case: Case, fn: Callable[..., Any], inputs: dict[str, Any]) -> list[torch.Tensor]:
    """One forward + backward of ``fn``: its outputs, then the gradients of its loss."""
    out = fn(**inputs)
    outputs = list(out) if isinstance(out, tuple) else [out]
    if not case.backward:
        return outputs
    return outputs + list(torch.autograd.grad(outputs[0], grad_inputs(inputs)))


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# Correctness.


def max_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Largest ``max|got - ref| / max|ref|`` over the tensors (inf for a NaN, inf or wrong shape)."""
    if len(got) != len(ref):
        return math.inf
    worst = 0.0
    for g, r in zip(got, ref):
        if g.shape != r.shape:
            return math.inf
        g = g.detach().to(r.dtype)
        if not bool(torch.isfinite(g).all()):
            return math.inf
        scale = max(float(r.detach().abs().max()) if r.numel() else 0.0, 1e-30)
        worst = max(worst, float((g - r.detach()).abs().max()) / scale if g.numel() else 0.0)
    return worst


def check_case(case: Case, inputs: dict[str, Any], failures: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run each implementation once (its first call, timed) and compare it with the reference.

    Returns impl -> {"first_call_ms", "max_err", "tolerance"}. An implementation whose loss or
    gradients are further from the reference than the tolerance raises ``BenchmarkError`` (and
    one that raises stops the run with its error); when a ``failures`` list is given, the message
    is appended there instead and the implementation left out of the result. The reference's
    failure always raises.
    """
    ref_dtype = torch.float64 if case.device == "cpu" else torch.float32
    expected = [t.detach() for t in run_step(case, case.impls[case.reference], _cast(inputs, ref_dtype))]
    order = [case.reference] + [name for name in case.impls if name != case.reference]
    tolerance = case.tolerance if case.tolerance is not None else TOLERANCE.get(case.dtype, 1e-2)
    where = f"{case.op} {case.shape} {dtype_name(case.dtype)} on {case.device}"
    results: dict[str, dict[str, float]] = {}
    for name in order:
        try:
            sync(case.device)
            start = time.perf_counter()
            got = run_step(case, case.impls[name], inputs)
            sync(case.device)
            first_call_ms = (time.perf_counter() - start) * 1e3
            err = max_error(got, expected)
            del got
        except Exception as error:
            if failures is None or name == case.reference:
                raise
            failures.append(f"{where}: implementation {name!r} raised {type(error).__name__}: {error}")
            continue
        if name == case.reference:
            tolerance = max(tolerance, 2 * err)
        if not err <= tolerance:
            message = (
                f"{where}: implementation {name!r} differs from the reference {case.reference!r} "
                f"(run in {dtype_name(ref_dtype)}): normalised error {err:.3g} > tolerance {tolerance:.3g}"
            )
            if failures is None or name == case.reference:
                raise BenchmarkError(message)
            failures.append(message)
            continue
        results[name] = {"first_call_ms": first_call_ms, "max_err": err, "tolerance": tolerance}
    return results


# --------------------------------------------------------------------------------------------
# Time.


def time_cpu(steps: dict[str, Callable[[], Any]], reps: int, budget_s: float = math.inf) -> dict[str, list[float]]:
    """Milliseconds per call of each step, over rounds that call every step once in turn: ``reps``
    rounds, or fewer (but at least ``MIN_RUNS``) once ``budget_s`` seconds have passed. Round ``r``
    starts at the ``r``-th step (the order rotates), so that what a step leaves behind (freed
    memory the system takes back, caches) falls on each of the others alike. The steps are warm:
    the correctness check made their first call."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    begin = time.perf_counter()
    for round_index in range(reps):
        if round_index >= MIN_RUNS and time.perf_counter() - begin > budget_s:
            break
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            step = steps[name]
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def time_cuda(step: Callable[[], Any], reps: int) -> list[float]:
    """Milliseconds per call on CUDA: every run of ``triton.testing.do_bench`` (which warms up for
    50 ms, runs for ``max(100, 20 * reps)`` ms and clears the L2 cache between calls), or without
    Triton the CUDA-event times of ``reps`` calls after 3 warm-up calls."""
    if importlib.util.find_spec("triton") is not None:
        from triton.testing import do_bench

        return [float(t) for t in do_bench(step, warmup=50, rep=max(100, 20 * reps), return_mode="all")]
    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return times


# --------------------------------------------------------------------------------------------
# Memory.


def _proc_status_mb(field: str) -> float:
    kb = proc_status_kb(field)
    if kb is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return kb / 1024


def peak_memory_mb(step: Callable[[], Any], device: str) -> float:
    """Peak memory of one call of ``step`` above the memory in use before it (see module doc)."""
    gc.collect()
    if device == "cuda":
        meter = StepMeter(torch.device(device))
        meter.start()
        step()
        return meter.stop()[1]
    if not reset_cpu_peak():  # returns freed heap memory, resets the peak resident set size
        raise RuntimeError("cannot reset the peak resident set size through /proc/self/clear_refs")
    before = _proc_status_mb("VmRSS")
    step()
    return _proc_status_mb("VmHWM") - before


# --------------------------------------------------------------------------------------------
# The machine.


def _best_ms(step: Callable[[], Any], device: str) -> float:
    """The fastest of several calls: what the machine can do, rather than what it did under load."""
    if device == "cuda":
        return min(time_cuda(step, reps=10))
    step()
    return min(time_cpu({"step": step}, reps=7)["step"])


def copy_bandwidth_gbs(device: str) -> float:
    """Copy bandwidth in GB/s (bytes read + bytes written per second) of a large tensor copy."""
    numel = (1 << 28) if device == "cuda" else (1 << 26)  # 1 GiB / 256 MiB of float32
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    ms = _best_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def matmul_tflops(device: str, dtype: torch.dtype) -> float:
    """Throughput of a large square matmul in ``dtype``, in TFLOP/s."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = _best_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fastkd_backend(device: str) -> str:
    from fastkd import _backend

    return _backend.resolve(torch.device(device))


def machine_info(device: str) -> dict[str, Any]:
    info = {
        "device": device,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel"),
        "cuda": torch.version.cuda if device == "cuda" else None,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    info["fastkd_backend"] = _fastkd_backend(device)
    return info


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` for ``torch.float32``."""
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------
# The run.


def run_cases(
    cases: list[Case],
    *,
    reps: int = 10,
    budget_s: float = math.inf,
    keep_going: bool = False,
    progress: Callable[[str], None] = _print_stderr,
    on_case: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Check, time and measure every case (``reps`` timed runs per implementation, fewer once a
    case's timing has taken ``budget_s`` seconds, on CPU); returns ``{"machine": {...}, "rows": [...],
    "failures": [...]}`` (``on_case`` receives it after each case, e.g. to save partial results).

    An implementation that disagrees with its case's reference raises ``BenchmarkError``; with
    ``keep_going``, it is left out and named in ``failures`` instead (as is a case that raises),
    and the run goes on: the caller must treat a non-empty ``failures`` as a failed run.
    """
    devices = {case.device for case in cases}
    if len(devices) != 1:
        raise ValueError(f"cases: expected cases of one device, got {sorted(devices) or 'none'}")
    device = devices.pop()
    begin = time.perf_counter()

    def say(message: str) -> None:
        progress(f"[{time.perf_counter() - begin:6.1f} s] {message}")

    machine = machine_info(device)
    say(f"measuring the machine ({device}) ...")
    machine["copy_bandwidth_gbs"] = copy_bandwidth_gbs(device)
    flop_dtypes = sorted({case.dtype for case in cases if case.flops}, key=str)
    machine["matmul_tflops"] = {dtype_name(d): matmul_tflops(device, d) for d in flop_dtypes}
    say(f"copy bandwidth {machine['copy_bandwidth_gbs']:.1f} GB/s")

    results: dict[str, Any] = {"machine": machine, "rows": [], "failures": []}
    failures = results["failures"] if keep_going else None
    for index, case in enumerate(cases, 1):
        label = f"[{index}/{len(cases)}] {case.op} {case.shape} {dtype_name(case.dtype)}"
        say(f"{label}: building inputs, checking {', '.join(case.impls)} against {case.reference}")
        failed_before = len(results["failures"])
        try:
            results["rows"].extend(_run_case(case, machine, reps, budget_s, say, label, failures))
        except Exception as error:
            if failures is None:
                raise
            failures.append(f"{label}: {type(error).__name__}: {error}")
        for message in results["failures"][failed_before:]:
            say(f"FAILED: {message}")
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        if on_case is not None:
            on_case(results)
    return results


def _run_case(case, machine, reps, budget_s, progress, label, failures) -> list[dict[str, Any]]:
    inputs = case.make_inputs()
    checks = check_case(case, inputs, failures)
    impls = {name: fn for name, fn in case.impls.items() if name in checks}
    steps = {name: (lambda fn=fn: run_step(case, fn, inputs)) for name, fn in impls.items()}
    progress(f"{label}: checked {', '.join(impls)}; timing")
    if case.device == "cuda":
        times = {name: time_cuda(step, reps) for name, step in steps.items()}
    else:
        keep_freed_memory()  # calls reuse freed pages: the time of the work, not of fresh pages
        times = time_cpu(steps, reps, budget_s)
        fix_mmap_threshold()  # large blocks freed at once: the resident set follows the tensors
    peaks = {name: peak_memory_mb(step, case.device) for name, step in steps.items()}

    floor_ms = case.bytes / (machine["copy_bandwidth_gbs"] * 1e9) * 1e3
    if case.flops:
        floor_ms = max(floor_ms, case.flops / (machine["matmul_tflops"][dtype_name(case.dtype)] * 1e12) * 1e3)
    ref_ms = statistics.median(times[case.reference])
    ref_mb = peaks[case.reference]
    rows = []
    for name in impls:
        time_ms = statistics.median(times[name])
        config = case.configs.get(name, "")
        if name == "fastkd" and not config:
            config = f"auto backend: {machine['fastkd_backend']}"
        rows.append(
            {
                "op": case.op,
                "impl": name,
                "config": config,
                "device": case.device,
                "dtype": dtype_name(case.dtype),
                "shape": case.shape,
                "size": case.size,
                "time_ms": time_ms,
                "time_min_ms": min(times[name]),
                "runs": len(times[name]),
                "peak_mem_mb": peaks[name],
                "floor_ms": floor_ms,
                "floor_frac": floor_ms / time_ms,
                "bytes": case.bytes,
                "flops": case.flops,
                "speedup_vs_ref": ref_ms / time_ms,
                "mem_vs_ref": peaks[name] / ref_mb if ref_mb > 0 else None,
                "reference": case.reference,
                **checks[name],
            }
        )
        progress(f"{label}: {name:8s} {time_ms:10.3f} ms  {peaks[name]:9.1f} MB")
    return rows
