"""From per-row values to the loss: ``reduction`` and the mean over layer pairs."""

from __future__ import annotations

import math

import torch


def _mean_divisors(sizes: list[int], mask_rows: torch.Tensor | None, rows_per_mask_row: list[int] | None):
    """``"mean"``'s divisor of each pair's sum, as ``(per-pair ints, n)``: the pair's row count and
    ``n = None`` without a mask; else ``rows_per_mask_row[p]`` (1 by default) and ``n`` the mask's
    valid rows ``max(mask_rows.sum(), 1)``, a device tensor."""
    if mask_rows is None:
        return [max(size, 1) for size in sizes], None
    return rows_per_mask_row or [1] * len(sizes), mask_rows.sum().clamp_min(1)


def reduce_rows(
    rows: torch.Tensor,
    row_shapes: list[tuple[int, ...]],
    mask_rows: torch.Tensor | None,
    reduction: str,
    is_sequence: bool,
    rows_per_mask_row: list[int] | None = None,
):
    """Reduce the concatenated per-row values ``rows`` of one or more pairs.

    ``"none"``: each pair's rows in ``row_shapes[i]`` (a list over a sequence of pairs); ``"sum"``:
    the sum of all rows; ``"mean"``: the mean over pairs of ``sum_p / max(valid_p, 1)``, where
    ``valid_p`` is the pair's row count without a mask, else ``rows_per_mask_row[p]`` (1 by default;
    the heads for attention) times the mask's valid rows ``mask_rows.sum()``.
    """
    sizes = [math.prod(shape) for shape in row_shapes]
    if reduction == "none":
        out = [r.view(shape) for r, shape in zip(rows.split(sizes), row_shapes)]
        return out if is_sequence else out[0]
    if reduction == "sum":
        return rows.sum()
    divisors, n = _mean_divisors(sizes, mask_rows, rows_per_mask_row)
    if len(set(divisors)) == 1:  # one divisor for every pair: one reduction
        mean = rows.sum() / (len(sizes) * divisors[0])
    else:
        mean = sum(r.sum() / d for r, d in zip(rows.split(sizes), divisors)) / len(sizes)
    return mean if n is None else mean / n


def row_weights(
    row_shapes: list[tuple[int, ...]],
    mask_rows: torch.Tensor | None,
    reduction: str,
    rows_per_mask_row: list[int] | None,
    expected: torch.Tensor,
) -> torch.Tensor:
    """``expected * d reduce_rows / d rows`` for a scalar ``reduction``, before any row exists:
    ``expected`` on every row for ``"sum"``; for ``"mean"``, ``expected / (P * divisor_p * n)`` on
    pair ``p``'s rows (``_mean_divisors``). Masked rows get their weight too: the kernels write 0
    there whatever the weight. ``expected``: a 0-d tensor of the rows' dtype and device."""
    sizes = [math.prod(shape) for shape in row_shapes]
    if reduction == "sum":
        return expected.expand(sum(sizes)).contiguous()
    divisors, n = _mean_divisors(sizes, mask_rows, rows_per_mask_row)
    count = 1 if n is None else n.to(expected.dtype)
    return torch.cat([(expected / (len(sizes) * d * count)).expand(size) for d, size in zip(divisors, sizes)])
