"""fastkd's losses on DTensors: FSDP2-sharded LM heads and tensor-parallel (vocabulary-sharded) logits.

PyTorch's own stack does every collective (``torch.distributed`` on the DTensors' device mesh);
fastkd adds none of its own and none that the math does not need. Meshes must be 1-D.

- **Sharded head weights** (``fused_linear_kl``, ``fused_linear_sparse_kl``, the runner):
  :func:`full_weight` turns a weight (or bias) DTensor placed ``Shard(0)`` (FSDP2's vocabulary
  sharding) or ``Replicate()`` into the whole local tensor: one all-gather per call. In backward its
  gradient goes back as ``Partial("avg")``: a reduce-scatter that averages it over the mesh, which
  is what FSDP2 does with the gradients of the parameters its own forward uses, so the weight's
  gradient arrives as a DTensor of the weight's placement. Each rank's hidden states are its own
  tokens (a plain tensor) and the loss is that rank's loss.
- **Vocabulary-sharded logits** (``logit_kl`` on DTensors placed ``Shard(-1)``, what a
  ``ColwiseParallel(use_local_output=False)`` LM head gives): :func:`vocab_parallel_rows`. Each rank
  holds every row but only its slice ``[o, o + V_r)`` of the vocabulary. Per row, with ``s' = s / T``:

  1. each rank's log-sum-exps over its slice, ``lse(s')``, ``lse(t')`` and (with labels) ``lse(s)``,
     are all-gathered (``3 R`` float64 values per rank) and combined: ``lse = log sum_r exp(lse_r)``;
  2. with those, each rank sums its slice's terms of the divergence ``D`` and of ``S = sum_v q_v a_v``
     (``fastkd.backends``) and picks ``s[label]`` where the label is in its slice; one all-reduce
     (sum) of these ``3 R`` values gives every row's ``D``, ``S`` and ``s[label]``;
  3. backward needs no collective: ``grad = g c q (a - S) + g_ce (softmax(s) - onehot(label))``
     on the local slice, from the rows' global stats.

  The slices are computed with the torch backend's formulas, a block of rows at a time (no
  temporary of the slice's size but the gradient): two reads of the slices in forward, one (two
  with labels) in backward.

  The loss is the same on every rank: a ``Replicate()`` DTensor, as PyTorch's ``loss_parallel``
  returns. The gradient is sharded like the logits; the logits are never gathered.
- **Batch-sharded or replicated logits** (``Shard(d)`` on a leading dimension, ``Replicate()``):
  each rank computes its rows locally; ``"mean"`` and ``"sum"`` then add the ranks' sums and
  counts with one all-reduce each (``Partial`` to ``Replicate``), ``"none"`` keeps the rows sharded.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate

from fastkd._layout import acc_dtype, rows_view
from fastkd._validation import IGNORE_INDEX, check_ce_weight, check_labels, is_dtensor
from fastkd.backends import torch_ref


def _placement(name: str, x: DTensor) -> object:
    """The one placement of ``x`` (a 1-D mesh), else a ValueError naming ``name``."""
    if x.device_mesh.ndim != 1:
        raise ValueError(
            f"{name}: a DTensor on a {x.device_mesh.ndim}-D device mesh; fastkd supports 1-D meshes "
            "(one FSDP2 or tensor-parallel dimension)"
        )
    return x.placements[0]


def check_same_mesh(name: str, x: object, other_name: str, other: object) -> None:
    """Both DTensors must live on one device mesh."""
    if is_dtensor(x) and is_dtensor(other) and x.device_mesh != other.device_mesh:
        raise ValueError(
            f"{name}: its device mesh {x.device_mesh} differs from {other_name}'s {other.device_mesh}; "
            "shard both on the same mesh"
        )


def full_weight(name: str, weight: torch.Tensor | None) -> torch.Tensor | None:
    """``weight`` whole, as a plain tensor: itself unless it is a DTensor, which is all-gathered
    (``Shard(0)``) or taken locally (``Replicate()``); its gradient is averaged over the mesh and
    placed like ``weight`` (module docstring). Other placements are a ValueError naming ``name``."""
    if not is_dtensor(weight):
        return weight
    placement = _placement(name, weight)
    if not (placement.is_replicate() or (placement.is_shard() and placement.dim == 0)):
        raise ValueError(
            f"{name}: a DTensor placed {placement!r}; fastkd takes head weights placed Shard(0) (FSDP2's "
            "sharding, or a ColwiseParallel head) or Replicate()"
        )
    return weight.redistribute(weight.device_mesh, [Replicate()]).to_local(grad_placements=[Partial("avg")])


def full_head(role: str, weight, bias):
    """``(full_weight(weight), full_weight(bias))`` of a head (``role``: ``"student"`` or ``"teacher"``),
    both on one mesh when both are DTensors."""
    check_same_mesh(f"{role}_bias", bias, f"{role}_weight", weight)
    return full_weight(f"{role}_weight", weight), full_weight(f"{role}_bias", bias)


# ------------------------------------------------------------------------------------ logit_kl


def _vocab_offset(vocab: int, mesh) -> int:
    """The first vocabulary entry of this rank's ``Shard(-1)`` slice (torch.chunk's split, as DTensor's)."""
    chunk = math.ceil(vocab / mesh.size())
    return min(mesh.get_local_rank() * chunk, vocab)


def _combined_lse(local: torch.Tensor, group) -> torch.Tensor:
    """``log sum_r exp(local_r)`` over the ranks of ``group``, elementwise (float64; -inf stays -inf)."""
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local.contiguous(), group=group)
    return torch.logsumexp(torch.stack(gathered), dim=0)


class _VocabParallelRows(torch.autograd.Function):
    """(rows, ce_rows) of ``fastkd.backends``' logit contract from the vocabulary slices of the
    logits (module docstring); ``labels`` are global ids, ``vocab`` the whole vocabulary's size."""

    @staticmethod
    def forward(ctx, student, teacher, mask, labels, offset, vocab, temperature, divergence, beta, group):
        s_view, t_view = rows_view(student), rows_view(teacher)
        count, acc = s_view.shape[0] * s_view.shape[1], acc_dtype(student, teacher)
        # 1. the slices' log-sum-exps [lse(s'), lse(t'), lse(s)], combined over the ranks
        lses = torch.full((3, count), -torch.inf, dtype=torch.float64, device=student.device)
        for start, cols, i in torch_ref._row_blocks(s_view):
            end = start + cols.stop - cols.start
            s_raw = s_view[i, cols].to(acc)
            lses[0, start:end] = torch_ref._row_lse(s_raw / temperature)
            lses[1, start:end] = torch_ref._row_lse(t_view[i, cols].to(acc) / temperature)
            if labels is not None:
                lses[2, start:end] = torch_ref._row_lse(s_raw)
        lses = _combined_lse(lses, group)
        # 2. the slices' sums of D and S, and s[label] where the label is in the slice, added over the ranks
        vocab_local = s_view.shape[-1]
        local_labels = None if labels is None else labels - offset
        sums = torch.zeros(3, count, dtype=acc, device=student.device)
        for start, cols, i in torch_ref._row_blocks(s_view):
            end = start + cols.stop - cols.start
            s_raw = s_view[i, cols].to(acc)
            log_q = torch_ref._minus_lse(s_raw / temperature, lses[0, start:end])
            log_p = torch_ref._minus_lse(t_view[i, cols].to(acc) / temperature, lses[1, start:end])
            value, _, total = torch_ref._divergence(log_q, log_p, divergence, beta)
            sums[0, start:end], sums[1, start:end] = value, total
            if local_labels is not None:
                block = local_labels[start:end]
                picked = s_raw.gather(-1, block.clamp(0, vocab_local - 1)[:, None]).squeeze(-1)
                sums[2, start:end] = torch.where((block >= 0) & (block < vocab_local), picked, 0)
        dist.all_reduce(sums, group=group)
        factor, _ = torch_ref._scales(divergence, temperature)
        valid = torch.ones(count, dtype=torch.bool, device=student.device) if mask is None else mask != 0
        kd = valid & (lses[1] > -torch.inf)
        rows = torch.where(kd, factor * sums[0], 0)
        ce_rows = rows.new_zeros(0)
        stats = torch.stack([
            torch.where(kd, lses[0], -torch.inf), torch.where(kd, lses[1], -torch.inf), lses[2],
            torch.where(kd, sums[1].double(), 0),
        ])
        if labels is not None:
            has_label = valid & (labels >= 0) & (labels < vocab)
            ce_rows = torch.where(has_label, (lses[2] - sums[2].double()).to(acc), 0)
            stats[2] = torch.where(has_label, lses[2], -torch.inf)
        ctx.save_for_backward(student, teacher, mask, local_labels, stats)
        ctx.options = temperature, divergence, beta
        return rows, ce_rows

    @staticmethod
    def backward(ctx, grad_rows, grad_ce_rows):
        # grad = g c q (a - S) + g_ce (softmax(s) - onehot(label)) on the slice, from the rows' global
        # stats (S: the whole row's sum; the kernels' backward may recompute it from a whole row)
        student, teacher, mask, local_labels, stats = ctx.saved_tensors
        temperature, divergence, beta = ctx.options
        s_view, t_view = rows_view(student), rows_view(teacher)
        grad = torch.empty(s_view.shape, dtype=student.dtype, device=student.device)
        acc, vocab_local = grad_rows.dtype, s_view.shape[-1]
        _, c = torch_ref._scales(divergence, temperature)
        for start, cols, i in torch_ref._row_blocks(s_view):
            end = start + cols.stop - cols.start
            lse_s, lse_t, lse_ce, total = stats[:, start:end].unbind()
            s_raw = s_view[i, cols].to(acc)
            log_q = torch_ref._minus_lse(s_raw / temperature, lse_s)
            log_p = torch_ref._minus_lse(t_view[i, cols].to(acc) / temperature, lse_t)
            _, q_a, _ = torch_ref._divergence(log_q, log_p, divergence, beta)
            kd = lse_t > -torch.inf
            scale = torch.where(kd, grad_rows[start:end] * c, 0)[:, None]
            block = torch.where(kd[:, None], (q_a - log_q.exp() * total.to(acc)[:, None]) * scale, 0)
            if local_labels is not None:
                has_label = lse_ce > -torch.inf
                weight = torch.where(has_label, grad_ce_rows[start:end], 0)[:, None]
                softmax = torch.where(has_label[:, None], torch_ref._exp_minus_lse(s_raw, lse_ce), 0)
                labels = local_labels[start:end]
                here = (labels >= 0) & (labels < vocab_local)
                onehot = torch.zeros_like(block).scatter_(-1, labels.clamp(0, vocab_local - 1)[:, None],
                                                          here[:, None].to(acc))
                block = block + weight * (softmax - onehot)
            grad[i, cols] = block.to(student.dtype)
        return grad.view(student.shape), *(None,) * 9


def vocab_parallel_rows(student, teacher, mask, labels, *, temperature, divergence, beta):
    """(rows, ce_rows) over the whole vocabulary of two ``Shard(-1)`` DTensors' local slices
    (``student``, ``teacher``: the DTensors; ``mask``, ``labels``: flat plain ``[R]`` or None)."""
    mesh = student.device_mesh
    vocab = student.shape[-1]
    return _VocabParallelRows.apply(
        student.to_local(), teacher.to_local().detach(), mask, labels, _vocab_offset(vocab, mesh), vocab,
        temperature, divergence, beta, mesh.get_group(),
    )


def _leading(name: str, x: torch.Tensor | None, like: DTensor) -> torch.Tensor | None:
    """``mask`` or ``labels`` (the logits' leading shape) as this rank's plain local part: a DTensor
    on the logits' mesh is redistributed like their leading dimensions; a plain tensor is the
    whole (global) value, the same on every rank, and is split like the logits."""
    if x is None:
        return None
    placement = like.placements[0]
    leading = placement if placement.is_shard() and placement.dim < like.dim() - 1 else Replicate()
    if is_dtensor(x):
        check_same_mesh(name, x, "student_logits", like)
    else:
        x = DTensor.from_local(x, like.device_mesh, [Replicate()], run_check=False)
    return x.redistribute(like.device_mesh, [leading]).to_local()


def logit_kl_dtensor(student_logits, teacher_logits, mask, labels, options: dict):
    """``fastkd.logit_kl`` of DTensor logits (module docstring): ``options`` are its other keywords."""
    from fastkd.logit import check_logit_inputs, labelled_rows, logit_loss, logit_parts

    names = ("student_logits", "teacher_logits")
    for name, other, x in ((names[0], names[1], student_logits), (names[1], names[0], teacher_logits)):
        if not is_dtensor(x):
            raise ValueError(
                f"{name}: a plain tensor, but {other} is a DTensor; give both logits as DTensors of one mesh and placement"
            )
    check_same_mesh(names[1], teacher_logits, names[0], student_logits)
    placement = _placement(names[0], student_logits)
    if teacher_logits.placements != student_logits.placements:
        raise ValueError(
            f"{names[1]}: placed {teacher_logits.placements[0]!r}, but {names[0]} is placed {placement!r}; place both alike"
        )
    if options.get("vocab", "exact") != "exact" and student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError("vocab: 'common' with vocabularies of different sizes needs plain tensors, not DTensors")
    mesh = student_logits.device_mesh
    local_mask, local_labels = _leading("mask", mask, student_logits), _leading("labels", labels, student_logits)
    student, teacher = student_logits.to_local(), teacher_logits.to_local()
    if placement.is_shard() and placement.dim in (-1, student_logits.dim() - 1):
        # every rank holds every row: the rows' values are computed together, then reduced on each rank
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"{names[1]}: shape {tuple(teacher_logits.shape)} differs from {names[0]}'s {tuple(student_logits.shape)}"
            )
        checked = check_logit_inputs(student, teacher, mask=local_mask, labels=None, **dict(options, ce_weight=0.0))
        # the labels are ids of the whole vocabulary
        flat_labels = check_labels(local_labels, student.shape[:-1], student.device, student_logits.shape[-1],
                                   "the logits' leading dimensions")
        ce_weight = check_ce_weight(options["ce_weight"], flat_labels)
        rows, ce_rows = vocab_parallel_rows(
            student_logits, teacher_logits, checked.mask_rows, flat_labels, temperature=checked.temperature,
            divergence=checked.divergence, beta=checked.beta,
        )
        labelled = None
        if flat_labels is not None and checked.reduction == "mean":
            labelled = labelled_rows(flat_labels, checked.mask_rows)
        parts = logit_parts(rows, ce_rows, tuple(student.shape[:-1]), checked.mask_rows, flat_labels, labelled,
                            checked.reduction, 1.0, ce_weight)
        return _as_dtensor(parts, mesh, Replicate())
    checked = check_logit_inputs(student, teacher, mask=local_mask, labels=local_labels, **options)
    if placement.is_replicate() or checked.reduction == "none":
        shape = student_logits.shape[:-1] if checked.reduction == "none" else None
        return _as_dtensor(logit_loss(*checked.tensors, **checked.keywords), mesh, placement, shape=shape)
    # batch-sharded, "mean" or "sum": each rank's sums over the global counts, added over the ranks
    kd_divisor = ce_divisor = None
    if checked.reduction == "mean":
        valid = torch.ones(student.shape[:-1].numel(), dtype=torch.bool, device=student.device)
        if checked.mask_rows is not None:
            valid = checked.mask_rows != 0
        with_label = valid & (checked.labels != IGNORE_INDEX) if checked.labels is not None else valid[:0]
        counts = torch.stack([valid.sum(), with_label.sum()]).double()
        dist.all_reduce(counts, group=mesh.get_group())
        kd_divisor, ce_divisor = counts.clamp_min(1).to(acc_dtype(student, teacher)).unbind()
    keywords = dict(checked.keywords, reduction="sum")
    if kd_divisor is not None:
        keywords.update(kd_weight=1 / kd_divisor, ce_weight=checked.keywords["ce_weight"] / ce_divisor)
    parts = logit_loss(*checked.tensors, **keywords)
    if kd_divisor is not None:
        parts = parts._replace(kd=parts.kd / kd_divisor, ce=None if parts.ce is None else parts.ce / ce_divisor)
    return _as_dtensor(parts, mesh, Partial(), Replicate())


def _as_dtensor(parts, mesh, placement, to=None, shape=None):
    """``LogitParts`` of DTensors on ``mesh`` placed ``placement`` (of global ``shape`` when the
    parts are rows, else 0-d), then redistributed ``to``."""
    def wrap(x):
        if x is None:
            return None
        stride = None if shape is None or x.dim() == 0 else torch.empty(shape, device="meta").stride()
        out = DTensor.from_local(x, mesh, [placement], run_check=False, shape=shape if x.dim() else None,
                                 stride=stride)
        return out if to is None else out.redistribute(mesh, [to])

    return type(parts)(*(wrap(x) for x in parts))
