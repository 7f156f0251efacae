"""The ``"triton"`` backend: one fused kernel per loss and direction.

Each forward kernel reads every student and teacher element of a row once and writes the row's value
(and, for softmax losses, the two log-sum-exps); each backward kernel reads the row once more and
writes the gradient. Masked rows read nothing and write 0. One program handles one row; offsets are
64-bit. Layer pairs of one dtype combination run in one launch: a small int64 table on the device
holds, per pair, the addresses, sizes and strides the kernels need (``_pair_table``).

Notation: ``i_`` program ids, ``o_`` offsets, ``m_`` masks, ``p_`` pointers, ``b_`` block values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd._layout import acc_dtype

TINY = tl.constexpr(1.1754943508222875e-38)  # float32's smallest normal: the floor of q in log q for kind="probs"
MAX_BLOCK = 4096
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float64: tl.float64}


def _block(cols: int) -> int:
    return min(triton.next_power_of_2(cols), MAX_BLOCK)


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


@triton.jit
def _online_lse(m, z, b_x):
    """Fold block ``b_x`` into a running (max ``m``, sum ``z`` of exp(x - m)); -inf entries add 0."""
    m_new = tl.maximum(m, tl.max(b_x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    b_e = tl.exp(b_x - m_safe)
    return m_new, z * tl.exp(m - m_safe) + tl.sum(b_e, 0), b_e, tl.exp(m - m_safe)


@triton.jit
def _kl_from_online(m_s, z_s, m_t, z_t, a):
    """kl = sum p (t - s) + lse_s - lse_t from the running sums, and the float64 lses; 0 where the
    teacher row is empty. The maxima and the log-sums are subtracted apart, so no large lse rounds."""
    log_z_s = tl.log(z_s)
    log_z_t = tl.log(z_t)
    has_keys = z_t > 0
    kl = tl.where(has_keys, a / z_t + (m_s - m_t) + (log_z_s - log_z_t), 0.0)
    lse_s = m_s.to(tl.float64) + log_z_s.to(tl.float64)
    lse_t = m_t.to(tl.float64) + log_z_t.to(tl.float64)
    return kl, tl.where(has_keys, lse_s, 0.0), tl.where(has_keys, lse_t, 0.0)


@triton.jit
def _load_lse(p_lse, ACC: tl.constexpr):
    """A float64 lse as (hi, lo) in ACC, hi + lo = lse: exp((x - hi) - lo) keeps x's precision."""
    lse = tl.load(p_lse)
    hi = lse.to(ACC)
    return hi, (lse - hi.to(tl.float64)).to(ACC)


# ----------------------------------------------------------------------------------------- logit


@triton.jit
def _logit_forward_kernel(
    p_s, p_t, p_mask, p_rows, p_stats, n_rows, R1, V, s_stride0, s_stride1, t_stride0, t_stride1,
    inv_temperature, temperature_sq, HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    i0, i1 = i_row // R1, i_row % R1
    p_s += i0 * s_stride0 + i1 * s_stride1
    p_t += i0 * t_stride0 + i1 * t_stride1
    valid = tl.load(p_mask + i_row) != 0 if HAS_MASK else True
    m_s = tl.full([], float("-inf"), ACC)
    m_t = tl.full([], float("-inf"), ACC)
    z_s = tl.zeros([], ACC)
    z_t = tl.zeros([], ACC)
    a = tl.zeros([], ACC)  # sum_v exp(t_v - m_t) (t_v - s_v): sum p (t - s) times z_t
    for start in range(0, tl.where(valid, V, 0), BLOCK):
        o_v = start + tl.arange(0, BLOCK)
        m_v = o_v < V
        b_s = tl.load(p_s + o_v, mask=m_v, other=float("-inf")).to(ACC) * inv_temperature  # [BLOCK]
        b_t = tl.load(p_t + o_v, mask=m_v, other=float("-inf")).to(ACC) * inv_temperature  # [BLOCK]
        m_s, z_s, _, _ = _online_lse(m_s, z_s, b_s)
        m_t, z_t, b_e, alpha = _online_lse(m_t, z_t, b_t)
        a = a * alpha + tl.sum(tl.where(b_e > 0, b_e * (b_t - b_s), 0.0), 0)
    kl, lse_s, lse_t = _kl_from_online(m_s, z_s, m_t, z_t, a)
    tl.store(p_rows + i_row, tl.where(valid, temperature_sq * kl, 0.0))
    tl.store(p_stats + i_row, lse_s)
    tl.store(p_stats + n_rows + i_row, lse_t)


@triton.jit
def _logit_backward_kernel(
    p_s, p_t, p_mask, p_stats, p_grad_rows, p_grad, n_rows, R1, V, s_stride0, s_stride1, t_stride0,
    t_stride1, inv_temperature, temperature, HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    i0, i1 = i_row // R1, i_row % R1
    p_s += i0 * s_stride0 + i1 * s_stride1
    p_t += i0 * t_stride0 + i1 * t_stride1
    p_grad += i_row * V
    valid = tl.load(p_mask + i_row) != 0 if HAS_MASK else True
    lse_s_hi, lse_s_lo = _load_lse(p_stats + i_row, ACC)
    lse_t_hi, lse_t_lo = _load_lse(p_stats + n_rows + i_row, ACC)
    scale = tl.load(p_grad_rows + i_row).to(ACC) * temperature
    n_load = tl.where(valid, V, 0)  # a masked row reads nothing and writes 0
    for start in range(0, V, BLOCK):
        o_v = start + tl.arange(0, BLOCK)
        m_v = o_v < V
        m_load = o_v < n_load
        b_s = tl.load(p_s + o_v, mask=m_load, other=0.0).to(ACC) * inv_temperature  # [BLOCK]
        b_t = tl.load(p_t + o_v, mask=m_load, other=0.0).to(ACC) * inv_temperature  # [BLOCK]
        b_g = scale * (tl.exp((b_s - lse_s_hi) - lse_s_lo) - tl.exp((b_t - lse_t_hi) - lse_t_lo))
        tl.store(p_grad + o_v, tl.where(valid, b_g, 0.0).to(p_grad.dtype.element_ty), mask=m_v)


def logit_forward(student, teacher, mask, temperature):
    """rows = T^2 sum_v p_v (log p_v - log q_v) per row, stats = (lse(s / T), lse(t / T))."""
    r0, r1, vocab = student.shape
    n_rows = r0 * r1
    acc = acc_dtype(student, teacher)
    rows = torch.empty(n_rows, dtype=acc, device=student.device)
    stats = torch.empty(2, n_rows, dtype=torch.float64, device=student.device)
    if n_rows:
        block = _block(vocab)
        _logit_forward_kernel[(n_rows,)](
            student, teacher, mask, rows, stats, n_rows, r1, vocab, *student.stride()[:2],
            *teacher.stride()[:2], 1.0 / temperature, temperature**2, HAS_MASK=mask is not None,
            ACC=_TL_DTYPES[acc], BLOCK=block, num_warps=_warps(block),
        )
    return rows, stats


def logit_backward(student, teacher, mask, temperature, stats, grad_rows):
    """grad = grad_rows * T * (q - p), 0 on masked rows."""
    r0, r1, vocab = student.shape
    n_rows = r0 * r1
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    if n_rows:
        block = _block(vocab)
        _logit_backward_kernel[(n_rows,)](
            student, teacher, mask, stats, grad_rows, grad, n_rows, r1, vocab, *student.stride()[:2],
            *teacher.stride()[:2], 1.0 / temperature, temperature, HAS_MASK=mask is not None,
            ACC=_TL_DTYPES[acc_dtype(student, teacher)], BLOCK=block, num_warps=_warps(block),
        )
    return grad


# ----------------------------------------------------------------------------------- pair tables

_TABLES: dict[tuple, torch.Tensor] = {}
_MAX_TABLES = 256


def _pair_table(entries: list[tuple[int, ...]], device: torch.device) -> torch.Tensor:
    """The int64 ``[pairs, fields]`` table on ``device``, without a host synchronisation.

    On CUDA the table is copied from pinned memory with ``non_blocking=True`` and cached by content,
    so repeated calls with the same tensors (training loops, CUDA-graph capture after a warm-up) reuse
    it and never copy during capture.
    """
    key = (str(device), tuple(entries))
    table = _TABLES.get(key)
    if table is None:
        table = torch.tensor(entries, dtype=torch.int64)
        if device.type == "cuda":
            table = table.pin_memory().to(device, non_blocking=True)
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = table
    return table


def _dtype_groups(students, teachers):
    """Pair indices grouped by (student dtype, teacher dtype): one launch per group."""
    groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, (s, t) in enumerate(zip(students, teachers)):
        groups.setdefault((s.dtype, t.dtype), []).append(i)
    return groups


def _row_starts(row_counts: list[int]) -> list[int]:
    starts, total = [], 0
    for count in row_counts:
        starts.append(total)
        total += count
    return starts


# ---------------------------------------------------------------------------------------- hidden

# Table fields of one hidden pair (views [R0, R1, D]): addresses of s, t, grad; rows R0*R1; first row
# in the concatenation; R1; D; strides of s's and t's two leading dimensions.


@triton.jit
def _hidden_kernel(
    p_table, p_mask, p_rows, p_grad_rows, BACKWARD: tl.constexpr, HAS_MASK: tl.constexpr,
    S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Forward: rows[i] = sum_d (s - t)^2 / D. Backward: grad = grad_rows[i] * 2 (s - t) / D.

    One program handles BLOCK_R rows of one pair (program id 1).
    """
    p_entry = p_table + tl.program_id(1) * 11
    n_rows = tl.load(p_entry + 3)
    start_row = tl.load(p_entry + 4)
    R1 = tl.load(p_entry + 5)
    D = tl.load(p_entry + 6)
    o_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    m_r = o_r < n_rows
    o_s = (o_r // R1) * tl.load(p_entry + 7) + (o_r % R1) * tl.load(p_entry + 8)  # [BLOCK_R]
    o_t = (o_r // R1) * tl.load(p_entry + 9) + (o_r % R1) * tl.load(p_entry + 10)  # [BLOCK_R]
    p_s = tl.load(p_entry + 0).to(tl.pointer_type(S_DTYPE))
    p_t = tl.load(p_entry + 1).to(tl.pointer_type(T_DTYPE))
    valid = m_r
    if HAS_MASK:
        valid = valid & (tl.load(p_mask + o_r, mask=m_r, other=0.0) != 0)
    if BACKWARD:
        p_g = tl.load(p_entry + 2).to(tl.pointer_type(S_DTYPE))
        b_scale = tl.load(p_grad_rows + start_row + o_r, mask=valid, other=0.0).to(ACC) * 2.0 / D  # [BLOCK_R]
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_D], ACC)
    for start in range(0, D, BLOCK_D):
        o_d = start + tl.arange(0, BLOCK_D)
        m_load = valid[:, None] & (o_d < D)[None, :]  # masked rows read nothing
        b_s = tl.load(p_s + o_s[:, None] + o_d[None, :], mask=m_load, other=0.0).to(ACC)  # [BLOCK_R, BLOCK_D]
        b_t = tl.load(p_t + o_t[:, None] + o_d[None, :], mask=m_load, other=0.0).to(ACC)  # [BLOCK_R, BLOCK_D]
        if BACKWARD:
            b_g = b_scale[:, None] * (b_s - b_t)
            m_store = m_r[:, None] & (o_d < D)[None, :]
            tl.store(p_g + o_r[:, None] * D + o_d[None, :], b_g.to(S_DTYPE), mask=m_store)
        else:
            acc += (b_s - b_t) * (b_s - b_t)
    if not BACKWARD:
        tl.store(p_rows + start_row + o_r, tl.sum(acc, 1) / D, mask=m_r)


def _tile(rows_hint: int, cols: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): a tile of about 8192 elements, at most MAX_BLOCK columns wide."""
    block_c = _block(cols)
    return max(1, min(64, 8192 // block_c, triton.next_power_of_2(rows_hint))), block_c


def _hidden_launch(students, teachers, mask, rows, grad_rows, grads):
    counts = [s.shape[0] * s.shape[1] for s in students]
    starts = _row_starts(counts)
    device = students[0].device
    for (s_dtype, t_dtype), pairs in _dtype_groups(students, teachers).items():
        entries = []
        for i in pairs:
            s, t = students[i], teachers[i]
            grad_address = grads[i].data_ptr() if grads else 0
            entries.append((s.data_ptr(), t.data_ptr(), grad_address, counts[i], starts[i], s.shape[1], s.shape[2],
                            *s.stride()[:2], *t.stride()[:2]))
        max_rows = max(counts[i] for i in pairs)
        if max_rows == 0:
            continue
        block_r, block_d = _tile(max_rows, max(students[i].shape[2] for i in pairs))
        _hidden_kernel[(triton.cdiv(max_rows, block_r), len(pairs))](
            _pair_table(entries, device), mask, rows, grad_rows, BACKWARD=bool(grads), HAS_MASK=mask is not None,
            S_DTYPE=_TL_DTYPES[s_dtype], T_DTYPE=_TL_DTYPES[t_dtype], ACC=_TL_DTYPES[acc_dtype(*students, *teachers)],
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=8,
        )


def hidden_forward(students, teachers, mask):
    """rows = sum_d (s - t)^2 / D per row of each pair, concatenated; all pairs in one launch."""
    count = sum(s.shape[0] * s.shape[1] for s in students)
    rows = torch.zeros(count, dtype=acc_dtype(*students, *teachers), device=students[0].device)
    _hidden_launch(students, teachers, mask, rows, None, None)
    return rows


def hidden_backward(students, teachers, mask, grad_rows):
    """grad = grad_rows * 2 (s - t) / D, 0 on masked rows; all pairs in one launch."""
    grads = [torch.empty(s.shape, dtype=s.dtype, device=s.device) for s in students]
    _hidden_launch(students, teachers, mask, None, grad_rows, grads)
    return grads


# ------------------------------------------------------------------------------------- attention

# Table fields of one attention pair (contiguous [B, H, Lq, Lk]): addresses of s, t, grad; rows
# B*H*Lq; first row in the concatenation; Lk; H*Lq (rows per batch); Lq.


@triton.jit
def _attention_row(p_entry, p_mask, S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, HAS_MASK: tl.constexpr):
    """This program's query row: (p_s, p_t, row, first row of the pair, Lk, offset of its batch's mask
    row, valid)."""
    i_row = tl.program_id(0).to(tl.int64)
    Lk = tl.load(p_entry + 5)
    rows_per_batch = tl.load(p_entry + 6)
    Lq = tl.load(p_entry + 7)
    p_s = tl.load(p_entry + 0).to(tl.pointer_type(S_DTYPE)) + i_row * Lk
    p_t = tl.load(p_entry + 1).to(tl.pointer_type(T_DTYPE)) + i_row * Lk
    o_batch_mask = (i_row // rows_per_batch) * Lq
    if HAS_MASK:
        valid = tl.load(p_mask + o_batch_mask + i_row % Lq) != 0
    else:
        valid = tl.full([], 1, tl.int1)
    return p_s, p_t, i_row, tl.load(p_entry + 4), Lk, o_batch_mask, valid


@triton.jit
def _kept_keys(b_s, b_t, o_k, m_k, p_mask, o_batch_mask, HAS_MASK: tl.constexpr, S_LOWEST: tl.constexpr, T_LOWEST: tl.constexpr):
    """kind="scores": keys in range, unmasked, and neither score -inf nor its dtype's lowest value."""
    keep = m_k & (b_s > S_LOWEST) & (b_t > T_LOWEST)
    if HAS_MASK:
        keep = keep & (tl.load(p_mask + o_batch_mask + o_k, mask=m_k, other=0.0) != 0)
    return keep


@triton.jit
def _attention_forward_kernel(
    p_table, p_mask, p_rows, p_stats, total_rows, SCORES: tl.constexpr, HAS_MASK: tl.constexpr,
    S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, S_LOWEST: tl.constexpr, T_LOWEST: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """rows = sum_k p_k (log p_k - log q_k); scores: also stats = (lse_s, lse_t) over kept keys."""
    p_entry = p_table + tl.program_id(1) * 8
    if tl.program_id(0) < tl.load(p_entry + 3):
        p_s, p_t, i_row, start_row, Lk, o_batch_mask, valid = _attention_row(p_entry, p_mask, S_DTYPE, T_DTYPE, HAS_MASK)
        n_keys = tl.where(valid, Lk, 0)
        if SCORES:
            m_s = tl.full([], float("-inf"), ACC)
            m_t = tl.full([], float("-inf"), ACC)
            z_s = tl.zeros([], ACC)
            z_t = tl.zeros([], ACC)
            a = tl.zeros([], ACC)
            for start in range(0, n_keys, BLOCK):
                o_k = start + tl.arange(0, BLOCK)
                m_k = o_k < Lk
                b_s = tl.load(p_s + o_k, mask=m_k, other=0.0).to(ACC)  # [BLOCK]
                b_t = tl.load(p_t + o_k, mask=m_k, other=0.0).to(ACC)  # [BLOCK]
                keep = _kept_keys(b_s, b_t, o_k, m_k, p_mask, o_batch_mask, HAS_MASK, S_LOWEST, T_LOWEST)
                m_s, z_s, _, _ = _online_lse(m_s, z_s, tl.where(keep, b_s, float("-inf")))
                m_t, z_t, b_e, alpha = _online_lse(m_t, z_t, tl.where(keep, b_t, float("-inf")))
                a = a * alpha + tl.sum(tl.where(keep, b_e * (b_t - b_s), 0.0), 0)
            kl, lse_s, lse_t = _kl_from_online(m_s, z_s, m_t, z_t, a)
            tl.store(p_stats + start_row + i_row, lse_s)
            tl.store(p_stats + total_rows + start_row + i_row, lse_t)
        else:
            acc = tl.zeros([BLOCK], ACC)
            for start in range(0, n_keys, BLOCK):
                o_k = start + tl.arange(0, BLOCK)
                m_k = o_k < Lk
                b_q = tl.load(p_s + o_k, mask=m_k, other=1.0).to(ACC)  # [BLOCK]
                b_p = tl.load(p_t + o_k, mask=m_k, other=0.0).to(ACC)  # [BLOCK]
                has_p = b_p > 0
                log_ratio = tl.log(tl.where(has_p, b_p, 1.0)) - tl.log(tl.maximum(b_q, TINY))
                acc += tl.where(has_p, b_p * log_ratio, 0.0)
            kl = tl.sum(acc, 0)
        tl.store(p_rows + start_row + i_row, tl.where(valid, kl, 0.0))


@triton.jit
def _attention_backward_kernel(
    p_table, p_mask, p_stats, p_grad_rows, total_rows, SCORES: tl.constexpr, HAS_MASK: tl.constexpr,
    S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, S_LOWEST: tl.constexpr, T_LOWEST: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """probs: grad = grad_rows * (-p / q) where p > 0 and q >= TINY; scores: grad_rows * (q - p)."""
    p_entry = p_table + tl.program_id(1) * 8
    if tl.program_id(0) < tl.load(p_entry + 3):
        p_s, p_t, i_row, start_row, Lk, o_batch_mask, valid = _attention_row(p_entry, p_mask, S_DTYPE, T_DTYPE, HAS_MASK)
        p_g = tl.load(p_entry + 2).to(tl.pointer_type(S_DTYPE)) + i_row * Lk
        scale = tl.load(p_grad_rows + start_row + i_row).to(ACC)
        if SCORES:
            lse_s_hi, lse_s_lo = _load_lse(p_stats + start_row + i_row, ACC)
            lse_t_hi, lse_t_lo = _load_lse(p_stats + total_rows + start_row + i_row, ACC)
        n_load = tl.where(valid, Lk, 0)  # a masked row reads nothing and writes 0
        for start in range(0, Lk, BLOCK):
            o_k = start + tl.arange(0, BLOCK)
            m_k = o_k < Lk
            m_load = o_k < n_load
            b_s = tl.load(p_s + o_k, mask=m_load, other=0.0).to(ACC)  # [BLOCK]
            b_t = tl.load(p_t + o_k, mask=m_load, other=0.0).to(ACC)  # [BLOCK]
            if SCORES:
                keep = _kept_keys(b_s, b_t, o_k, m_load, p_mask, o_batch_mask, HAS_MASK, S_LOWEST, T_LOWEST)
                b_dkl = tl.where(keep, tl.exp((b_s - lse_s_hi) - lse_s_lo) - tl.exp((b_t - lse_t_hi) - lse_t_lo), 0.0)
            else:
                keep = (b_t > 0) & (b_s >= TINY)
                b_dkl = tl.where(keep, -b_t / tl.where(keep, b_s, 1.0), 0.0)
            tl.store(p_g + o_k, tl.where(valid, scale * b_dkl, 0.0).to(S_DTYPE), mask=m_k)


def _attention_launch(kernel, students, teachers, mask, kind, outputs, grads):
    counts = [s.shape[0] * s.shape[1] * s.shape[2] for s in students]
    starts = _row_starts(counts)
    device = students[0].device
    for (s_dtype, t_dtype), pairs in _dtype_groups(students, teachers).items():
        entries = []
        for i in pairs:
            s, t = students[i], teachers[i]
            batch, heads, lq, lk = s.shape
            grad_address = grads[i].data_ptr() if grads else 0
            entries.append((s.data_ptr(), t.data_ptr(), grad_address, counts[i], starts[i], lk, heads * lq, lq))
        max_rows = max(counts[i] for i in pairs)
        if max_rows == 0:
            continue
        block = _block(max(students[i].shape[3] for i in pairs))
        kernel[(max_rows, len(pairs))](
            _pair_table(entries, device), mask, *outputs, sum(counts), SCORES=kind == "scores",
            HAS_MASK=mask is not None, S_DTYPE=_TL_DTYPES[s_dtype], T_DTYPE=_TL_DTYPES[t_dtype],
            S_LOWEST=torch.finfo(s_dtype).min, T_LOWEST=torch.finfo(t_dtype).min,
            ACC=_TL_DTYPES[acc_dtype(*students, *teachers)], BLOCK=block, num_warps=_warps(block),
        )


def attention_forward(students, teachers, mask, kind):
    """rows = kl per query row of every pair (one launch); stats = (lse_s, lse_t) for scores."""
    count = sum(s.shape[0] * s.shape[1] * s.shape[2] for s in students)
    acc = acc_dtype(*students, *teachers)
    rows = torch.zeros(count, dtype=acc, device=students[0].device)
    stats = torch.zeros(2, count if kind == "scores" else 0, dtype=torch.float64, device=students[0].device)
    _attention_launch(_attention_forward_kernel, students, teachers, mask, kind, (rows, stats), None)
    return rows, stats


def attention_backward(students, teachers, mask, kind, stats, grad_rows):
    """Gradient of each student, 0 on masked rows and dropped keys (one launch)."""
    grads = [torch.empty(s.shape, dtype=s.dtype, device=s.device) for s in students]
    _attention_launch(_attention_backward_kernel, students, teachers, mask, kind, (stats, grad_rows), grads)
    return grads
