"""Views that bring a user's tensor into the layouts of ``fastkd.backends``."""

from __future__ import annotations

import torch


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 3-D view ``[R0, R1, C]`` of its rows, the last dimension of stride 1.

    Leading dimensions that can be merged are merged, so any contiguous tensor, a slice such as
    ``logits[:, :-1]`` and a transpose of the leading dimensions are viewed without a copy. A copy is
    made only when the last dimension is strided or more than two leading groups remain.
    """
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    sizes: list[int] = []
    strides: list[int] = []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if sizes and strides[-1] == stride * size:
            sizes[-1] *= size
            strides[-1] = stride
        else:
            sizes.append(size)
            strides.append(stride)
    if len(sizes) > 2:
        x = x.contiguous()
        sizes, strides = [x.numel() // x.shape[-1]], [x.shape[-1]]
    while len(sizes) < 2:
        sizes.insert(0, 1)
        strides.insert(0, 0)
    return x.as_strided((*sizes, x.shape[-1]), (*strides, 1))


def acc_dtype(*xs: torch.Tensor) -> torch.dtype:
    """float64 when an input is float64, float32 otherwise: the dtype losses accumulate in."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
