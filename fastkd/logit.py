"""``logit_kl``: temperature-scaled KL divergence between the teacher's and the student's outputs.

Path: ``logit_kl`` validates (``fastkd._validation``), picks a backend (``fastkd._backend``) and calls
the custom op ``fastkd::logit_kl_rows``, whose kernels live in ``fastkd/backends/<backend>``
(``logit_forward`` / ``logit_backward``).
"""

from __future__ import annotations

import math

import torch

from fastkd import _backend, _one_pass
from fastkd._layout import acc_dtype, rows_view
from fastkd._reduction import reduce_rows
from fastkd._validation import check_mask, check_pair, check_reduction, check_temperature


@torch.library.custom_op("fastkd::logit_kl_rows", mutates_args=())
def logit_kl_rows(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, temperature: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``T^2 * kl`` (masked rows 0) and the log-sum-exps ``[2, rows]`` backward needs."""
    return _backend.module(backend).logit_forward(rows_view(student), rows_view(teacher), mask, temperature)


@logit_kl_rows.register_fake
def _(student, teacher, mask, temperature, backend):
    rows = math.prod(student.shape[:-1])
    dtype = acc_dtype(student, teacher)
    return student.new_empty(rows, dtype=dtype), student.new_empty(2, rows, dtype=torch.float64)


@torch.library.custom_op("fastkd::logit_kl_rows_backward", mutates_args=())
def logit_kl_rows_backward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    stats: torch.Tensor,
    grad_rows: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """d loss / d student = grad_rows * T * (q - p), 0 on masked rows."""
    grad = _backend.module(backend).logit_backward(
        rows_view(student), rows_view(teacher), mask, temperature, stats, grad_rows.contiguous()
    )
    return grad.view(student.shape)


@logit_kl_rows_backward.register_fake
def _(student, teacher, mask, temperature, stats, grad_rows, backend):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    student, teacher, mask, temperature, backend = inputs
    ctx.save_for_backward(student, teacher, mask, output[1])
    ctx.temperature, ctx.backend = temperature, backend


def _backward(ctx, grad_rows, grad_stats):
    student, teacher, mask, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = logit_kl_rows_backward(student, teacher, mask, ctx.temperature, stats, grad_rows, ctx.backend)
    return grad, None, None, None, None


logit_kl_rows.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastkd::logit_kl_rows_with_grad", mutates_args=())
def logit_kl_rows_with_grad(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    grad_rows: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The rows of ``logit_kl_rows`` and, from the same read, ``[grad_rows * T * (q - p)]``."""
    rows, grad = _backend.module(backend).logit_forward_with_grad(
        rows_view(student), rows_view(teacher), mask, temperature, grad_rows
    )
    return rows, [grad.view(student.shape)]


@logit_kl_rows_with_grad.register_fake
def _(student, teacher, mask, temperature, grad_rows, backend):
    rows, _ = logit_kl_rows(student, teacher, mask, temperature, backend)
    return rows, [torch.empty_like(student, memory_format=torch.contiguous_format)]


def logit_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Forward KL between temperature-softened distributions, with Hinton's T^2 scaling.

    ``student_logits``, ``teacher_logits``: ``[..., V]``; ``mask``: the leading shape (nonzero =
    valid row; ``labels != -100`` for a causal LM). Per row ``i``::

        p = softmax(t_i / T), q = softmax(s_i / T)
        r_i = T^2 * sum_v p_v (log p_v - log q_v)          (teacher logits of -inf: p_v = 0, no term)

    ``reduction="mean"``: ``sum_i m_i r_i / max(sum_i m_i, 1)``; ``"sum"``: ``sum_i m_i r_i``;
    ``"none"``: ``r`` with masked rows 0, of the leading shape. The gradient w.r.t. the student is
    ``T * m_i (q - p) / n`` for ``"mean"``; the teacher gets none. The loss is float32 (float64 for
    float64 inputs) whatever the input dtypes; the gradient has the student's dtype.
    """
    check_pair(student_logits, teacher_logits, names=("student_logits", "teacher_logits"), what="logits")
    temperature = check_temperature(temperature)
    reduction = check_reduction(reduction)
    leading = student_logits.shape[:-1]
    mask_rows = check_mask(mask, leading, student_logits.device, "the logits' leading dimensions")
    if mask_rows is not None:
        mask_rows = mask_rows.view(-1)
    backend = _backend.resolve(student_logits.device)
    teacher_logits = teacher_logits.detach()
    if _one_pass.applies([student_logits], reduction):
        student = student_logits.detach()
        return _one_pass.loss(
            lambda grad_rows: logit_kl_rows_with_grad(student, teacher_logits, mask_rows, temperature, grad_rows, backend),
            [student_logits], [tuple(leading)], mask_rows, reduction, False, backend,
            acc_dtype(student_logits, teacher_logits),
        )
    rows, _ = logit_kl_rows(student_logits, teacher_logits, mask_rows, temperature, backend)
    return reduce_rows(rows, [tuple(leading)], mask_rows, reduction, is_sequence=False)
