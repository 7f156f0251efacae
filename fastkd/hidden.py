"""``hidden_mse``: mean squared error between the student's and the teacher's hidden states.

Path: ``hidden_mse`` validates (``fastkd._validation``), picks a backend (``fastkd._backend``) and calls
the custom op ``fastkd::hidden_mse_rows`` over all layer pairs at once; the kernels live in
``fastkd/backends/<backend>`` (``hidden_forward`` / ``hidden_backward``).
"""

from __future__ import annotations

import math

import torch

from fastkd import _backend, _one_pass
from fastkd._layout import acc_dtype, rows_view
from fastkd._reduction import reduce_rows
from fastkd._validation import as_pair_lists, check_mask, check_one_device, check_pair, check_reduction


@torch.library.custom_op("fastkd::hidden_mse_rows", mutates_args=())
def hidden_mse_rows(
    students: list[torch.Tensor], teachers: list[torch.Tensor], mask: torch.Tensor | None, backend: str
) -> torch.Tensor:
    """Per-row ``sum_d (s - t)^2 / D`` of every pair, concatenated; masked rows 0."""
    return _backend.module(backend).hidden_forward(
        [rows_view(s) for s in students], [rows_view(t) for t in teachers], mask
    )


@hidden_mse_rows.register_fake
def _(students, teachers, mask, backend):
    rows = sum(math.prod(s.shape[:-1]) for s in students)
    return students[0].new_empty(rows, dtype=acc_dtype(*students, *teachers))


@torch.library.custom_op("fastkd::hidden_mse_rows_backward", mutates_args=())
def hidden_mse_rows_backward(
    students: list[torch.Tensor],
    teachers: list[torch.Tensor],
    mask: torch.Tensor | None,
    grad_rows: torch.Tensor,
    backend: str,
) -> list[torch.Tensor]:
    """d loss / d s = grad_rows * 2 (s - t) / D for each pair, 0 on masked rows."""
    grads = _backend.module(backend).hidden_backward(
        [rows_view(s) for s in students], [rows_view(t) for t in teachers], mask, grad_rows.contiguous()
    )
    return [g.view(s.shape) for g, s in zip(grads, students)]


@hidden_mse_rows_backward.register_fake
def _(students, teachers, mask, grad_rows, backend):
    return [torch.empty_like(s, memory_format=torch.contiguous_format) for s in students]


def _setup_context(ctx, inputs, output):
    students, teachers, mask, backend = inputs
    ctx.save_for_backward(mask, *students, *teachers)
    ctx.backend, ctx.pairs = backend, len(students)


def _backward(ctx, grad_rows):
    mask, *tensors = ctx.saved_tensors
    students, teachers = tensors[: ctx.pairs], tensors[ctx.pairs :]
    grads = None
    if ctx.needs_input_grad[0]:
        grads = hidden_mse_rows_backward(students, teachers, mask, grad_rows, ctx.backend)
    return grads, [None] * ctx.pairs, None, None


hidden_mse_rows.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastkd::hidden_mse_rows_with_grad", mutates_args=())
def hidden_mse_rows_with_grad(
    students: list[torch.Tensor],
    teachers: list[torch.Tensor],
    mask: torch.Tensor | None,
    grad_rows: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The rows of ``hidden_mse_rows`` and, from the same read, ``grad_rows * 2 (s - t) / D``."""
    rows, grads = _backend.module(backend).hidden_forward_with_grad(
        [rows_view(s) for s in students], [rows_view(t) for t in teachers], mask, grad_rows
    )
    return rows, [g.view(s.shape) for g, s in zip(grads, students)]


@hidden_mse_rows_with_grad.register_fake
def _(students, teachers, mask, grad_rows, backend):
    return hidden_mse_rows(students, teachers, mask, backend), hidden_mse_rows_backward(
        students, teachers, mask, grad_rows, backend
    )


def hidden_mse(student, teacher, *, mask: torch.Tensor | None = None, reduction: str = "mean"):
    """Mean squared error between hidden states, over valid rows.

    ``student``, ``teacher``: ``[..., D]`` tensors of one shape, or two equal-length sequences of them
    (layer pairs; pairs may differ in shape, all computed in one launch). ``mask``: the leading shape
    (nonzero = valid row), shared by every pair. Per row ``i``::

        r_i = sum_d (s_id - t_id)^2 / D

    ``reduction="mean"``: ``sum_i m_i r_i / max(sum_i m_i, 1)`` (with ``mask=None``, exactly
    ``F.mse_loss(s, t)``); ``"sum"``: ``sum_i m_i r_i``; ``"none"``: ``r`` of the leading shape, masked
    rows 0. Over a sequence of pairs ``"mean"`` averages the per-pair means, ``"sum"`` adds the per-pair
    sums and ``"none"`` returns a list. The teacher gets no gradient. The loss is float32 (float64 for
    float64 inputs); gradients have the students' dtypes.
    """
    students, teachers, is_sequence = as_pair_lists(student, teacher)
    for s, t in zip(students, teachers):
        check_pair(s, t, what="hidden width")
    reduction = check_reduction(reduction)
    device = check_one_device(students)
    leading = [tuple(s.shape[:-1]) for s in students]
    mask_rows = None
    for shape in dict.fromkeys(leading):
        mask_rows = check_mask(mask, torch.Size(shape), device, "the hidden states' leading dimensions")
    if mask_rows is not None:
        mask_rows = mask_rows.view(-1)
    backend = _backend.resolve(device)
    teachers = [t.detach() for t in teachers]
    if _one_pass.applies(students, reduction):
        detached = [s.detach() for s in students]
        return _one_pass.loss(
            lambda grad_rows: hidden_mse_rows_with_grad(detached, teachers, mask_rows, grad_rows, backend),
            students, leading, mask_rows, reduction, is_sequence, backend, acc_dtype(*students, *teachers),
        )
    rows = hidden_mse_rows(students, teachers, mask_rows, backend)
    return reduce_rows(rows, leading, mask_rows, reduction, is_sequence)
