"""The ``"triton"`` backend: one fused kernel per loss and direction.

Each forward kernel reads every student and teacher element of a row once and writes the row's value
(and, for softmax losses, the two log-sum-exps); each backward kernel reads the row once more and
writes the gradient. Masked rows read nothing and write 0. One program handles a tile of ``BLOCK_R``
rows, walking their columns ``BLOCK_C`` at a time; offsets are 64-bit. Layer pairs of one dtype
combination run in one launch (program id 1 is the pair): a small int64 table on the device holds,
per pair, the addresses, sizes and strides the kernels need (``_pair_table``).

Notation: ``o_`` offsets, ``m_`` masks, ``p_`` pointers, ``b_`` block values; sizes ``R`` rows, ``V``
vocabulary, ``D`` width, ``Lk`` keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd._layout import acc_dtype

TINY = tl.constexpr(1.1754943508222875e-38)  # float32's smallest normal: the floor of q in log q for kind="probs"
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


@triton.jit
def _online_lse(m, z, b_x):
    """Fold tile ``b_x`` ``[R, C]`` into running per-row (max ``m``, sum ``z`` of exp(x - m)).

    -inf entries add 0. Returns (m, z, exp(b_x - m), the factor the old sums were scaled by).
    """
    m_new = tl.maximum(m, tl.max(b_x, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    b_e = tl.exp(b_x - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    return m_new, z * alpha + tl.sum(b_e, 1), b_e, alpha


@triton.jit
def _div(x, y):
    """x / y rounded to nearest: Triton's float32 ``/`` is approximate (2 ulp on CUDA)."""
    if x.dtype.is_fp64():
        return x / y
    else:
        return tl.math.div_rn(x, y)


@triton.jit
def _kl_from_online(m_s, z_s, m_t, z_t, a):
    """kl = sum p (t - s) + lse_s - lse_t per row from the running sums, and the float64 lses; 0 where
    the teacher row is empty. Maxima and log-sums are subtracted apart, so no large lse rounds."""
    log_z_s = tl.log(z_s)
    log_z_t = tl.log(z_t)
    has_entries = z_t > 0
    kl = tl.where(has_entries, _div(a, z_t) + (m_s - m_t) + (log_z_s - log_z_t), 0.0)
    lse_s = m_s.to(tl.float64) + log_z_s.to(tl.float64)
    lse_t = m_t.to(tl.float64) + log_z_t.to(tl.float64)
    return kl, tl.where(has_entries, lse_s, 0.0), tl.where(has_entries, lse_t, 0.0)


@triton.jit
def _load_lse(p_lse, m_r, ACC: tl.constexpr):
    """Float64 lses as (hi, lo) in ACC with hi + lo = lse: exp((x - hi) - lo) keeps x's precision."""
    lse = tl.load(p_lse, mask=m_r, other=0.0)
    hi = lse.to(ACC)
    return hi, (lse - hi.to(tl.float64)).to(ACC)


@triton.jit
def _row_tile(n_rows, p_mask, HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's rows: (o_r row indices, m_r in range, valid: in range and not masked)."""
    o_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < n_rows
    valid = m_r
    if HAS_MASK:
        valid = valid & (tl.load(p_mask + o_r, mask=m_r, other=0.0) != 0)
    return o_r, m_r, valid


@triton.jit
def _column_bound(valid, n_cols):
    """n_cols, or 0 when no row of the tile is valid (a fully masked tile reads nothing)."""
    return tl.where(tl.max(valid.to(tl.int32), 0) > 0, n_cols, 0)


# ----------------------------------------------------------------------------------------- logit


@triton.jit
def _logit_forward_kernel(
    p_s, p_t, p_mask, p_rows, p_stats, n_rows, R1, V, s_stride0, s_stride1, t_stride0, t_stride1,
    inv_temperature, temperature_sq, HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """rows = T^2 (sum p (t' - s') + lse(s') - lse(t')), t' = t / T, s' = s / T; stats = the lses."""
    o_r, m_r, valid = _row_tile(n_rows, p_mask, HAS_MASK, BLOCK_R)
    o_s = (o_r // R1) * s_stride0 + (o_r % R1) * s_stride1  # [BLOCK_R]
    o_t = (o_r // R1) * t_stride0 + (o_r % R1) * t_stride1  # [BLOCK_R]
    m_s = tl.full([BLOCK_R], float("-inf"), ACC)
    m_t = tl.full([BLOCK_R], float("-inf"), ACC)
    z_s = tl.zeros([BLOCK_R], ACC)
    z_t = tl.zeros([BLOCK_R], ACC)
    a = tl.zeros([BLOCK_R], ACC)  # sum_v exp(t'_v - m_t) (t'_v - s'_v) = z_t * sum p (t' - s')
    for start in range(0, _column_bound(valid, V), BLOCK_C):
        o_v = start + tl.arange(0, BLOCK_C)
        m_load = valid[:, None] & (o_v < V)[None, :]
        b_s = tl.load(p_s + o_s[:, None] + o_v[None, :], mask=m_load, other=float("-inf")).to(ACC) * inv_temperature
        b_t = tl.load(p_t + o_t[:, None] + o_v[None, :], mask=m_load, other=float("-inf")).to(ACC) * inv_temperature
        m_s, z_s, _, _ = _online_lse(m_s, z_s, b_s)
        m_t, z_t, b_e, alpha = _online_lse(m_t, z_t, b_t)
        a = a * alpha + tl.sum(tl.where(b_e > 0, b_e * (b_t - b_s), 0.0), 1)
    kl, lse_s, lse_t = _kl_from_online(m_s, z_s, m_t, z_t, a)
    tl.store(p_rows + o_r, tl.where(valid, temperature_sq * kl, 0.0), mask=m_r)
    tl.store(p_stats + o_r, lse_s, mask=m_r)
    tl.store(p_stats + n_rows + o_r, lse_t, mask=m_r)


@triton.jit
def _logit_backward_kernel(
    p_s, p_t, p_mask, p_stats, p_grad_rows, p_grad, n_rows, R1, V, s_stride0, s_stride1, t_stride0,
    t_stride1, inv_temperature, temperature, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad = grad_rows * T * (q - p), q = exp(s' - lse_s), p = exp(t' - lse_t); 0 on masked rows."""
    o_r, m_r, valid = _row_tile(n_rows, p_mask, HAS_MASK, BLOCK_R)
    o_s = (o_r // R1) * s_stride0 + (o_r % R1) * s_stride1  # [BLOCK_R]
    o_t = (o_r // R1) * t_stride0 + (o_r % R1) * t_stride1  # [BLOCK_R]
    lse_s_hi, lse_s_lo = _load_lse(p_stats + o_r, m_r, ACC)
    lse_t_hi, lse_t_lo = _load_lse(p_stats + n_rows + o_r, m_r, ACC)
    b_scale = tl.load(p_grad_rows + o_r, mask=valid, other=0.0).to(ACC) * temperature  # [BLOCK_R]
    for start in range(0, V, BLOCK_C):
        o_v = start + tl.arange(0, BLOCK_C)
        m_v = (o_v < V)[None, :]
        m_load = valid[:, None] & m_v
        b_s = tl.load(p_s + o_s[:, None] + o_v[None, :], mask=m_load, other=0.0).to(ACC) * inv_temperature
        b_t = tl.load(p_t + o_t[:, None] + o_v[None, :], mask=m_load, other=float("-inf")).to(ACC) * inv_temperature
        b_q = tl.exp((b_s - lse_s_hi[:, None]) - lse_s_lo[:, None])
        b_p = tl.exp((b_t - lse_t_hi[:, None]) - lse_t_lo[:, None])
        b_g = tl.where(m_load, b_scale[:, None] * (b_q - b_p), 0.0)
        tl.store(p_grad + o_r[:, None] * V + o_v[None, :], b_g.to(p_grad.dtype.element_ty), mask=m_r[:, None] & m_v)


def logit_forward(student, teacher, mask, temperature):
    """rows = T^2 sum_v p_v (log p_v - log q_v) per row, stats = (lse(s / T), lse(t / T))."""
    r0, r1, vocab = student.shape
    n_rows = r0 * r1
    rows = torch.empty(n_rows, dtype=acc_dtype(student, teacher), device=student.device)
    stats = torch.empty(2, n_rows, dtype=torch.float64, device=student.device)
    if n_rows:
        tile = _tile("logit", n_rows, vocab)
        _logit_forward_kernel[(triton.cdiv(n_rows, tile["BLOCK_R"]),)](
            student, teacher, mask, rows, stats, n_rows, r1, vocab, *student.stride()[:2], *teacher.stride()[:2],
            1.0 / temperature, temperature**2, HAS_MASK=mask is not None, ACC=_tl(rows.dtype), **tile,
        )
    return rows, stats


def logit_backward(student, teacher, mask, temperature, stats, grad_rows):
    """grad = grad_rows * T * (q - p), 0 on masked rows."""
    r0, r1, vocab = student.shape
    n_rows = r0 * r1
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    if n_rows:
        tile = _tile("logit", n_rows, vocab)
        _logit_backward_kernel[(triton.cdiv(n_rows, tile["BLOCK_R"]),)](
            student, teacher, mask, stats, grad_rows, grad, n_rows, r1, vocab, *student.stride()[:2],
            *teacher.stride()[:2], 1.0 / temperature, temperature, HAS_MASK=mask is not None,
            ACC=_tl(acc_dtype(student, teacher)), **tile,
        )
    return grad


# ----------------------------------------------------------------------------------- pair tables

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

# Table fields of one hidden pair (views [R0, R1, D]): addresses of s, t, grad; rows R0*R1; first row
# in the concatenation; R1; D; strides of s's and t's two leading dimensions.


@triton.jit
def _hidden_kernel(
    p_table, p_mask, p_rows, p_grad_rows, BACKWARD: tl.constexpr, HAS_MASK: tl.constexpr,
    S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Forward: rows = sum_d (s - t)^2 / D. Backward: grad = grad_rows * 2 (s - t) / D."""
    p_entry = p_table + tl.program_id(1) * 11
    first_row = tl.load(p_entry + 4)
    R1 = tl.load(p_entry + 5)
    D = tl.load(p_entry + 6)
    o_r, m_r, valid = _row_tile(tl.load(p_entry + 3), p_mask, HAS_MASK, BLOCK_R)
    o_s = (o_r // R1) * tl.load(p_entry + 7) + (o_r % R1) * tl.load(p_entry + 8)  # [BLOCK_R]
    o_t = (o_r // R1) * tl.load(p_entry + 9) + (o_r % R1) * tl.load(p_entry + 10)  # [BLOCK_R]
    p_s = tl.load(p_entry + 0).to(tl.pointer_type(S_DTYPE))
    p_t = tl.load(p_entry + 1).to(tl.pointer_type(T_DTYPE))
    if BACKWARD:
        p_g = tl.load(p_entry + 2).to(tl.pointer_type(S_DTYPE))
        b_scale = tl.load(p_grad_rows + first_row + o_r, mask=valid, other=0.0).to(ACC) * 2.0 / D  # [BLOCK_R]
        n_cols = D
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_C], ACC)
        n_cols = _column_bound(valid, D)
    for start in range(0, n_cols, BLOCK_C):
        o_d = start + tl.arange(0, BLOCK_C)
        m_d = (o_d < D)[None, :]
        m_load = valid[:, None] & m_d
        b_s = tl.load(p_s + o_s[:, None] + o_d[None, :], mask=m_load, other=0.0).to(ACC)  # [BLOCK_R, BLOCK_C]
        b_t = tl.load(p_t + o_t[:, None] + o_d[None, :], mask=m_load, other=0.0).to(ACC)  # [BLOCK_R, BLOCK_C]
        if BACKWARD:
            b_g = b_scale[:, None] * (b_s - b_t)
            tl.store(p_g + o_r[:, None] * D + o_d[None, :], b_g.to(S_DTYPE), mask=m_r[:, None] & m_d)
        else:
            acc += (b_s - b_t) * (b_s - b_t)
    if not BACKWARD:
        tl.store(p_rows + first_row + o_r, tl.sum(acc, 1) / D, mask=m_r)


def _hidden_launch(students, teachers, mask, rows, grad_rows, grads):
    def entry(i, first_row):
        s, t = students[i], teachers[i]
        grad_address = grads[i].data_ptr() if grads else 0
        return (s.data_ptr(), t.data_ptr(), grad_address, s.shape[0] * s.shape[1], first_row, s.shape[1],
                s.shape[2], *s.stride()[:2], *t.stride()[:2])

    counts = [s.shape[0] * s.shape[1] for s in students]
    for (s_dtype, t_dtype), entries, max_rows, max_cols in _pair_launches(students, teachers, counts, entry):
        tile = _tile("hidden", max_rows, max_cols)
        _hidden_kernel[(triton.cdiv(max_rows, tile["BLOCK_R"]), len(entries))](
            _pair_table(entries, students[0].device), mask, rows, grad_rows, BACKWARD=grads is not None,
            HAS_MASK=mask is not None, S_DTYPE=_tl(s_dtype), T_DTYPE=_tl(t_dtype),
            ACC=_tl(acc_dtype(*students, *teachers)), **tile,
        )


def hidden_forward(students, teachers, mask):
    """rows = sum_d (s - t)^2 / D per row of each pair, concatenated; all pairs in one launch."""
    count = sum(s.shape[0] * s.shape[1] for s in students)
    rows = torch.empty(count, dtype=acc_dtype(*students, *teachers), device=students[0].device)
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
def _attention_tile(p_table, p_mask, HAS_MASK: tl.constexpr, S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    """This program's pair (program id 1) and query rows: (pointers to the pair's student, teacher and
    gradient (0 in the forward), o_r, m_r, valid, first row, Lk, each row's offset of its batch's mask
    row). The row mask of row (b, h, i) is mask[b, i]."""
    p_entry = p_table + tl.program_id(1) * 8
    p_s = tl.load(p_entry + 0).to(tl.pointer_type(S_DTYPE))
    p_t = tl.load(p_entry + 1).to(tl.pointer_type(T_DTYPE))
    p_g = tl.load(p_entry + 2).to(tl.pointer_type(S_DTYPE))
    n_rows = tl.load(p_entry + 3)
    rows_per_batch = tl.load(p_entry + 6)
    Lq = tl.load(p_entry + 7)
    o_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < n_rows
    o_mask = (o_r // rows_per_batch) * Lq  # [BLOCK_R]
    valid = m_r
    if HAS_MASK:
        valid = valid & (tl.load(p_mask + o_mask + o_r % Lq, mask=m_r, other=0.0) != 0)
    return p_s, p_t, p_g, o_r, m_r, valid, tl.load(p_entry + 4), tl.load(p_entry + 5), o_mask


@triton.jit
def _kept_keys(b_s, b_t, o_k, m_load, p_mask, o_mask, HAS_MASK: tl.constexpr, S_LOWEST: tl.constexpr,
               T_LOWEST: tl.constexpr):
    """kind="scores": keys loaded, unmasked, and with neither score -inf nor its dtype's lowest."""
    keep = m_load & (b_s > S_LOWEST) & (b_t > T_LOWEST)
    if HAS_MASK:
        keep = keep & (tl.load(p_mask + o_mask[:, None] + o_k[None, :], mask=m_load, other=0.0) != 0)
    return keep


@triton.jit
def _attention_forward_kernel(
    p_table, p_mask, p_rows, p_stats, total_rows, SCORES: tl.constexpr, HAS_MASK: tl.constexpr,
    S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, S_LOWEST: tl.constexpr, T_LOWEST: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """rows = sum_k p_k (log p_k - log q_k); scores: also stats = (lse_s, lse_t) over kept keys."""
    p_s, p_t, p_g, o_r, m_r, valid, first_row, Lk, o_mask = _attention_tile(
        p_table, p_mask, HAS_MASK, S_DTYPE, T_DTYPE, BLOCK_R
    )
    if SCORES:
        m_s = tl.full([BLOCK_R], float("-inf"), ACC)
        m_t = tl.full([BLOCK_R], float("-inf"), ACC)
        z_s = tl.zeros([BLOCK_R], ACC)
        z_t = tl.zeros([BLOCK_R], ACC)
        a = tl.zeros([BLOCK_R], ACC)  # sum_k exp(t_k - m_t) (t_k - s_k) over kept keys
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    for start in range(0, _column_bound(valid, Lk), BLOCK_C):
        o_k = start + tl.arange(0, BLOCK_C)
        m_load = valid[:, None] & (o_k < Lk)[None, :]
        b_s = tl.load(p_s + o_r[:, None] * Lk + o_k[None, :], mask=m_load, other=0.0).to(ACC)  # [BLOCK_R, BLOCK_C]
        b_t = tl.load(p_t + o_r[:, None] * Lk + o_k[None, :], mask=m_load, other=0.0).to(ACC)  # [BLOCK_R, BLOCK_C]
        if SCORES:
            keep = _kept_keys(b_s, b_t, o_k, m_load, p_mask, o_mask, HAS_MASK, S_LOWEST, T_LOWEST)
            m_s, z_s, _, _ = _online_lse(m_s, z_s, tl.where(keep, b_s, float("-inf")))
            m_t, z_t, b_e, alpha = _online_lse(m_t, z_t, tl.where(keep, b_t, float("-inf")))
            a = a * alpha + tl.sum(tl.where(keep, b_e * (b_t - b_s), 0.0), 1)
        else:
            has_p = b_t > 0
            log_ratio = tl.log(tl.where(has_p, b_t, 1.0)) - tl.log(tl.maximum(b_s, TINY))
            acc += tl.where(has_p, b_t * log_ratio, 0.0)
    if SCORES:
        kl, lse_s, lse_t = _kl_from_online(m_s, z_s, m_t, z_t, a)
        tl.store(p_stats + first_row + o_r, lse_s, mask=m_r)
        tl.store(p_stats + total_rows + first_row + o_r, lse_t, mask=m_r)
    else:
        kl = tl.sum(acc, 1)
    tl.store(p_rows + first_row + o_r, tl.where(valid, kl, 0.0), mask=m_r)


@triton.jit
def _attention_backward_kernel(
    p_table, p_mask, p_stats, p_grad_rows, total_rows, SCORES: tl.constexpr, HAS_MASK: tl.constexpr,
    S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, S_LOWEST: tl.constexpr, T_LOWEST: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """probs: grad = grad_rows * (-p / q) where p > 0 and q >= TINY; scores: grad_rows * (q - p)."""
    p_s, p_t, p_g, o_r, m_r, valid, first_row, Lk, o_mask = _attention_tile(
        p_table, p_mask, HAS_MASK, S_DTYPE, T_DTYPE, BLOCK_R
    )
    b_scale = tl.load(p_grad_rows + first_row + o_r, mask=valid, other=0.0).to(ACC)  # [BLOCK_R]
    if SCORES:
        lse_s_hi, lse_s_lo = _load_lse(p_stats + first_row + o_r, m_r, ACC)
        lse_t_hi, lse_t_lo = _load_lse(p_stats + total_rows + first_row + o_r, m_r, ACC)
    for start in range(0, Lk, BLOCK_C):
        o_k = start + tl.arange(0, BLOCK_C)
        m_k = (o_k < Lk)[None, :]
        m_load = valid[:, None] & m_k
        b_s = tl.load(p_s + o_r[:, None] * Lk + o_k[None, :], mask=m_load, other=0.0).to(ACC)  # [BLOCK_R, BLOCK_C]
        b_t = tl.load(p_t + o_r[:, None] * Lk + o_k[None, :], mask=m_load, other=0.0).to(ACC)  # [BLOCK_R, BLOCK_C]
        if SCORES:
            keep = _kept_keys(b_s, b_t, o_k, m_load, p_mask, o_mask, HAS_MASK, S_LOWEST, T_LOWEST)
            b_q = tl.exp((b_s - lse_s_hi[:, None]) - lse_s_lo[:, None])
            b_p = tl.exp((b_t - lse_t_hi[:, None]) - lse_t_lo[:, None])
            b_dkl = tl.where(keep, b_q - b_p, 0.0)
        else:
            keep = (b_t > 0) & (b_s >= TINY)
            b_dkl = tl.where(keep, -b_t / tl.where(keep, b_s, 1.0), 0.0)
        tl.store(p_g + o_r[:, None] * Lk + o_k[None, :], (b_scale[:, None] * b_dkl).to(S_DTYPE), mask=m_r[:, None] & m_k)


def _attention_launch(kernel, students, teachers, mask, kind, outputs, grads):
    def entry(i, first_row):
        s, t = students[i], teachers[i]
        batch, heads, lq, lk = s.shape
        grad_address = grads[i].data_ptr() if grads else 0
        return (s.data_ptr(), t.data_ptr(), grad_address, batch * heads * lq, first_row, lk, heads * lq, lq)

    counts = [s.shape[0] * s.shape[1] * s.shape[2] for s in students]
    for (s_dtype, t_dtype), entries, max_rows, max_cols in _pair_launches(students, teachers, counts, entry):
        tile = _tile("attention", max_rows, max_cols)
        kernel[(triton.cdiv(max_rows, tile["BLOCK_R"]), len(entries))](
            _pair_table(entries, students[0].device), mask, *outputs, sum(counts), SCORES=kind == "scores",
            HAS_MASK=mask is not None, S_DTYPE=_tl(s_dtype), T_DTYPE=_tl(t_dtype),
            S_LOWEST=torch.finfo(s_dtype).min, T_LOWEST=torch.finfo(t_dtype).min,
            ACC=_tl(acc_dtype(*students, *teachers)), **tile,
        )


def attention_forward(students, teachers, mask, kind):
    """rows = kl per query row of every pair (one launch); stats = (lse_s, lse_t) for scores."""
    count = sum(s.shape[0] * s.shape[1] * s.shape[2] for s in students)
    device = students[0].device
    rows = torch.empty(count, dtype=acc_dtype(*students, *teachers), device=device)
    stats = torch.empty(2, count if kind == "scores" else 0, dtype=torch.float64, device=device)
    _attention_launch(_attention_forward_kernel, students, teachers, mask, kind, (rows, stats), None)
    return rows, stats


def attention_backward(students, teachers, mask, kind, stats, grad_rows):
    """Gradient of each student, 0 on masked rows and dropped keys (one launch)."""
    grads = [torch.empty(s.shape, dtype=s.dtype, device=s.device) for s in students]
    _attention_launch(_attention_backward_kernel, students, teachers, mask, kind, (stats, grad_rows), grads)
    return grads
