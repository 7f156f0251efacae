"""``attention_qk_forward`` / ``attention_qk_backward`` for the CPU backends: query chunks of scores.

For each batch element and chunk of ``c`` query rows, the scores of both models are formed with
GEMMs in the accumulation dtype (float32, float64 for float64 inputs)::

    S_s = (query_s[b, :, rows] * scale_s) @ key_s[b, :, :keys]^T        [H, c, keys]
    S_t = (query_t[b, :, rows] * scale_t) @ key_t[b, :, :keys]^T

with ``-inf`` on the dropped keys (padding, and ``j > i`` when causal; a causal chunk reads only
the keys up to its last row), and handed to the backend's own ``attention_forward`` /
``attention_backward`` for ``kind="scores"``, which give the rows, the stats and ``dKL/dS = q - p``.
Backward recomputes the chunk's scores and finishes the chain rule with GEMMs::

    dS = (grad_rows * scale_s) (q - p);  grad_q[b, :, rows] = dS @ key_s;  grad_k[b] += dS^T @ query_s

Grouped-query attention folds the ``G = H / H_kv`` query heads of a key head into one GEMM
(``[H_kv, G * c, d] @ [H_kv, d, keys]``). Memory beyond the inputs and gradients: a few chunks of
``H * c * keys`` scores in buffers reused by every chunk, ``c`` chosen so that a chunk holds about
``CHUNK_ELEMENTS`` of them; no ``[L, L]`` tensor exists.
"""

from __future__ import annotations

import torch

from fastkd._layout import acc_dtype

CHUNK_ELEMENTS = 1 << 20  # scores of one chunk per model: 4 MiB as float32


def _chunks(heads: int, length: int, causal: bool):
    """(first row, end row, keys read) of each query chunk of one batch element."""
    rows = _chunk_rows(heads, length)
    for start in range(0, length, rows):
        end = min(start + rows, length)
        yield start, end, end if causal else length


def _chunk_rows(heads: int, length: int) -> int:
    return max(1, min(length, CHUNK_ELEMENTS // max(heads * length, 1)))


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[H, c, d]`` query rows as ``[H_kv, G * c, d]``: the query heads of each key head stacked."""
    heads, rows, width = x.shape
    return x.reshape(kv_heads, heads // kv_heads * rows, width)


class _Scores:
    """The chunk's scores of one model, ``[H, c, keys]``, in a buffer reused by every chunk (a fresh
    chunk-sized tensor per chunk would cost page faults where the allocator maps large blocks)::

        S = (query * scale) @ key^T,   -inf on the keys dropped for each row

    ``key`` is ``[H_kv, L, d]``; the scale is applied to the ``c`` query rows, not to the scores."""

    def __init__(self, heads: int, length: int, acc: torch.dtype, device: torch.device):
        self.buffer = torch.empty(heads * _chunk_rows(heads, length) * length, dtype=acc, device=device)

    def __call__(self, query, key, scale, start, end, keys, padding, causal) -> torch.Tensor:
        heads, rows, _ = query.shape
        kv_heads = key.shape[0]
        out = self.buffer[: heads * rows * keys].view(kv_heads, heads // kv_heads * rows, keys)
        acc = self.buffer.dtype
        torch.bmm(_grouped(query.to(acc) * scale, kv_heads), key[:, :keys].to(acc).transpose(1, 2), out=out)
        scores = out.view(heads, rows, keys)
        if padding is not None:
            scores.masked_fill_(padding[:keys], -torch.inf)
        if causal:  # keys below the chunk's first row are all kept: only its diagonal block has future keys
            future = torch.ones(rows, rows, dtype=torch.bool, device=scores.device).triu_(1)
            scores[:, :, start:end].masked_fill_(future, -torch.inf)
        return scores


def _pair_chunks(query_s, key_s, query_t, key_t, scale_s, scale_t, mask, causal):
    """(b, first row, end row, keys, S_s, S_t) over the chunks of one pair; S as ``[1, H, c, keys]``,
    valid until the next chunk is formed."""
    batch, heads, length, _ = query_s.shape
    acc = acc_dtype(query_s, key_s, query_t, key_t)
    scores_s = _Scores(heads, length, acc, query_s.device)
    scores_t = _Scores(heads, length, acc, query_s.device)
    for b in range(batch):
        padding = None if mask is None else mask[b] == 0
        for start, end, keys in _chunks(heads, length, causal):
            s = scores_s(query_s[b, :, start:end], key_s[b], scale_s, start, end, keys, padding, causal)
            t = scores_t(query_t[b, :, start:end], key_t[b], scale_t, start, end, keys, padding, causal)
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
            chunk_grad_rows = pair_grad_rows[b, :, start:end].reshape(-1) * scale_s
            d_scores = attention_backward([s], [t], None, "scores", chunk_stats, chunk_grad_rows)[0][0]
            d_scores = _grouped(d_scores, key_s.shape[1])  # [H_kv, G * c, keys]
            key = key_s[b, :, :keys].to(acc)
            grad_q[b, :, start:end] = torch.bmm(d_scores, key).view(heads, end - start, -1)
            query = _grouped(query_s[b, :, start:end].to(acc), key_s.shape[1])
            grad_k[b, :, :keys] += torch.bmm(d_scores.transpose(1, 2), query)
        grads_q.append(grad_q.to(query_s.dtype))
        grads_k.append(grad_k.to(key_s.dtype))
        offset += count
    return grads_q, grads_k


def through(attention_forward, attention_backward):
    """A backend's ``(attention_qk_forward, attention_qk_backward)`` built on its own row kernels."""

    def qk_forward(student_q, student_k, teacher_q, teacher_k, scales, mask, causal):
        """rows and stats of kind="scores" for S = query key^T * scale, chunk by chunk."""
        return attention_qk_forward(attention_forward, student_q, student_k, teacher_q, teacher_k, scales, mask,
                                    causal)

    def qk_backward(student_q, student_k, teacher_q, teacher_k, scales, mask, causal, stats, grad_rows):
        """(grads of the student's queries, of its keys), chunk by chunk."""
        return attention_qk_backward(attention_backward, student_q, student_k, teacher_q, teacher_k, scales, mask,
                                     causal, stats, grad_rows)

    return qk_forward, qk_backward
