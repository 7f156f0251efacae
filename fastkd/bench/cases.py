"""The benchmark cases: one definition shared by ``fastkd bench`` and ``benchmarks/``.

A :class:`Case` is one operation at one size on one device, with the implementations to compare.
This module defines the cases of the three losses and of ``attention_kl_qk`` (below, with their own
implementations) and, at its end, adds the ``CASES`` lists of the modules
``fastkd.bench.divergence_cases``, ``fastkd.bench.fused_linear_cases``, ``fastkd.bench.sparse_cases``
and ``fastkd.bench.runner_cases``.

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
        opt_in: run only when asked for by name (``fastkd bench --ops <op>``), never in a run of
            every op: for cases too long for the default suite (e.g. the runner at L=4096).
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
    opt_in: bool = False


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


def two_pass(fastkd_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fastkd_fn`` on fastkd's two-pass path (``fastkd.set_passes("two")`` while it runs): the
    backward reads student and teacher again, beside the default one-pass path."""

    def call(**inputs):
        import fastkd

        previous = fastkd.get_passes()
        fastkd.set_passes("two")
        try:
            return fastkd_fn(**inputs)
        finally:
            fastkd.set_passes(previous)

    return call


TWO_PASS_CONFIG = (
    "the same fastkd call on its two-pass path (set_passes('two')): forward reads student and teacher, "
    "backward reads both again and writes the gradient"
)


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
    impls = {**_impls(torch_fn, fastkd_fn, liger_fn, device), "fastkd_two_pass": two_pass(fastkd_fn)}
    configs = {"fastkd_two_pass": TWO_PASS_CONFIG}
    if op in LIGER_CONFIGS:
        configs["liger"] = LIGER_CONFIGS[op]
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
# attention_kl_qk: the attention KL from queries and keys, ``attention_kl(S_s, S_t, kind="scores")``
# with ``S = q k^T * d^-0.5``. Implementations, each forward + backward to the student's queries
# and keys (the teacher is a constant):
#
# - ``fastkd``: ``fastkd.attention_kl_qk``: no ``[L, L]`` map (query chunks of scores on CPU,
#   flash-attention style tiles in Triton);
# - ``maps``: the maps path as users write it: per side ``S = q @ k^T * d^-0.5`` (grouped-query
#   attention: keys repeated per group), ``-inf`` on the dropped keys (causal, padding), softmax,
#   then ``fastkd.attention_kl(probs_s, probs_t, mask=mask, kind="probs")``. It is the case's
#   reference (run in float64 on CPU, float32 on CUDA, for the check), so that the ``fastkd`` row's
#   ``speed-up`` and ``peak vs ref`` read as fastkd against the maps path;
# - ``torch``: the formula in eager PyTorch: both score maps (upcast to float32 from bfloat16),
#   ``log_softmax`` of each, ``sum_j p (log p - log q)`` over the kept keys, masked mean;
# - ``compile``: ``torch.compile`` of ``torch``;
# - ``sdpa`` (CUDA, a case of its own beside each CUDA case, same shape): a yardstick, not a
#   competitor: ``F.scaled_dot_product_attention`` forward + backward on the student's ``q`` and
#   ``k`` (``v = k``), causal as the case, padding ignored: the cost of one tiled attention pass.


@dataclass(frozen=True)
class QKShape:
    """Sizes of an ``attention_kl_qk`` case: ``[B, H, L, d]`` queries of both models, keys with
    ``kv_heads`` / ``kv_heads_t`` heads (None: ``H``), teacher width ``d_t`` (None: ``d``), causal or
    not, right padding (``mask``) or none."""

    batch: int
    heads: int
    length: int
    d: int
    d_t: int | None = None
    kv_heads: int | None = None
    kv_heads_t: int | None = None
    causal: bool = False
    padded: bool = False

    def side(self, student: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(query shape, key shape) of the student or the teacher."""
        width = self.d if student or self.d_t is None else self.d_t
        kv = self.kv_heads if student else self.kv_heads_t
        kv = self.heads if kv is None else kv
        return (self.batch, self.heads, self.length, width), (self.batch, kv, self.length, width)

    @property
    def score_elements(self) -> int:
        """Score entries per model that the softmaxes see: ``B H L^2``, ``B H L (L + 1) / 2`` causal."""
        per_head = self.length * (self.length + 1) // 2 if self.causal else self.length**2
        return self.batch * self.heads * per_head

    def label(self) -> str:
        text = f"B={self.batch} H={self.heads} L={self.length} d={self.d}"
        if self.d_t is not None and self.d_t != self.d:
            text += f" d_t={self.d_t}"
        if self.kv_heads not in (None, self.heads) or self.kv_heads_t not in (None, self.heads):
            text += f" H_kv={self.side(True)[1][1]}/{self.side(False)[1][1]}"
        return text + (" causal" if self.causal else "") + (" padded" if self.padded else "")


def _dropped_keys(length: int, mask, causal: bool, device) -> torch.Tensor | None:
    """``[B or 1, 1, L, L]``, True where query i drops key j: padding, or ``j > i`` when causal."""
    dropped = None
    if causal:
        dropped = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    if mask is not None:
        padding = (mask == 0)[:, None, None, :]
        dropped = padding if dropped is None else dropped | padding
    return dropped


def _scores(query, key, dropped):
    """``query @ key^T * d^-0.5`` ``[B, H, L, L]``, keys repeated per query group, dropped keys -inf."""
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5
    return scores if dropped is None else scores.masked_fill(dropped, float("-inf"))


def fastkd_attention_kl_qk(student_q, student_k, teacher_q, teacher_k, mask, causal):
    import fastkd

    return fastkd.attention_kl_qk(student_q, student_k, teacher_q, teacher_k, mask=mask, causal=causal)


def maps_attention_kl_qk(student_q, student_k, teacher_q, teacher_k, mask, causal):
    """The maps path: both models' probabilities ``[B, H, L, L]``, then ``attention_kl`` of them."""
    import fastkd

    dropped = _dropped_keys(student_q.shape[2], mask, causal, student_q.device)
    probs_s = _scores(student_q, student_k, dropped).softmax(-1)
    with torch.no_grad():
        probs_t = _scores(teacher_q, teacher_k, dropped).softmax(-1)
    return fastkd.attention_kl(probs_s, probs_t, mask=mask, kind="probs")


def torch_attention_kl_qk(student_q, student_k, teacher_q, teacher_k, mask, causal):
    """The formula in eager PyTorch: ``sum_j p (log p - log q)`` of two ``log_softmax``es of scores."""
    dropped = _dropped_keys(student_q.shape[2], mask, causal, student_q.device)
    scores_s = _scores(student_q, student_k, dropped)
    wide = torch.promote_types(scores_s.dtype, torch.float32)
    log_q = F.log_softmax(scores_s.to(wide), dim=-1)
    log_p = F.log_softmax(_scores(teacher_q, teacher_k, dropped).to(wide), dim=-1)
    terms = log_p.exp() * (log_p - log_q)
    if dropped is not None:
        terms = terms.masked_fill(dropped, 0.0)  # 0 * (-inf - -inf) is NaN on the dropped keys
    kl = terms.sum(-1)  # [B, H, L]
    if mask is None:
        return kl.mean()
    m = mask[:, None, :].to(kl.dtype)
    return (kl * m).sum() / (kl.shape[1] * m.sum().clamp_min(1))


def sdpa_yardstick(student_q, student_k, teacher_q, teacher_k, mask, causal):
    """``F.scaled_dot_product_attention(q, k, k)`` of the student, causal as the case (padding
    ignored), reduced to a scalar whose gradient reaches ``q`` and ``k`` (through ``k`` and ``v``)."""
    gqa = student_k.shape[1] != student_q.shape[1]
    out = F.scaled_dot_product_attention(student_q, student_k, student_k, is_causal=causal, enable_gqa=gqa)
    return out.float().square().mean()


QK_CONFIGS = {
    "fastkd": "fastkd.attention_kl_qk(q_s, k_s, q_t, k_t, mask=, causal=): no [L, L] map",
    "maps": "S = q @ k^T * d^-0.5 per side (GQA: keys repeated), -inf on dropped keys, softmax, then "
    "fastkd.attention_kl(probs_s, probs_t, mask=mask, kind='probs') (the maps path as users write it)",
    "torch": "eager: both score maps, F.log_softmax of each (float32 from bfloat16), "
    "sum p (log p - log q) over kept keys, masked mean over valid query rows and heads",
    "compile": "torch.compile(<the torch formula>, dynamic=False)",
    "sdpa": "YARDSTICK, not a competitor: F.scaled_dot_product_attention(q_s, k_s, v=k_s, is_causal) "
    "forward + backward, padding ignored: the cost of one tiled attention pass",
}

# device -> size -> [(shape, dtype)]. CPU default: B=2, H=8, L=2048, d=64 float32 (no
# causal variant: the default suite's time); tiny: the paths (GQA, d_s != d_t, causal, padding).
_QK_TINY = [
    QKShape(2, 4, 32, 8, d_t=12, kv_heads=2, causal=True, padded=True),
    QKShape(2, 2, 24, 8),
]
QK_SIZES = {
    "cpu": {
        "tiny": [(shape, _F32) for shape in _QK_TINY],
        "quick": [(QKShape(2, 8, 256, 64), _F32)],
        "default": [(QKShape(2, 8, 2048, 64), _F32)],
    },
    "cuda": {
        "tiny": [(shape, _BF16) for shape in _QK_TINY],
        "quick": [(QKShape(2, 16, 2048, 128, causal=True), _BF16)],
        "default": [(QKShape(4, 32, 4096, 128, causal=True), _BF16)],
    },
}


def _qk_inputs(shape: QKShape, dtype, device):
    gen = _generator(device, 4)
    (q_shape_s, k_shape_s), (q_shape_t, k_shape_t) = shape.side(True), shape.side(False)
    inputs = {
        "student_q": _randn(q_shape_s, gen, device, dtype).requires_grad_(),
        "student_k": _randn(k_shape_s, gen, device, dtype).requires_grad_(),
        "teacher_q": _randn(q_shape_t, gen, device, dtype, 2.0),  # a sharper teacher
        "teacher_k": _randn(k_shape_t, gen, device, dtype),
        "mask": None,
        "causal": shape.causal,
    }
    if shape.padded:
        batch, length = shape.batch, shape.length
        lengths = torch.tensor([length - b * length // 8 for b in range(batch)], device=device)
        inputs["mask"] = torch.arange(length, device=device)[None, :] < lengths[:, None]  # right padding
    return inputs


def _qk_bytes(shape: QKShape, elt: int) -> int:
    """One-pass minimum: read the four inputs once, write the student's two gradients."""
    (q_s, k_s), (q_t, k_t) = (tuple(math.prod(x) for x in shape.side(s)) for s in (True, False))
    return elt * (2 * q_s + 2 * k_s + q_t + k_t)


def _qk_flops(shape: QKShape) -> int:
    """One-pass minimum: both score GEMMs (``2 n d`` each), then ``dq = dS k`` and ``dk = dS^T q``
    (``2 n d_s`` each), ``n`` the score elements; a design that recomputes the scores in backward
    (fastkd's) does ``2 n (d_s + d_t)`` more (``benchmarks/NOTES.md``)."""
    d_t = shape.d if shape.d_t is None else shape.d_t
    return 2 * shape.score_elements * (3 * shape.d + d_t)


def qk_case(shape: QKShape, dtype: torch.dtype, device: str, size: str) -> Case:
    """The ``attention_kl_qk`` case of ``shape``: fastkd, maps (the reference), torch, compile."""
    elt = torch.empty((), dtype=dtype).element_size()
    return Case(
        op="attention_kl_qk",
        shape=shape.label(),
        dtype=dtype,
        device=device,
        size=size,
        make_inputs=lambda: _qk_inputs(shape, dtype, device),
        impls={
            "maps": maps_attention_kl_qk,
            "fastkd": fastkd_attention_kl_qk,
            "torch": torch_attention_kl_qk,
            "compile": compiled(torch_attention_kl_qk),
        },
        bytes=_qk_bytes(shape, elt),
        flops=_qk_flops(shape),
        configs={name: QK_CONFIGS[name] for name in ("fastkd", "maps", "torch", "compile")},
        reference="maps",
    )


def sdpa_case(shape: QKShape, dtype: torch.dtype, device: str, size: str) -> Case:
    """The ``sdpa`` yardstick beside an ``attention_kl_qk`` case (its own reference: nothing to
    compare it with; the check only shows that it runs and is close to itself in float32)."""
    elt = torch.empty((), dtype=dtype).element_size()
    q_numel = math.prod(shape.side(True)[0])
    return Case(
        op="attention_kl_qk",
        shape=shape.label(),
        dtype=dtype,
        device=device,
        size=size,
        make_inputs=lambda: _qk_inputs(shape, dtype, device),
        impls={"sdpa": sdpa_yardstick},
        bytes=12 * q_numel * elt,  # about: forward reads q, k, v, writes o; backward reads 5, writes 3
        flops=14 * shape.score_elements * shape.d,  # forward 2 GEMMs, backward 5 (recompute, dv, dp, dq, dk)
        configs={"sdpa": QK_CONFIGS["sdpa"]},
        reference="sdpa",
        tolerance=5e-2,
    )


def qk_cases(device: str, size: str) -> list[Case]:
    cases = []
    for shape, dtype in QK_SIZES[device][size]:
        cases.append(qk_case(shape, dtype, device, size))
        if device == "cuda":
            cases.append(sdpa_case(shape, dtype, device, size))
    return cases


# --------------------------------------------------------------------------------------------
# Cases defined in other modules (each a ``CASES: list[Case]``).


def extra_cases() -> list[Case]:
    # Imported here: those modules import this one.
    from fastkd.bench import divergence_cases, fused_linear_cases, runner_cases, sparse_cases

    return divergence_cases.CASES + fused_linear_cases.CASES + sparse_cases.CASES + runner_cases.CASES


def select_cases(
    device: str, size: str, ops: list[str] | None = None, impls: list[str] | None = None
) -> list[Case]:
    """Every case of ``device`` and ``size`` (the losses first), restricted to ``ops`` and to the
    implementations ``impls`` (plus each case's reference) if given. Cases marked ``opt_in`` are
    selected only when ``ops`` names their op."""
    if size not in SIZES:
        raise ValueError(f"size: got {size!r}, expected one of {', '.join(SIZES)}")
    cases = loss_cases(device, size) + qk_cases(device, size)
    cases += [c for c in extra_cases() if c.device == device and c.size == size]
    if ops is None:
        cases = [c for c in cases if not c.opt_in]
    else:
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
