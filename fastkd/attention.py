"""``attention_kl``: KL divergence between the teacher's and the student's attention distributions.

Path: ``attention_kl`` validates (``fastkd._validation``), picks a backend (``fastkd._backend``) and
calls the custom op ``fastkd::attention_kl_rows`` over all layer pairs at once; the kernels live in
``fastkd/backends/<backend>`` (``attention_forward`` / ``attention_backward``).
"""

from __future__ import annotations

import torch

from fastkd import _backend, _one_pass
from fastkd._layout import acc_dtype
from fastkd._reduction import reduce_rows
from fastkd._validation import (
    as_pair_lists,
    check_choice,
    check_mask,
    check_one_device,
    check_pair,
    check_reduction,
)

KINDS = ("probs", "scores")


@torch.library.custom_op("fastkd::attention_kl_rows", mutates_args=())
def attention_kl_rows(
    students: list[torch.Tensor], teachers: list[torch.Tensor], mask: torch.Tensor | None, kind: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row ``kl`` of every pair, concatenated (masked rows 0), and the ``[2, rows]`` stats."""
    return _backend.module(backend).attention_forward(
        [s.contiguous() for s in students], [t.contiguous() for t in teachers], mask, kind
    )


@attention_kl_rows.register_fake
def _(students, teachers, mask, kind, backend):
    rows = sum(s.shape[0] * s.shape[1] * s.shape[2] for s in students)
    dtype = acc_dtype(*students, *teachers)
    stats = students[0].new_empty(2, rows if kind == "scores" else 0, dtype=torch.float64)
    return students[0].new_empty(rows, dtype=dtype), stats


@torch.library.custom_op("fastkd::attention_kl_rows_backward", mutates_args=())
def attention_kl_rows_backward(
    students: list[torch.Tensor],
    teachers: list[torch.Tensor],
    mask: torch.Tensor | None,
    kind: str,
    stats: torch.Tensor,
    grad_rows: torch.Tensor,
    backend: str,
) -> list[torch.Tensor]:
    """probs: grad_rows * (-p / q); scores: grad_rows * (q - p); 0 on masked rows and dropped keys."""
    return _backend.module(backend).attention_backward(
        [s.contiguous() for s in students], [t.contiguous() for t in teachers], mask, kind, stats,
        grad_rows.contiguous(),
    )


@attention_kl_rows_backward.register_fake
def _(students, teachers, mask, kind, stats, grad_rows, backend):
    return [torch.empty_like(s, memory_format=torch.contiguous_format) for s in students]


def _setup_context(ctx, inputs, output):
    students, teachers, mask, kind, backend = inputs
    ctx.save_for_backward(mask, output[1], *students, *teachers)
    ctx.kind, ctx.backend, ctx.pairs = kind, backend, len(students)


def _backward(ctx, grad_rows, grad_stats):
    mask, stats, *tensors = ctx.saved_tensors
    students, teachers = tensors[: ctx.pairs], tensors[ctx.pairs :]
    grads = None
    if ctx.needs_input_grad[0]:
        grads = attention_kl_rows_backward(students, teachers, mask, ctx.kind, stats, grad_rows, ctx.backend)
    return grads, [None] * ctx.pairs, None, None, None


attention_kl_rows.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastkd::attention_kl_rows_with_grad", mutates_args=())
def attention_kl_rows_with_grad(
    students: list[torch.Tensor],
    teachers: list[torch.Tensor],
    mask: torch.Tensor | None,
    kind: str,
    grad_rows: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The rows of ``attention_kl_rows`` and, from the same read, the gradients of its backward."""
    return _backend.module(backend).attention_forward_with_grad(
        [s.contiguous() for s in students], [t.contiguous() for t in teachers], mask, kind, grad_rows
    )


@attention_kl_rows_with_grad.register_fake
def _(students, teachers, mask, kind, grad_rows, backend):
    rows, _ = attention_kl_rows(students, teachers, mask, kind, backend)
    return rows, [torch.empty_like(s, memory_format=torch.contiguous_format) for s in students]


def attention_kl(student, teacher, *, mask: torch.Tensor | None = None, kind: str = "probs", reduction: str = "mean"):
    """KL(teacher || student) between attention distributions over keys, per query row.

    ``student``, ``teacher``: ``[B, H, Lq, Lk]``, or two equal-length sequences of them (layer pairs,
    computed in one launch). ``mask``: ``[B, Lq]`` padding mask of the query rows (nonzero = valid).
    Per row ``(b, h, i)``::

        kl = sum_k p_k (log p_k - log q_k)      p: teacher's distribution, q: student's

    ``kind="probs"``: inputs are probabilities (transformers' eager attention); terms with ``p_k = 0``
    contribute 0 and ``log q_k`` uses ``max(q_k, 1.1754944e-38)``. ``kind="scores"``: inputs are
    pre-softmax scores, ``p = softmax(t)``, ``q = softmax(s)`` over the keys kept in both: a key ``k``
    is dropped from both softmaxes when ``mask[b, k] = 0`` (so ``Lq == Lk`` is required with a mask),
    or when either score is ``-inf`` or the lowest value of its dtype (causal masks); a row with no key
    left gives 0, never NaN.

    ``reduction="mean"``: ``sum m_bi kl_bhi / (H * max(sum m, 1))``; ``"sum"``: ``sum m_bi kl_bhi``;
    ``"none"``: ``kl`` of shape ``[B, H, Lq]``, masked rows 0. Over a sequence of pairs ``"mean"``
    averages the per-pair means, ``"sum"`` adds the sums and ``"none"`` returns a list. The teacher
    gets no gradient. Non-contiguous inputs are copied to contiguous ones.
    """
    students, teachers, is_sequence = as_pair_lists(student, teacher)
    for s, t in zip(students, teachers):
        check_pair(s, t, what="key length", exact_dim=4)
    kind = check_choice("kind", kind, KINDS)
    reduction = check_reduction(reduction)
    device = check_one_device(students)
    mask_rows = None
    for batch, _, lq, lk in dict.fromkeys(tuple(s.shape) for s in students):
        mask_rows = check_mask(mask, torch.Size((batch, lq)), device, "[batch, query length]")
        if mask_rows is not None and kind == "scores" and lq != lk:
            raise ValueError(
                f"mask: kind='scores' with a mask needs query length == key length (it masks keys too), "
                f"got Lq={lq}, Lk={lk}"
            )
    backend = _backend.resolve(device)
    teachers = [t.detach() for t in teachers]
    row_shapes = [tuple(s.shape[:3]) for s in students]
    heads = [s.shape[1] for s in students]
    if _one_pass.applies(students, reduction):
        detached = [s.detach() for s in students]
        return _one_pass.loss(
            lambda grad_rows: attention_kl_rows_with_grad(detached, teachers, mask_rows, kind, grad_rows, backend),
            students, row_shapes, mask_rows, reduction, is_sequence, backend, acc_dtype(*students, *teachers),
            rows_per_mask_row=heads,
        )
    rows, _ = attention_kl_rows(students, teachers, mask_rows, kind, backend)
    return reduce_rows(rows, row_shapes, mask_rows, reduction, is_sequence, rows_per_mask_row=heads)
