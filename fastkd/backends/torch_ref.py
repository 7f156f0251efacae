"""The ``"torch"`` backend: the three losses in plain PyTorch, the reference the kernels must match.

Readable first: each function is the formula of ``fastkd.backends`` written out. Bounded in memory
second: rows are processed in blocks of about ``BLOCK_ELEMENTS`` elements, so a ``[8192, 128256]``
input never needs an input-sized float32 temporary, only the gradient the backward pass returns.
"""

from __future__ import annotations

import torch

from fastkd._constants import TINY
from fastkd._layout import acc_dtype
from fastkd.backends import qk_chunks

BLOCK_ELEMENTS = 1 << 22


def _row_blocks(x: torch.Tensor):
    """(flat row offset, [rows, C] block) over a ``[R0, R1, C]`` view, about BLOCK_ELEMENTS each."""
    r0, r1, cols = x.shape
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    for i in range(r0):
        for j in range(0, r1, step):
            yield i * r1 + j, slice(j, min(j + step, r1)), i


def _block_mask(mask: torch.Tensor | None, start: int, rows: int, like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(rows, dtype=torch.bool, device=like.device)
    return mask[start : start + rows] != 0


# ---------------------------------------------------------------------------------------- hidden


def _hidden(students, teachers, mask, grad_rows, with_rows):
    """(rows or None, grads or None): rows = sum_d (s - t)^2 / D per row of each pair, concatenated;
    with ``grad_rows``, grads = grad_rows * 2 (s - t) / D; masked rows 0 in both."""
    out, grads, offset = [], [], 0
    for s, t in zip(students, teachers):
        acc = acc_dtype(s, t)
        rows = torch.zeros(s.shape[0] * s.shape[1], dtype=acc, device=s.device) if with_rows else None
        grad = None if grad_rows is None else torch.empty(s.shape, dtype=s.dtype, device=s.device)
        for start, cols, i in _row_blocks(s):
            diff = s[i, cols].to(acc) - t[i, cols].to(acc)
            n = diff.shape[0]
            valid = _block_mask(mask, start, n, s)
            if with_rows:
                rows[start : start + n] = torch.where(valid, diff.square().sum(-1) / s.shape[-1], 0)
            if grad is not None:
                scale = grad_rows[offset + start : offset + start + n].to(acc) * (2.0 / s.shape[-1])
                grad[i, cols] = torch.where(valid[:, None], diff * scale[:, None], 0).to(s.dtype)
        out.append(rows)
        grads.append(grad)
        offset += s.shape[0] * s.shape[1]
    return (torch.cat(out) if with_rows else None), (grads if grad_rows is not None else None)


def hidden_forward(students, teachers, mask):
    """rows = sum_d (s - t)^2 / D per row of each pair, concatenated; masked rows 0."""
    return _hidden(students, teachers, mask, None, True)[0]


def hidden_backward(students, teachers, mask, grad_rows):
    """d rows / d s = 2 (s - t) / D, times grad_rows; 0 on masked rows."""
    return _hidden(students, teachers, mask, grad_rows, False)[1]


def hidden_forward_with_grad(students, teachers, mask, grad_rows):
    """Both of the above from one read of each block."""
    return _hidden(students, teachers, mask, grad_rows, True)


# ------------------------------------------------------------------------------------- attention


def _attention_blocks(s: torch.Tensor):
    """(b, head slice) blocks of a ``[B, H, Lq, Lk]`` tensor, about BLOCK_ELEMENTS each."""
    batch, heads, lq, lk = s.shape
    step = max(1, BLOCK_ELEMENTS // max(lq * lk, 1))
    for b in range(batch):
        for h in range(0, heads, step):
            yield b, slice(h, min(h + step, heads))


def _kept_keys(s, t, mask, b, heads):
    """kind="scores": keys kept in both softmaxes, ``[h, Lq, Lk]`` bool."""
    keep = (s[b, heads] > torch.finfo(s.dtype).min) & (t[b, heads] > torch.finfo(t.dtype).min)
    if mask is not None:
        keep = keep & (mask[b] != 0)[None, None, :]
    return keep


def _log_softmax(x: torch.Tensor, keep: torch.Tensor | None = None):
    """(log softmax over the last dim, float64 lse); only ``keep`` entries count when given.

    Computed as ``(x - max) - log(sum exp(x - max))``, exact near the maximum even where ``|x|`` is
    large. A row without a finite (kept) entry has lse -inf and a log softmax of no use (NaN).
    """
    if keep is not None:
        x = torch.where(keep, x, -torch.inf)
    peak, log_z = _peak_and_log_z(x)
    return (x - peak) - log_z, peak.squeeze(-1).double() + log_z.squeeze(-1).double()


def _peak_and_log_z(x: torch.Tensor):
    """``(max, log(sum exp(x - max)))`` over the last dim, kept; the max is 0 where none is finite."""
    peak = x.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, 0)
    return peak, torch.log(torch.exp(x - peak).sum(-1, keepdim=True))


def _row_lse(x: torch.Tensor) -> torch.Tensor:
    """The float64 lse of ``_log_softmax``, without the log softmax itself."""
    peak, log_z = _peak_and_log_z(x)
    return peak.squeeze(-1).double() + log_z.squeeze(-1).double()


def _minus_lse(x: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """x - lse in x's dtype, with the float64 lse split into hi + lo (see fastkd.backends)."""
    hi = lse.to(x.dtype)
    lo = (lse - hi.double()).to(x.dtype)
    return (x - hi[..., None]) - lo[..., None]


def _exp_minus_lse(x: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    return torch.exp(_minus_lse(x, lse))


def _attention_terms(s, t, mask, kind, b, heads, acc):
    """(p, log p - log q, keep, lse_s, lse_t, d kl / d s) of one block."""
    sb, tb = s[b, heads].to(acc), t[b, heads].to(acc)
    if kind == "probs":
        keep = tb > 0
        log_ratio = torch.log(torch.where(keep, tb, 1)) - torch.log(sb.clamp_min(TINY))
        return tb, log_ratio, keep, None, None, _probs_dkl(sb, tb)
    keep = _kept_keys(s, t, mask, b, heads)
    log_q, lse_s = _log_softmax(sb, keep)
    log_p, lse_t = _log_softmax(tb, keep)
    p = torch.where(keep, log_p.exp(), 0)
    return p, log_p - log_q, keep, lse_s, lse_t, torch.where(keep, log_q.exp() - p, 0)


def _probs_dkl(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """kind="probs": d kl / d q = -p / q where p > 0 and q >= TINY, else 0."""
    return torch.where((p > 0) & (q >= TINY), -p / q, 0)


def _contributes(valid: torch.Tensor, lse_t: torch.Tensor) -> torch.Tensor:
    """Rows that count: valid, with an entry of the teacher (``lse_t > -inf``); see fastkd.backends."""
    return valid & (lse_t > -torch.inf)


def _row_valid(mask, b, heads, lq, device):
    """Query-row validity of one block, ``[h, Lq, 1]``."""
    if mask is None:
        return torch.ones(1, lq, 1, dtype=torch.bool, device=device)
    return (mask[b] != 0)[None, :, None].expand(1, lq, 1)


def _attention(students, teachers, mask, kind, grad_rows):
    """(rows, stats, grads or None): the forward's rows and stats; with ``grad_rows`` also the
    gradients ``grad_rows * d kl / d s`` from the same read of each block."""
    out_rows, out_stats, grads, offset = [], [], [], 0
    for s, t in zip(students, teachers):
        batch, heads, lq, _ = s.shape
        acc = acc_dtype(s, t)
        rows = torch.zeros(batch, heads, lq, dtype=acc, device=s.device)
        stats = torch.zeros(2, batch, heads, lq, dtype=torch.float64, device=s.device)
        grad = None if grad_rows is None else torch.empty(s.shape, dtype=s.dtype, device=s.device)
        for b, hs in _attention_blocks(s):
            p, log_ratio, keep, lse_s, lse_t, dkl = _attention_terms(s, t, mask, kind, b, hs, acc)
            valid = _row_valid(mask, b, hs, lq, s.device)[..., 0]
            if kind == "scores":
                valid = _contributes(valid, lse_t)
                stats[0, b, hs] = torch.where(valid, lse_s, -torch.inf)
                stats[1, b, hs] = torch.where(valid, lse_t, -torch.inf)
            kl = torch.where(keep, p * log_ratio, 0).sum(-1)
            rows[b, hs] = torch.where(valid, kl, 0)
            if grad is not None:
                scale = grad_rows[offset : offset + batch * heads * lq].view(batch, heads, lq)[b, hs].to(acc)
                grad[b, hs] = torch.where(valid[..., None], dkl * scale[..., None], 0).to(s.dtype)
        out_rows.append(rows.reshape(-1))
        out_stats.append(stats.reshape(2, -1))
        grads.append(grad)
        offset += batch * heads * lq
    stats = torch.cat(out_stats, dim=1)
    return torch.cat(out_rows), stats if kind == "scores" else stats[:, :0], grads


def attention_forward(students, teachers, mask, kind):
    """rows = sum_k p_k (log p_k - log q_k) per query row, pairs concatenated; see fastkd.attention."""
    rows, stats, _ = _attention(students, teachers, mask, kind, None)
    return rows, stats


def attention_forward_with_grad(students, teachers, mask, kind, grad_rows):
    """The rows above and the gradients of attention_backward, from one read of each block."""
    rows, _, grads = _attention(students, teachers, mask, kind, grad_rows)
    return rows, grads


def attention_backward(students, teachers, mask, kind, stats, grad_rows):
    """probs: d kl / d q = -p / q (p > 0, q >= TINY); scores: d kl / d s = q - p on kept keys."""
    grads, offset = [], 0
    for s, t in zip(students, teachers):
        batch, heads, lq, _ = s.shape
        acc = acc_dtype(s, t)
        scale_all = grad_rows[offset : offset + batch * heads * lq].view(batch, heads, lq).to(acc)
        grad = torch.empty(s.shape, dtype=s.dtype, device=s.device)
        for b, hs in _attention_blocks(s):
            valid = _row_valid(mask, b, hs, lq, s.device)
            sb, tb = s[b, hs].to(acc), t[b, hs].to(acc)
            if kind == "probs":
                dkl = _probs_dkl(sb, tb)
            else:
                keep = _kept_keys(s, t, mask, b, hs)
                lse_s = _lse(stats[0], offset, b, hs, batch, heads, lq)
                lse_t = _lse(stats[1], offset, b, hs, batch, heads, lq)
                valid = _contributes(valid, lse_t[..., None])
                q = torch.where(keep, _exp_minus_lse(sb, lse_s), 0)
                p = torch.where(keep, _exp_minus_lse(tb, lse_t), 0)
                dkl = q - p
            grad[b, hs] = torch.where(valid, dkl * scale_all[b, hs][..., None], 0).to(s.dtype)
        grads.append(grad)
        offset += batch * heads * lq
    return grads


def _lse(stat_row, offset, b, hs, batch, heads, lq):
    return stat_row[offset : offset + batch * heads * lq].view(batch, heads, lq)[b, hs]


# ----------------------------------------------------------------------------------------- logit


def _divergence(log_q, log_p, divergence, beta):
    """(D per row, q a, S) of one block: the divergence (before its T^2) and the pieces of its
    gradient in the scaled student logits, d D / d s' = q (a - S) with S = sum_v q_v a_v (see
    fastkd.backends). ``q a`` is 0 wherever q is."""
    q, p = log_q.exp(), log_p.exp()
    if divergence == "forward":
        value, q_a = torch.where(p > 0, p * (log_p - log_q), 0).sum(-1), -p
    elif divergence == "reverse":
        q_a = torch.where(q > 0, q * (log_q - log_p), 0)
        value = q_a.sum(-1)
    elif divergence == "jsd":
        # m = 0 where both underflow (also where a subnormal q or p rounds away): no term there
        m = beta * p + (1 - beta) * q
        log_m = torch.log(m)
        q_a = (1 - beta) * torch.where((q > 0) & (m > 0), q * (log_q - log_m), 0)
        value = beta * torch.where((p > 0) & (m > 0), p * (log_p - log_m), 0).sum(-1) + q_a.sum(-1)
    else:  # "tvd"
        value, q_a = 0.5 * (p - q).abs().sum(-1), 0.5 * q * torch.sign(q - p)
    return value, q_a, q_a.sum(-1)


def _scales(divergence, temperature):
    """(factor of D in the row value, c in d r / d s = c q (a - S)): (T^2, T), or (1, 1 / T) for tvd."""
    if divergence == "tvd":
        return 1.0, 1.0 / temperature
    return temperature**2, temperature


def _ce_terms(s_raw, labels, valid, grad_ce):
    """(ce per row, float64 lse, gradient or None) of the hard-label cross-entropy at T = 1 on the
    rows of ``valid`` whose label is in [0, V): ``lse(s) - s[label]``, ``grad_ce (softmax(s) - onehot)``."""
    vocab = s_raw.shape[-1]
    has_label = valid & (labels >= 0) & (labels < vocab)
    log_q1, lse = _log_softmax(s_raw)
    picked = log_q1.gather(-1, labels.clamp(0, vocab - 1)[:, None]).squeeze(-1)
    ce = torch.where(has_label, -picked, 0)
    lse = torch.where(has_label, lse, -torch.inf)
    if grad_ce is None:
        return ce, lse, None
    onehot = torch.nn.functional.one_hot(labels.clamp(0, vocab - 1), vocab).to(s_raw.dtype)
    weight = torch.where(has_label, grad_ce.to(s_raw.dtype), 0)
    return ce, lse, (log_q1.exp() - onehot) * weight[:, None]


def _logit(student, teacher, mask, temperature, divergence, beta, labels, grad_rows, grad_ce_rows, stats_in=None):
    """(rows, ce_rows, stats, grad or None) of the logit contract (fastkd.backends): the rows, the
    hard-label cross-entropy and the stats of the forward; with ``grad_rows`` the gradient from the
    same read of each block. With ``stats_in`` (backward) the lses come from there instead."""
    count = student.shape[0] * student.shape[1]
    acc = acc_dtype(student, teacher)
    factor, c = _scales(divergence, temperature)
    rows = torch.zeros(count, dtype=acc, device=student.device)
    ce_rows = torch.zeros(count if labels is not None else 0, dtype=acc, device=student.device)
    stats = torch.zeros(4, count, dtype=torch.float64, device=student.device)
    grad = None if grad_rows is None else torch.empty(student.shape, dtype=student.dtype, device=student.device)
    for start, cols, i in _row_blocks(student):
        s_raw = student[i, cols].to(acc)
        s, t = s_raw / temperature, teacher[i, cols].to(acc) / temperature
        end = start + s.shape[0]
        if stats_in is None:
            log_q, lse_s = _log_softmax(s)
            log_p, lse_t = _log_softmax(t)
        else:
            lse_s, lse_t = stats_in[0, start:end], stats_in[1, start:end]
            log_q, log_p = _minus_lse(s, lse_s), _minus_lse(t, lse_t)
        valid = _block_mask(mask, start, s.shape[0], student)
        kd = _contributes(valid, lse_t)
        value, q_a, total = _divergence(log_q, log_p, divergence, beta)
        rows[start:end] = torch.where(kd, factor * value, 0)
        stats[0, start:end] = torch.where(kd, lse_s, -torch.inf)
        stats[1, start:end] = torch.where(kd, lse_t, -torch.inf)
        stats[3, start:end] = torch.where(kd, total, 0)
        ce_grad = None
        if labels is not None:
            ce, stats[2, start:end], ce_grad = _ce_terms(
                s_raw, labels[start:end], valid, None if grad_ce_rows is None else grad_ce_rows[start:end]
            )
            ce_rows[start:end] = ce
        else:
            stats[2, start:end] = -torch.inf
        if grad is not None:
            scale = grad_rows[start:end].to(acc) * c
            block = torch.where(kd[:, None], (q_a - log_q.exp() * total[:, None]) * scale[:, None], 0)
            grad[i, cols] = (block if ce_grad is None else block + ce_grad).to(student.dtype)
    return rows, ce_rows, stats, grad


def logit_forward(student, teacher, mask, temperature, divergence, beta, labels):
    """rows (the divergence per row), ce_rows (the hard-label cross-entropy) and stats, as
    fastkd.backends defines them."""
    rows, ce_rows, stats, _ = _logit(student, teacher, mask, temperature, divergence, beta, labels, None, None)
    return rows, ce_rows, stats


def logit_forward_with_grad(student, teacher, mask, temperature, divergence, beta, labels, grad_rows, grad_ce_rows):
    """The rows above and the gradient of logit_backward, from one read of each block."""
    rows, ce_rows, _, grad = _logit(
        student, teacher, mask, temperature, divergence, beta, labels, grad_rows, grad_ce_rows
    )
    return rows, ce_rows, grad


def logit_backward(student, teacher, mask, temperature, divergence, beta, labels, stats, grad_rows, grad_ce_rows):
    """grad_rows * d rows / d s + grad_ce_rows * d ce_rows / d s; 0 on masked rows."""
    *_, grad = _logit(
        student, teacher, mask, temperature, divergence, beta, labels, grad_rows, grad_ce_rows, stats_in=stats
    )
    return grad


# ---------------------------------------------------------------------------------------- sparse


def _sparse_terms(log_q_ids, logprobs, stored, temperature, tail, vocab, lse_t=None):
    """(row value, a, b) of a block of sparse rows (fastkd.backends): the divergence and the
    gradient's dense coefficient ``a`` (of q) and sparse ones ``b`` (at the ids), from the
    student's ``log q`` at the ids, ``[n, k]``. ``lse_t`` is computed unless given (backward)."""
    if tail == "renormalize":
        scaled = torch.where(stored, logprobs / temperature, -torch.inf)
        if lse_t is None:
            _, lse_t = _log_softmax(scaled)
        log_p = _minus_lse(scaled, lse_t)
        p = torch.where(stored, log_p.exp(), 0)
        value = temperature**2 * torch.where(p > 0, p * (log_p - log_q_ids), 0).sum(-1)
        return value, lse_t, torch.full_like(value, temperature), -temperature * p
    log_p = torch.where(stored, logprobs, -torch.inf)
    if lse_t is None:
        _, lse_t = _log_softmax(log_p)
    p, q = log_p.exp(), torch.where(stored, log_q_ids.exp(), 0)
    total_p, total_q = p.sum(-1), q.sum(-1)
    p_tail, q_tail = (1 - total_p).clamp_min(0), 1 - total_q
    has_tail = stored.sum(-1) < vocab
    tail_term = p_tail * (torch.log(torch.where(p_tail > 0, p_tail, 1)) - torch.log(q_tail.clamp_min(TINY)))
    value = torch.where(p > 0, p * (log_p - log_q_ids), 0).sum(-1) + torch.where(has_tail & (p_tail > 0), tail_term, 0)
    w = torch.where(has_tail & (q_tail > TINY), p_tail / torch.where(q_tail > TINY, q_tail, 1), 0)
    return value, lse_t, total_p - w * total_q, w[:, None] * q - p


def _sparse(student, ids, logprobs, mask, temperature, tail, grad_rows, stats_in=None):
    """(rows, stats, grad or None) of the sparse contract (fastkd.backends), block by block; with
    ``stats_in`` (backward) the lses come from there."""
    count, vocab = student.shape[0] * student.shape[1], student.shape[-1]
    acc = logprobs.dtype
    rows = torch.zeros(count, dtype=acc, device=student.device)
    stats = torch.full((2, count), -torch.inf, dtype=torch.float64, device=student.device)
    grad = None if grad_rows is None else torch.empty(student.shape, dtype=student.dtype, device=student.device)
    for start, cols, i in _row_blocks(student):
        s = student[i, cols].to(acc) / temperature
        end = start + s.shape[0]
        block_ids, block_logprobs = ids[start:end], logprobs[start:end]
        stored = block_ids >= 0
        if stats_in is None:
            log_q, lse_s = _log_softmax(s)
        else:
            lse_s = stats_in[0, start:end]
            log_q = _minus_lse(s, lse_s)
        log_q_ids = log_q.gather(-1, block_ids.clamp_min(0))
        value, lse_t, a, b = _sparse_terms(
            log_q_ids, block_logprobs, stored, temperature, tail, vocab, None if stats_in is None else stats_in[1, start:end]
        )
        counts = _contributes(_block_mask(mask, start, s.shape[0], student), lse_t)
        rows[start:end] = torch.where(counts, value, 0)
        stats[0, start:end] = torch.where(counts, lse_s, -torch.inf)
        stats[1, start:end] = torch.where(counts, lse_t, -torch.inf)
        if grad is not None:
            scale = grad_rows[start:end].to(acc)
            block = log_q.exp() * (a * scale)[:, None]
            block.scatter_add_(-1, block_ids.clamp_min(0), torch.where(stored, b * scale[:, None], 0))
            grad[i, cols] = torch.where(counts[:, None], block, 0).to(student.dtype)
    return rows, stats, grad


def sparse_forward(student, ids, logprobs, mask, temperature, tail):
    """rows (the divergence per row against the stored top-k teacher) and stats (fastkd.backends)."""
    rows, stats, _ = _sparse(student, ids, logprobs, mask, temperature, tail, None)
    return rows, stats


def sparse_forward_with_grad(student, ids, logprobs, mask, temperature, tail, grad_rows):
    """The rows above and the gradient of sparse_backward, from one read of each block."""
    rows, _, grad = _sparse(student, ids, logprobs, mask, temperature, tail, grad_rows)
    return rows, grad


def sparse_backward(student, ids, logprobs, mask, temperature, tail, stats, grad_rows):
    """grad_rows * d rows / d s; 0 on rows that contribute nothing."""
    return _sparse(student, ids, logprobs, mask, temperature, tail, grad_rows, stats_in=stats)[2]


# attention_kl_qk: query chunks of scores through this backend's attention_forward/backward
attention_qk_forward, attention_qk_backward = qk_chunks.through(attention_forward, attention_backward)


def scale_gradients_(grads, upstream, expected):
    """grads *= upstream / expected (0 where expected == 0), in torch ops: this backend pays the pass
    over the gradients whatever the values (a Python test of them would synchronise with the host)."""
    factor = torch.where(expected == 0, 0, upstream / expected)
    for grad in grads:
        grad.mul_(factor)
