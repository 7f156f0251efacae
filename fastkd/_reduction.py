"""From per-row values to the loss: ``reduction`` and the mean over layer pairs."""

from __future__ import annotations

import torch


def reduce_rows(
    rows: torch.Tensor,
    row_shapes: list[tuple[int, ...]],
    valid_rows: list[torch.Tensor | int],
    reduction: str,
    is_sequence: bool,
):
    """Split the concatenated per-row values ``rows`` into pairs and reduce each.

    ``"none"``: each pair's rows in ``row_shapes[i]``; ``"sum"``: sum of rows; ``"mean"``: sum over
    ``max(valid_rows[i], 1)``. Over a sequence of pairs, sums add and means average; ``"none"`` gives a
    list.
    """
    sizes = [_numel(shape) for shape in row_shapes]
    per_pair = rows.split(sizes)
    if reduction == "none":
        out = [r.view(shape) for r, shape in zip(per_pair, row_shapes)]
        return out if is_sequence else out[0]
    sums = [r.sum() for r in per_pair]
    if reduction == "sum":
        return torch.stack(sums).sum() if is_sequence else sums[0]
    means = [s / (n.clamp_min(1) if isinstance(n, torch.Tensor) else max(n, 1)) for s, n in zip(sums, valid_rows)]
    return torch.stack(means).mean() if is_sequence else means[0]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n
