"""``attention_qk_forward`` / ``attention_qk_backward`` for the CPU backends: query chunks of scores.

For each batch element and chunk of ``c`` query rows, the scores of both models are formed with
GEMMs in the accumulation dtype (float32, float64 for float64 inputs)::

    S_s = query_s[b, :, rows] @ key_s[b, :, :keys]^T * scale_s        [H, c, keys]
    S_t = query_t[b, :, rows] @ key_t[b, :, :keys]^T * scale_t

with ``-inf`` on the dropped keys (padding, and ``j > i`` when causal; a causal chunk reads only
the keys up to its last row), and handed to the backend's own ``attention_forward`` /
``attention_backward`` for ``kind="scores"``, which give the rows, the stats and ``dKL/dS = q - p``.
Backward recomputes the chunk's scores and finishes the chain rule with GEMMs::

    dS = grad_rows * (q - p) * scale_s;  grad_q[b, :, rows] = dS @ key_s;  grad_k[b] += dS^T @ query_s

Grouped-query attention folds the ``G = H / H_kv`` query heads of a key head into one GEMM
(``[H_kv, G * c, d] @ [H_kv, d, keys]``). Memory beyond the inputs and gradients: a few chunks of
``H * c * keys`` scores, ``c`` chosen so that a chunk holds about ``CHUNK_ELEMENTS`` of them; no
``[L, L]`` tensor exists.
"""

from __future__ import annotations

import torch

from fastkd._layout import acc_dtype

CHUNK_ELEMENTS = 1 << 20  # scores of one chunk per model: 4 MiB as float32


def _chunks(heads: int, length: int, causal: bool):
    """(first row, end row, keys read) of each query chunk of one batch element."""
    rows = max(1, min(length, CHUNK_ELEMENTS // max(heads * length, 1)))
    for start in range(0, length, rows):
        end = min(start + rows, length)
        yield start, end, end if causal else length


def _dropped_keys(mask_row, start: int, end: int, keys: int, causal: bool, device) -> torch.Tensor | None:
    """``[c, keys]`` True where key j is dropped for query row i: padding, or ``j > i`` when causal."""
    dropped = None
    if causal:
        rows = torch.arange(start, end, device=device)[:, None]
        dropped = torch.arange(keys, device=device)[None, :] > rows
    if mask_row is not None:
        padding = (mask_row[:keys] == 0)[None, :]
        dropped = padding if dropped is None else dropped | padding
    return dropped


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[H, c, d]`` query rows as ``[H_kv, G * c, d]``: the query heads of each key head stacked."""
    heads, rows, width = x.shape
    return x.reshape(kv_heads, heads // kv_heads * rows, width)


def _scores(query: torch.Tensor, key: torch.Tensor, scale: float, dropped, acc) -> torch.Tensor:
    """``query [H, c, d] @ key [H_kv, keys, d]^T * scale`` as ``[H, c, keys]``, dropped keys -inf."""
    heads, rows, _ = query.shape
    scores = torch.bmm(_grouped(query.to(acc), key.shape[0]), key.to(acc).transpose(1, 2))
    scores = scores.mul_(scale).view(heads, rows, key.shape[1])
    return scores if dropped is None else scores.masked_fill_(dropped, -torch.inf)


def _pair_chunks(query_s, key_s, query_t, key_t, scale_s, scale_t, mask, causal):
    """(b, first row, end row, keys, S_s, S_t) over the chunks of one pair; S as ``[1, H, c, keys]``."""
    batch, heads, length, _ = query_s.shape
    acc = acc_dtype(query_s, key_s, query_t, key_t)
    for b in range(batch):
        for start, end, keys in _chunks(heads, length, causal):
            dropped = _dropped_keys(None if mask is None else mask[b], start, end, keys, causal, query_s.device)
            s = _scores(query_s[b, :, start:end], key_s[b, :, :keys], scale_s, dropped, acc)
            t = _scores(query_t[b, :, start:end], key_t[b, :, :keys], scale_t, dropped, acc)
            yield b, start, end, keys, s[None], t[None]


def _masked_queries(rows: torch.Tensor, stats: torch.Tensor, mask_row, start: int, end: int):
    """Masked query rows contribute nothing: value 0, stats -inf (``rows [H, c]``, ``stats [2, H, c]``)."""
    if mask_row is None:
        return rows, stats
    valid = mask_row[start:end] != 0
    return torch.where(valid, rows, 0), torch.where(valid, stats, -torch.inf)


def attention_qk_forward(attention_forward, student_q, student_k, teacher_q, teacher_k, scales, mask, causal):
    """(rows, stats) of every pair, concatenated, from ``attention_forward(kind="scores")`` on chunks."""
    out_rows, out_stats = [], []
    for i, (query_s, key_s, query_t, key_t) in enumerate(zip(student_q, student_k, teacher_q, teacher_k)):
        batch, heads, length, _ = query_s.shape
        rows = query_s.new_zeros(batch, heads, length, dtype=acc_dtype(query_s, key_s, query_t, key_t))
        stats = query_s.new_full((2, batch, heads, length), -torch.inf, dtype=torch.float64)
        chunks = _pair_chunks(query_s, key_s, query_t, key_t, scales[2 * i], scales[2 * i + 1], mask, causal)
        for b, start, end, _, s, t in chunks:
            chunk_rows, chunk_stats = attention_forward([s], [t], None, "scores")
            chunk_rows, chunk_stats = _masked_queries(
                chunk_rows.view(heads, end - start), chunk_stats.view(2, heads, end - start),
                None if mask is None else mask[b], start, end,
            )
            rows[b, :, start:end] = chunk_rows
            stats[:, b, :, start:end] = chunk_stats
        out_rows.append(rows.view(-1))
        out_stats.append(stats.view(2, -1))
    return torch.cat(out_rows), torch.cat(out_stats, dim=1)


def attention_qk_backward(attention_backward, student_q, student_k, teacher_q, teacher_k, scales, mask, causal,
                          stats, grad_rows):
    """(grads of the student's queries, grads of its keys) from ``attention_backward(kind="scores")``."""
    grads_q, grads_k, offset = [], [], 0
    for i, (query_s, key_s, query_t, key_t) in enumerate(zip(student_q, student_k, teacher_q, teacher_k)):
        batch, heads, length, _ = query_s.shape
        count = batch * heads * length
        pair_stats = stats[:, offset : offset + count].view(2, batch, heads, length)
        pair_grad_rows = grad_rows[offset : offset + count].view(batch, heads, length)
        acc = acc_dtype(query_s, key_s, query_t, key_t)
        grad_q = torch.empty(query_s.shape, dtype=acc, device=query_s.device)
        grad_k = torch.zeros(key_s.shape, dtype=acc, device=key_s.device)
        scale_s = scales[2 * i]
        chunks = _pair_chunks(query_s, key_s, query_t, key_t, scale_s, scales[2 * i + 1], mask, causal)
        for b, start, end, keys, s, t in chunks:
            chunk_stats = pair_stats[:, b, :, start:end].reshape(2, -1)
            chunk_grad_rows = pair_grad_rows[b, :, start:end].reshape(-1)
            d_scores = attention_backward([s], [t], None, "scores", chunk_stats, chunk_grad_rows)[0][0]
            d_scores = _grouped(d_scores.mul_(scale_s), key_s.shape[1])  # [H_kv, G * c, keys]
            key = key_s[b, :, :keys].to(acc)
            grad_q[b, :, start:end] = torch.bmm(d_scores, key).view(heads, end - start, -1)
            query = _grouped(query_s[b, :, start:end].to(acc), key_s.shape[1])
            grad_k[b, :, :keys] += torch.bmm(d_scores.transpose(1, 2), query)
        grads_q.append(grad_q.to(query_s.dtype))
        grads_k.append(grad_k.to(key_s.dtype))
        offset += count
    return grads_q, grads_k
