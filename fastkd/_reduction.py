"""From per-row values to the loss: ``reduction`` and the mean over layer pairs."""

from __future__ import annotations

import math

import torch


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
    if mask_rows is None:
        divisors = [max(size, 1) for size in sizes]
    else:
        divisors = rows_per_mask_row or [1] * len(sizes)
    if len(set(divisors)) == 1:  # one divisor for every pair: one reduction
        mean = rows.sum() / (len(sizes) * divisors[0])
    else:
        mean = sum(r.sum() / d for r, d in zip(rows.split(sizes), divisors)) / len(sizes)
    return mean if mask_rows is None else mean / mask_rows.sum().clamp_min(1)
