"""``fused_linear_kl``: the logit KL of two linear heads, computed without ever holding the logits.

Path: ``fused_linear_kl`` validates, picks a backend (``fastkd._backend``) and calls the custom op
``fastkd::fused_linear_kl``, which runs ``fused_linear_kl_forward``: token chunks of two GEMMs, the
backend's one-pass per-row logit kernel (``logit_forward_with_grad`` of ``fastkd/backends``) and
two gradient GEMMs. The gradients are finished in the forward pass; backward only scales them by
``grad_output``.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastkd import _backend
from fastkd._layout import acc_dtype
from fastkd._validation import (
    check_ce_weight,
    check_divergence,
    check_float_tensor,
    check_labels,
    check_mask,
    check_temperature,
    check_vocab,
)
from fastkd.distributed import check_same_mesh, full_head
from fastkd.logit import LogitParts, labelled_rows

# Logit elements (rows x V) of one token chunk: 2^22 (16 MiB as float32) on CPU, where small
# chunks cost no speed; 2^28 on CUDA, where each chunk re-reads both weights and the float32
# weight-gradient accumulator, so that ~2000 rows are needed to keep the GEMMs near peak.
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 28}


def default_chunk_size(tokens: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: ``max(1, min(tokens, CHUNK_ELEMENTS[device] // vocab))``.

    A chunk holds the teacher's and the student's logits and the student's logit gradient,
    ``[chunk, V]`` each, so the memory beyond the inputs and the gradients stays below about
    ``3 * CHUNK_ELEMENTS * 4`` bytes (192 MiB on CPU, 3 GiB on CUDA) whatever the number of
    tokens.
    """
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"])
    return max(1, min(tokens, budget // vocab))


def _addmm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in float32 (float64) also when ``a``, ``b`` are bf16/fp16.

    On CUDA cuBLAS writes a float32 result from low-precision inputs (``out_dtype``); elsewhere
    the chunk is upcast, which costs memory of the chunk's size only.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _head_logits(hidden, weight, bias, scale, softcap):
    """``z = (hidden @ weight.T + bias) * scale``, then ``softcap * tanh(z / softcap)`` when a
    softcap is given: the logits of a transformed head, ``[1, rows, V]``, computed in place."""
    logits = F.linear(hidden, weight, bias)
    if scale != 1.0:
        logits.mul_(scale)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits.unsqueeze(0)


def _head_grad(dlogits, logits, scale, softcap):
    """d loss / d (hidden @ weight.T + bias) from d loss / d logits, in place: through the softcap,
    ``d/dz [c tanh(z / c)] = 1 - (logits / c)^2``, and the scale. ``logits`` is overwritten."""
    if softcap is not None:
        dlogits.mul_(logits.div_(softcap).square_().neg_().add_(1))
    if scale != 1.0:
        dlogits.mul_(scale)
    return dlogits


def head_chunks(student_hidden, student_weight, student_bias, student_head, chunk_size, grads, row_pass):
    """The chunk loop of the fused-linear losses: for each chunk ``c`` of rows::

        s         = head_s(h_s[c])                      (_head_logits; [1, chunk, V])
        rows, ce_rows, dlogits = row_pass(c, s, grads)  (a backend's row kernel: d loss / d s
                                                         when a gradient is asked for, else None)
        dz        = _head_grad(dlogits)                 (through the softcap and the scale)
        grad_h[c] = dz @ W_s;  grad_W += dz.T @ h_s[c];  grad_b += sum_rows dz

    ``grads = (hidden, weight, bias)``: which gradients to compute. Returns the sums of ``rows``
    and ``ce_rows`` over all chunks and the three gradients (an empty tensor where not asked for).
    ``grad_W`` and ``grad_b`` accumulate in float32 (float64 for float64 weights) and are returned
    in the weight's dtype.
    """
    grad_hidden, grad_weight, grad_bias = grads
    tokens, vocab = student_hidden.shape[0], student_weight.shape[0]
    w_acc = torch.promote_types(student_weight.dtype, torch.float32)
    g_hidden = torch.empty_like(student_hidden) if grad_hidden else student_hidden.new_empty(0)
    g_weight = student_weight.new_zeros(student_weight.shape if grad_weight else 0, dtype=w_acc)
    g_bias = student_weight.new_zeros(vocab if grad_bias else 0, dtype=w_acc)
    rows_sum = ce_sum = 0
    for start in range(0, tokens, chunk_size):
        chunk = slice(start, start + chunk_size)
        hidden = student_hidden[chunk]
        student = _head_logits(hidden, student_weight, student_bias, *student_head)
        rows, ce_rows, dlogits = row_pass(chunk, student, any(grads))
        rows_sum = rows_sum + rows.sum()
        ce_sum = ce_sum + ce_rows.sum()
        if dlogits is not None:
            dlogits = _head_grad(dlogits[0], student[0], *student_head)
        del student  # free the chunk's logits before the gradient GEMMs and the next chunk
        if grad_hidden:
            torch.mm(dlogits, student_weight, out=g_hidden[chunk])
        if grad_weight:
            _addmm_acc(g_weight, dlogits.t(), hidden)
        if grad_bias:
            g_bias += dlogits.sum(0, dtype=w_acc)
    return rows_sum, ce_sum, g_hidden, g_weight.to(student_weight.dtype), g_bias.to(student_weight.dtype)


def finish_head_loss(kd_sum, ce_sum, n, n_ce, weights):
    """``(w_kd kd + w_ce ce, kd, ce)`` from the row sums (``ce`` is ``[0]`` without labels)."""
    kd = kd_sum / n
    loss = weights[0] * kd
    ce = kd.new_empty(0)
    if n_ce is not None:
        ce = ce_sum / n_ce
        loss = loss + weights[1] * ce
    return loss, kd, ce


def fused_linear_kl_forward(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    weights: torch.Tensor,
    temperature: float,
    divergence: str,
    beta: float,
    student_logit_scale: float,
    student_softcap: float | None,
    teacher_logit_scale: float,
    teacher_softcap: float | None,
    chunk_size: int,
    backend: str,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss, its parts and the gradients of the loss w.r.t. the student's hidden, weight and bias.

    Inputs are 2-D ``[N, D_s]``/``[N, D_t]`` hiddens, ``[V, D]`` weights, ``[V]`` biases, a float32
    ``[N]`` mask of 0/1 (or None), int64 ``[N]`` labels (or None) and ``weights = [w_kd, w_ce]``
    (a ``[2]`` tensor of the loss's dtype). ``head_chunks`` runs the chunks; each chunk's row pass
    computes the teacher's logits ``t = head_t(h_t[c])`` and, from one read of ``s`` and ``t``,
    the divergence and the cross-entropy per row and ``d loss / d s`` (``logit_forward_with_grad``
    with ``grad_rows = w_kd / n``, ``grad_ce_rows = w_ce / n_ce``), with ``n = max(sum m, 1)`` and
    ``n_ce = max(rows with a label and a valid mask, 1)`` kept on the device. Returns
    ``(w_kd kd + w_ce ce, kd, ce)`` (``ce`` is ``[0]`` without labels) and the gradients (an empty
    tensor where ``grad_*`` is False).
    """
    tokens = student_hidden.shape[0]
    kernels = _backend.module(backend)
    n = max(tokens, 1) if mask is None else mask.sum().clamp_min(1)
    n_ce = None if labels is None else labelled_rows(labels, mask)
    options = (temperature, divergence, beta)

    def row_pass(chunk, student, with_grad):
        teacher = _head_logits(teacher_hidden[chunk], teacher_weight, teacher_bias, teacher_logit_scale, teacher_softcap)
        chunk_mask = None if mask is None else mask[chunk]
        chunk_labels = None if labels is None else labels[chunk]
        if not with_grad:
            return *kernels.logit_forward(student, teacher, chunk_mask, *options, chunk_labels)[:2], None
        rows_in_chunk = student.shape[1]  # masked rows' weights are not read: the kernel writes 0 there
        grad_rows = (weights[0] / n).expand(rows_in_chunk).contiguous()
        grad_ce_rows = None if labels is None else (weights[1] / n_ce).expand(rows_in_chunk).contiguous()
        return kernels.logit_forward_with_grad(student, teacher, chunk_mask, *options, chunk_labels, grad_rows, grad_ce_rows)

    kd_sum, ce_sum, *grads = head_chunks(
        student_hidden, student_weight, student_bias, (student_logit_scale, student_softcap), chunk_size,
        (grad_hidden, grad_weight, grad_bias), row_pass,
    )
    return (*finish_head_loss(kd_sum, ce_sum, n, n_ce, weights), *grads)


def register_head_autograd(op, inputs: int) -> None:
    """The forward of a fused-linear op left d loss / d (hidden, weight, bias) as its outputs 3..5;
    backward scales them by ``grad_loss``. The op's last three inputs say which were computed."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output[3:])
        ctx.computed = inputs[-3:]

    def backward(ctx, grad_loss, *_):
        grads = [g * grad_loss if done else None for g, done in zip(ctx.saved_tensors, ctx.computed)]
        return (*grads, *(None,) * (inputs - 3))

    op.register_autograd(backward, setup_context=setup_context)


def fake_head_outputs(student_hidden, student_weight, acc, labels, grads):
    scalar = student_hidden.new_empty((), dtype=acc)
    grad_hidden, grad_weight, grad_bias = grads
    return (
        scalar,
        torch.empty_like(scalar),
        scalar.new_empty(() if labels is not None else 0),
        student_hidden.new_empty(student_hidden.shape if grad_hidden else 0),
        student_weight.new_empty(student_weight.shape if grad_weight else 0),
        student_weight.new_empty(student_weight.shape[0] if grad_bias else 0),
    )


fused_linear_kl_op = torch.library.custom_op("fastkd::fused_linear_kl", fused_linear_kl_forward, mutates_args=())


@fused_linear_kl_op.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask, labels,
      weights, temperature, divergence, beta, student_logit_scale, student_softcap, teacher_logit_scale,
      teacher_softcap, chunk_size, backend, grad_hidden, grad_weight, grad_bias):
    acc = acc_dtype(student_hidden, teacher_hidden)
    return fake_head_outputs(student_hidden, student_weight, acc, labels, (grad_hidden, grad_weight, grad_bias))


register_head_autograd(fused_linear_kl_op, 21)


def check_linear(role: str, hidden: object, weight: object, bias: object) -> None:
    """``{role}_hidden [..., D]``, ``{role}_weight [V, D]``, ``{role}_bias [V]`` or None: one dtype."""
    check_float_tensor(f"{role}_hidden", hidden)
    check_float_tensor(f"{role}_weight", weight)
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"{role}_hidden: expected shape [..., D] with D > 0, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"{role}_weight: expected a 2-D [V, D] tensor with V > 0, got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{role}_weight: width {weight.shape[1]} (shape {tuple(weight.shape)}) does not match "
            f"{role}_hidden's last dimension {hidden.shape[-1]} (shape {tuple(hidden.shape)})"
        )
    tensors = [(f"{role}_hidden", hidden), (f"{role}_weight", weight)]
    if bias is not None:
        check_float_tensor(f"{role}_bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{role}_bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        tensors.append((f"{role}_bias", bias))
    for name, x in tensors[1:]:
        if x.dtype != hidden.dtype:
            raise TypeError(f"{name}: dtype {x.dtype} differs from {role}_hidden's {hidden.dtype}")
        if x.device != hidden.device:
            raise ValueError(f"{name}: on {x.device}, but {role}_hidden is on {hidden.device}")


def check_head(role: str, logit_scale: object, softcap: object) -> tuple[float, float | None]:
    """``{role}_logit_scale``: a finite float > 0; ``{role}_softcap``: None or a finite float > 0."""
    for name, value, optional in ((f"{role}_logit_scale", logit_scale, False), (f"{role}_softcap", softcap, True)):
        if value is None and optional:
            continue
        if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a Python float{' or None' if optional else ''}, got {type(value).__name__}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(logit_scale), None if softcap is None else float(softcap)


def check_chunk_size(chunk_size: object, tokens: int, vocab: int, device: torch.device) -> int:
    """``chunk_size``: a positive int, or None for ``default_chunk_size``."""
    if chunk_size is None:
        return default_chunk_size(tokens, vocab, device)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size: expected an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive number of rows, got {chunk_size}")
    return chunk_size


def head_rows(weight: torch.Tensor, bias: torch.Tensor | None, vocab: int):
    """The first ``vocab`` rows of a head's weight and bias (views): ``vocab="common"``'s head."""
    return weight[:vocab], None if bias is None else bias[:vocab]


def fused_linear_loss(
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask_rows, labels, *, student_bias,
    teacher_bias, temperature, divergence, beta, chunk_size, student_head, teacher_head, kd_weight=1.0,
    ce_weight=0.0, backend,
) -> LogitParts:
    """``kd_weight * KD + ce_weight * CE`` of validated inputs (2-D hiddens, flat ``mask_rows`` and
    ``labels`` or None, heads ``(logit_scale, softcap)``), with its parts: the body of
    ``fused_linear_kl`` (``kd_weight`` 1) and of the runner's logit stages (the weights may be 0-d
    device tensors)."""
    acc = acc_dtype(student_hidden, teacher_hidden)
    weights = torch.stack([torch.as_tensor(w, dtype=acc, device=student_hidden.device) for w in (kd_weight, ce_weight)])
    grad = torch.is_grad_enabled()
    loss, kd, ce, _, _, _ = fused_linear_kl_op(
        student_hidden, student_weight, student_bias, teacher_hidden.detach(), teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(), mask_rows, labels, weights, temperature,
        divergence, beta, *student_head, *teacher_head, chunk_size, backend,
        grad and student_hidden.requires_grad,
        grad and student_weight.requires_grad,
        grad and student_bias is not None and student_bias.requires_grad,
    )
    return LogitParts(loss, kd.detach(), None if labels is None else ce.detach())


def fused_linear_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    divergence: str = "forward",
    beta: float | None = None,
    labels: torch.Tensor | None = None,
    ce_weight: float | torch.Tensor = 0.0,
    vocab: str = "exact",
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    return_parts: bool = False,
) -> torch.Tensor | LogitParts:
    """``logit_kl(head_s(h_s), head_t(h_t), ...)`` with the same options, no logits held.

    ``student_hidden [..., D_s]``, ``student_weight [V, D_s]``, ``student_bias [V]``;
    ``teacher_hidden [..., D_t]`` with the student's leading shape, ``teacher_weight [V, D_t]``,
    ``teacher_bias [V]``. Each side's tensors share one dtype; the two sides may differ in width
    and dtype. ``mask``: the leading shape, nonzero = valid token. Each side's logits are::

        z = (h @ W.T + b) * logit_scale;   logits = softcap * tanh(z / softcap)  (softcap None: z)

    (Gemma-2/3's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's
    ``1 / logits_scaling``). Then, as ``logit_kl`` with ``reduction="mean"``: ``divergence`` and
    ``beta`` choose the divergence of each row (``"forward"``: ``T^2 KL(p || q)``, ``"reverse"``,
    ``"jsd"``, ``"tvd"``; see ``logit_kl``), ``loss = sum_i m_i r_i / max(sum_i m_i, 1)``, plus
    ``ce_weight`` times the mean hard-label cross-entropy of the student's logits at T = 1 over the
    rows with a label (``labels``: integer, the leading shape, -100 ignored); ``vocab="common"``
    compares the first ``min(V_s, V_t)`` rows of the heads; ``return_parts=True`` returns
    ``LogitParts(loss, kd, ce)``.

    The tokens are processed ``chunk_size`` rows at a time (default: ``default_chunk_size``, about
    2^22 logits per chunk on CPU, 2^28 on CUDA), so no ``[tokens, V]`` tensor exists. Gradients flow
    to the student's hidden, weight and bias (through the softcap's tanh exactly); the teacher's
    tensors get none (they are constants). The loss is float32 (float64 for float64 inputs); no step
    synchronises with the host.
    """
    check_same_mesh("teacher_weight", teacher_weight, "student_weight", student_weight)
    student_weight, student_bias = full_head("student", student_weight, student_bias)
    teacher_weight, teacher_bias = full_head("teacher", teacher_weight, teacher_bias)
    check_linear("student", student_hidden, student_weight, student_bias)
    check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
    vocab_size = check_vocab(vocab, student_weight.shape[0], teacher_weight.shape[0], ("student_weight", "teacher_weight"))
    leading = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != leading:
        raise ValueError(
            f"teacher_hidden: leading shape {tuple(teacher_hidden.shape[:-1])} differs from "
            f"student_hidden's {tuple(leading)}"
        )
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher_hidden: on {teacher_hidden.device}, but student_hidden is on {student_hidden.device}")
    temperature = check_temperature(temperature)
    divergence, beta = check_divergence(divergence, beta)
    student_head = check_head("student", student_logit_scale, student_softcap)
    teacher_head = check_head("teacher", teacher_logit_scale, teacher_softcap)
    what = "student_hidden's leading dimensions"
    mask_rows = check_mask(mask, leading, student_hidden.device, what)
    labels = check_labels(labels, leading, student_hidden.device, vocab_size, what)
    ce_weight = check_ce_weight(ce_weight, labels)
    tokens = leading.numel()
    chunk_size = check_chunk_size(chunk_size, tokens, vocab_size, student_hidden.device)

    student_weight, student_bias = head_rows(student_weight, student_bias, vocab_size)
    teacher_weight, teacher_bias = head_rows(teacher_weight, teacher_bias, vocab_size)
    parts = fused_linear_loss(
        student_hidden.reshape(tokens, student_hidden.shape[-1]), student_weight,
        teacher_hidden.reshape(tokens, teacher_hidden.shape[-1]), teacher_weight,
        None if mask_rows is None else mask_rows.view(-1), labels, student_bias=student_bias,
        teacher_bias=teacher_bias, temperature=temperature, divergence=divergence, beta=beta,
        chunk_size=chunk_size, student_head=student_head, teacher_head=teacher_head, ce_weight=ce_weight,
        backend=_backend.resolve(student_hidden.device),
    )
    return parts if return_parts else parts.loss


# fused_linear_kl's keyword options that FusedLinearKLLoss fixes (the tensors are forward's)
MODULE_OPTIONS = tuple(
    name for name, parameter in inspect.signature(fused_linear_kl).parameters.items()
    if parameter.kind is parameter.KEYWORD_ONLY and name not in ("student_bias", "teacher_bias", "mask", "labels")
)


class FusedLinearKLLoss(nn.Module):
    """``fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, mask=mask,
    labels=labels, ...)`` with the keyword options of ``fused_linear_kl`` (``temperature``,
    ``chunk_size``, ``divergence``, ``beta``, ``ce_weight``, ``vocab``, the softcaps and logit
    scales) fixed at construction."""

    def __init__(self, **options):
        super().__init__()
        unknown = sorted(set(options) - set(MODULE_OPTIONS))
        if unknown:
            raise TypeError(f"FusedLinearKLLoss: unknown options {unknown}; expected some of {list(MODULE_OPTIONS)}")
        self.options = options

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None, *,
                student_bias=None, teacher_bias=None, labels=None):
        return fused_linear_kl(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, mask=mask, labels=labels, **self.options,
        )
