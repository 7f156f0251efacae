"""``attention_kl_qk`` and ``relation_kl``: the attention KL from queries and keys, no ``[L, L]`` maps.

Path: ``attention_kl_qk`` validates, picks a backend (``fastkd._backend``) and calls the custom op
``fastkd::attention_kl_qk_rows`` over all layer pairs at once; the backends' ``attention_qk_forward``
/ ``attention_qk_backward`` compute it (flash-attention style tiles in Triton, query chunks of
scores on CPU, ``fastkd/backends/qk_chunks.py``). ``relation_kl`` splits ``[B, L, D]`` projections
into relation heads and calls the same op with each side's tensor as both query and key.
"""

from __future__ import annotations

import math

import torch

from fastkd import _backend
from fastkd._layout import acc_dtype
from fastkd._reduction import reduce_rows
from fastkd._validation import (
    as_layer_lists,
    as_pair_lists,
    check_float_tensor,
    check_mask,
    check_one_device,
    check_reduction,
)


@torch.library.custom_op("fastkd::attention_kl_qk_rows", mutates_args=())
def attention_kl_qk_rows(
    student_q: list[torch.Tensor],
    student_k: list[torch.Tensor],
    teacher_q: list[torch.Tensor],
    teacher_k: list[torch.Tensor],
    scales: list[float],
    mask: torch.Tensor | None,
    causal: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row ``kl`` of every pair, concatenated (rows that contribute nothing 0), and the
    ``[2, rows]`` float64 stats; ``scales`` holds ``scale_s, scale_t`` of each pair in turn."""
    contiguous = [[x.contiguous() for x in xs] for xs in (student_q, student_k, teacher_q, teacher_k)]
    return _backend.module(backend).attention_qk_forward(*contiguous, scales, mask, causal)


@attention_kl_qk_rows.register_fake
def _(student_q, student_k, teacher_q, teacher_k, scales, mask, causal, backend):
    rows = sum(q.shape[0] * q.shape[1] * q.shape[2] for q in student_q)
    dtype = acc_dtype(*student_q, *student_k, *teacher_q, *teacher_k)
    return student_q[0].new_empty(rows, dtype=dtype), student_q[0].new_empty(2, rows, dtype=torch.float64)


@torch.library.custom_op("fastkd::attention_kl_qk_rows_backward", mutates_args=())
def attention_kl_qk_rows_backward(
    student_q: list[torch.Tensor],
    student_k: list[torch.Tensor],
    teacher_q: list[torch.Tensor],
    teacher_k: list[torch.Tensor],
    scales: list[float],
    mask: torch.Tensor | None,
    causal: bool,
    stats: torch.Tensor,
    grad_rows: torch.Tensor,
    backend: str,
) -> list[torch.Tensor]:
    """The student's query gradients, then its key gradients: ``dS = grad_rows (q - p) scale_s``,
    ``dq = dS key_s``, ``dk = dS^T query_s`` (summed over each key head's query heads)."""
    contiguous = [[x.contiguous() for x in xs] for xs in (student_q, student_k, teacher_q, teacher_k)]
    grads_q, grads_k = _backend.module(backend).attention_qk_backward(
        *contiguous, scales, mask, causal, stats, grad_rows.contiguous()
    )
    return [*grads_q, *grads_k]


@attention_kl_qk_rows_backward.register_fake
def _(student_q, student_k, teacher_q, teacher_k, scales, mask, causal, stats, grad_rows, backend):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in (*student_q, *student_k)]


def _setup_context(ctx, inputs, output):
    student_q, student_k, teacher_q, teacher_k, scales, mask, causal, backend = inputs
    ctx.save_for_backward(mask, output[1], *student_q, *student_k, *teacher_q, *teacher_k)
    ctx.scales, ctx.causal, ctx.backend, ctx.pairs = scales, causal, backend, len(student_q)


def _backward(ctx, grad_rows, grad_stats):
    mask, stats, *tensors = ctx.saved_tensors
    n = ctx.pairs
    student_q, student_k, teacher_q, teacher_k = (tensors[i * n : (i + 1) * n] for i in range(4))
    grads_q = grads_k = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grads = attention_kl_qk_rows_backward(
            student_q, student_k, teacher_q, teacher_k, ctx.scales, mask, ctx.causal, stats, grad_rows, ctx.backend
        )
        grads_q, grads_k = grads[:n], grads[n:]
    return grads_q, grads_k, [None] * n, [None] * n, None, None, None, None


attention_kl_qk_rows.register_autograd(_backward, setup_context=_setup_context)


def _check_side(role: str, query: object, key: object, layer: str) -> None:
    """``{role}_q [B, H, L, d]`` and ``{role}_k [B, H_kv, L, d]`` with ``H % H_kv == 0``, one dtype."""
    check_float_tensor(f"{role}_q", query)
    check_float_tensor(f"{role}_k", key)
    for name, x in ((f"{role}_q", query), (f"{role}_k", key)):
        if x.dim() != 4 or x.shape[-1] == 0:
            raise ValueError(f"{name}{layer}: expected shape [B, H, L, d] with d > 0, got {tuple(x.shape)}")
    (batch, heads, length, width), kv_heads = query.shape, key.shape[1]
    if key.shape[0] != batch or key.shape[2] != length or key.shape[3] != width:
        raise ValueError(
            f"{role}_k{layer}: expected shape [{batch}, H_kv, {length}, {width}] to match {role}_q's "
            f"{tuple(query.shape)}, got {tuple(key.shape)}"
        )
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"{role}_k{layer}: the query heads H={heads} must be a multiple of the key heads H_kv={kv_heads}"
        )
    if key.dtype != query.dtype:
        raise TypeError(f"{role}_k{layer}: dtype {key.dtype} differs from {role}_q's {query.dtype}")
    if key.device != query.device:
        raise ValueError(f"{role}_k{layer}: on {key.device}, but {role}_q is on {query.device}")


def _check_scale(name: str, scale: object, width: int) -> float:
    """A finite positive float, ``width ** -0.5`` when None."""
    if scale is None:
        return width**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name}: expected a float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name}: expected a finite positive number, got {scale}")
    return float(scale)


def attention_kl_qk(
    student_q, student_k, teacher_q, teacher_k, *, mask=None, causal: bool = False,
    student_scale: float | None = None, teacher_scale: float | None = None, reduction: str = "mean",
):
    """``attention_kl(S_s, S_t, mask=mask, kind="scores")`` with ``S = q k^T * scale``, no maps held.

    ``student_q [B, H, L, d_s]``, ``student_k [B, H_kv_s, L, d_s]``, ``teacher_q [B, H, L, d_t]``,
    ``teacher_k [B, H_kv_t, L, d_t]`` (or four equal-length sequences of them: layer pairs, computed
    in one call): each side's queries and keys as attention sees them (after rotary embeddings).
    Grouped-query attention: query head ``h`` uses key head ``h // (H / H_kv)``; ``d`` and ``H_kv``
    may differ between the models. ``scale`` defaults to ``d ** -0.5`` per side. Per query row::

        S_s = q_s k_s^T * scale_s,  S_t = q_t k_t^T * scale_t    (key j dropped when mask[b, j] = 0,
        q = softmax(S_s), p = softmax(S_t) over kept keys           or when causal and j > i)
        kl = sum_j p_j (log p_j - log q_j)

    A row with no key left (left padding with ``causal``) or a masked query row gives 0, never NaN.
    ``mask``: ``[B, L]`` padding mask (nonzero = valid), for query rows and keys. ``reduction`` as in
    ``attention_kl`` (``"mean"``: ``sum m_bi kl_bhi / (H * max(sum m, 1))``). Gradients flow to
    ``student_q`` and ``student_k``; the teacher is a constant. Memory: ``O(B H L)`` statistics
    besides the inputs, never an ``[L, L]`` tensor per head on GPU (a bounded chunk of rows on CPU).
    """
    layers, is_sequence = as_layer_lists(
        student_q=student_q, student_k=student_k, teacher_q=teacher_q, teacher_k=teacher_k
    )
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    reduction = check_reduction(reduction)
    scales = []
    for i, (q_s, k_s, q_t, k_t) in enumerate(zip(*layers.values())):
        layer = f"[{i}]" if is_sequence else ""
        _check_side("student", q_s, k_s, layer)
        _check_side("teacher", q_t, k_t, layer)
        if q_t.shape[:3] != q_s.shape[:3]:
            raise ValueError(
                f"teacher_q{layer}: [B, H, L] = {tuple(q_t.shape[:3])} differs from student_q's {tuple(q_s.shape[:3])}"
            )
        if q_t.device != q_s.device:
            raise ValueError(f"teacher_q{layer}: on {q_t.device}, but student_q is on {q_s.device}")
        scales += [_check_scale("student_scale", student_scale, q_s.shape[-1]),
                   _check_scale("teacher_scale", teacher_scale, q_t.shape[-1])]
    device = check_one_device(layers["student_q"])
    mask_rows = None
    for batch, _, length, _ in dict.fromkeys(tuple(q.shape) for q in layers["student_q"]):
        mask_rows = check_mask(mask, torch.Size((batch, length)), device, "[batch, length]")
    rows, _ = attention_kl_qk_rows(
        layers["student_q"], layers["student_k"],
        [x.detach() for x in layers["teacher_q"]], [x.detach() for x in layers["teacher_k"]],
        scales, mask_rows, causal, _backend.resolve(device),
    )
    row_shapes = [tuple(q.shape[:3]) for q in layers["student_q"]]
    heads = [q.shape[1] for q in layers["student_q"]]
    return reduce_rows(rows, row_shapes, mask_rows, reduction, is_sequence, rows_per_mask_row=heads)


def _relation_heads(name: str, x: torch.Tensor, heads: int, layer: str) -> torch.Tensor:
    """``[B, L, D]`` as ``[B, R, L, D / R]``: the R relation heads of width ``D / R``."""
    check_float_tensor(name, x)
    if x.dim() != 3 or x.shape[-1] == 0:
        raise ValueError(f"{name}{layer}: expected shape [B, L, D] with D > 0, got {tuple(x.shape)}")
    if x.shape[-1] % heads:
        raise ValueError(
            f"{name}{layer}: width D={x.shape[-1]} is not divisible by relation_heads={heads}"
        )
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def relation_kl(student, teacher, *, relation_heads: int, mask=None, causal: bool = False, reduction: str = "mean"):
    """MiniLMv2 self-attention relation KL of one projection (queries, keys or values) of a layer.

    ``student [B, L, D_s]``, ``teacher [B, L, D_t]`` (or two equal-length sequences of them), heads
    concatenated as a projection returns them; ``D_s`` and ``D_t`` divisible by ``relation_heads =
    R``. Each side is split into R heads ``x_r`` of width ``D / R`` and::

        relation_r = softmax(x_r x_r^T / sqrt(D / R))  over keys (masked and causal keys dropped)
        loss = attention_kl_qk(x_s, x_s, x_t, x_t)      reduced as attention_kl with R for H

    so teacher and student may differ in head count and width. Gradients flow to ``student``.
    """
    if isinstance(relation_heads, bool) or not isinstance(relation_heads, int):
        raise TypeError(f"relation_heads: expected an int, got {type(relation_heads).__name__}")
    if relation_heads < 1:
        raise ValueError(f"relation_heads: expected a positive number of heads, got {relation_heads}")
    student_layers, teacher_layers, is_sequence = as_pair_lists(student, teacher)
    students, teachers = [], []
    for i, (s, t) in enumerate(zip(student_layers, teacher_layers)):
        layer = f"[{i}]" if is_sequence else ""
        students.append(_relation_heads("student", s, relation_heads, layer))
        teachers.append(_relation_heads("teacher", t, relation_heads, layer))
        if t.shape[:2] != s.shape[:2]:
            raise ValueError(f"teacher{layer}: [B, L] = {tuple(t.shape[:2])} differs from student's {tuple(s.shape[:2])}")
    if not is_sequence:
        students, teachers = students[0], teachers[0]
    return attention_kl_qk(students, students, teachers, teachers, mask=mask, causal=causal, reduction=reduction)
