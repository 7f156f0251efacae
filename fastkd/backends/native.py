"""The ``"native"`` backend: C++ CPU kernels (``kernels/*.cpp``), built on first use.

The sources ship inside the package as ``fastkd._kernels`` (in a source checkout they are read from
the repository's ``kernels/`` directory). ``torch.utils.cpp_extension`` compiles them with ninja
into the torch extensions cache (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) under a name that carries the CPU's vector ISA and a digest of the
sources and the torch version, so a later process only loads the cached library. The kernels
register the ops ``torch.ops.fastkd_native.*``; the functions below, with the signatures and
semantics of ``fastkd.backends``, call them.

Each kernel reads a row's teacher and student values once in the forward pass (online log-sum-exp
where a softmax is involved) and once more in the backward pass, vectorised with
``at::vec::Vectorized`` and spread over rows with ``at::parallel_for``. The one-pass functions
(``*_forward_with_grad``, see ``fastkd._one_pass``) read them once in all: the forward sweep also
writes the gradient (softmax rows keep their exps in a per-thread scratch that stays in cache).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import sys
import warnings
from pathlib import Path

import torch

from fastkd.backends import qk_chunks

SOURCES = ("hidden.cpp", "attention.cpp", "logit.cpp", "sparse.cpp", "gradients.cpp")
HEADERS = ("rows.h",)

# Compiler flags per ATen CPU capability: the same instruction sets as ATen's own kernels.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma",
               "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
}


def _kernel_file(name: str) -> Path:
    """A kernel source: the installed package data, else the source checkout's ``kernels/``."""
    try:
        path = Path(str(importlib.resources.files("fastkd._kernels").joinpath(name)))
        if path.is_file():
            return path
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / "kernels" / name


def _build_options() -> tuple[str, list[str], list[str]]:
    """(extension name, compiler flags, linker flags) for this machine and these sources."""
    capability = torch.backends.cpu.get_cpu_capability()
    cflags = ["-O3", *_ISA_FLAGS.get(capability, [])]
    ldflags: list[str] = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        cflags.append("-fopenmp")  # at::parallel_for runs on OpenMP threads only with it
        ldflags.append("-fopenmp")
    digest = hashlib.sha256(torch.__version__.encode())
    for name in (*SOURCES, *HEADERS):
        digest.update(_kernel_file(name).read_bytes())
    digest.update(" ".join(cflags + ldflags).encode())
    isa = capability.lower().replace(" ", "_")
    return f"fastkd_native_{isa}_{digest.hexdigest()[:12]}", cflags, ldflags


@functools.cache
def _load() -> str | None:
    """Builds (first time) and loads the kernels; the reason they are unusable, or None."""
    try:
        from torch.utils import cpp_extension

        name, cflags, ldflags = _build_options()
        cpp_extension.load(
            name=name,
            sources=[str(_kernel_file(source)) for source in SOURCES],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any failure to build means "use another backend"
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        return f"{type(exc).__name__}: {lines[0]}"
    return None


@torch.compiler.assume_constant_result  # traced code (torch.compile) sees the result, not the build
def is_available() -> bool:
    """Whether the native kernels are built and loaded; warns once with the reason when not."""
    reason = _load()
    if reason is not None:
        _warn_once(reason)
    return reason is None


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"fastkd: the native CPU kernels could not be built ({reason}); "
        "CPU losses use the 'torch' backend instead",
        RuntimeWarning,
        stacklevel=3,
    )


def _ops():
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"fastkd: the native CPU kernels are unavailable ({reason})")
    return torch.ops.fastkd_native


def hidden_forward(students, teachers, mask):
    """rows = sum_d (s - t)^2 / D per row of each pair, concatenated; masked rows 0."""
    return _ops().hidden_forward(list(students), list(teachers), mask)


def hidden_backward(students, teachers, mask, grad_rows):
    """d rows / d s = 2 (s - t) / D, times grad_rows; 0 on masked rows."""
    return _ops().hidden_backward(list(students), list(teachers), mask, grad_rows)


def hidden_forward_with_grad(students, teachers, mask, grad_rows):
    """(rows, grads) of hidden_forward and hidden_backward in one sweep: d = s - t gives
    rows = sum_d d^2 / D and grad = grad_rows * 2 d / D from the same loads; masked rows 0."""
    return _ops().hidden_forward_with_grad(list(students), list(teachers), mask, grad_rows)


def attention_forward(students, teachers, mask, kind):
    """rows = sum_k p_k (log p_k - log q_k) per query row, pairs concatenated; stats = lses for
    kind="scores" ([2, 0] for "probs"); see fastkd.attention."""
    return _ops().attention_forward(list(students), list(teachers), mask, kind == "scores")


def attention_backward(students, teachers, mask, kind, stats, grad_rows):
    """probs: d kl / d q = -p / q (p > 0, q >= tiny); scores: d kl / d s = q - p on kept keys."""
    return _ops().attention_backward(
        list(students), list(teachers), mask, kind == "scores", stats, grad_rows
    )


def attention_forward_with_grad(students, teachers, mask, kind, grad_rows):
    """(rows, grads) of attention_forward and attention_backward in one sweep: probs: kl and
    grad_rows * (-p / q) (p > 0, q >= tiny) from the same loads; scores: grad_rows * (q - p) on kept
    keys from the exps of the forward's online softmax, kept per row in cache."""
    return _ops().attention_forward_with_grad(
        list(students), list(teachers), mask, kind == "scores", grad_rows
    )


def logit_forward(student, teacher, mask, temperature, divergence, beta, labels):
    """rows = T^2 D per row (tvd: D), D the divergence of q = softmax(s / T) and p = softmax(t / T)
    ("forward" KL(p || q), "reverse" KL(q || p), "jsd" with beta, "tvd"); ce_rows = lse(s) - s[label]
    on valid rows with a label (empty without labels); stats = float64
    [lse(s / T), lse(t / T), lse(s), S] (fastkd.backends)."""
    return _ops().logit_forward(
        student, teacher, mask, float(temperature), divergence, float(beta), labels
    )


def logit_backward(
    student, teacher, mask, temperature, divergence, beta, labels, stats, grad_rows, grad_ce_rows
):
    """grad_rows * c q (a - S) + grad_ce_rows * (softmax(s) - onehot(label)) from the inputs and
    stats (fastkd.backends); 0 on masked rows."""
    return _ops().logit_backward(
        student, teacher, mask, float(temperature), divergence, float(beta), labels, stats,
        grad_rows, grad_ce_rows,
    )


def logit_forward_with_grad(
    student, teacher, mask, temperature, divergence, beta, labels, grad_rows, grad_ce_rows
):
    """(rows, ce_rows, grad) of logit_forward and logit_backward in one read of the inputs: the
    exps e = exp(x / T - shift) of the online softmax are kept per row in cache, give
    q = e_s exp(shift_s - max_s) / sum_s (p likewise) to the later sweeps (reverse, jsd, tvd) and to
    the gradient; 0 on masked rows."""
    return _ops().logit_forward_with_grad(
        student, teacher, mask, float(temperature), divergence, float(beta), labels, grad_rows,
        grad_ce_rows,
    )


def sparse_forward(student, ids, logprobs, mask, temperature, tail):
    """rows = the divergence of q = softmax(s / T) from the stored top-k teacher (ids, logprobs;
    tail "renormalize" or "bucket") per row, stats = float64 [lse(s / T), lse_t] (fastkd.backends):
    one sweep over the row for lse(s / T), then the k stored entries."""
    return _ops().sparse_forward(student, ids, logprobs, mask, float(temperature), tail)


def sparse_backward(student, ids, logprobs, mask, temperature, tail, stats, grad_rows):
    """grad_rows * (a q + scatter_j b_j) from the inputs and stats (fastkd.backends), one sweep
    over the row; 0 on rows that contribute nothing."""
    return _ops().sparse_backward(
        student, ids, logprobs, mask, float(temperature), tail, stats, grad_rows
    )


def sparse_forward_with_grad(student, ids, logprobs, mask, temperature, tail, grad_rows):
    """(rows, grad) of sparse_forward and sparse_backward in one read of the student: the sweep
    for lse(s / T), then one over the row still in cache writing grad_rows a q, and
    grad_rows (a q + b_j) at the stored ids; 0 on rows that contribute nothing."""
    return _ops().sparse_forward_with_grad(
        student, ids, logprobs, mask, float(temperature), tail, grad_rows
    )


def scale_gradients_(grads, upstream, expected):
    """grads *= upstream / expected in place (0 where expected == 0); nothing read or written when
    upstream == expected. upstream, expected: 0-d float32/float64 tensors, read by the kernel."""
    _ops().scale_gradients_(list(grads), upstream, expected)


# attention_kl_qk: query chunks of scores through this backend's attention_forward/backward
attention_qk_forward, attention_qk_backward = qk_chunks.through(attention_forward, attention_backward)
