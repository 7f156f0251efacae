"""The ``"triton"`` backend: one fused kernel per loss and direction.

Each forward kernel reads every student and teacher element of a row once and writes the row's value
(and, for softmax losses, the log-sum-exps backward needs); each backward kernel reads the row once
more and writes the gradient. With ``GRAD`` (one pass, ``fastkd._one_pass``) a forward kernel writes
the gradient too: from the same loads for ``hidden`` and attention probabilities, and for the softmax
losses from a further pass over the tile's columns once its log-sum-exps are known (a GPU finds the
tile in L2 while it is still there); the logit divergences other than ``"forward"`` need such a pass
for their row values too. ``_scale_gradients_kernel`` rescales one-pass gradients in backward.
Rows that contribute nothing (masked, or without an entry that counts) read nothing in the forward
and write a zero gradient. One program handles a tile of ``BLOCK_R`` rows, walking their columns
``BLOCK_C`` at a time; offsets are 64-bit. Layer pairs of one dtype combination run in one launch
(program id 1 is the pair): a small int64 table on the device holds, per pair, the addresses, sizes
and strides the kernels need (``PairTable``). Every launch runs with the inputs' CUDA device
current, whichever device the caller has selected.

Notation (the same in the C++ kernels and the torch backend): the student comes first, and a name
ending in ``_s`` is the student's, in ``_t`` the teacher's. Prefixes: ``o_`` offsets, ``m_``
boolean masks, ``p_`` pointers, ``b_`` values of a ``[BLOCK_R, BLOCK_C]`` block. An online softmax
keeps per row ``max_`` (running maximum), ``sum_`` (of ``exp(x - max_)``) and ``cross`` (of
``exp(t - max_t) ((t - max_t) - (s - max_s))``, ``_online_kl``). Sizes: ``R1`` rows of the second leading dimension, ``V`` vocabulary,
``D`` width, ``Lq``/``Lk`` queries/keys.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from fastkd._constants import TINY as _TINY
from fastkd._layout import acc_dtype

TINY = tl.constexpr(_TINY)  # the floor of q in log q for kind="probs"
MAX_BLOCK_C = 4096
# Elements per program tile, by kernel: the best of 1024..16384 on an H100 at the benchmark sizes
# (benchmarks/NOTES.md); rows longer than MAX_BLOCK_C get one row per program whatever the tile.
TILE_ELEMENTS = {"logit": 4096, "hidden": 2048, "attention": 1024}
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float64: tl.float64}


def _tile(kernel: str, rows: int, cols: int) -> dict:
    """Launch options for rows of ``cols`` elements: a tile of about TILE_ELEMENTS[kernel] elements."""
    block_c = min(triton.next_power_of_2(cols), MAX_BLOCK_C)
    block_r = max(1, min(TILE_ELEMENTS[kernel] // block_c, triton.next_power_of_2(rows)))
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": 8 if block_r * block_c >= 2048 else 4}


def _tl(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def _device_context(device: torch.device):
    """The inputs' CUDA device made current (nothing to do for CPU tensors under the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _on_inputs_device(fn):
    """Runs a backend function (first argument: a tensor, or a list of them) on its inputs' device."""

    @functools.wraps(fn)
    def on_device(inputs, *args):
        first = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
        with _device_context(first.device):
            return fn(inputs, *args)

    return on_device


@triton.jit
def _scalar(x, ACC: tl.constexpr):
    """A float64 scalar argument (a Python float under the interpreter) in the accumulator dtype."""
    return tl.full([], x, ACC)


@triton.jit
def _online_lse(max_x, sum_x, b_x):
    """Fold block ``b_x`` ``[R, C]`` into the running per-row ``max_x`` and ``sum_x = sum exp(x - max_x)``.

    -inf entries add 0. Returns (max, sum, exp(b_x - max), the factor the old sums were scaled by).
    """
    max_new = tl.maximum(max_x, tl.max(b_x, 1))
    max_safe = tl.where(max_new == float("-inf"), 0.0, max_new)
    b_e = tl.exp(b_x - max_safe[:, None])
    alpha = tl.exp(max_x - max_safe)
    return max_new, sum_x * alpha + tl.sum(b_e, 1), b_e, alpha


@triton.jit
def _div(x, y):
    """x / y rounded to nearest: Triton's float32 ``/`` is approximate (2 ulp on CUDA)."""
    if x.dtype.is_fp64():
        return x / y
    else:
        return tl.math.div_rn(x, y)


@triton.jit
def _lse_from_online(max_x, sum_x):
    """The float64 log-sum-exp ``max_x + log(sum_x)`` of running sums (-inf for sum_x = 0)."""
    return max_x.to(tl.float64) + tl.log(sum_x.to(tl.float64))


@triton.jit
def _shift(max_x):
    """What exps are taken relative to: the running maximum, 0 while it is -inf (no entry yet)."""
    return tl.where(max_x == float("-inf"), 0.0, max_x)


@triton.jit
def _online_kl(max_s, sum_s, max_t, sum_t, cross, b_s, b_t, m_keep):
    """Fold block ``b_s``, ``b_t`` ``[R, C]`` (entries outside ``m_keep`` excluded from both softmaxes)
    into the running ``max_``, ``sum_ = sum exp(x - shift_)`` and
    ``cross = sum exp(t - shift_t) ((t - shift_t) - (s - shift_s))``: each logit relative to its own
    row's maximum, so that ``cross`` is as small as p and q are close (``_kl_from_online``). When a
    block moves the maxima, the old terms are moved with them: ``cross -= sum_t (d shift_t - d shift_s)``."""
    shift_s, shift_t = _shift(max_s), _shift(max_t)
    sum_t_old = sum_t
    max_s, sum_s, _, _ = _online_lse(max_s, sum_s, tl.where(m_keep, b_s, float("-inf")))
    max_t, sum_t, b_e, alpha = _online_lse(max_t, sum_t, tl.where(m_keep, b_t, float("-inf")))
    moved = (_shift(max_t) - shift_t) - (_shift(max_s) - shift_s)
    cross = alpha * (cross - tl.where(sum_t_old > 0, sum_t_old * moved, 0.0))
    b_d = (b_t - _shift(max_t)[:, None]) - (b_s - _shift(max_s)[:, None])
    return max_s, sum_s, max_t, sum_t, cross + tl.sum(tl.where(m_keep & (b_e > 0), b_e * b_d, 0.0), 1)


@triton.jit
def _log1p(x):
    """log(1 + x), accurate where x is small: ``log(w) x / (w - 1)`` with ``w = 1 + x`` rounded."""
    w = 1.0 + x
    return tl.where(w == 1.0, x, tl.log(w) * _div(x, w - 1.0))


@triton.jit
def _kl_from_online(max_s, sum_s, max_t, sum_t, cross):
    """Per row ``kl = sum p ((t - shift_t) - (s - shift_s)) + log(sum_s / sum_t)`` from the running
    sums of ``_online_kl``, and the float64 lses.

    Both terms shrink with the divergence (``log(sum_s / sum_t)`` as ``log1p((sum_s - sum_t) / sum_t)``),
    so float32 rounds kl about as the float32 formula ``sum p (log p - log q)`` does. A row whose
    teacher has no entry (``sum_t = 0``) gives kl 0 and lses -inf (the log-sum-exp of nothing), which
    backward reads as "no gradient".
    """
    has_entries = sum_t > 0
    kl = _div(cross, sum_t) + _log1p(_div(sum_s - sum_t, sum_t))
    lse_s = _lse_from_online(max_s, sum_s)
    lse_t = _lse_from_online(max_t, sum_t)
    none = float("-inf")
    return tl.where(has_entries, kl, 0.0), tl.where(has_entries, lse_s, none), tl.where(has_entries, lse_t, none)


@triton.jit
def _split_lse(lse, ACC: tl.constexpr):
    """Float64 lses as (hi, lo) in ACC with hi + lo = lse: exp((x - hi) - lo) keeps x's precision."""
    hi = lse.to(ACC)
    return hi, (lse - hi.to(tl.float64)).to(ACC)


@triton.jit
def _load_lse(p_lse, m_rows, ACC: tl.constexpr):
    """The float64 lses at ``p_lse`` as (hi, lo) (``_split_lse``)."""
    return _split_lse(tl.load(p_lse, mask=m_rows, other=0.0), ACC)


@triton.jit
def _softmax_kl_grad(b_s, b_t, lse_s_hi, lse_s_lo, lse_t_hi, lse_t_lo, b_scale, m_keep):
    """``b_scale * (q - p)`` on ``m_keep``, 0 elsewhere: the gradient of sum p (log p - log q) in the
    student's scores, q = exp(s - lse_s), p = exp(t - lse_t) from the float64 lses' (hi, lo)."""
    b_q = tl.exp((b_s - lse_s_hi[:, None]) - lse_s_lo[:, None])
    b_p = tl.exp((b_t - lse_t_hi[:, None]) - lse_t_lo[:, None])
    return tl.where(m_keep, b_scale[:, None] * (b_q - b_p), 0.0)


@triton.jit
def _row_tile(n_rows, p_mask, HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's rows: (o_r row indices, m_rows in range, m_valid: in range and not masked)."""
    o_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_rows = o_r < n_rows
    m_valid = m_rows
    if HAS_MASK:
        m_valid = m_valid & (tl.load(p_mask + o_r, mask=m_rows, other=0.0) != 0)
    return o_r, m_rows, m_valid


@triton.jit
def _column_bound(m_valid, n_cols):
    """n_cols, or 0 when no row of the tile is valid (a tile without a valid row reads nothing)."""
    return tl.where(tl.max(m_valid.to(tl.int32), 0) > 0, n_cols, 0)


# ----------------------------------------------------------------------------------------- logit
#
# Per row, s' = s / T, t' = t / T, log q = log_softmax(s'), log p = log_softmax(t'); DIVERGENCE (a
# string constexpr) picks the row value r:
#     "forward": T^2 sum_v p_v (log p_v - log q_v)
#     "reverse": T^2 sum_v q_v (log q_v - log p_v)
#     "jsd":     T^2 (beta KL(p‖m) + (1 - beta) KL(q‖m)),  m = beta p + (1 - beta) q
#     "tvd":     0.5 sum_v |p_v - q_v|
# and d r / d s = c q (a - S), S = sum_v q_v a_v, c = T (tvd: 1 / T), a per ``_divergence_terms``
# (forward: q a = -p, S = -1: T (q - p)). With labels (HAS_LABELS), ce = lse(s) - s[label] at T = 1,
# whose gradient is softmax(s) - onehot(label); CE_GRAD adds grad_ce_rows times it to the gradient.
# ``b_x`` is the student's block of raw logits s (the CE's), names ending in ``_ce`` its values.
# stats, float64 [4, R]: lse(s'), lse(t') (-inf where the KD part contributes nothing), lse(s)
# (-inf on rows without CE), S (0 where unused).


@triton.jit
def _row_labels(p_labels, o_r, m_rows, m_valid, V):
    """(label, m_ce) of rows ``o_r``: their labels, and the rows with a CE (valid, label in [0, V):
    any other value, -100 included, is no label)."""
    label = tl.load(p_labels + o_r, mask=m_rows, other=-1)
    return label, m_valid & (label >= 0) & (label < V)


@triton.jit
def _divergence_terms(b_s, b_t, lse_s_hi, lse_s_lo, lse_t_hi, lse_t_lo, beta, DIVERGENCE: tl.constexpr,
                      ACC: tl.constexpr):
    """(q, r_v, q a) per entry of s', t' for a divergence other than "forward", the rows' lses as
    (hi, lo): r = sum_v r_v (before T^2), d r / d s' = q (a - S), S = sum_v q_v a_v::

        reverse: r_v = q a,  a = log q - log p
        jsd:     r_v = beta p log(p / m) + (1 - beta) q log(q / m),  a = (1 - beta) log(q / m),
                 log m = max(log q, log p) + log(1 + w (exp(-|d|) - 1)), d = log q - log p,
                 w = beta where d >= 0, 1 - beta where d < 0 (the weight of the smaller): exactly
                 0 where p = q
        tvd:     r_v = 0.5 |p - q|,  a = 0.5 sign(q - p)

    Terms of a zero probability are 0 (0 log 0 = 0, q a = 0 where q = 0; q > 0 = p gives reverse +inf).
    """
    b_q = tl.exp((b_s - lse_s_hi[:, None]) - lse_s_lo[:, None])
    b_p = tl.exp((b_t - lse_t_hi[:, None]) - lse_t_lo[:, None])
    # log q - log p with the lses' difference taken first: no rounding at the lses' magnitude
    b_lqp = (b_s - b_t) - ((lse_s_hi - lse_t_hi) + (lse_s_lo - lse_t_lo))[:, None]
    if DIVERGENCE == "reverse":
        b_qa = tl.where(b_q > 0, b_q * b_lqp, 0.0)
        b_r = b_qa
    elif DIVERGENCE == "jsd":
        w_p = _scalar(beta, ACC)  # the weights of p and q in m
        w_q = _scalar(1.0 - beta, ACC)
        b_w = tl.where(b_lqp < 0, w_q, w_p)
        b_lm_rel = tl.log(1.0 + b_w * (tl.exp(-tl.abs(b_lqp)) - 1.0))  # log(m / max(q, p)), in [log w, 0]
        b_kl_q = tl.where(b_q > 0, -b_q * (b_lm_rel + tl.maximum(-b_lqp, 0.0)), 0.0)  # q log(q / m)
        b_kl_p = tl.where(b_p > 0, -b_p * (b_lm_rel + tl.maximum(b_lqp, 0.0)), 0.0)  # p log(p / m)
        b_r = w_p * b_kl_p + w_q * b_kl_q
        b_qa = w_q * b_kl_q
    else:
        b_r = 0.5 * tl.abs(b_q - b_p)
        b_qa = tl.where(b_lqp > 0, 0.5 * b_q, tl.where(b_lqp < 0, -0.5 * b_q, 0.0))  # sign(q - p) of log q - log p
    return b_q, b_r, b_qa


@triton.jit
def _divergence_rows(
    p_s, p_t, o_s, o_t, m_kd, lse_s, lse_t, V, inv_t, beta, DIVERGENCE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """(sum_v r_v, S = sum_v q_v a_v) of ``_divergence_terms`` on rows ``m_kd``, 0 elsewhere: one pass
    over the rows' V columns of s and t once their float64 lses are known."""
    lse_s_hi, lse_s_lo = _split_lse(lse_s, ACC)
    lse_t_hi, lse_t_lo = _split_lse(lse_t, ACC)
    r = tl.zeros([BLOCK_R], ACC)
    S = tl.zeros([BLOCK_R], ACC)
    for start in range(0, _column_bound(m_kd, V), BLOCK_C):
        o_v = start + tl.arange(0, BLOCK_C)
        m_load = m_kd[:, None] & (o_v < V)[None, :]
        b_s = tl.load(p_s + o_s[:, None] + o_v[None, :], mask=m_load, other=float("-inf")).to(ACC) * inv_t
        b_t = tl.load(p_t + o_t[:, None] + o_v[None, :], mask=m_load, other=float("-inf")).to(ACC) * inv_t
        _, b_r, b_qa = _divergence_terms(b_s, b_t, lse_s_hi, lse_s_lo, lse_t_hi, lse_t_lo, beta, DIVERGENCE, ACC)
        r += tl.sum(tl.where(m_load, b_r, 0.0), 1)
        S += tl.sum(tl.where(m_load, b_qa, 0.0), 1)
    return r, S


@triton.jit
def _logit_grad(
    p_s, p_t, p_labels, p_grad_rows, p_grad_ce_rows, p_grad, o_r, o_s, o_t, m_rows, m_valid, lse_s, lse_t, S,
    lse_ce, V, temperature, beta, DIVERGENCE: tl.constexpr, CE_GRAD: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """grad = grad_rows * c q (a - S) (forward: grad_rows * T (q - p)) on rows ``o_r`` (s and t at offsets
    ``o_s``/``o_t``), q = exp(s' - lse_s), p = exp(t' - lse_t) from the rows' float64 lses, 0 on rows whose
    KD part contributes nothing (not ``m_valid``, or lse_t = -inf); CE_GRAD adds
    grad_ce_rows * (exp(s - lse_ce) - onehot(label)) on rows with a CE. One pass over the rows' V columns."""
    inv_t = _scalar(1.0 / temperature, ACC)
    lse_s_hi, lse_s_lo = _split_lse(lse_s, ACC)
    lse_t_hi, lse_t_lo = _split_lse(lse_t, ACC)
    m_kd = m_valid & (lse_t_hi > float("-inf"))
    if DIVERGENCE == "tvd":
        c = inv_t
    else:
        c = _scalar(temperature, ACC)
    b_scale = tl.load(p_grad_rows + o_r, mask=m_kd, other=0.0).to(ACC) * c  # [BLOCK_R]
    m_read = m_kd  # the rows whose s is read
    if CE_GRAD:
        label, m_ce = _row_labels(p_labels, o_r, m_rows, m_valid, V)
        b_scale_ce = tl.load(p_grad_ce_rows + o_r, mask=m_ce, other=0.0).to(ACC)  # [BLOCK_R]
        lse_ce_hi, lse_ce_lo = _split_lse(lse_ce, ACC)
        m_read = m_read | m_ce
    for start in range(0, V, BLOCK_C):
        o_v = start + tl.arange(0, BLOCK_C)
        m_cols = (o_v < V)[None, :]
        m_load = m_kd[:, None] & m_cols
        b_x = tl.load(p_s + o_s[:, None] + o_v[None, :], mask=m_read[:, None] & m_cols, other=0.0).to(ACC)
        b_s = b_x * inv_t
        b_t = tl.load(p_t + o_t[:, None] + o_v[None, :], mask=m_load, other=float("-inf")).to(ACC) * inv_t
        if DIVERGENCE == "forward":
            b_g = _softmax_kl_grad(b_s, b_t, lse_s_hi, lse_s_lo, lse_t_hi, lse_t_lo, b_scale, m_load)
        else:
            b_q, _, b_qa = _divergence_terms(b_s, b_t, lse_s_hi, lse_s_lo, lse_t_hi, lse_t_lo, beta, DIVERGENCE, ACC)
            b_g = tl.where(m_load, b_scale[:, None] * (b_qa - b_q * S[:, None]), 0.0)
        if CE_GRAD:
            b_onehot = tl.where(o_v[None, :] == label[:, None], 1.0, 0.0)
            b_dce = tl.exp((b_x - lse_ce_hi[:, None]) - lse_ce_lo[:, None]) - b_onehot  # softmax(s) - onehot
            b_g += tl.where(m_ce[:, None] & m_cols, b_scale_ce[:, None] * b_dce, 0.0)
        tl.store(p_grad + o_r[:, None] * V + o_v[None, :], b_g.to(p_grad.dtype.element_ty), mask=m_rows[:, None] & m_cols)


@triton.jit
def _logit_forward_kernel(
    p_s, p_t, p_mask, p_labels, p_rows, p_ce_rows, p_stats, p_grad_rows, p_grad_ce_rows, p_grad, n_rows, R1, V,
    stride0_s, stride1_s, stride0_t, stride1_t, temperature: tl.float64, beta: tl.float64,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, GRAD: tl.constexpr, CE_GRAD: tl.constexpr,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """rows = r (the section's notes), with HAS_LABELS ce_rows = lse(s) - s[label] (0 on rows without
    CE), and stats = (lse(s'), lse(t'), lse(s), S); with GRAD, the gradient of ``_logit_grad`` instead
    of the stats. The first pass over the tile's columns folds s' and t' (and s) into online lses, and
    for "forward" into ``cross``, which gives its r; the other divergences form q and p in a second
    pass (``_divergence_rows``); GRAD writes the gradient in a last one. A GPU serves the later passes
    from L2 where the tile is still there."""
    inv_t = _scalar(1.0 / temperature, ACC)
    o_r, m_rows, m_valid = _row_tile(n_rows, p_mask, HAS_MASK, BLOCK_R)
    o_s = (o_r // R1) * stride0_s + (o_r % R1) * stride1_s  # [BLOCK_R]
    o_t = (o_r // R1) * stride0_t + (o_r % R1) * stride1_t  # [BLOCK_R]
    max_s = tl.full([BLOCK_R], float("-inf"), ACC)
    max_t = tl.full([BLOCK_R], float("-inf"), ACC)
    sum_s = tl.zeros([BLOCK_R], ACC)
    sum_t = tl.zeros([BLOCK_R], ACC)
    cross = tl.zeros([BLOCK_R], ACC)  # sum_v exp(t'_v - max_t) ((t'_v - max_t) - (s'_v - max_s)), _online_kl
    max_ce = tl.full([BLOCK_R], float("-inf"), ACC)
    sum_ce = tl.zeros([BLOCK_R], ACC)
    for start in range(0, _column_bound(m_valid, V), BLOCK_C):
        o_v = start + tl.arange(0, BLOCK_C)
        m_load = m_valid[:, None] & (o_v < V)[None, :]
        b_x = tl.load(p_s + o_s[:, None] + o_v[None, :], mask=m_load, other=float("-inf")).to(ACC)
        b_s = b_x * inv_t
        b_t = tl.load(p_t + o_t[:, None] + o_v[None, :], mask=m_load, other=float("-inf")).to(ACC) * inv_t
        if DIVERGENCE == "forward":
            max_s, sum_s, max_t, sum_t, cross = _online_kl(max_s, sum_s, max_t, sum_t, cross, b_s, b_t, m_load)
        else:
            max_s, sum_s, _, _ = _online_lse(max_s, sum_s, b_s)
            max_t, sum_t, _, _ = _online_lse(max_t, sum_t, b_t)
        if HAS_LABELS:
            max_ce, sum_ce, _, _ = _online_lse(max_ce, sum_ce, b_x)
    kl, lse_s, lse_t = _kl_from_online(max_s, sum_s, max_t, sum_t, cross)  # kl: "forward"'s r / T^2
    S = tl.zeros([BLOCK_R], ACC)
    if DIVERGENCE == "forward":
        r = kl
    else:
        r, S = _divergence_rows(p_s, p_t, o_s, o_t, m_valid & (lse_t > float("-inf")), lse_s, lse_t, V, inv_t,
                                beta, DIVERGENCE, ACC, BLOCK_R, BLOCK_C)
    if DIVERGENCE != "tvd":
        r = r * _scalar(temperature * temperature, ACC)
    tl.store(p_rows + o_r, r, mask=m_rows)
    lse_ce = tl.full([BLOCK_R], float("-inf"), tl.float64)
    if HAS_LABELS:
        label, m_ce = _row_labels(p_labels, o_r, m_rows, m_valid, V)
        s_label = tl.load(p_s + o_s + tl.where(m_ce, label, 0), mask=m_ce, other=0.0).to(ACC)
        lse_ce = tl.where(m_ce, _lse_from_online(max_ce, sum_ce), float("-inf"))
        ce = (lse_ce - s_label.to(tl.float64)).to(ACC)
        tl.store(p_ce_rows + o_r, tl.where(m_ce, ce, 0.0), mask=m_rows)
    if GRAD:
        _logit_grad(p_s, p_t, p_labels, p_grad_rows, p_grad_ce_rows, p_grad, o_r, o_s, o_t, m_rows, m_valid, lse_s,
                    lse_t, S, lse_ce, V, temperature, beta, DIVERGENCE, CE_GRAD, ACC, BLOCK_C)
    else:
        tl.store(p_stats + o_r, lse_s, mask=m_rows)
        tl.store(p_stats + n_rows + o_r, lse_t, mask=m_rows)
        tl.store(p_stats + 2 * n_rows + o_r, lse_ce, mask=m_rows)
        tl.store(p_stats + 3 * n_rows + o_r, S.to(tl.float64), mask=m_rows)


@triton.jit
def _logit_backward_kernel(
    p_s, p_t, p_mask, p_labels, p_stats, p_grad_rows, p_grad_ce_rows, p_grad, n_rows, R1, V, stride0_s, stride1_s,
    stride0_t, stride1_t, temperature: tl.float64, beta: tl.float64, DIVERGENCE: tl.constexpr,
    CE_GRAD: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The gradient of ``_logit_grad`` from the forward's stats (lse(s'), lse(t'), and S where the
    divergence has one, lse(s) with CE_GRAD); 0 on rows that contribute nothing."""
    o_r, m_rows, m_valid = _row_tile(n_rows, p_mask, HAS_MASK, BLOCK_R)
    o_s = (o_r // R1) * stride0_s + (o_r % R1) * stride1_s  # [BLOCK_R]
    o_t = (o_r // R1) * stride0_t + (o_r % R1) * stride1_t  # [BLOCK_R]
    lse_s = tl.load(p_stats + o_r, mask=m_rows, other=0.0)
    lse_t = tl.load(p_stats + n_rows + o_r, mask=m_rows, other=0.0)
    lse_ce = tl.full([BLOCK_R], float("-inf"), tl.float64)
    if CE_GRAD:
        lse_ce = tl.load(p_stats + 2 * n_rows + o_r, mask=m_rows, other=0.0)
    S = tl.zeros([BLOCK_R], ACC)
    if DIVERGENCE != "forward":
        S = tl.load(p_stats + 3 * n_rows + o_r, mask=m_rows, other=0.0).to(ACC)
    _logit_grad(p_s, p_t, p_labels, p_grad_rows, p_grad_ce_rows, p_grad, o_r, o_s, o_t, m_rows, m_valid, lse_s,
                lse_t, S, lse_ce, V, temperature, beta, DIVERGENCE, CE_GRAD, ACC, BLOCK_C)


def _logit_forward(student, teacher, mask, temperature, divergence, beta, labels, stats, grad_rows, grad_ce_rows,
                   grad):
    """(rows, ce_rows) of ``_logit_forward_kernel``, which also fills ``stats``, or with ``grad``, the
    gradient; ce_rows is empty without labels."""
    r0, r1, vocab = student.shape
    n_rows = r0 * r1
    acc = acc_dtype(student, teacher)
    rows = torch.empty(n_rows, dtype=acc, device=student.device)
    ce_rows = torch.empty(n_rows if labels is not None else 0, dtype=acc, device=student.device)
    if n_rows:
        tile = _tile("logit", n_rows, vocab)
        _logit_forward_kernel[(triton.cdiv(n_rows, tile["BLOCK_R"]),)](
            student, teacher, mask, labels, rows, ce_rows, stats, grad_rows, grad_ce_rows, grad, n_rows, r1, vocab,
            *student.stride()[:2], *teacher.stride()[:2], temperature, beta, DIVERGENCE=divergence,
            HAS_LABELS=labels is not None, GRAD=grad is not None, CE_GRAD=grad_ce_rows is not None,
            HAS_MASK=mask is not None, ACC=_tl(acc), **tile,
        )
    return rows, ce_rows


@_on_inputs_device
def logit_forward(student, teacher, mask, temperature, divergence, beta, labels):
    """(rows, ce_rows, stats): the divergence's r and the CE per row, stats = (lse(s / T), lse(t / T),
    lse(s), S)."""
    stats = torch.empty(4, student.shape[0] * student.shape[1], dtype=torch.float64, device=student.device)
    rows, ce_rows = _logit_forward(student, teacher, mask, temperature, divergence, beta, labels, stats, None, None,
                                   None)
    return rows, ce_rows, stats


@_on_inputs_device
def logit_backward(student, teacher, mask, temperature, divergence, beta, labels, stats, grad_rows, grad_ce_rows):
    """grad = grad_rows * d r / d s (+ grad_ce_rows * (softmax(s) - onehot(label)) on rows with a CE),
    0 on masked rows."""
    r0, r1, vocab = student.shape
    n_rows = r0 * r1
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    if n_rows:
        tile = _tile("logit", n_rows, vocab)
        _logit_backward_kernel[(triton.cdiv(n_rows, tile["BLOCK_R"]),)](
            student, teacher, mask, labels, stats, grad_rows, grad_ce_rows, grad, n_rows, r1, vocab,
            *student.stride()[:2], *teacher.stride()[:2], temperature, beta, DIVERGENCE=divergence,
            CE_GRAD=grad_ce_rows is not None, HAS_MASK=mask is not None, ACC=_tl(acc_dtype(student, teacher)),
            **tile,
        )
    return grad


@_on_inputs_device
def logit_forward_with_grad(student, teacher, mask, temperature, divergence, beta, labels, grad_rows, grad_ce_rows):
    """(rows, ce_rows of ``logit_forward``, grad of ``logit_backward`` for ``grad_rows``, ``grad_ce_rows``)
    from one launch."""
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    rows, ce_rows = _logit_forward(student, teacher, mask, temperature, divergence, beta, labels, None, grad_rows,
                                   grad_ce_rows, grad)
    return rows, ce_rows, grad


# ---------------------------------------------------------------------------------------- sparse
#
# A teacher stored as its top-k log-probabilities l_j at T = 1 at ids id_j (``-1``: padding, not
# stored; J the stored entries, K of them per row at most). Per row, s' = s / T, log q = s' - lse(s')
# over the V columns; TAIL (a string constexpr) picks the row value r and the gradient
# grad = grad_rows * (a q + scatter_j b_j), b_j = w q_{id_j} - c p_j:
#     "renormalize": lse_t = lse_J(l / T), p_j = exp(l_j / T - lse_t),
#                    r = T^2 sum_{J, p_j > 0} p_j (log p_j - log q_{id_j});  a = c = T, w = 0
#     "bucket":      lse_t = lse_J(l), p_j = exp(l_j), P = sum_J p_j, Q = sum_J q_{id_j},
#                    p_tail = max(1 - P, 0), q_tail = 1 - Q,
#                    r = sum_{J, p_j > 0} p_j (l_j - log q_{id_j})
#                        + p_tail (log p_tail - log max(q_tail, TINY))   (a tail, |J| < V, and p_tail > 0)
#                    w = p_tail / q_tail (a tail and q_tail > TINY; else 0), a = P - w Q, c = 1
# A row contributes nothing when it is masked or lse_t = -inf. stats, float64 [2, R]: lse(s'), lse_t.
# ``b_l`` is a block of the teacher's log-probabilities as the softmax takes them (l / T for
# "renormalize", l for "bucket"), -inf where nothing is stored.


@triton.jit
def _sparse_entries(p_ids, p_logprobs, o_r, m_rows, start, K, inv_t, TAIL: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """(ids, m_stored, b_l) of the stored entries ``start .. start + BLOCK_K`` of rows ``o_r`` (only
    rows ``m_rows`` read): their ids, whether they are stored (id >= 0), and b_l."""
    o_k = start + tl.arange(0, BLOCK_K)
    o_e = o_r[:, None] * K + o_k[None, :]
    ids = tl.load(p_ids + o_e, mask=m_rows[:, None] & (o_k < K)[None, :], other=-1)
    m_stored = ids >= 0
    b_l = tl.load(p_logprobs + o_e, mask=m_stored, other=float("-inf")).to(ACC)
    if TAIL == "renormalize":
        b_l = b_l * inv_t
    return ids, m_stored, tl.where(m_stored, b_l, float("-inf"))


@triton.jit
def _sparse_probs(p_s, o_s, ids, m_stored, b_l, lse_s_hi, lse_s_lo, lse_t_hi, lse_t_lo, inv_t,
                  TAIL: tl.constexpr, ACC: tl.constexpr):
    """(q, p, log p - log q) at the stored entries, s' gathered at the ids, the rows' lses as (hi, lo);
    q and p are 0 where nothing is stored. "renormalize" takes the lses' difference first (no
    rounding at their magnitude): log p - log q = (l' - s') - (lse_t - lse_s)."""
    b_s = tl.load(p_s + o_s[:, None] + ids, mask=m_stored, other=0.0).to(ACC) * inv_t
    b_lq = (b_s - lse_s_hi[:, None]) - lse_s_lo[:, None]
    if TAIL == "renormalize":
        b_lp = (b_l - lse_t_hi[:, None]) - lse_t_lo[:, None]
        b_lr = (b_l - b_s) - ((lse_t_hi - lse_s_hi) + (lse_t_lo - lse_s_lo))[:, None]
    else:
        b_lp = b_l
        b_lr = b_l - b_lq
    return tl.where(m_stored, tl.exp(b_lq), 0.0), tl.where(m_stored, tl.exp(b_lp), 0.0), b_lr


@triton.jit
def _sparse_rows(
    p_s, p_ids, p_logprobs, o_r, o_s, m_kd, V, K, lse_s, lse_t, temperature, TAIL: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """(r, a, w) of the section's notes on rows ``m_kd`` (r = 0 elsewhere), from one pass over the
    rows' stored entries once their float64 lses are known."""
    inv_t = _scalar(1.0 / temperature, ACC)
    lse_s_hi, lse_s_lo = _split_lse(lse_s, ACC)
    lse_t_hi, lse_t_lo = _split_lse(lse_t, ACC)
    r = tl.zeros([BLOCK_R], ACC)  # sum_{J, p_j > 0} p_j (log p_j - log q_{id_j})
    P = tl.zeros([BLOCK_R], ACC)
    Q = tl.zeros([BLOCK_R], ACC)
    n_stored = tl.zeros([BLOCK_R], tl.int64)
    for start in range(0, _column_bound(m_kd, K), BLOCK_K):
        ids, m_stored, b_l = _sparse_entries(p_ids, p_logprobs, o_r, m_kd, start, K, inv_t, TAIL, ACC, BLOCK_K)
        b_q, b_p, b_lr = _sparse_probs(p_s, o_s, ids, m_stored, b_l, lse_s_hi, lse_s_lo, lse_t_hi, lse_t_lo,
                                       inv_t, TAIL, ACC)
        r += tl.sum(tl.where(b_p > 0, b_p * b_lr, 0.0), 1)
        P += tl.sum(b_p, 1)
        Q += tl.sum(b_q, 1)
        n_stored += tl.sum(m_stored.to(tl.int64), 1)
    if TAIL == "renormalize":
        a = tl.full([BLOCK_R], temperature, ACC)
        r = r * _scalar(temperature * temperature, ACC)
        w = tl.zeros([BLOCK_R], ACC)
    else:
        p_tail = tl.maximum(1.0 - P, 0.0)
        q_tail = 1.0 - Q
        has_tail = n_stored < V
        tail = p_tail * (tl.log(tl.where(p_tail > 0, p_tail, 1.0)) - tl.log(tl.maximum(q_tail, TINY)))
        r += tl.where(has_tail & (p_tail > 0), tail, 0.0)
        w = tl.where(has_tail & (q_tail > TINY), _div(p_tail, tl.where(q_tail > TINY, q_tail, 1.0)), 0.0)
        a = P - w * Q
    return tl.where(m_kd, r, 0.0), a, w


@triton.jit
def _sparse_grad(
    p_s, p_ids, p_logprobs, p_grad_rows, p_grad, o_r, o_s, m_rows, m_kd, V, K, lse_s, lse_t, a, w, temperature,
    TAIL: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad = grad_rows * (a q + scatter_j b_j), b_j = w q_{id_j} - c p_j, on rows ``o_r`` (0 on rows
    not ``m_kd``): ``grad_rows * a q`` over the rows' V columns, then, once those stores are done,
    the entries at the stored ids rewritten as ``grad_rows * ((a + w) q_{id_j} - c p_j)`` (from
    the gathered s, not from the rounded stored gradient)."""
    inv_t = _scalar(1.0 / temperature, ACC)
    if TAIL == "renormalize":
        c = _scalar(temperature, ACC)
    else:
        c = _scalar(1.0, ACC)
    lse_s_hi, lse_s_lo = _split_lse(lse_s, ACC)
    lse_t_hi, lse_t_lo = _split_lse(lse_t, ACC)
    b_scale = tl.load(p_grad_rows + o_r, mask=m_kd, other=0.0).to(ACC)  # [BLOCK_R]
    for start in range(0, V, BLOCK_C):
        o_v = start + tl.arange(0, BLOCK_C)
        m_cols = (o_v < V)[None, :]
        m_load = m_kd[:, None] & m_cols
        b_s = tl.load(p_s + o_s[:, None] + o_v[None, :], mask=m_load, other=float("-inf")).to(ACC) * inv_t
        b_q = tl.exp((b_s - lse_s_hi[:, None]) - lse_s_lo[:, None])
        b_g = tl.where(m_load, (b_scale * a)[:, None] * b_q, 0.0)
        tl.store(p_grad + o_r[:, None] * V + o_v[None, :], b_g.to(p_grad.dtype.element_ty), mask=m_rows[:, None] & m_cols)
    tl.debug_barrier()  # the dense stores above land before the entries at the ids are rewritten
    for start in range(0, _column_bound(m_kd, K), BLOCK_K):
        ids, m_stored, b_l = _sparse_entries(p_ids, p_logprobs, o_r, m_kd, start, K, inv_t, TAIL, ACC, BLOCK_K)
        b_q, b_p, _ = _sparse_probs(p_s, o_s, ids, m_stored, b_l, lse_s_hi, lse_s_lo, lse_t_hi, lse_t_lo, inv_t,
                                    TAIL, ACC)
        b_g = b_scale[:, None] * ((a + w)[:, None] * b_q - c * b_p)
        tl.store(p_grad + o_r[:, None] * V + ids, b_g.to(p_grad.dtype.element_ty), mask=m_stored)


@triton.jit
def _sparse_forward_kernel(
    p_s, p_ids, p_logprobs, p_mask, p_rows, p_stats, p_grad_rows, p_grad, n_rows, R1, V, K, stride0_s, stride1_s,
    temperature: tl.float64, TAIL: tl.constexpr, GRAD: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """rows = r (the section's notes) and stats = (lse(s'), lse_t); with GRAD, the gradient of
    ``_sparse_grad`` instead of the stats. lse_t comes from a pass over the tile's stored entries,
    lse(s') from one over its columns (rows that contribute nothing read none), r from a second
    pass over the entries, the gradient from a second pass over the columns (from L2 on a GPU
    where the tile is still there)."""
    inv_t = _scalar(1.0 / temperature, ACC)
    o_r, m_rows, m_valid = _row_tile(n_rows, p_mask, HAS_MASK, BLOCK_R)
    o_s = (o_r // R1) * stride0_s + (o_r % R1) * stride1_s  # [BLOCK_R]
    max_t = tl.full([BLOCK_R], float("-inf"), ACC)
    sum_t = tl.zeros([BLOCK_R], ACC)
    for start in range(0, _column_bound(m_valid, K), BLOCK_K):
        _, _, b_l = _sparse_entries(p_ids, p_logprobs, o_r, m_valid, start, K, inv_t, TAIL, ACC, BLOCK_K)
        max_t, sum_t, _, _ = _online_lse(max_t, sum_t, b_l)
    lse_t = _lse_from_online(max_t, sum_t)  # -inf on rows without a stored entry of finite l, or not valid
    m_kd = m_valid & (lse_t > float("-inf"))
    max_s = tl.full([BLOCK_R], float("-inf"), ACC)
    sum_s = tl.zeros([BLOCK_R], ACC)
    for start in range(0, _column_bound(m_kd, V), BLOCK_C):
        o_v = start + tl.arange(0, BLOCK_C)
        m_load = m_kd[:, None] & (o_v < V)[None, :]
        b_s = tl.load(p_s + o_s[:, None] + o_v[None, :], mask=m_load, other=float("-inf")).to(ACC) * inv_t
        max_s, sum_s, _, _ = _online_lse(max_s, sum_s, b_s)
    lse_s = tl.where(m_kd, _lse_from_online(max_s, sum_s), float("-inf"))
    r, a, w = _sparse_rows(p_s, p_ids, p_logprobs, o_r, o_s, m_kd, V, K, lse_s, lse_t, temperature, TAIL, ACC,
                           BLOCK_R, BLOCK_K)
    tl.store(p_rows + o_r, r, mask=m_rows)
    if GRAD:
        _sparse_grad(p_s, p_ids, p_logprobs, p_grad_rows, p_grad, o_r, o_s, m_rows, m_kd, V, K, lse_s, lse_t, a, w,
                     temperature, TAIL, ACC, BLOCK_C, BLOCK_K)
    else:
        tl.store(p_stats + o_r, lse_s, mask=m_rows)
        tl.store(p_stats + n_rows + o_r, lse_t, mask=m_rows)


@triton.jit
def _sparse_backward_kernel(
    p_s, p_ids, p_logprobs, p_mask, p_stats, p_grad_rows, p_grad, n_rows, R1, V, K, stride0_s, stride1_s,
    temperature: tl.float64, TAIL: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The gradient of ``_sparse_grad`` from the forward's stats (lse(s'), lse_t); "bucket" recomputes
    P, Q and w from a pass over the stored entries. 0 on rows that contribute nothing."""
    o_r, m_rows, m_valid = _row_tile(n_rows, p_mask, HAS_MASK, BLOCK_R)
    o_s = (o_r // R1) * stride0_s + (o_r % R1) * stride1_s  # [BLOCK_R]
    lse_s = tl.load(p_stats + o_r, mask=m_rows, other=float("-inf"))
    lse_t = tl.load(p_stats + n_rows + o_r, mask=m_rows, other=float("-inf"))
    m_kd = m_valid & (lse_t > float("-inf"))
    if TAIL == "renormalize":
        a = tl.full([BLOCK_R], temperature, ACC)
        w = tl.zeros([BLOCK_R], ACC)
    else:
        _, a, w = _sparse_rows(p_s, p_ids, p_logprobs, o_r, o_s, m_kd, V, K, lse_s, lse_t, temperature, TAIL, ACC,
                               BLOCK_R, BLOCK_K)
    _sparse_grad(p_s, p_ids, p_logprobs, p_grad_rows, p_grad, o_r, o_s, m_rows, m_kd, V, K, lse_s, lse_t, a, w,
                 temperature, TAIL, ACC, BLOCK_C, BLOCK_K)


def _sparse_tile(rows: int, cols: int, k: int) -> dict:
    """The logit kernels' tile, with BLOCK_K stored entries per row at a time (at most BLOCK_C)."""
    tile = _tile("logit", rows, cols)
    return {**tile, "BLOCK_K": min(triton.next_power_of_2(k), tile["BLOCK_C"])}


def _sparse_forward(student, ids, logprobs, mask, temperature, tail, stats, grad_rows, grad):
    """rows of ``_sparse_forward_kernel``, which also fills ``stats``, or with ``grad``, the gradient."""
    r0, r1, vocab = student.shape
    n_rows = r0 * r1
    rows = torch.empty(n_rows, dtype=logprobs.dtype, device=student.device)
    if n_rows:
        tile = _sparse_tile(n_rows, vocab, ids.shape[1])
        _sparse_forward_kernel[(triton.cdiv(n_rows, tile["BLOCK_R"]),)](
            student, ids, logprobs, mask, rows, stats, grad_rows, grad, n_rows, r1, vocab, ids.shape[1],
            *student.stride()[:2], temperature, TAIL=tail, GRAD=grad is not None, HAS_MASK=mask is not None,
            ACC=_tl(logprobs.dtype), **tile,
        )
    return rows


@_on_inputs_device
def sparse_forward(student, ids, logprobs, mask, temperature, tail):
    """(rows, stats): the divergence from the stored teacher per row, stats = (lse(s / T), lse_t)."""
    stats = torch.empty(2, student.shape[0] * student.shape[1], dtype=torch.float64, device=student.device)
    return _sparse_forward(student, ids, logprobs, mask, temperature, tail, stats, None, None), stats


@_on_inputs_device
def sparse_backward(student, ids, logprobs, mask, temperature, tail, stats, grad_rows):
    """grad = grad_rows * (a q + scatter_j b_j), 0 on rows that contribute nothing."""
    r0, r1, vocab = student.shape
    n_rows = r0 * r1
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    if n_rows:
        tile = _sparse_tile(n_rows, vocab, ids.shape[1])
        _sparse_backward_kernel[(triton.cdiv(n_rows, tile["BLOCK_R"]),)](
            student, ids, logprobs, mask, stats, grad_rows, grad, n_rows, r1, vocab, ids.shape[1],
            *student.stride()[:2], temperature, TAIL=tail, HAS_MASK=mask is not None, ACC=_tl(logprobs.dtype),
            **tile,
        )
    return grad


@_on_inputs_device
def sparse_forward_with_grad(student, ids, logprobs, mask, temperature, tail, grad_rows):
    """(rows of ``sparse_forward``, grad of ``sparse_backward`` for ``grad_rows``) from one launch."""
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    return _sparse_forward(student, ids, logprobs, mask, temperature, tail, None, grad_rows, grad), grad


# ----------------------------------------------------------------------------------- pair tables


class PairTable:
    """The fields of one pair's row in a kernel's int64 table, named once.

    A field's offset is its position: kernels read ``tl.load(p_entry + TABLE.<field>)``, launchers
    build a row with ``TABLE.pack(<field>=value, ...)``, and ``TABLE.width`` is the row's length.
    """

    __triton_builtin__ = True  # lets Triton kernels read this global's attributes (compile-time ints)

    def __init__(self, *fields: str) -> None:
        self.fields = fields
        self.width = len(fields)
        for offset, name in enumerate(fields):
            setattr(self, name, offset)

    def pack(self, **values: int) -> tuple[int, ...]:
        if set(values) != set(self.fields):
            raise KeyError(f"table fields: got {sorted(values)}, expected {sorted(self.fields)}")
        return tuple(values[name] for name in self.fields)


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (device table, its host copy)
_MAX_TABLES = 256
_GRAPH_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # used in a CUDA-graph capture: kept


def _pair_table(entries: list[tuple[int, ...]], device: torch.device) -> torch.Tensor:
    """The int64 ``[pairs, fields]`` table on ``device``, without a host synchronisation.

    On CUDA the table is copied from pinned memory with ``non_blocking=True`` and cached by content,
    so repeated calls with the same tensors (training loops, CUDA-graph capture after a warm-up) reuse
    it. A table used while a CUDA graph is being captured is kept for good, with its pinned host
    copy, since the graph reads it (and may copy it again) at every replay; the others are evicted
    oldest first beyond ``_MAX_TABLES``.
    """
    key = (str(device), tuple(entries))
    cached = _GRAPH_TABLES.get(key) or _TABLES.pop(key, None)
    if cached is None:
        host = torch.tensor(entries, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
            cached = (host.to(device, non_blocking=True), host)
        else:
            cached = (host, host)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        _GRAPH_TABLES[key] = cached
    elif key not in _GRAPH_TABLES:
        _TABLES[key] = cached
        if len(_TABLES) > _MAX_TABLES:
            _TABLES.pop(next(iter(_TABLES)))
    return cached[0]


def _pair_launches(students, teachers, row_counts, entry):
    """(dtype pair, table entries, largest row count, widest row) per group of pairs of one dtype pair.

    ``entry(i, first_row)`` gives pair ``i``'s table row; pairs with no rows are skipped.
    """
    first_rows, total = [], 0
    for count in row_counts:
        first_rows.append(total)
        total += count
    groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, (s, t) in enumerate(zip(students, teachers)):
        if row_counts[i]:
            groups.setdefault((s.dtype, t.dtype), []).append(i)
    for dtypes, pairs in groups.items():
        entries = [entry(i, first_rows[i]) for i in pairs]
        yield dtypes, entries, max(row_counts[i] for i in pairs), max(students[i].shape[-1] for i in pairs)


# ---------------------------------------------------------------------------------------- hidden

# One hidden pair (views [R0, R1, D]): addresses of s, t and grad (0 in the forward); its rows
# R0 * R1; its first row in the concatenated rows; R1; D; the strides of the two leading dims.
HIDDEN_TABLE = PairTable(
    "p_s", "p_t", "p_grad", "n_rows", "first_row", "R1", "D", "stride0_s", "stride1_s", "stride0_t", "stride1_t"
)


@triton.jit
def _hidden_kernel(
    p_table, p_mask, p_rows, p_grad_rows, ROWS: tl.constexpr, GRAD: tl.constexpr, HAS_MASK: tl.constexpr,
    S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """ROWS: rows = sum_d (s - t)^2 / D. GRAD: grad = grad_rows * 2 (s - t) / D (0 on masked rows).
    Both: one read of s and t gives the two."""
    p_entry = p_table + tl.program_id(1) * HIDDEN_TABLE.width
    first_row = tl.load(p_entry + HIDDEN_TABLE.first_row)
    R1 = tl.load(p_entry + HIDDEN_TABLE.R1)
    D = tl.load(p_entry + HIDDEN_TABLE.D)
    o_r, m_rows, m_valid = _row_tile(tl.load(p_entry + HIDDEN_TABLE.n_rows), p_mask, HAS_MASK, BLOCK_R)
    o_s = (o_r // R1) * tl.load(p_entry + HIDDEN_TABLE.stride0_s) + (o_r % R1) * tl.load(p_entry + HIDDEN_TABLE.stride1_s)
    o_t = (o_r // R1) * tl.load(p_entry + HIDDEN_TABLE.stride0_t) + (o_r % R1) * tl.load(p_entry + HIDDEN_TABLE.stride1_t)
    p_s = tl.load(p_entry + HIDDEN_TABLE.p_s).to(tl.pointer_type(S_DTYPE))
    p_t = tl.load(p_entry + HIDDEN_TABLE.p_t).to(tl.pointer_type(T_DTYPE))
    if GRAD:
        p_grad = tl.load(p_entry + HIDDEN_TABLE.p_grad).to(tl.pointer_type(S_DTYPE))
        b_scale = tl.load(p_grad_rows + first_row + o_r, mask=m_valid, other=0.0).to(ACC) * 2.0 / D  # [BLOCK_R]
        n_cols = D  # masked rows too: their gradient is written 0
    else:
        n_cols = _column_bound(m_valid, D)
    if ROWS:
        acc = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    for start in range(0, n_cols, BLOCK_C):
        o_d = start + tl.arange(0, BLOCK_C)
        m_cols = (o_d < D)[None, :]
        m_load = m_valid[:, None] & m_cols
        b_s = tl.load(p_s + o_s[:, None] + o_d[None, :], mask=m_load, other=0.0).to(ACC)  # [BLOCK_R, BLOCK_C]
        b_t = tl.load(p_t + o_t[:, None] + o_d[None, :], mask=m_load, other=0.0).to(ACC)  # [BLOCK_R, BLOCK_C]
        if GRAD:
            b_g = b_scale[:, None] * (b_s - b_t)
            tl.store(p_grad + o_r[:, None] * D + o_d[None, :], b_g.to(S_DTYPE), mask=m_rows[:, None] & m_cols)
        if ROWS:
            acc += (b_s - b_t) * (b_s - b_t)
    if ROWS:
        tl.store(p_rows + first_row + o_r, tl.sum(acc, 1) / D, mask=m_rows)


def _hidden_launch(students, teachers, mask, rows, grad_rows, grads):
    """One launch per dtype pair: the rows into ``rows`` and/or the gradients into ``grads`` (None: not wanted)."""

    def entry(i, first_row):
        s, t = students[i], teachers[i]
        return HIDDEN_TABLE.pack(
            p_s=s.data_ptr(), p_t=t.data_ptr(), p_grad=grads[i].data_ptr() if grads else 0,
            n_rows=s.shape[0] * s.shape[1], first_row=first_row, R1=s.shape[1], D=s.shape[2],
            stride0_s=s.stride(0), stride1_s=s.stride(1), stride0_t=t.stride(0), stride1_t=t.stride(1),
        )

    counts = [s.shape[0] * s.shape[1] for s in students]
    for (s_dtype, t_dtype), entries, max_rows, max_cols in _pair_launches(students, teachers, counts, entry):
        tile = _tile("hidden", max_rows, max_cols)
        _hidden_kernel[(triton.cdiv(max_rows, tile["BLOCK_R"]), len(entries))](
            _pair_table(entries, students[0].device), mask, rows, grad_rows, ROWS=rows is not None,
            GRAD=grads is not None, HAS_MASK=mask is not None, S_DTYPE=_tl(s_dtype), T_DTYPE=_tl(t_dtype),
            ACC=_tl(acc_dtype(*students, *teachers)), **tile,
        )


@_on_inputs_device
def hidden_forward(students, teachers, mask):
    """rows = sum_d (s - t)^2 / D per row of each pair, concatenated; all pairs in one launch."""
    count = sum(s.shape[0] * s.shape[1] for s in students)
    rows = torch.empty(count, dtype=acc_dtype(*students, *teachers), device=students[0].device)
    _hidden_launch(students, teachers, mask, rows, None, None)
    return rows


@_on_inputs_device
def hidden_backward(students, teachers, mask, grad_rows):
    """grad = grad_rows * 2 (s - t) / D, 0 on masked rows; all pairs in one launch."""
    grads = [torch.empty(s.shape, dtype=s.dtype, device=s.device) for s in students]
    _hidden_launch(students, teachers, mask, None, grad_rows, grads)
    return grads


@_on_inputs_device
def hidden_forward_with_grad(students, teachers, mask, grad_rows):
    """(rows of ``hidden_forward``, grads of ``hidden_backward`` for ``grad_rows``) from one read of s
    and t; all pairs in one launch."""
    count = sum(s.shape[0] * s.shape[1] for s in students)
    rows = torch.empty(count, dtype=acc_dtype(*students, *teachers), device=students[0].device)
    grads = [torch.empty(s.shape, dtype=s.dtype, device=s.device) for s in students]
    _hidden_launch(students, teachers, mask, rows, grad_rows, grads)
    return rows, grads


# ------------------------------------------------------------------------------------- attention

# One attention pair (contiguous [B, H, Lq, Lk]): addresses of s, t and grad (0 in the forward);
# its rows B * H * Lq; its first row in the concatenated rows; Lk; H * Lq (rows per batch); Lq.
ATTENTION_TABLE = PairTable("p_s", "p_t", "p_grad", "n_rows", "first_row", "Lk", "rows_per_batch", "Lq")


@triton.jit
def _attention_tile(p_table, p_mask, HAS_MASK: tl.constexpr, S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    """This program's pair (program id 1) and query rows: (pointers to the pair's student, teacher and
    gradient (0 in the forward), o_r, m_rows, m_valid, first row, Lk, each row's offset of its batch's
    mask row). The row mask of row (b, h, i) is mask[b, i]."""
    p_entry = p_table + tl.program_id(1) * ATTENTION_TABLE.width
    p_s = tl.load(p_entry + ATTENTION_TABLE.p_s).to(tl.pointer_type(S_DTYPE))
    p_t = tl.load(p_entry + ATTENTION_TABLE.p_t).to(tl.pointer_type(T_DTYPE))
    p_grad = tl.load(p_entry + ATTENTION_TABLE.p_grad).to(tl.pointer_type(S_DTYPE))
    n_rows = tl.load(p_entry + ATTENTION_TABLE.n_rows)
    Lq = tl.load(p_entry + ATTENTION_TABLE.Lq)
    o_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_rows = o_r < n_rows
    o_mask = (o_r // tl.load(p_entry + ATTENTION_TABLE.rows_per_batch)) * Lq  # [BLOCK_R]
    m_valid = m_rows
    if HAS_MASK:
        m_valid = m_valid & (tl.load(p_mask + o_mask + o_r % Lq, mask=m_rows, other=0.0) != 0)
    first_row = tl.load(p_entry + ATTENTION_TABLE.first_row)
    return p_s, p_t, p_grad, o_r, m_rows, m_valid, first_row, tl.load(p_entry + ATTENTION_TABLE.Lk), o_mask


@triton.jit
def _kept_keys(b_s, b_t, o_k, m_load, p_mask, o_mask, HAS_MASK: tl.constexpr, S_LOWEST: tl.constexpr,
               T_LOWEST: tl.constexpr):
    """kind="scores": keys loaded, unmasked, and with neither score -inf nor its dtype's lowest."""
    m_keep = m_load & (b_s > S_LOWEST) & (b_t > T_LOWEST)
    if HAS_MASK:
        m_keep = m_keep & (tl.load(p_mask + o_mask[:, None] + o_k[None, :], mask=m_load, other=0.0) != 0)
    return m_keep


@triton.jit
def _attention_block(p_s, p_t, o_r, o_k, m_load, Lk, ACC: tl.constexpr):
    """(s, t) at keys ``o_k`` of rows ``o_r``, ``[BLOCK_R, BLOCK_C]`` in ACC, 0 where not ``m_load``."""
    b_s = tl.load(p_s + o_r[:, None] * Lk + o_k[None, :], mask=m_load, other=0.0).to(ACC)
    b_t = tl.load(p_t + o_r[:, None] * Lk + o_k[None, :], mask=m_load, other=0.0).to(ACC)
    return b_s, b_t


@triton.jit
def _probs_grad_store(p_grad, o_r, o_k, m_rows, Lk, b_s, b_t, b_scale, S_DTYPE: tl.constexpr):
    """kind="probs": writes grad = b_scale * (-p / q) where p > 0 and q >= TINY, 0 elsewhere, at keys
    ``o_k`` of rows ``o_r`` (q = b_s, p = b_t: 0 on rows not loaded)."""
    m_keep = (b_t > 0) & (b_s >= TINY)
    b_dkl = tl.where(m_keep, -b_t / tl.where(m_keep, b_s, 1.0), 0.0)
    tl.store(p_grad + o_r[:, None] * Lk + o_k[None, :], (b_scale[:, None] * b_dkl).to(S_DTYPE),
             mask=m_rows[:, None] & (o_k < Lk)[None, :])


@triton.jit
def _scores_grad(
    p_s, p_t, p_grad_rows, p_grad, p_mask, o_r, m_rows, m_valid, Lk, o_mask, lse_s, lse_t, HAS_MASK: tl.constexpr,
    S_DTYPE: tl.constexpr, S_LOWEST: tl.constexpr, T_LOWEST: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """kind="scores": grad = grad_rows * (q - p) on the kept keys of rows ``o_r``, q = exp(s - lse_s),
    p = exp(t - lse_t) from the rows' float64 lses; 0 on rows that contribute nothing (not ``m_valid``,
    or lse_t = -inf) and on dropped keys. One pass over the rows' Lk keys of s and t."""
    lse_s_hi, lse_s_lo = _split_lse(lse_s, ACC)
    lse_t_hi, lse_t_lo = _split_lse(lse_t, ACC)
    m_valid = m_valid & (lse_t_hi > float("-inf"))
    b_scale = tl.load(p_grad_rows + o_r, mask=m_valid, other=0.0).to(ACC)  # [BLOCK_R]
    for start in range(0, Lk, BLOCK_C):
        o_k = start + tl.arange(0, BLOCK_C)
        m_cols = (o_k < Lk)[None, :]
        m_load = m_valid[:, None] & m_cols
        b_s, b_t = _attention_block(p_s, p_t, o_r, o_k, m_load, Lk, ACC)
        m_keep = _kept_keys(b_s, b_t, o_k, m_load, p_mask, o_mask, HAS_MASK, S_LOWEST, T_LOWEST)
        b_g = _softmax_kl_grad(b_s, b_t, lse_s_hi, lse_s_lo, lse_t_hi, lse_t_lo, b_scale, m_keep)
        tl.store(p_grad + o_r[:, None] * Lk + o_k[None, :], b_g.to(S_DTYPE), mask=m_rows[:, None] & m_cols)


@triton.jit
def _attention_forward_kernel(
    p_table, p_mask, p_rows, p_stats, p_grad_rows, total_rows, SCORES: tl.constexpr, GRAD: tl.constexpr,
    HAS_MASK: tl.constexpr, S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, S_LOWEST: tl.constexpr,
    T_LOWEST: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """rows = sum_k p_k (log p_k - log q_k); scores: also stats = (lse_s, lse_t) over kept keys. With
    GRAD, the gradient of ``_attention_backward_kernel`` for grad_rows (and no stats): probs from the
    same loads, scores by a second pass over the tile's keys with the lses in registers, which a GPU
    serves from L2 where the tile is still there."""
    p_s, p_t, p_grad, o_r, m_rows, m_valid, first_row, Lk, o_mask = _attention_tile(
        p_table, p_mask, HAS_MASK, S_DTYPE, T_DTYPE, BLOCK_R
    )
    if SCORES:
        max_s = tl.full([BLOCK_R], float("-inf"), ACC)
        max_t = tl.full([BLOCK_R], float("-inf"), ACC)
        sum_s = tl.zeros([BLOCK_R], ACC)
        sum_t = tl.zeros([BLOCK_R], ACC)
        cross = tl.zeros([BLOCK_R], ACC)  # of _online_kl, over kept keys
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    if GRAD and not SCORES:
        b_scale = tl.load(p_grad_rows + first_row + o_r, mask=m_valid, other=0.0).to(ACC)  # [BLOCK_R]
        n_cols = Lk  # the gradient is written in this loop: masked rows' zeros too
    else:
        n_cols = _column_bound(m_valid, Lk)
    for start in range(0, n_cols, BLOCK_C):
        o_k = start + tl.arange(0, BLOCK_C)
        m_load = m_valid[:, None] & (o_k < Lk)[None, :]
        b_s, b_t = _attention_block(p_s, p_t, o_r, o_k, m_load, Lk, ACC)  # [BLOCK_R, BLOCK_C]
        if SCORES:
            m_keep = _kept_keys(b_s, b_t, o_k, m_load, p_mask, o_mask, HAS_MASK, S_LOWEST, T_LOWEST)
            max_s, sum_s, max_t, sum_t, cross = _online_kl(max_s, sum_s, max_t, sum_t, cross, b_s, b_t, m_keep)
        else:
            m_p = b_t > 0
            b_log_ratio = tl.log(tl.where(m_p, b_t, 1.0)) - tl.log(tl.maximum(b_s, TINY))
            acc += tl.where(m_p, b_t * b_log_ratio, 0.0)
            if GRAD:
                _probs_grad_store(p_grad, o_r, o_k, m_rows, Lk, b_s, b_t, b_scale, S_DTYPE)
    if SCORES:
        kl, lse_s, lse_t = _kl_from_online(max_s, sum_s, max_t, sum_t, cross)
        if GRAD:
            _scores_grad(p_s, p_t, p_grad_rows + first_row, p_grad, p_mask, o_r, m_rows, m_valid, Lk, o_mask, lse_s,
                         lse_t, HAS_MASK, S_DTYPE, S_LOWEST, T_LOWEST, ACC, BLOCK_C)
        else:
            tl.store(p_stats + first_row + o_r, lse_s, mask=m_rows)
            tl.store(p_stats + total_rows + first_row + o_r, lse_t, mask=m_rows)
    else:
        kl = tl.sum(acc, 1)
    tl.store(p_rows + first_row + o_r, tl.where(m_valid, kl, 0.0), mask=m_rows)


@triton.jit
def _attention_backward_kernel(
    p_table, p_mask, p_stats, p_grad_rows, total_rows, SCORES: tl.constexpr, HAS_MASK: tl.constexpr,
    S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, S_LOWEST: tl.constexpr, T_LOWEST: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """probs: grad = grad_rows * (-p / q) where p > 0 and q >= TINY (``_probs_grad_store``); scores:
    grad_rows * (q - p) on kept keys with the forward's lses, 0 on rows without one (``_scores_grad``)."""
    p_s, p_t, p_grad, o_r, m_rows, m_valid, first_row, Lk, o_mask = _attention_tile(
        p_table, p_mask, HAS_MASK, S_DTYPE, T_DTYPE, BLOCK_R
    )
    if SCORES:
        lse_s = tl.load(p_stats + first_row + o_r, mask=m_rows, other=0.0)
        lse_t = tl.load(p_stats + total_rows + first_row + o_r, mask=m_rows, other=0.0)
        _scores_grad(p_s, p_t, p_grad_rows + first_row, p_grad, p_mask, o_r, m_rows, m_valid, Lk, o_mask, lse_s,
                     lse_t, HAS_MASK, S_DTYPE, S_LOWEST, T_LOWEST, ACC, BLOCK_C)
    else:
        b_scale = tl.load(p_grad_rows + first_row + o_r, mask=m_valid, other=0.0).to(ACC)  # [BLOCK_R]
        for start in range(0, Lk, BLOCK_C):
            o_k = start + tl.arange(0, BLOCK_C)
            b_s, b_t = _attention_block(p_s, p_t, o_r, o_k, m_valid[:, None] & (o_k < Lk)[None, :], Lk, ACC)
            _probs_grad_store(p_grad, o_r, o_k, m_rows, Lk, b_s, b_t, b_scale, S_DTYPE)


def _attention_launch(kernel, students, teachers, mask, kind, outputs, grads, **constants):
    """One launch of ``kernel`` per dtype pair with (table, mask, *outputs, total rows) and ``constants``;
    the table holds the addresses of ``grads`` (None: the kernel writes no gradient)."""

    def entry(i, first_row):
        s, t = students[i], teachers[i]
        batch, heads, lq, lk = s.shape
        return ATTENTION_TABLE.pack(
            p_s=s.data_ptr(), p_t=t.data_ptr(), p_grad=grads[i].data_ptr() if grads else 0,
            n_rows=batch * heads * lq, first_row=first_row, Lk=lk, rows_per_batch=heads * lq, Lq=lq,
        )

    counts = [s.shape[0] * s.shape[1] * s.shape[2] for s in students]
    for (s_dtype, t_dtype), entries, max_rows, max_cols in _pair_launches(students, teachers, counts, entry):
        tile = _tile("attention", max_rows, max_cols)
        kernel[(triton.cdiv(max_rows, tile["BLOCK_R"]), len(entries))](
            _pair_table(entries, students[0].device), mask, *outputs, sum(counts), SCORES=kind == "scores",
            HAS_MASK=mask is not None, S_DTYPE=_tl(s_dtype), T_DTYPE=_tl(t_dtype),
            S_LOWEST=torch.finfo(s_dtype).min, T_LOWEST=torch.finfo(t_dtype).min,
            ACC=_tl(acc_dtype(*students, *teachers)), **constants, **tile,
        )


@_on_inputs_device
def attention_forward(students, teachers, mask, kind):
    """rows = kl per query row of every pair (one launch); stats = (lse_s, lse_t) for scores."""
    count = sum(s.shape[0] * s.shape[1] * s.shape[2] for s in students)
    device = students[0].device
    rows = torch.empty(count, dtype=acc_dtype(*students, *teachers), device=device)
    stats = torch.empty(2, count if kind == "scores" else 0, dtype=torch.float64, device=device)
    _attention_launch(_attention_forward_kernel, students, teachers, mask, kind, (rows, stats, None), None, GRAD=False)
    return rows, stats


@_on_inputs_device
def attention_backward(students, teachers, mask, kind, stats, grad_rows):
    """Gradient of each student, 0 on masked rows, rows without a kept key, and dropped keys (one launch)."""
    grads = [torch.empty(s.shape, dtype=s.dtype, device=s.device) for s in students]
    _attention_launch(_attention_backward_kernel, students, teachers, mask, kind, (stats, grad_rows), grads)
    return grads


@_on_inputs_device
def attention_forward_with_grad(students, teachers, mask, kind, grad_rows):
    """(rows of ``attention_forward``, grads of ``attention_backward`` for ``grad_rows``) from one launch."""
    count = sum(s.shape[0] * s.shape[1] * s.shape[2] for s in students)
    rows = torch.empty(count, dtype=acc_dtype(*students, *teachers), device=students[0].device)
    grads = [torch.empty(s.shape, dtype=s.dtype, device=s.device) for s in students]
    _attention_launch(_attention_forward_kernel, students, teachers, mask, kind, (rows, None, grad_rows), grads,
                      GRAD=True)
    return rows, grads


# ---------------------------------------------------------------------- attention from queries, keys

# Flash-attention style: the [L, L] scores of both models exist only as [BLOCK_M, BLOCK_N] tiles in
# registers, recomputed in backward. Tensors ([B, H, L, d] queries, [B, H_kv, L, d] keys) are
# contiguous; row r of a pair is (b, h, i) flattened row-major, its key head h // (H / H_kv). A
# program owns one (b, h) (or (b, h_kv) for key gradients) and one tile; the grids are one-dimensional
# (tile fastest) so that consecutive programs share their keys in L2 and B * H is not bounded by a
# grid dimension's 65535. Suffixes ``_m``/``_n`` name the query and key side of a tile.
QK_BLOCK = 64  # query and key tile side (halved for head widths > 128 and for float64)


def _qk_tile(length: int, width_s: int, width_t: int, acc: torch.dtype) -> dict:
    """Launch options of one pair: square tiles of at most QK_BLOCK, widths padded to powers of two.

    tl.dot needs every dimension >= 16: short sequences get 16-row tiles, narrow heads 16 columns.
    """
    block_ds, block_dt = max(16, triton.next_power_of_2(width_s)), max(16, triton.next_power_of_2(width_t))
    block = QK_BLOCK if max(block_ds, block_dt) <= 128 and acc != torch.float64 else QK_BLOCK // 2
    block = max(16, min(block, triton.next_power_of_2(length)))
    return {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_DS": block_ds, "BLOCK_DT": block_dt,
            "num_warps": 4 if block_ds + block_dt <= 128 else 8}


@triton.jit
def _qk_load(p_x, o_rows, m_rows, width, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    """Rows ``o_rows`` of a contiguous ``[L, width]`` matrix as a ``[rows, BLOCK_D]`` block in DOT, 0 beyond."""
    o_d = tl.arange(0, BLOCK_D)
    m_load = m_rows[:, None] & (o_d < width)[None, :]
    return tl.load(p_x + o_rows[:, None] * width + o_d[None, :], mask=m_load, other=0.0).to(DOT)


@triton.jit
def _qk_scores(b_query, b_key, scale, ACC: tl.constexpr):
    """``b_query [M, d] @ b_key [N, d]^T * scale`` in ACC, summed in float32 (float64 blocks: float64);
    half blocks multiply exactly on tensor cores, float32 ones in full float32 ("ieee", not tf32)."""
    return tl.dot(b_query, tl.trans(b_key), input_precision="ieee", out_dtype=ACC) * scale


@triton.jit
def _qk_keys(o_n, L, p_mask, o_mask, HAS_MASK: tl.constexpr):
    """The keys ``o_n`` that exist and are not padding (mask[b, j] != 0)."""
    m_keys = o_n < L
    if HAS_MASK:
        m_keys = m_keys & (tl.load(p_mask + o_mask + o_n, mask=m_keys, other=0.0) != 0)
    return m_keys


@triton.jit
def _qk_kept(o_m, o_n, m_valid, m_keys, CAUSAL: tl.constexpr):
    """``[M, N]``: query row o_m valid and key o_n kept for it (present, unmasked, j <= i if causal)."""
    m_keep = m_valid[:, None] & m_keys[None, :]
    if CAUSAL:
        m_keep = m_keep & (o_n[None, :] <= o_m[:, None])
    return m_keep


@triton.jit
def _qk_heads(bh, H, L, D_s, D_t, H_kv_s, H_kv_t, p_query_s, p_key_s, p_query_t, p_key_t):
    """Pointers to the ``[L, d]`` matrices of query head (b, h) = divmod(bh, H) and of its key heads
    ``h // (H / H_kv)`` on each side, and b's offset in the mask."""
    b = bh // H
    h = bh % H
    p_key_s += (b * H_kv_s + h // (H // H_kv_s)) * L * D_s
    p_key_t += (b * H_kv_t + h // (H // H_kv_t)) * L * D_t
    return p_query_s + bh * L * D_s, p_key_s, p_query_t + bh * L * D_t, p_key_t, b * L


@triton.jit
def _qk_row_stats(p_stats, p_grad_rows, o_r, m_rows, total_rows, scale_s, ACC: tl.constexpr):
    """Backward's view of rows ``o_r``: (m_valid: in range and contributing (lse_t > -inf), the lses
    as (hi, lo), grad_rows * scale_s (0 where not valid))."""
    lse_s_hi, lse_s_lo = _load_lse(p_stats + o_r, m_rows, ACC)
    lse_t_hi, lse_t_lo = _load_lse(p_stats + total_rows + o_r, m_rows, ACC)
    m_valid = m_rows & (lse_t_hi > float("-inf"))
    b_scale = tl.load(p_grad_rows + o_r, mask=m_valid, other=0.0).to(ACC) * scale_s
    return m_valid, lse_s_hi, lse_s_lo, lse_t_hi, lse_t_lo, b_scale


@triton.jit
def _attention_qk_forward_kernel(
    p_query_s, p_key_s, p_query_t, p_key_t, p_mask, p_rows, p_stats, first_row, total_rows, n_tiles, H, L,
    D_s, D_t, H_kv_s, H_kv_t, scale_s: tl.float64, scale_t: tl.float64, CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, S_DOT: tl.constexpr, T_DOT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    """Per query row over its kept keys K: S_s = scale_s query_s key_s^T, S_t = scale_t query_t key_t^T,
    rows = sum_K p (log p - log q) (q = softmax(S_s), p = softmax(S_t), from one online pass over key
    tiles: ``_online_kl``, ``_kl_from_online``); stats = (lse_s, lse_t), -inf for rows without a kept key."""
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % n_tiles
    bh = pid // n_tiles
    p_query_s, p_key_s, p_query_t, p_key_t, o_mask = _qk_heads(
        bh, H, L, D_s, D_t, H_kv_s, H_kv_t, p_query_s, p_key_s, p_query_t, p_key_t
    )
    o_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_rows = o_m < L
    m_valid = m_rows
    if HAS_MASK:
        m_valid = m_valid & (tl.load(p_mask + o_mask + o_m, mask=m_rows, other=0.0) != 0)
    b_query_s = _qk_load(p_query_s, o_m, m_valid, D_s, BLOCK_DS, S_DOT)  # [BLOCK_M, BLOCK_DS]
    b_query_t = _qk_load(p_query_t, o_m, m_valid, D_t, BLOCK_DT, T_DOT)  # [BLOCK_M, BLOCK_DT]
    scale_s = _scalar(scale_s, ACC)
    scale_t = _scalar(scale_t, ACC)
    max_s = tl.full([BLOCK_M], float("-inf"), ACC)
    max_t = tl.full([BLOCK_M], float("-inf"), ACC)
    sum_s = tl.zeros([BLOCK_M], ACC)
    sum_t = tl.zeros([BLOCK_M], ACC)
    cross = tl.zeros([BLOCK_M], ACC)  # of _online_kl
    end = L
    if CAUSAL:
        end = tl.minimum(L, (tile + 1) * BLOCK_M)  # no key beyond the tile's last row
    for start in range(0, _column_bound(m_valid, end), BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        m_keep = _qk_kept(o_m, o_n, m_valid, _qk_keys(o_n, L, p_mask, o_mask, HAS_MASK), CAUSAL)
        b_s = _qk_scores(b_query_s, _qk_load(p_key_s, o_n, o_n < L, D_s, BLOCK_DS, S_DOT), scale_s, ACC)
        b_t = _qk_scores(b_query_t, _qk_load(p_key_t, o_n, o_n < L, D_t, BLOCK_DT, T_DOT), scale_t, ACC)
        max_s, sum_s, max_t, sum_t, cross = _online_kl(max_s, sum_s, max_t, sum_t, cross, b_s, b_t, m_keep)
    kl, lse_s, lse_t = _kl_from_online(max_s, sum_s, max_t, sum_t, cross)
    o_r = first_row + bh * L + o_m
    tl.store(p_rows + o_r, kl, mask=m_rows)
    tl.store(p_stats + o_r, lse_s, mask=m_rows)
    tl.store(p_stats + total_rows + o_r, lse_t, mask=m_rows)


@triton.jit
def _attention_qk_query_grad_kernel(
    p_query_s, p_key_s, p_query_t, p_key_t, p_mask, p_stats, p_grad_rows, p_grad_query, first_row,
    total_rows, n_tiles, H, L, D_s, D_t, H_kv_s, H_kv_t, scale_s: tl.float64, scale_t: tl.float64,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, S_DOT: tl.constexpr, T_DOT: tl.constexpr,
    GRAD_PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    """grad_query_s = dS @ key_s per tile of query rows, dS = grad_rows * scale_s * (q - p) on kept keys
    (scores recomputed tile by tile over the keys); 0 on rows that contribute nothing."""
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % n_tiles
    bh = pid // n_tiles
    p_query_s, p_key_s, p_query_t, p_key_t, o_mask = _qk_heads(
        bh, H, L, D_s, D_t, H_kv_s, H_kv_t, p_query_s, p_key_s, p_query_t, p_key_t
    )
    o_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_rows = o_m < L
    scale_s = _scalar(scale_s, ACC)
    scale_t = _scalar(scale_t, ACC)
    m_valid, lse_s_hi, lse_s_lo, lse_t_hi, lse_t_lo, b_scale = _qk_row_stats(
        p_stats, p_grad_rows, first_row + bh * L + o_m, m_rows, total_rows, scale_s, ACC
    )
    b_query_s = _qk_load(p_query_s, o_m, m_valid, D_s, BLOCK_DS, S_DOT)  # [BLOCK_M, BLOCK_DS]
    b_query_t = _qk_load(p_query_t, o_m, m_valid, D_t, BLOCK_DT, T_DOT)  # [BLOCK_M, BLOCK_DT]
    acc = tl.zeros([BLOCK_M, BLOCK_DS], ACC)
    end = L
    if CAUSAL:
        end = tl.minimum(L, (tile + 1) * BLOCK_M)
    for start in range(0, _column_bound(m_valid, end), BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        m_keep = _qk_kept(o_m, o_n, m_valid, _qk_keys(o_n, L, p_mask, o_mask, HAS_MASK), CAUSAL)
        b_key_s = _qk_load(p_key_s, o_n, o_n < L, D_s, BLOCK_DS, S_DOT)  # [BLOCK_N, BLOCK_DS]
        b_s = _qk_scores(b_query_s, b_key_s, scale_s, ACC)
        b_t = _qk_scores(b_query_t, _qk_load(p_key_t, o_n, o_n < L, D_t, BLOCK_DT, T_DOT), scale_t, ACC)
        b_ds = _softmax_kl_grad(b_s, b_t, lse_s_hi, lse_s_lo, lse_t_hi, lse_t_lo, b_scale, m_keep)
        acc = tl.dot(b_ds, b_key_s.to(ACC), acc, input_precision=GRAD_PRECISION, out_dtype=ACC)
    o_d = tl.arange(0, BLOCK_DS)
    tl.store(p_grad_query + bh * L * D_s + o_m[:, None] * D_s + o_d[None, :], acc.to(p_grad_query.dtype.element_ty),
             mask=m_rows[:, None] & (o_d < D_s)[None, :])


@triton.jit
def _attention_qk_key_grad_kernel(
    p_query_s, p_key_s, p_query_t, p_key_t, p_mask, p_stats, p_grad_rows, p_grad_key, first_row, total_rows,
    n_tiles, H, L, D_s, D_t, H_kv_s, H_kv_t, scale_s: tl.float64, scale_t: tl.float64, CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, S_DOT: tl.constexpr, T_DOT: tl.constexpr, GRAD_PRECISION: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr,
):
    """grad_key_s[b, h_kv] = sum over the H / H_kv query heads h of h_kv and their query tiles of
    dS^T @ query_s, per tile of keys (one program owns the tile: no atomics); 0 on dropped keys."""
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % n_tiles
    bh_kv = pid // n_tiles  # b * H_kv_s + h_kv
    b = bh_kv // H_kv_s
    group = H // H_kv_s
    o_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    m_keys = _qk_keys(o_n, L, p_mask, b * L, HAS_MASK)
    b_key_s = _qk_load(p_key_s + bh_kv * L * D_s, o_n, m_keys, D_s, BLOCK_DS, S_DOT)  # [BLOCK_N, BLOCK_DS]
    scale_s = _scalar(scale_s, ACC)
    scale_t = _scalar(scale_t, ACC)
    acc = tl.zeros([BLOCK_N, BLOCK_DS], ACC)
    first = 0
    if CAUSAL:
        first = (tile * BLOCK_N // BLOCK_M) * BLOCK_M  # no query row before the tile's first key
    end = _column_bound(m_keys, L)
    for g in range(0, group):
        bh = b * H + (bh_kv % H_kv_s) * group + g
        p_head_query_s, _, p_head_query_t, p_head_key_t, _ = _qk_heads(
            bh, H, L, D_s, D_t, H_kv_s, H_kv_t, p_query_s, p_key_s, p_query_t, p_key_t
        )
        b_key_t = _qk_load(p_head_key_t, o_n, m_keys, D_t, BLOCK_DT, T_DOT)  # [BLOCK_N, BLOCK_DT]
        for start in range(first, end, BLOCK_M):
            o_m = start + tl.arange(0, BLOCK_M)
            m_valid, lse_s_hi, lse_s_lo, lse_t_hi, lse_t_lo, b_scale = _qk_row_stats(
                p_stats, p_grad_rows, first_row + bh * L + o_m, o_m < L, total_rows, scale_s, ACC
            )
            b_query_s = _qk_load(p_head_query_s, o_m, m_valid, D_s, BLOCK_DS, S_DOT)  # [BLOCK_M, BLOCK_DS]
            b_s = _qk_scores(b_query_s, b_key_s, scale_s, ACC)
            b_t = _qk_scores(_qk_load(p_head_query_t, o_m, m_valid, D_t, BLOCK_DT, T_DOT), b_key_t, scale_t, ACC)
            m_keep = _qk_kept(o_m, o_n, m_valid, m_keys, CAUSAL)
            b_ds = _softmax_kl_grad(b_s, b_t, lse_s_hi, lse_s_lo, lse_t_hi, lse_t_lo, b_scale, m_keep)
            acc = tl.dot(tl.trans(b_ds), b_query_s.to(ACC), acc, input_precision=GRAD_PRECISION, out_dtype=ACC)
    o_d = tl.arange(0, BLOCK_DS)
    tl.store(p_grad_key + bh_kv * L * D_s + o_n[:, None] * D_s + o_d[None, :], acc.to(p_grad_key.dtype.element_ty),
             mask=(o_n < L)[:, None] & (o_d < D_s)[None, :])


def _qk_dot_dtype(dtype: torch.dtype, acc: torch.dtype):
    """The dtype one side's queries and keys enter tl.dot in: their own (half products are exact in the
    float32 sums), float64 when the accumulator is. Triton's interpreter multiplies bfloat16 blocks
    as their uint16 bits, so under it bfloat16 enters as float32: the same exact products."""
    if acc == torch.float64:
        return tl.float64
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return tl.float32
    return _tl(dtype)


def _qk_launches(student_q, student_k, teacher_q, teacher_k, scales, mask, causal):
    """Per pair with rows: (its index, its tensors, the runtime arguments its kernels share after
    (first_row, total_rows, n_tiles), its number of (b, h) and of (b, h_kv), the tile count along L,
    the constexprs and launch options). Tiles are square: one n_tiles for query and key tiles."""
    acc = acc_dtype(*student_q, *student_k, *teacher_q, *teacher_k)
    total_rows = sum(q.shape[0] * q.shape[1] * q.shape[2] for q in student_q)
    first_row = 0
    for i, tensors in enumerate(zip(student_q, student_k, teacher_q, teacher_k)):
        query_s, key_s, query_t, key_t = tensors
        batch, heads, length, width_s = query_s.shape
        if query_s.numel():
            tile = _qk_tile(length, width_s, query_t.shape[3], acc)
            n_tiles = triton.cdiv(length, tile["BLOCK_M"])
            shape = (heads, length, width_s, query_t.shape[3], key_s.shape[1], key_t.shape[1], scales[2 * i],
                     scales[2 * i + 1])
            # backward's dS @ key_s, dS^T @ query_s: dS in ACC; tf32 holds a half operand exactly
            half = query_s.dtype in (torch.float16, torch.bfloat16) and acc == torch.float32
            options = dict(
                CAUSAL=causal, HAS_MASK=mask is not None, S_DOT=_qk_dot_dtype(query_s.dtype, acc),
                T_DOT=_qk_dot_dtype(query_t.dtype, acc), GRAD_PRECISION="tf32" if half else "ieee", ACC=_tl(acc),
                **tile,
            )
            yield i, tensors, (first_row, total_rows, n_tiles, *shape), batch * heads, batch * key_s.shape[1], options
        first_row += batch * heads * length


@_on_inputs_device
def attention_qk_forward(student_q, student_k, teacher_q, teacher_k, scales, mask, causal):
    """rows = kl per query row of every pair (pair by pair, [B, H, L] row-major), stats = (lse_s, lse_t)
    over the kept keys; scores S = query key^T * scale formed tile by tile, never as [L, L] maps."""
    count = sum(q.shape[0] * q.shape[1] * q.shape[2] for q in student_q)
    device = student_q[0].device
    rows = torch.empty(count, dtype=acc_dtype(*student_q, *student_k, *teacher_q, *teacher_k), device=device)
    stats = torch.empty(2, count, dtype=torch.float64, device=device)
    launches = _qk_launches(student_q, student_k, teacher_q, teacher_k, scales, mask, causal)
    for _, tensors, args, query_heads, _, options in launches:
        options.pop("GRAD_PRECISION")
        _attention_qk_forward_kernel[(args[2] * query_heads,)](*tensors, mask, rows, stats, *args, **options)
    return rows, stats


@_on_inputs_device
def attention_qk_backward(student_q, student_k, teacher_q, teacher_k, scales, mask, causal, stats, grad_rows):
    """(grads of the student's queries, of its keys): dS = grad_rows (q - p) scale_s on kept keys,
    grad_q = dS key_s (one program per query tile), grad_k = sum over the key head's query heads of
    dS^T query_s (one program per key tile); 0 on rows that contribute nothing and dropped keys."""
    grads_q = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in student_q]
    grads_k = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in student_k]
    for query_s, grad_k in zip(student_q, grads_k):
        if not query_s.numel():
            grad_k.zero_()  # no query row (H = 0 with keys): no gradient; nothing is launched
    launches = _qk_launches(student_q, student_k, teacher_q, teacher_k, scales, mask, causal)
    for i, tensors, args, query_heads, key_heads, options in launches:
        _attention_qk_query_grad_kernel[(args[2] * query_heads,)](
            *tensors, mask, stats, grad_rows, grads_q[i], *args, **options
        )
        _attention_qk_key_grad_kernel[(args[2] * key_heads,)](
            *tensors, mask, stats, grad_rows, grads_k[i], *args, **options
        )
    return grads_q, grads_k


# -------------------------------------------------------------------------------------- one pass

SCALE_BLOCK = 4096  # gradient elements per program of _scale_gradients_kernel


@triton.jit
def _scale_gradients_kernel(p_grad, p_upstream, p_expected, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """grad *= upstream / expected in place (0 where expected == 0), the two read here, on the device;
    when they are equal, every load and store is masked off: no gradient element is read or written.

    The factor is divided in float64 and rounded to ACC (float32 unless the gradient is float64): for
    float32 operands that is float32's correctly rounded quotient, and the product is torch's.
    """
    upstream = tl.load(p_upstream).to(tl.float64)
    expected = tl.load(p_expected).to(tl.float64)
    factor = tl.where(expected == 0, 0.0, upstream / expected).to(ACC)
    o_x = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_scale = o_x < tl.where(upstream != expected, n, 0)  # [BLOCK]
    b_g = tl.load(p_grad + o_x, mask=m_scale, other=0.0).to(ACC)
    tl.store(p_grad + o_x, (b_g * factor).to(p_grad.dtype.element_ty), mask=m_scale)


@_on_inputs_device
def scale_gradients_(grads, upstream, expected):
    """grads *= upstream / expected in place, 0 where expected == 0, nothing read or written where
    upstream == expected; one launch per gradient, the 0-d upstream and expected read by the kernel."""
    for grad in grads:
        if grad.numel():
            _scale_gradients_kernel[(triton.cdiv(grad.numel(), SCALE_BLOCK),)](
                grad, upstream, expected, grad.numel(), ACC=_tl(acc_dtype(grad)), BLOCK=SCALE_BLOCK, num_warps=8
            )
