"""``sparse_logit_kl`` and ``fused_linear_sparse_kl``: the logit KL against a teacher stored as its
top-k log-probabilities (an offline teacher, ``fastkd.offline``), from one pass over the student's
logits, or chunk by chunk from the student's head without ever holding them.

Path: ``sparse_logit_kl`` validates (``fastkd._validation``), picks a backend (``fastkd._backend``)
and calls ``sparse_loss``, which runs the custom op ``fastkd::sparse_kl_rows`` (or, on the one-pass
path of ``fastkd._one_pass``, ``fastkd::sparse_kl_rows_with_grad``). The kernels live in
``fastkd/backends/<backend>`` (``sparse_forward`` / ``sparse_backward`` / ``sparse_forward_with_grad``).
``fused_linear_sparse_kl`` runs the custom op ``fastkd::fused_linear_sparse_kl``: the chunk loop of
``fastkd.fused_linear`` with the sparse row kernel, the gradients finished in the forward pass.

The hard-label cross-entropy is the same kernel against a one-entry teacher: ``labels`` as the
stored id with log-probability 0 at T = 1 gives ``p = 1`` there and the row value
``-log softmax(s)[label]``. It is a second row pass over the logits (``hard_label_teacher``).
"""

from __future__ import annotations

import math

import torch

from fastkd import _backend, _one_pass
from fastkd._layout import acc_dtype, rows_view
from fastkd._reduction import row_weights
from fastkd._validation import (
    PADDING_ID,
    check_ce_weight,
    check_float_tensor,
    check_labels,
    check_mask,
    check_reduction,
    check_sparse_teacher,
    check_tail,
    check_temperature,
)
from fastkd.distributed import full_head
from fastkd.fused_linear import (
    check_chunk_size,
    check_head,
    check_linear,
    fake_head_outputs,
    finish_head_loss,
    head_chunks,
    register_head_autograd,
)
from fastkd.logit import LogitParts, labelled_rows, logit_parts


@torch.library.custom_op("fastkd::sparse_kl_rows", mutates_args=())
def sparse_kl_rows(
    student: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    tail: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the divergence from the stored teacher (masked rows 0) and the ``[2, rows]``
    stats backward needs (``fastkd.backends``)."""
    return _backend.module(backend).sparse_forward(rows_view(student), ids, logprobs, mask, temperature, tail)


@sparse_kl_rows.register_fake
def _(student, ids, logprobs, mask, temperature, tail, backend):
    rows = math.prod(student.shape[:-1])
    return student.new_empty(rows, dtype=logprobs.dtype), student.new_empty(2, rows, dtype=torch.float64)


@torch.library.custom_op("fastkd::sparse_kl_rows_backward", mutates_args=())
def sparse_kl_rows_backward(
    student: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    tail: str,
    stats: torch.Tensor,
    grad_rows: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """d loss / d student = grad_rows * d rows / d s."""
    grad = _backend.module(backend).sparse_backward(
        rows_view(student), ids, logprobs, mask, temperature, tail, stats, grad_rows.contiguous()
    )
    return grad.view(student.shape)


@sparse_kl_rows_backward.register_fake
def _(student, ids, logprobs, mask, temperature, tail, stats, grad_rows, backend):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    student, ids, logprobs, mask, temperature, tail, backend = inputs
    ctx.save_for_backward(student, ids, logprobs, mask, output[1])
    ctx.options = temperature, tail
    ctx.backend = backend


def _backward(ctx, grad_rows, grad_stats):
    student, ids, logprobs, mask, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = sparse_kl_rows_backward(student, ids, logprobs, mask, *ctx.options, stats, grad_rows, ctx.backend)
    return grad, None, None, None, None, None, None


sparse_kl_rows.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastkd::sparse_kl_rows_with_grad", mutates_args=())
def sparse_kl_rows_with_grad(
    student: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    tail: str,
    grad_rows: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``sparse_kl_rows`` and, from the same read, the gradient of the backward."""
    rows, grad = _backend.module(backend).sparse_forward_with_grad(
        rows_view(student), ids, logprobs, mask, temperature, tail, grad_rows
    )
    return rows, grad.view(student.shape)


@sparse_kl_rows_with_grad.register_fake
def _(student, ids, logprobs, mask, temperature, tail, grad_rows, backend):
    rows, _ = sparse_kl_rows(student, ids, logprobs, mask, temperature, tail, backend)
    return rows, torch.empty_like(student, memory_format=torch.contiguous_format)


def hard_label_teacher(labels: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-entry teacher whose ``"renormalize"`` divergence at T = 1 is the hard-label
    cross-entropy ``-log softmax(s)[label]``: ids ``[rows, 1]`` (``-1`` where the label is
    ignored) and log-probabilities 0."""
    ids = torch.where(labels >= 0, labels, PADDING_ID)[:, None].contiguous()
    return ids, torch.zeros(ids.shape, dtype=dtype, device=labels.device)


def sparse_loss(
    student: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    mask_rows: torch.Tensor | None,
    labels: torch.Tensor | None,
    *,
    temperature: float,
    tail: str,
    reduction: str,
    kd_weight: float | torch.Tensor = 1.0,
    ce_weight: float | torch.Tensor = 0.0,
    backend: str,
) -> LogitParts:
    """``kd_weight * KD + ce_weight * CE`` of validated inputs (``ids``/``logprobs`` ``[rows, k]``,
    ``logprobs`` of the loss's dtype; ``mask_rows``, ``labels`` flat or None), with its parts."""
    shape = tuple(student.shape[:-1])
    logprobs = logprobs.detach()
    labelled = labelled_rows(labels, mask_rows) if labels is not None and reduction == "mean" else None
    passes = [(ids, logprobs, temperature, tail)]
    if labels is not None:
        passes.append((*hard_label_teacher(labels, logprobs.dtype), 1.0, "renormalize"))

    if _one_pass.applies([student], reduction):
        expected = _one_pass.expected_tensor(logprobs.dtype, student.device)
        weights = [row_weights([shape], mask_rows, reduction, None, expected * kd_weight)]
        if labels is not None:
            weight = expected * ce_weight if reduction == "sum" else expected * ce_weight / labelled
            weights.append(weight.expand(labels.shape[0]).contiguous())
        out, grad = [], None
        for (teacher_ids, teacher_logprobs, t, how), grad_rows in zip(passes, weights):
            rows, pass_grad = sparse_kl_rows_with_grad(
                student.detach(), teacher_ids, teacher_logprobs, mask_rows, t, how, grad_rows, backend
            )
            out.append(rows)
            grad = pass_grad if grad is None else grad.add_(pass_grad)
        result = logit_parts(out[0], out[-1], shape, mask_rows, labels, labelled, reduction, kd_weight, ce_weight)
        return result._replace(loss=_one_pass.with_gradients(result.loss, [student], [grad], expected, backend))
    out = [
        sparse_kl_rows(student, teacher_ids, teacher_logprobs, mask_rows, t, how, backend)[0]
        for teacher_ids, teacher_logprobs, t, how in passes
    ]
    return logit_parts(out[0], out[-1], shape, mask_rows, labels, labelled, reduction, kd_weight, ce_weight)


def sparse_logit_kl(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    tail: str = "renormalize",
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    ce_weight: float | torch.Tensor = 0.0,
    return_parts: bool = False,
) -> torch.Tensor | LogitParts:
    """The KL from a teacher stored as its top-k log-probabilities to the student's distribution.

    ``student_logits [..., V]``; ``teacher_ids [..., k]`` (int32/int64): the teacher's stored token
    ids per row, distinct, in ``[0, V)``, or ``-1`` for padding (a row that kept fewer than k; the
    entry is ignored whatever its log-probability); ``teacher_logprobs [..., k]`` (any float dtype):
    the teacher's log-probabilities at T = 1 of those ids, as ``log_softmax`` of its full logits
    gives them (``fastkd.topk_logprobs``) and inference servers return them. ``q = softmax(s / T)``
    over the student's whole vocabulary. Per row, over the stored entries ``j``:

    - ``tail="renormalize"`` (default): ``p = softmax(teacher_logprobs / T)`` over the stored ids,
      ``r_i = T^2 sum_j p_j (log p_j - log q_{id_j})``;
    - ``tail="bucket"`` (``temperature=1`` only): ``p_j = exp(teacher_logprobs_j)``, the rest of
      each distribution in one tail class, ``p_tail = max(1 - sum_j p_j, 0)``,
      ``q_tail = 1 - sum_j q_{id_j}``: ``r_i = sum_j p_j (log p_j - log q_{id_j})
      + p_tail (log p_tail - log q_tail)``, with ``0 log 0 = 0``, ``log q_tail`` taken of
      ``max(q_tail, 1.1754944e-38)``, and no tail term when the ids cover the vocabulary.

    A row with no stored entry of finite log-probability contributes 0. ``mask``, ``reduction``,
    ``labels``, ``ce_weight`` and ``return_parts`` as for ``fastkd.logit_kl`` (the cross-entropy is
    a second pass over the logits here: the label is a one-entry teacher). The gradient flows to the
    student only; the loss is float32 (float64 for a float64 student).
    """
    check_float_tensor("student_logits", student_logits)
    if student_logits.dim() == 0 or student_logits.shape[-1] == 0:
        raise ValueError(f"student_logits: expected shape [..., V] with V > 0, got {tuple(student_logits.shape)}")
    temperature = check_temperature(temperature)
    tail = check_tail(tail, temperature)
    reduction = check_reduction(reduction)
    leading, vocab, device = student_logits.shape[:-1], student_logits.shape[-1], student_logits.device
    what = "the logits' leading dimensions"
    ids, logprobs = check_sparse_teacher(teacher_ids, teacher_logprobs, leading, device, vocab, what)
    mask_rows = check_mask(mask, leading, device, what)
    labels = check_labels(labels, leading, device, vocab, what)
    ce_weight = check_ce_weight(ce_weight, labels)
    parts = sparse_loss(
        student_logits, ids, logprobs.to(acc_dtype(student_logits)),
        None if mask_rows is None else mask_rows.view(-1), labels, temperature=temperature, tail=tail,
        reduction=reduction, ce_weight=ce_weight, backend=_backend.resolve(device),
    )
    return parts if return_parts else parts.loss


def fused_linear_sparse_kl_forward(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    weights: torch.Tensor,
    temperature: float,
    tail: str,
    student_logit_scale: float,
    student_softcap: float | None,
    chunk_size: int,
    backend: str,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss, its parts and the student's gradients, chunk by chunk (``fused_linear.head_chunks``):
    each chunk's row pass runs ``sparse_forward_with_grad`` on the chunk's student logits with
    ``grad_rows = w_kd / n`` (and, with labels, again against the hard-label teacher with
    ``w_ce / n_ce``). Inputs as for ``fused_linear_kl_forward``, with the teacher's ``ids`` and
    ``logprobs`` ``[N, k]`` instead of its head; no teacher GEMM."""
    kernels = _backend.module(backend)
    n = max(student_hidden.shape[0], 1) if mask is None else mask.sum().clamp_min(1)
    n_ce = None if labels is None else labelled_rows(labels, mask)
    passes = [(ids, logprobs, temperature, tail, weights[0] / n)]
    if labels is not None:
        passes.append((*hard_label_teacher(labels, logprobs.dtype), 1.0, "renormalize", weights[1] / n_ce))

    def row_pass(chunk, student, with_grad):
        chunk_mask = None if mask is None else mask[chunk]
        out, grad = [], None
        for teacher_ids, teacher_logprobs, t, how, weight in passes:
            teacher = (teacher_ids[chunk], teacher_logprobs[chunk], chunk_mask, t, how)
            if with_grad:
                rows, pass_grad = kernels.sparse_forward_with_grad(
                    student, *teacher, weight.expand(student.shape[1]).contiguous()
                )
                grad = pass_grad if grad is None else grad.add_(pass_grad)
            else:
                rows, _ = kernels.sparse_forward(student, *teacher)
            out.append(rows)
        return out[0], out[1] if labels is not None else out[0].new_empty(0), grad

    kd_sum, ce_sum, *grads = head_chunks(
        student_hidden, student_weight, student_bias, (student_logit_scale, student_softcap), chunk_size,
        (grad_hidden, grad_weight, grad_bias), row_pass,
    )
    return (*finish_head_loss(kd_sum, ce_sum, n, n_ce, weights), *grads)


fused_linear_sparse_kl_op = torch.library.custom_op(
    "fastkd::fused_linear_sparse_kl", fused_linear_sparse_kl_forward, mutates_args=()
)


@fused_linear_sparse_kl_op.register_fake
def _(student_hidden, student_weight, student_bias, ids, logprobs, mask, labels, weights, temperature, tail,
      student_logit_scale, student_softcap, chunk_size, backend, grad_hidden, grad_weight, grad_bias):
    return fake_head_outputs(student_hidden, student_weight, logprobs.dtype, labels, (grad_hidden, grad_weight, grad_bias))


register_head_autograd(fused_linear_sparse_kl_op, 17)


def fused_linear_sparse_loss(
    student_hidden, student_weight, ids, logprobs, mask_rows, labels, *, student_bias, temperature, tail,
    chunk_size, student_head, kd_weight=1.0, ce_weight=0.0, backend,
) -> LogitParts:
    """``kd_weight * KD + ce_weight * CE`` of validated inputs (a 2-D hidden, ``[N, k]`` ids and
    log-probabilities of the loss's dtype, flat ``mask_rows`` and ``labels`` or None, the head
    ``(logit_scale, softcap)``), with its parts: the body of ``fused_linear_sparse_kl`` and of the
    runner's logit stages from an offline teacher."""
    weights = torch.stack([torch.as_tensor(w, dtype=logprobs.dtype, device=student_hidden.device) for w in (kd_weight, ce_weight)])
    grad = torch.is_grad_enabled()
    loss, kd, ce, _, _, _ = fused_linear_sparse_kl_op(
        student_hidden, student_weight, student_bias, ids, logprobs.detach(), mask_rows, labels, weights,
        temperature, tail, *student_head, chunk_size, backend,
        grad and student_hidden.requires_grad,
        grad and student_weight.requires_grad,
        grad and student_bias is not None and student_bias.requires_grad,
    )
    return LogitParts(loss, kd.detach(), None if labels is None else ce.detach())


def fused_linear_sparse_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    tail: str = "renormalize",
    chunk_size: int | None = None,
    labels: torch.Tensor | None = None,
    ce_weight: float | torch.Tensor = 0.0,
    student_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    return_parts: bool = False,
) -> torch.Tensor | LogitParts:
    """``sparse_logit_kl(head_s(h_s), teacher_ids, teacher_logprobs, ...)`` with ``reduction="mean"``,
    no logits held and no teacher head run.

    ``student_hidden [..., D]``, ``student_weight [V, D]``, ``student_bias [V]`` (one dtype);
    ``teacher_ids``, ``teacher_logprobs``: ``[..., k]`` with the hidden's leading shape (see
    ``sparse_logit_kl`` for them, ``tail`` and the formulas). The student's logits are
    ``softcap * tanh(z / softcap)`` with ``z = (h @ W.T + b) * logit_scale`` (``softcap`` None: ``z``),
    as in ``fused_linear_kl``. The tokens are processed ``chunk_size`` rows at a time (default: about
    2^22 logits per chunk on CPU, 2^28 on CUDA), so no ``[tokens, V]`` tensor exists and the whole
    loss costs the student's head GEMMs (forward, and two for the gradients). ``labels``,
    ``ce_weight``, ``return_parts`` as for ``fused_linear_kl``. Gradients flow to the hidden, the
    weight and the bias; nothing synchronises with the host.
    """
    student_weight, student_bias = full_head("student", student_weight, student_bias)
    check_linear("student", student_hidden, student_weight, student_bias)
    temperature = check_temperature(temperature)
    tail = check_tail(tail, temperature)
    student_head = check_head("student", student_logit_scale, student_softcap)
    leading, vocab, device = student_hidden.shape[:-1], student_weight.shape[0], student_hidden.device
    what = "student_hidden's leading dimensions"
    ids, logprobs = check_sparse_teacher(teacher_ids, teacher_logprobs, leading, device, vocab, what)
    mask_rows = check_mask(mask, leading, device, what)
    labels = check_labels(labels, leading, device, vocab, what)
    ce_weight = check_ce_weight(ce_weight, labels)
    tokens = leading.numel()
    parts = fused_linear_sparse_loss(
        student_hidden.reshape(tokens, student_hidden.shape[-1]), student_weight, ids,
        logprobs.to(acc_dtype(student_hidden)), None if mask_rows is None else mask_rows.view(-1), labels,
        student_bias=student_bias, temperature=temperature, tail=tail,
        chunk_size=check_chunk_size(chunk_size, tokens, vocab, device), student_head=student_head,
        ce_weight=ce_weight, backend=_backend.resolve(device),
    )
    return parts if return_parts else parts.loss
