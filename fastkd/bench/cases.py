"""The benchmark cases: one definition shared by ``fastkd bench`` and ``benchmarks/``.

A :class:`Case` is one operation at one size on one device, with the implementations to compare.
This module defines the cases of the three losses and, at its end, adds the ``CASES`` lists of the
modules ``fastkd.bench.fused_linear_cases`` and ``fastkd.bench.runner_cases``.

Implementations of the losses, each computing forward and (through the harness) backward:

- ``fastkd``: the public API with the ``auto`` backend (Triton kernels on CUDA, native C++ on CPU).
- ``torch``: the formula as users write it in eager PyTorch (:mod:`fastkd.eager`).
- ``compile``: ``torch.compile(torch_fn, dynamic=False)``, default mode; its first call, which
  compiles forward and backward, is reported apart as ``first_call_ms``.
- ``liger``: Liger-Kernel's ``LigerKLDIVLoss`` where it applies (logit and attention KL), when
  ``liger_kernel`` is importable and the device is CUDA; its exact use is in ``Case.configs``.
- ``fastkd_mask`` (``hidden_mse``): ``fastkd`` with an all-ones row mask, the masked kernel path
  timed beside the unmasked one.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from fastkd import eager
from fastkd._constants import TINY

SIZES = ("tiny", "quick", "default")


@dataclass
class Case:
    """One benchmarked operation: its inputs, implementations and the floor of its cost.

    Fields:
        op: the operation's name, e.g. ``"logit_kl"``; ``fastkd bench --ops`` selects by it.
        shape: a short human-readable size, e.g. ``"N=2048 V=32000"``.
        dtype: the dtype of the floating inputs.
        device: ``"cpu"`` or ``"cuda"``; ``fastkd bench`` runs the cases of its device.
        size: ``"tiny"`` (a smoke test of seconds), ``"quick"`` (``fastkd bench --quick``) or
            ``"default"`` (``fastkd bench``); each run selects the cases of one size.
        make_inputs: ``() -> dict`` of keyword arguments for every implementation, built on
            ``device``; called once per case, when the case runs (so listing cases is cheap).
            Tensors that need a gradient have ``requires_grad=True``; values may be tensors,
            lists/tuples of tensors, or anything else (passed through unchanged).
        impls: implementation name -> callable. Each is called as ``fn(**inputs)`` and returns the
            loss (a scalar tensor) or a tuple of tensors whose first element is the loss. It must
            not change the inputs. The harness times ``fn`` plus, when ``backward`` is true,
            ``torch.autograd.grad(loss, <every input tensor with requires_grad>)``.
        bytes: the bytes forward + backward must move at the least (the one-pass minimum of
            ``benchmarks/NOTES.md``); ``floor_ms`` is ``bytes`` over the measured copy bandwidth.
        flops: floating-point operations forward + backward must do (0 where the op is
            memory-bound); when non-zero, ``floor_ms`` is the larger of the byte floor and
            ``flops`` over the measured matmul throughput.
        configs: implementation name -> text describing exactly what it runs (shown in the
            results), for implementations whose name alone does not say it.
        reference: the implementation every other one is checked against, and the one speed-ups
            and memory ratios are relative to. The check runs it on the inputs cast to float64
            on CPU, float32 on CUDA, and accepts an implementation whose loss and gradients (each
            normalised by the largest reference magnitude) are within
            ``max(tolerance, 2 * error of the reference in dtype)``.
        backward: whether the harness differentiates the loss (set false for implementations
            that run their own backward, such as a whole training step; their outputs are then
            compared as returned).
        tolerance: the error accepted whatever the reference's own error; default by dtype.
    """

    op: str
    shape: str
    dtype: torch.dtype
    device: str
    size: str
    make_inputs: Callable[[], dict[str, Any]]
    impls: dict[str, Callable[..., Any]]
    bytes: int
    flops: int = 0
    configs: dict[str, str] = field(default_factory=dict)
    reference: str = "torch"
    backward: bool = True
    tolerance: float | None = None


# --------------------------------------------------------------------------------------------
# fastkd (the auto backend), imported when called.


def fastkd_logit_kl(student, teacher, mask, temperature):
    import fastkd

    return fastkd.logit_kl(student, teacher, temperature=temperature, mask=mask)


def fastkd_hidden_mse(students, teachers):
    import fastkd

    return fastkd.hidden_mse(students, teachers)


def fastkd_hidden_mse_mask(students, teachers):
    """``fastkd.hidden_mse`` with an all-ones row mask: the masked path on the same rows."""
    import fastkd

    mask = torch.ones(students[0].shape[:-1], dtype=torch.bool, device=students[0].device)
    return fastkd.hidden_mse(students, teachers, mask=mask)


def fastkd_attention_kl(students, teachers, mask):
    import fastkd

    return fastkd.attention_kl(students, teachers, mask=mask)


# --------------------------------------------------------------------------------------------
# Liger-Kernel: LigerKLDIVLoss takes log-probabilities and has no mask, so the valid rows are
# selected by boolean indexing first, as a Liger user would.

LIGER_CONFIGS = {
    "logit_kl": "LigerKLDIVLoss(reduction='batchmean', log_target=True) on "
    "F.log_softmax(x[mask] / T) of student and teacher, times T^2",
    "attention_kl": "LigerKLDIVLoss(reduction='sum', log_target=False) on "
    "(log(max(q, tiny)), p) of the valid query rows, / (H * n), mean over pairs",
}


def liger_available(device: str) -> bool:
    return device == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def liger_logit_kl(student, teacher, mask, temperature):
    from liger_kernel.transformers import LigerKLDIVLoss

    log_q = F.log_softmax(student[mask] / temperature, dim=-1)
    log_p = F.log_softmax(teacher[mask] / temperature, dim=-1)
    return LigerKLDIVLoss(reduction="batchmean", log_target=True)(log_q, log_p) * temperature**2


def liger_attention_kl(students, teachers, mask):
    from liger_kernel.transformers import LigerKLDIVLoss

    kl_sum = LigerKLDIVLoss(reduction="sum", log_target=False)
    total = 0
    for q, p in zip(students, teachers):
        keys = q.shape[-1]
        q_rows = q.transpose(1, 2)[mask].reshape(-1, keys)  # the H * n valid query rows
        p_rows = p.transpose(1, 2)[mask].reshape(-1, keys)
        total = total + kl_sum(torch.log(q_rows.clamp_min(TINY)), p_rows) / q_rows.shape[0]
    return total / len(students)


# --------------------------------------------------------------------------------------------
# Inputs. Deterministic: every case seeds its own generator.


def _generator(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape, gen, device, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)


def _logit_inputs(n, v, dtype, device):
    gen = _generator(device, 0)
    student = _randn((n, v), gen, device, dtype, 3.0).requires_grad_()
    teacher = _randn((n, v), gen, device, dtype, 3.0)
    mask = torch.rand(n, generator=gen, device=device) < 0.9  # ~10% padding / prompt tokens
    return {"student": student, "teacher": teacher, "mask": mask, "temperature": 2.0}


def _hidden_inputs(pairs, shape, dtype, device):
    gen = _generator(device, 1)
    students = [_randn(shape, gen, device, dtype).requires_grad_() for _ in range(pairs)]
    teachers = [_randn(shape, gen, device, dtype) for _ in range(pairs)]
    return {"students": students, "teachers": teachers}


def _causal_probs(shape, gen, device, dtype):
    scores = torch.randn(shape, generator=gen, device=device) * 2.0
    causal = torch.ones(shape[-2:], dtype=torch.bool, device=device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1).to(dtype)


def _attention_inputs(pairs, shape, dtype, device):
    gen = _generator(device, 2)
    students = [_causal_probs(shape, gen, device, dtype).requires_grad_() for _ in range(pairs)]
    teachers = [_causal_probs(shape, gen, device, dtype) for _ in range(pairs)]
    batch, _, length, _ = shape
    lengths = torch.tensor([length - b * length // 8 for b in range(batch)], device=device)
    mask = torch.arange(length, device=device)[None, :] < lengths[:, None]  # right padding [B, Lq]
    return {"students": students, "teachers": teachers, "mask": mask}


# --------------------------------------------------------------------------------------------
# Sizes per device.

_F32, _BF16 = torch.float32, torch.bfloat16

# op -> device -> size -> (shape arguments, dtype)
LOSS_SIZES = {
    "logit_kl": {
        "cpu": {"tiny": ((64, 1000), _F32), "quick": ((1024, 32000), _F32), "default": ((2048, 32000), _F32)},
        "cuda": {"tiny": ((64, 1000), _BF16), "quick": ((2048, 128256), _BF16), "default": ((8192, 128256), _BF16)},
    },
    "hidden_mse": {
        "cpu": {
            "tiny": ((3, (2, 8, 64)), _F32),
            "quick": ((12, (4, 512, 512)), _F32),
            "default": ((12, (4, 512, 512)), _F32),
        },
        "cuda": {
            "tiny": ((3, (2, 8, 64)), _BF16),
            "quick": ((24, (2048, 2048)), _BF16),
            "default": ((24, (8192, 2048)), _BF16),
        },
    },
    "attention_kl": {
        "cpu": {
            "tiny": ((2, (2, 2, 16, 16)), _F32),
            "quick": ((4, (2, 8, 256, 256)), _F32),
            "default": ((4, (2, 8, 256, 256)), _F32),
        },
        "cuda": {
            "tiny": ((2, (2, 2, 16, 16)), _BF16),
            "quick": ((6, (2, 16, 512, 512)), _BF16),
            "default": ((6, (4, 16, 1024, 1024)), _BF16),
        },
    },
}


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn, dynamic=False)``, made at the first call: importing the compiler takes
    seconds, and listing cases should not."""
    compiled_fn = None

    def call(**inputs):
        nonlocal compiled_fn
        if compiled_fn is None:
            compiled_fn = torch.compile(fn, dynamic=False)
        return compiled_fn(**inputs)

    return call


def _impls(torch_fn, fastkd_fn, liger_fn, device):
    impls = {"torch": torch_fn, "fastkd": fastkd_fn, "compile": compiled(torch_fn)}
    if liger_fn is not None and liger_available(device):
        impls["liger"] = liger_fn
    return impls


# op -> (inputs, torch, fastkd, liger implementation; None where Liger has none). The inputs are
# built from the op's ``LOSS_SIZES`` shape arguments: ``(N, V)`` for ``logit_kl``, else
# ``(pairs, shape of each layer)``.
_LOSS_OPS = {
    "logit_kl": (_logit_inputs, eager.logit_kl, fastkd_logit_kl, liger_logit_kl),
    "hidden_mse": (_hidden_inputs, eager.hidden_mse, fastkd_hidden_mse, None),
    "attention_kl": (_attention_inputs, eager.attention_kl, fastkd_attention_kl, liger_attention_kl),
}


# Further implementations of an op, beside the four above: name -> (function, what it runs).
_EXTRA_IMPLS = {
    "hidden_mse": {"fastkd_mask": (fastkd_hidden_mse_mask, "fastkd.hidden_mse with an all-ones row mask")},
}


def loss_case(op: str, device: str, size: str) -> Case:
    """The case of one loss (``logit_kl``, ``hidden_mse``, ``attention_kl``) at a named size."""
    if op not in _LOSS_OPS:
        raise ValueError(f"op: got {op!r}, expected one of {', '.join(_LOSS_OPS)}")
    make_inputs, torch_fn, fastkd_fn, liger_fn = _LOSS_OPS[op]
    args, dtype = LOSS_SIZES[op][device][size]
    if op == "logit_kl":
        n, v = args
        shape, numel = f"N={n} V={v}", n * v
    else:
        pairs, layer_shape = args
        shape, numel = f"{pairs} x {list(layer_shape)}", pairs * math.prod(layer_shape)
    elt = torch.empty((), dtype=dtype).element_size()
    impls = _impls(torch_fn, fastkd_fn, liger_fn, device)
    configs = {"liger": LIGER_CONFIGS[op]} if op in LIGER_CONFIGS else {}
    for name, (fn, config) in _EXTRA_IMPLS.get(op, {}).items():
        impls[name], configs[name] = fn, config
    return Case(
        op=op,
        shape=shape,
        dtype=dtype,
        device=device,
        size=size,
        make_inputs=lambda: make_inputs(*args, dtype, device),
        impls=impls,
        bytes=3 * numel * elt,  # read s, t; write grad s
        configs=configs,
    )


def loss_cases(device: str, size: str) -> list[Case]:
    return [loss_case(op, device, size) for op in LOSS_SIZES]


# --------------------------------------------------------------------------------------------
# Cases defined in other modules (each a ``CASES: list[Case]``).


def extra_cases() -> list[Case]:
    # Imported here: both modules import this one.
    from fastkd.bench import fused_linear_cases, runner_cases

    return fused_linear_cases.CASES + runner_cases.CASES


def select_cases(
    device: str, size: str, ops: list[str] | None = None, impls: list[str] | None = None
) -> list[Case]:
    """Every case of ``device`` and ``size`` (the losses first), restricted to ``ops`` and to the
    implementations ``impls`` (plus each case's reference) if given."""
    if size not in SIZES:
        raise ValueError(f"size: got {size!r}, expected one of {', '.join(SIZES)}")
    cases = loss_cases(device, size) + [c for c in extra_cases() if c.device == device and c.size == size]
    if ops is not None:
        known = sorted({c.op for c in cases})
        unknown = [op for op in ops if op not in known]
        if unknown:
            raise ValueError(f"ops: unknown {', '.join(unknown)}; expected some of {', '.join(known)}")
        cases = [c for c in cases if c.op in ops]
    if impls is not None:
        known = sorted({name for c in cases for name in c.impls})
        unknown = [name for name in impls if name not in known]
        if unknown:
            raise ValueError(f"impls: unknown {', '.join(unknown)}; expected some of {', '.join(known)}")
        cases = [
            replace(c, impls={k: f for k, f in c.impls.items() if k in impls or k == c.reference}) for c in cases
        ]
    return cases
