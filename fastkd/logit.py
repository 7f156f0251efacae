"""``logit_kl``: a divergence between the teacher's and the student's output distributions, and the
hard-label cross-entropy of the student, from one pass over the logits.

Path: ``logit_kl`` validates (``fastkd._validation``), picks a backend (``fastkd._backend``) and calls
``logit_loss``, which runs the custom op ``fastkd::logit_kl_rows`` (or, on the one-pass path of
``fastkd._one_pass``, ``fastkd::logit_kl_rows_with_grad``). The kernels live in
``fastkd/backends/<backend>`` (``logit_forward`` / ``logit_backward`` / ``logit_forward_with_grad``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastkd import _backend, _one_pass
from fastkd._layout import acc_dtype, rows_view
from fastkd._reduction import reduce_rows, row_weights
from fastkd._validation import (
    IGNORE_INDEX,
    is_dtensor,
    check_ce_weight,
    check_divergence,
    check_float_tensor,
    check_labels,
    check_mask,
    check_pair,
    check_reduction,
    check_temperature,
    check_vocab,
)


class LogitParts(NamedTuple):
    """What ``logit_kl(..., return_parts=True)`` returns: ``loss = kd + ce_weight * ce``, and its
    two parts, detached, for logging (reduced as ``loss`` is; ``ce`` is None without ``labels``)."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor | None


@torch.library.custom_op("fastkd::logit_kl_rows", mutates_args=())
def logit_kl_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    divergence: str,
    beta: float,
    labels: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the divergence (masked rows 0), the hard-label cross-entropy (``[0]`` without
    labels) and the ``[4, rows]`` stats backward needs (``fastkd.backends``)."""
    return _backend.module(backend).logit_forward(
        rows_view(student), rows_view(teacher), mask, temperature, divergence, beta, labels
    )


@logit_kl_rows.register_fake
def _(student, teacher, mask, temperature, divergence, beta, labels, backend):
    rows = math.prod(student.shape[:-1])
    dtype = acc_dtype(student, teacher)
    return (
        student.new_empty(rows, dtype=dtype),
        student.new_empty(0 if labels is None else rows, dtype=dtype),
        student.new_empty(4, rows, dtype=torch.float64),
    )


@torch.library.custom_op("fastkd::logit_kl_rows_backward", mutates_args=())
def logit_kl_rows_backward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    divergence: str,
    beta: float,
    labels: torch.Tensor | None,
    stats: torch.Tensor,
    grad_rows: torch.Tensor,
    grad_ce_rows: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """d loss / d student = grad_rows * d rows / d s + grad_ce_rows * (softmax(s) - onehot(label))."""
    grad = _backend.module(backend).logit_backward(
        rows_view(student), rows_view(teacher), mask, temperature, divergence, beta, labels, stats,
        grad_rows.contiguous(), None if grad_ce_rows is None else grad_ce_rows.contiguous(),
    )
    return grad.view(student.shape)


@logit_kl_rows_backward.register_fake
def _(student, teacher, mask, temperature, divergence, beta, labels, stats, grad_rows, grad_ce_rows, backend):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    student, teacher, mask, temperature, divergence, beta, labels, backend = inputs
    ctx.save_for_backward(student, teacher, mask, labels, output[2])
    ctx.options = temperature, divergence, beta
    ctx.backend = backend


def _backward(ctx, grad_rows, grad_ce_rows, grad_stats):
    student, teacher, mask, labels, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = logit_kl_rows_backward(
            student, teacher, mask, *ctx.options, labels, stats, grad_rows,
            None if labels is None else grad_ce_rows, ctx.backend,
        )
    return grad, None, None, None, None, None, None, None


logit_kl_rows.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastkd::logit_kl_rows_with_grad", mutates_args=())
def logit_kl_rows_with_grad(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    divergence: str,
    beta: float,
    labels: torch.Tensor | None,
    grad_rows: torch.Tensor,
    grad_ce_rows: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The rows of ``logit_kl_rows`` and, from the same read, ``[the gradient of the backward]``."""
    rows, ce_rows, grad = _backend.module(backend).logit_forward_with_grad(
        rows_view(student), rows_view(teacher), mask, temperature, divergence, beta, labels, grad_rows, grad_ce_rows
    )
    return rows, ce_rows, [grad.view(student.shape)]


@logit_kl_rows_with_grad.register_fake
def _(student, teacher, mask, temperature, divergence, beta, labels, grad_rows, grad_ce_rows, backend):
    rows, ce_rows, _ = logit_kl_rows(student, teacher, mask, temperature, divergence, beta, labels, backend)
    return rows, ce_rows, [torch.empty_like(student, memory_format=torch.contiguous_format)]


def _is_constant(weight: float | torch.Tensor, value: float) -> bool:
    return not isinstance(weight, torch.Tensor) and weight == value


def labelled_rows(labels: torch.Tensor, mask_rows: torch.Tensor | None) -> torch.Tensor:
    """The cross-entropy's mean divisor: ``max(rows with a label and a valid mask, 1)``, on the device."""
    labelled = labels != IGNORE_INDEX
    if mask_rows is not None:
        labelled = labelled & (mask_rows != 0)
    return labelled.sum().clamp_min(1)


def logit_parts(rows, ce_rows, shape, mask_rows, labels, labelled, reduction, kd_weight, ce_weight) -> LogitParts:
    """``LogitParts`` from per-row values: ``kd`` the reduction of ``rows`` (``shape``: the leading
    shape), ``ce`` that of ``ce_rows`` over the labelled rows (``labelled``: the mean's divisor, a
    device tensor, None unless ``reduction="mean"``), ``loss = kd_weight * kd + ce_weight * ce``."""
    kd = reduce_rows(rows, [shape], mask_rows, reduction, is_sequence=False)
    loss = kd if _is_constant(kd_weight, 1.0) else kd_weight * kd
    if labels is None:
        return LogitParts(loss, kd.detach(), None)
    if reduction == "none":
        ce = ce_rows.view(shape)
    else:
        ce = ce_rows.sum() if labelled is None else ce_rows.sum() / labelled
    if not _is_constant(ce_weight, 0.0):
        loss = loss + ce_weight * ce
    return LogitParts(loss, kd.detach(), ce.detach())


def logit_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask_rows: torch.Tensor | None,
    labels: torch.Tensor | None,
    *,
    temperature: float,
    divergence: str,
    beta: float,
    reduction: str,
    kd_weight: float | torch.Tensor = 1.0,
    ce_weight: float | torch.Tensor = 0.0,
    backend: str,
) -> LogitParts:
    """``kd_weight * KD + ce_weight * CE`` of validated inputs, with its parts: the body of
    ``logit_kl`` (``kd_weight`` 1) and of the runner's ``"logit"`` + ``"ce"`` stages (the weights
    may be 0-d device tensors). ``mask_rows``, ``labels``: flat ``[rows]`` or None."""
    shapes = [tuple(student.shape[:-1])]
    teacher = teacher.detach()
    # the cross-entropy's mean divisor, the only reduction that needs it
    labelled = labelled_rows(labels, mask_rows) if labels is not None and reduction == "mean" else None

    def parts(rows, ce_rows):
        return logit_parts(rows, ce_rows, shapes[0], mask_rows, labels, labelled, reduction, kd_weight, ce_weight)

    if _one_pass.applies([student], reduction):
        expected = _one_pass.expected_tensor(acc_dtype(student, teacher), student.device)
        grad_rows = row_weights(shapes, mask_rows, reduction, None, expected * kd_weight)
        grad_ce_rows = None
        if labels is not None:
            weight = expected * ce_weight if reduction == "sum" else expected * ce_weight / labelled
            grad_ce_rows = weight.expand(labels.shape[0]).contiguous()
        rows, ce_rows, grads = logit_kl_rows_with_grad(
            student.detach(), teacher, mask_rows, temperature, divergence, beta, labels, grad_rows, grad_ce_rows, backend
        )
        result = parts(rows, ce_rows)
        return result._replace(loss=_one_pass.with_gradients(result.loss, [student], grads, expected, backend))
    rows, ce_rows, _ = logit_kl_rows(student, teacher, mask_rows, temperature, divergence, beta, labels, backend)
    return parts(rows, ce_rows)


def logit_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    divergence: str = "forward",
    beta: float | None = None,
    labels: torch.Tensor | None = None,
    ce_weight: float | torch.Tensor = 0.0,
    vocab: str = "exact",
    return_parts: bool = False,
) -> torch.Tensor | LogitParts:
    """A divergence between temperature-softened distributions, plus a hard-label cross-entropy.

    ``student_logits``, ``teacher_logits``: ``[..., V]``; ``mask``: the leading shape (nonzero =
    valid row; ``fastkd.logit_mask`` builds it from transformers' labels). Per row ``i``, with
    ``p = softmax(t_i / T)`` (teacher), ``q = softmax(s_i / T)`` (student), ``divergence``:

    - ``"forward"`` (default): ``r_i = T^2 KL(p || q) = T^2 sum_v p_v (log p_v - log q_v)``;
    - ``"reverse"``: ``r_i = T^2 KL(q || p)``;
    - ``"jsd"``: ``r_i = T^2 (beta KL(p || m) + (1 - beta) KL(q || m))``, ``m = beta p + (1 - beta) q``,
      ``beta`` in (0, 1), 0.5 when None (TRL's ``generalized_jsd_loss`` times ``T^2``; its beta 0
      and 1 are ``"forward"`` and ``"reverse"``);
    - ``"tvd"``: ``r_i = 0.5 sum_v |p_v - q_v|`` (no ``T^2``).

    Teacher logits of -inf have ``p_v = 0`` and add no term (in ``"reverse"``, a student entry with
    ``q_v > 0`` there makes the divergence +inf, as it is); a row whose teacher has no finite logit
    contributes 0. ``reduction="mean"``: ``KD = sum_i m_i r_i / max(sum_i m_i, 1)``; ``"sum"``:
    ``sum_i m_i r_i``; ``"none"``: ``r`` with masked rows 0, of the leading shape.

    ``labels`` (integer, the leading shape, ``-100`` ignored; for a causal LM the *next* token's
    label of each row, e.g. ``labels[:, 1:]`` against ``logits[:, :-1]``) adds the student's
    hard-label cross-entropy at temperature 1, ``ce_i = logsumexp(s_i) - s_i[labels_i]``, from the
    same pass: the result is ``KD + ce_weight * CE`` with ``CE`` the mean of ``ce_i`` over the rows
    with a label and a valid mask (``"sum"``: their sum; ``"none"``: ``r_i + ce_weight * ce_i``).
    ``ce_weight`` may be a 0-d tensor. ``return_parts=True`` returns ``LogitParts(loss, kd, ce)``
    instead of ``loss``: the two parts, detached, for logging, at no extra cost.

    ``vocab="exact"``: ``V_s == V_t`` is required; ``"common"``: the first ``min(V_s, V_t)`` entries
    of both (checkpoints whose vocabularies differ only by padding rows; the student's other entries
    get gradient 0).

    The gradient flows to the student only; the teacher gets none. The loss is float32 (float64 for
    float64 inputs) whatever the input dtypes; the gradient has the student's dtype.
    """
    if is_dtensor(student_logits) or is_dtensor(teacher_logits):
        from fastkd.distributed import logit_kl_dtensor  # it uses this module's functions

        parts = logit_kl_dtensor(student_logits, teacher_logits, mask, labels, dict(
            temperature=temperature, reduction=reduction, divergence=divergence, beta=beta, ce_weight=ce_weight,
            vocab=vocab,
        ))
    else:
        checked = check_logit_inputs(
            student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction,
            divergence=divergence, beta=beta, labels=labels, ce_weight=ce_weight, vocab=vocab,
        )
        parts = logit_loss(*checked.tensors, **checked.keywords)
    return parts if return_parts else parts.loss


class LogitInputs(NamedTuple):
    """``logit_kl``'s arguments, checked: the tensors and keywords of :func:`logit_loss`."""

    student: torch.Tensor
    teacher: torch.Tensor
    mask_rows: torch.Tensor | None
    labels: torch.Tensor | None
    temperature: float
    divergence: str
    beta: float
    reduction: str
    ce_weight: float | torch.Tensor

    @property
    def tensors(self) -> tuple:
        return self.student, self.teacher, self.mask_rows, self.labels

    @property
    def keywords(self) -> dict:
        return dict(
            temperature=self.temperature, divergence=self.divergence, beta=self.beta, reduction=self.reduction,
            ce_weight=self.ce_weight, backend=_backend.resolve(self.student.device),
        )


def check_logit_inputs(student_logits, teacher_logits, *, temperature, mask, reduction, divergence, beta, labels,
                       ce_weight, vocab) -> LogitInputs:
    """``logit_kl``'s checks (a ValueError or TypeError naming the argument); the checked inputs,
    the logits cut to ``vocab``'s common vocabulary, ``mask`` and ``labels`` flat."""
    names = ("student_logits", "teacher_logits")
    check_float_tensor(names[0], student_logits)
    check_float_tensor(names[1], teacher_logits)
    if student_logits.dim() and teacher_logits.dim():
        vocab_size = check_vocab(vocab, student_logits.shape[-1], teacher_logits.shape[-1], names)
        student_logits, teacher_logits = student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]
    check_pair(student_logits, teacher_logits, names=names, what="logits")
    temperature = check_temperature(temperature)
    reduction = check_reduction(reduction)
    divergence, beta = check_divergence(divergence, beta)
    leading = student_logits.shape[:-1]
    what = "the logits' leading dimensions"
    mask_rows = check_mask(mask, leading, student_logits.device, what)
    labels = check_labels(labels, leading, student_logits.device, student_logits.shape[-1], what)
    ce_weight = check_ce_weight(ce_weight, labels)
    return LogitInputs(
        student_logits, teacher_logits, None if mask_rows is None else mask_rows.view(-1), labels, temperature,
        divergence, beta, reduction, ce_weight,
    )
