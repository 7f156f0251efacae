"""``fused_linear_kl``: the logit KL of two linear heads, computed without ever holding the logits.

Path: ``fused_linear_kl`` validates, picks a backend (``fastkd._backend``) and calls the custom op
``fastkd::fused_linear_kl``, which runs ``fused_linear_kl_forward``: token chunks of two GEMMs, the
backend's one-pass per-row logit kernel (``logit_forward_with_grad`` of ``fastkd/backends``) and
two gradient GEMMs. The gradients are finished in the forward pass; backward only scales them by
``grad_output``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastkd import _backend
from fastkd._layout import acc_dtype
from fastkd._validation import check_float_tensor, check_mask, check_temperature

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


def fused_linear_kl_forward(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    temperature: float,
    chunk_size: int,
    backend: str,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss and the gradients of the loss w.r.t. the student's hidden, weight and bias.

    Inputs are 2-D ``[N, D_s]``/``[N, D_t]`` hiddens, ``[V, D]`` weights, ``[V]`` biases and a
    float32 ``[N]`` mask of 0/1 (or None). For each chunk of rows::

        s, t      = h_s[c] @ W_s.T + b_s, h_t[c] @ W_t.T + b_t       (each in its own dtype)
        rows, dlogits = logit_forward_with_grad(s, t, grad_rows = m[c] / n)
                  (T^2 kl per row, masked rows 0; dlogits = T m (q - p) / n, from one read of s, t)
        grad_h[c] = dlogits @ W_s;  grad_W += dlogits.T @ h_s[c];  grad_b += sum_rows dlogits

    with ``n = max(sum m, 1)`` kept on the device. ``grad_W`` and ``grad_b`` accumulate in float32
    (float64 for float64 weights) and are returned in the weight's dtype. A gradient not asked for
    (``grad_* = False``) is returned as an empty tensor and not computed.
    """
    tokens, vocab = student_hidden.shape[0], student_weight.shape[0]
    kernels = _backend.module(backend)
    acc = acc_dtype(student_hidden, teacher_hidden)
    loss = student_hidden.new_zeros((), dtype=acc)
    n = max(tokens, 1) if mask is None else mask.sum().clamp_min(1)
    w_acc = torch.promote_types(student_weight.dtype, torch.float32)
    g_hidden = torch.empty_like(student_hidden) if grad_hidden else student_hidden.new_empty(0)
    g_weight = student_weight.new_zeros(student_weight.shape if grad_weight else 0, dtype=w_acc)
    g_bias = student_weight.new_zeros(vocab if grad_bias else 0, dtype=w_acc)
    for start in range(0, tokens, chunk_size):
        chunk = slice(start, start + chunk_size)
        hidden = student_hidden[chunk]
        student = F.linear(hidden, student_weight, student_bias).unsqueeze(0)
        teacher = F.linear(teacher_hidden[chunk], teacher_weight, teacher_bias).unsqueeze(0)
        chunk_mask = None if mask is None else mask[chunk]
        if grad_hidden or grad_weight or grad_bias:
            grad_rows = hidden.new_full((student.shape[1],), 1 / n, dtype=acc) if chunk_mask is None else chunk_mask.to(acc) / n
            rows, dlogits = kernels.logit_forward_with_grad(student, teacher, chunk_mask, temperature, grad_rows)
            dlogits = dlogits[0]
        else:
            rows, _ = kernels.logit_forward(student, teacher, chunk_mask, temperature)
        loss += rows.sum()
        del student, teacher  # free the chunk's logits before the gradient GEMMs and the next chunk
        if grad_hidden:
            torch.mm(dlogits, student_weight, out=g_hidden[chunk])
        if grad_weight:
            _addmm_acc(g_weight, dlogits.t(), hidden)
        if grad_bias:
            g_bias += dlogits.sum(0, dtype=w_acc)
    return loss / n, g_hidden, g_weight.to(student_weight.dtype), g_bias.to(student_weight.dtype)


fused_linear_kl_op = torch.library.custom_op("fastkd::fused_linear_kl", fused_linear_kl_forward, mutates_args=())


@fused_linear_kl_op.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask,
      temperature, chunk_size, backend, grad_hidden, grad_weight, grad_bias):
    return (
        student_hidden.new_empty((), dtype=acc_dtype(student_hidden, teacher_hidden)),
        student_hidden.new_empty(student_hidden.shape if grad_hidden else 0),
        student_weight.new_empty(student_weight.shape if grad_weight else 0),
        student_weight.new_empty(student_weight.shape[0] if grad_bias else 0),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.computed = inputs[-3:]


def _backward(ctx, grad_loss, *_):
    """The forward pass left d loss / d (hidden, weight, bias); scale them by ``grad_loss``."""
    grads = [g * grad_loss if done else None for g, done in zip(ctx.saved_tensors, ctx.computed)]
    g_hidden, g_weight, g_bias = grads
    return g_hidden, g_weight, g_bias, None, None, None, None, None, None, None, None, None, None


fused_linear_kl_op.register_autograd(_backward, setup_context=_setup_context)


def _check_linear(role: str, hidden: object, weight: object, bias: object) -> None:
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
) -> torch.Tensor:
    """``logit_kl(h_s @ W_s.T + b_s, h_t @ W_t.T + b_t, temperature=T, mask=mask)``, no logits held.

    ``student_hidden [..., D_s]``, ``student_weight [V, D_s]``, ``student_bias [V]``;
    ``teacher_hidden [..., D_t]`` with the student's leading shape, ``teacher_weight [V, D_t]``,
    ``teacher_bias [V]``. Each side's tensors share one dtype; the two sides may differ in width
    and dtype. ``mask``: the leading shape, nonzero = valid token. With ``s``, ``t`` the logits::

        p = softmax(t_i / T), q = softmax(s_i / T), kl_i = sum_v p_v (log p_v - log q_v)
        loss = T^2 * sum_i m_i kl_i / max(sum_i m_i, 1)

    The tokens are processed ``chunk_size`` rows at a time (default: ``default_chunk_size``, about
    2^22 logits per chunk on CPU, 2^28 on CUDA), so no ``[tokens, V]`` tensor exists. Gradients flow
    to the student's hidden, weight and bias; the teacher's tensors get none (they are constants).
    The loss is float32 (float64 for float64 inputs); no step synchronises with the host.
    """
    _check_linear("student", student_hidden, student_weight, student_bias)
    _check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"teacher_weight: vocabulary size V_t={teacher_weight.shape[0]} differs from "
            f"student_weight's V_s={student_weight.shape[0]}"
        )
    leading = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != leading:
        raise ValueError(
            f"teacher_hidden: leading shape {tuple(teacher_hidden.shape[:-1])} differs from "
            f"student_hidden's {tuple(leading)}"
        )
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher_hidden: on {teacher_hidden.device}, but student_hidden is on {student_hidden.device}")
    temperature = check_temperature(temperature)
    mask_rows = check_mask(mask, leading, student_hidden.device, "student_hidden's leading dimensions")
    tokens = leading.numel()
    if chunk_size is None:
        chunk_size = default_chunk_size(tokens, student_weight.shape[0], student_hidden.device)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size: expected an int or None, got {type(chunk_size).__name__}")
    elif chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive number of rows, got {chunk_size}")
    grad = torch.is_grad_enabled()
    loss, _, _, _ = fused_linear_kl_op(
        student_hidden.reshape(tokens, student_hidden.shape[-1]),
        student_weight,
        student_bias,
        teacher_hidden.detach().reshape(tokens, teacher_hidden.shape[-1]),
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        None if mask_rows is None else mask_rows.view(-1),
        temperature,
        chunk_size,
        _backend.resolve(student_hidden.device),
        grad and student_hidden.requires_grad,
        grad and student_weight.requires_grad,
        grad and student_bias is not None and student_bias.requires_grad,
    )
    return loss


class FusedLinearKLLoss(nn.Module):
    """``fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, ...)``
    with ``temperature`` and ``chunk_size`` fixed at construction."""

    def __init__(self, *, temperature: float = 1.0, chunk_size: int | None = None):
        super().__init__()
        self.temperature, self.chunk_size = temperature, chunk_size

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None, *,
                student_bias=None, teacher_bias=None):
        return fused_linear_kl(
            student_hidden, student_weight, teacher_hidden, teacher_weight,
            student_bias=student_bias, teacher_bias=teacher_bias, temperature=self.temperature,
            mask=mask, chunk_size=self.chunk_size,
        )
