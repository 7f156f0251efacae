"""One-pass losses: the forward pass writes the student's gradient, backward only confirms it.

A loss is two-pass when its forward reads student and teacher, and its backward reads both again
to write the gradient: 5 input-sized units of memory traffic. When the student requires grad and
the reduction is a scalar (``"mean"`` or ``"sum"``), ``d loss / d rows`` is known before the row
pass (``fastkd._reduction.row_weights``: ``m_i / n`` for ``"mean"``, with ``n`` a device tensor), so
the forward kernel can write ``grad = d loss / d student`` for an *expected* upstream gradient ``u``
(1, or the runner's stage weight) while it reads the inputs: 3 units. ``with_gradients`` gives the
loss a backward that calls ``scale_gradients_``: a kernel that reads the upstream gradient ``g`` on the device and
returns at once when ``g == u`` (``loss.backward()``, ``kd + ce``), and otherwise scales the
gradient in place by ``g / u``. Nothing input-sized is read in backward on the fast path, and
nothing synchronises with the host on either path.

The switch (``set_passes`` or ``FASTKD_PASSES``): ``"auto"`` (default) takes one pass wherever it
applies (``applies``), ``"two"`` always takes the two-pass path (tests and ``fastkd bench`` compare
both). The one-pass backward runs once: a second backward through the same loss
(``retain_graph=True``) and double backward (``create_graph=True``) raise a RuntimeError.
"""

from __future__ import annotations

import contextlib
import os

import torch

from fastkd import _backend
from fastkd._reduction import reduce_rows, row_weights
from fastkd._validation import check_choice

PASSES = ("auto", "two")

_selected: str | None = None
_expected: list[torch.Tensor | float] = [1.0]  # the upstream gradient the forward assumes (a stack)


def set_passes(mode: str) -> None:
    """``"auto"``: one pass where it applies; ``"two"``: the two-pass path for every loss."""
    global _selected
    _selected = check_choice("passes", mode, PASSES)


def get_passes() -> str:
    if _selected is not None:
        return _selected
    return check_choice("passes", os.environ.get("FASTKD_PASSES", "auto"), PASSES)


@contextlib.contextmanager
def expected_upstream(weight: torch.Tensor | float):
    """Within the block, one-pass losses write their gradient for an upstream gradient ``weight``
    (a float or a 0-d device tensor): the runner's ``sum_k w_k L_k`` keeps the fast path."""
    _expected.append(weight)
    try:
        yield
    finally:
        _expected.pop()


def applies(students: list[torch.Tensor], reduction: str) -> bool:
    """Whether a loss over ``students`` takes the one-pass path."""
    return (
        get_passes() == "auto"
        and reduction != "none"
        and torch.is_grad_enabled()
        and any(s.requires_grad for s in students)
    )


@torch.library.custom_op("fastkd::with_gradients", mutates_args=())
def with_gradients(
    loss: torch.Tensor,
    students: list[torch.Tensor],
    grads: list[torch.Tensor],
    expected: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """``loss`` (a copy), whose backward hands ``grads * upstream / expected`` to ``students``."""
    return loss.clone()


@with_gradients.register_fake
def _(loss, students, grads, expected, backend):
    return torch.empty_like(loss)


def _setup_context(ctx, inputs, output):
    _, students, grads, expected, backend = inputs
    # Attributes, not saved tensors: backward lets go of the gradients as it hands them on, so that
    # autograd can keep them as the leaves' .grad without a copy.
    ctx.grads, ctx.expected, ctx.backend = list(grads), expected, backend


def _backward(ctx, upstream):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fastkd: double backward (create_graph=True) through a one-pass loss is not supported; "
            "compute the loss after fastkd.set_passes('two') (or with FASTKD_PASSES=two) for it"
        )
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        raise RuntimeError(
            "fastkd: backward ran twice through a one-pass loss (retain_graph=True), whose gradient "
            "was handed on the first time; compute the loss after fastkd.set_passes('two') for it"
        )
    scale_gradients_(grads, upstream.reshape(()).to(ctx.expected.dtype), ctx.expected, ctx.backend)
    return None, grads, [None] * len(grads), None, None


with_gradients.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastkd::scale_gradients_", mutates_args=("grads",))
def scale_gradients_(grads: list[torch.Tensor], upstream: torch.Tensor, expected: torch.Tensor, backend: str) -> None:
    """``grads *= upstream / expected`` in place (0 where ``expected == 0``), nothing when they are
    equal: the backend's ``scale_gradients_`` reads both 0-d tensors on the device."""
    _backend.module(backend).scale_gradients_(grads, upstream, expected)


@scale_gradients_.register_fake
def _(grads, upstream, expected, backend):
    return None


def expected_tensor(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The upstream gradient a one-pass forward writes its gradient for, as a 0-d tensor."""
    return torch.as_tensor(_expected[-1], dtype=dtype, device=device).reshape(())


def loss(rows_with_grad, students, row_shapes, mask_rows, reduction, is_sequence, backend, dtype,
         rows_per_mask_row=None):
    """A loss through the one-pass path: ``rows_with_grad(grad_rows) -> (rows, grads)`` runs a
    backend's ``*_forward_with_grad`` on the rows' weights; the rows are reduced as the two-pass
    path reduces them, and the gradients are attached to ``students``."""
    expected = expected_tensor(dtype, students[0].device)
    rows, grads = rows_with_grad(row_weights(row_shapes, mask_rows, reduction, rows_per_mask_row, expected))
    value = reduce_rows(rows, row_shapes, mask_rows, reduction, is_sequence, rows_per_mask_row)
    return with_gradients(value, students, grads, expected, backend)
