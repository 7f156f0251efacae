"""The losses a :class:`~fastkd.runner.Stage` may name: a registry of name, needs and function.

:func:`register_loss` adds one::

    register_loss(name, fn, *, needs, replace=False)

``needs`` says which features the models are asked for (some of ``NEEDS``):

- ``"hidden"``: the hidden states of the layer map's pairs, of both models;
- ``"attention"``: the paired blocks' attention of both models, as the runner's ``attention``
  says (maps in ``Features.attentions`` for ``"maps"``, else ``Features.attention_inputs``);
- ``"head"``: the LM-head input of both models (``Features.head_input``);
- ``"student_head"``: the student's LM-head input only (the teacher is not asked for it);
- ``"labels"``: no feature: the batch must have ``labels``, or the step raises.

A model is run only when a loss of the stage needs something of it. ``fn(ctx)`` gets a
:class:`LossContext` and returns ``L``, a 0-d tensor: the stage's total adds ``w * L`` (``w`` the
loss's weight at the step, ``ctx.weights[name]``, a 0-d device tensor), and the metric
``loss_<name>`` is ``L``. fastkd's one-pass losses called in ``fn`` write their gradient for the
upstream gradient ``w`` (``fastkd._one_pass.expected_upstream``), so weighting costs no extra pass.
A function that weights itself returns :class:`WeightedLosses` instead: ``total = sum_n w_n L_n``
with its gradient, and the values ``L_n``, which may include losses of the stage that come after
it (their functions are then not called): that is how ``"logit"`` computes ``"ce"`` in its pass.
Weights, metrics, CUDA-graph capture and checkpoints treat every registered loss alike; a loss's
function should hold no trainable state of its own (checkpoints save the student and the
projections only).

The built-in losses, registered in this order (a stage lists its losses in registry order):

- ``"hidden"`` (needs ``hidden``): ``fastkd.hidden_mse([P_k(h_s[i_k])], [h_t[j_k]], mask=m)``;
- ``"att"`` (needs ``attention``): the attention loss of :mod:`fastkd.runner.runner`'s docstring;
- ``"logit"`` (needs ``head``): ``KD``, the runner's divergence of the heads' logits over the rows
  of ``fastkd.logit_mask(labels, m, causal=...)``, by ``fastkd.fused_linear.fused_linear_loss``
  (no logits held); in a stage with ``"ce"`` too, ``w_logit * KD + w_ce * CE`` from that one pass.
  With an offline teacher (the runner's ``teacher`` None or a ``fastkd.OfflineTeacher``) the
  teacher's side is the batch's stored top-k (``OFFLINE_FIELDS``) and the loss is
  ``fastkd.sparse.fused_linear_sparse_loss`` on the student's head alone;
- ``"ce"`` (needs ``student_head``, ``labels``): ``CE = sum_i ce_i / max(n, 1)``, the student's
  hard-label cross-entropy ``ce_i = logsumexp(s_i) - s_i[y_i]`` at T = 1 over the ``n`` rows with a
  target ``y = fastkd.logit_labels(labels, m, causal=...)``. Without ``"logit"`` in the stage the
  teacher does not run, and the student's logits ``s`` (its head transform applied) are computed
  whole, ``[B * L, V]``, for ``F.cross_entropy``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

import fastkd
from fastkd import _backend
from fastkd._layout import acc_dtype
from fastkd._validation import IGNORE_INDEX, check_labels, check_mask, check_sparse_teacher
from fastkd.distributed import full_head
from fastkd.fused_linear import default_chunk_size, fused_linear_loss, head_rows
from fastkd.masks import logit_labels, logit_mask
from fastkd.sparse import fused_linear_sparse_loss
from fastkd.runner.models import AttentionInputs, Features, ModelAdapter

if TYPE_CHECKING:
    from fastkd.runner.runner import StageRunner
    from fastkd.runner.schedule import Stage

NEEDS = ("hidden", "attention", "head", "student_head", "labels")
OFFLINE_FIELDS = ("teacher_ids", "teacher_logprobs")  # an offline teacher's stored top-k in a batch
PROJECTION_FIELDS = {"q": "query", "k": "key", "v": "value"}  # relation projection -> AttentionInputs field


@dataclass(frozen=True)
class LossContext:
    """What a stage's loss functions get at one step.

    Attributes:
        runner: the :class:`~fastkd.runner.StageRunner` (its options: ``temperature``,
            ``divergence``, ``beta``, ``vocab``, ``attention``, ``layer_map``, the ``student`` and
            ``teacher`` adapters and their ``head_transforms``).
        stage: the current :class:`~fastkd.runner.Stage`.
        batch: the step's batch on the device, with ``attention_mask``.
        student, teacher: the :class:`~fastkd.runner.Features` each model returned, or None when
            no loss of the stage needs anything of that model.
        student_hidden: ``[P_k(h_s[i_k])]`` over the layer map's hidden pairs ``(i_k, j_k)`` (the
            learned projection ``P_k`` when the widths differ); empty without ``"hidden"``.
        teacher_hidden: ``[h_t[j_k]]``, the teacher's side of those pairs.
        weights: each loss of the stage -> its weight at this step, a 0-d device tensor.
    """

    runner: StageRunner
    stage: Stage
    batch: Mapping[str, torch.Tensor]
    student: Features | None
    teacher: Features | None
    student_hidden: list[torch.Tensor]
    teacher_hidden: list[torch.Tensor]
    weights: Mapping[str, torch.Tensor]

    @property
    def mask(self) -> torch.Tensor:
        """The padding mask ``[B, L]`` (``batch["attention_mask"]``)."""
        return self.batch["attention_mask"]

    @property
    def labels(self) -> torch.Tensor | None:
        """The batch's transformers ``labels`` ``[B, L]`` (not shifted), or None."""
        return self.batch.get("labels")

    def logit_rows(self) -> torch.Tensor:
        """``fastkd.logit_mask(labels, mask, causal=student.causal)``: the logit rows that count, ``[B, L]``."""
        return logit_mask(self.labels, self.mask, causal=self.runner.student.causal)

    def logit_labels(self) -> torch.Tensor:
        """``fastkd.logit_labels(labels, mask, causal=student.causal)``: each logit row's target, ``[B, L]``."""
        return logit_labels(self.labels, self.mask, causal=self.runner.student.causal)


class WeightedLosses(NamedTuple):
    """A loss function's result when it weights its losses itself: ``total = sum_n w_n L_n`` over
    the names of ``values`` (``w_n = ctx.weights[n]``), with its gradient, and ``values``: each name
    -> ``L_n``, a 0-d tensor, for the metrics."""

    total: torch.Tensor
    values: Mapping[str, torch.Tensor]


LossFunction = Callable[[LossContext], "torch.Tensor | WeightedLosses"]


@dataclass(frozen=True)
class StageLoss:
    """A registered loss: its ``name``, what it ``needs`` (some of ``NEEDS``) and its function."""

    name: str
    fn: LossFunction
    needs: frozenset[str]


_registry: dict[str, StageLoss] = {}


def register_loss(name: str, fn: LossFunction, *, needs: Collection[str], replace: bool = False) -> StageLoss:
    """Register the loss ``name``, computed by ``fn(ctx: LossContext)`` from the features ``needs``
    names (module docstring), so that a :class:`~fastkd.runner.Stage` can weight it; returns it.

    ``replace=True`` replaces a loss registered under ``name`` (a built-in one too); without it a
    name already registered raises ValueError. A runner keeps the losses registered when it was
    built.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name: expected an identifier such as 'cosine' (metrics call it loss_<name>), got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn: expected a function ctx -> 0-d loss tensor, got {type(fn).__name__}")
    if isinstance(needs, str) or not isinstance(needs, Collection):
        raise TypeError(f"needs: expected a collection of some of {', '.join(map(repr, NEEDS))} such as ('hidden',), "
                        f"got {needs!r}")
    unknown = [need for need in needs if need not in NEEDS]
    if unknown:
        raise ValueError(
            f"needs: unknown {', '.join(map(repr, unknown))}, expected some of {', '.join(map(repr, NEEDS))}"
        )
    if not isinstance(replace, bool):
        raise TypeError(f"replace: expected a bool, got {type(replace).__name__}")
    if name in _registry and not replace:
        raise ValueError(f"name: a loss {name!r} is registered already; pass replace=True to replace it")
    loss = StageLoss(name, fn, frozenset(needs))
    _registry[name] = loss
    return loss


def registered_losses() -> Mapping[str, StageLoss]:
    """The losses registered now, name -> :class:`StageLoss`, in registration order (a read-only copy)."""
    return MappingProxyType(dict(_registry))


# --------------------------------------------------------------------------------------------
# The built-in losses.


def hidden_loss(ctx: LossContext) -> torch.Tensor:
    return fastkd.hidden_mse(ctx.student_hidden, ctx.teacher_hidden, mask=ctx.mask)


def attention_loss(ctx: LossContext) -> torch.Tensor:
    """The ``att`` loss of the layer map's attention pairs, as ``runner.attention`` says."""
    runner, mask = ctx.runner, ctx.mask
    if runner.attention == "maps":
        return fastkd.attention_kl(ctx.student.attentions, ctx.teacher.attentions, mask=mask, kind="probs")
    student = _attention_inputs(runner, "student", runner.student, ctx.student)
    teacher = _attention_inputs(runner, "teacher", runner.teacher, ctx.teacher)
    flags = {x.causal for x in (*student, *teacher)}
    if len(flags) > 1:
        raise ValueError(
            "att: the paired blocks' attention is causal in some and bidirectional in others (student "
            f"{[x.causal for x in student]}, teacher {[x.causal for x in teacher]}); attention_kl_qk takes one "
            "causal flag, use attention='maps'"
        )
    causal = flags.pop()
    if runner.attention == "relations":
        per_projection = []
        for name in runner.relation_projections:
            field = PROJECTION_FIELDS[name]
            per_projection.append(fastkd.relation_kl(
                [_concatenated(getattr(x, field)) for x in student],
                [_concatenated(getattr(x, field)) for x in teacher],
                relation_heads=runner.relation_heads, mask=mask, causal=causal,
            ))
        return per_projection[0] if len(per_projection) == 1 else torch.stack(per_projection).mean()
    student_scales = [_scaling(x) for x in student]
    teacher_scales = [_scaling(x) for x in teacher]
    if len(set(student_scales)) == 1 and len(set(teacher_scales)) == 1:
        return fastkd.attention_kl_qk(
            [x.query for x in student], [x.key for x in student],
            [x.query for x in teacher], [x.key for x in teacher],
            mask=mask, causal=causal, student_scale=student_scales[0], teacher_scale=teacher_scales[0],
        )
    # Scalings differ between blocks (e.g. GPT-2's scale_attn_by_inverse_layer_idx): each pair on its
    # own, then the mean of the pairs' means, which is what the sequence form's "mean" is.
    return torch.stack([
        fastkd.attention_kl_qk(x.query, x.key, y.query, y.key, mask=mask, causal=causal, student_scale=a,
                               teacher_scale=b)
        for x, y, a, b in zip(student, teacher, student_scales, teacher_scales)
    ]).mean()


def _attention_inputs(runner: StageRunner, role: str, model: ModelAdapter, features: Features) -> list[AttentionInputs]:
    """``features.attention_inputs``, checked, with ``causal`` resolved to a bool."""
    wanted = len(runner.layer_map.attention)
    got = list(features.attention_inputs)
    if len(got) != wanted or not all(isinstance(x, AttentionInputs) for x in got):
        raise RuntimeError(
            f"{role}: {type(model).__name__}.features returned {len(got)} attention input(s) for {wanted} "
            f"attention block(s); with attention={runner.attention!r} it must return one "
            "fastkd.runner.models.AttentionInputs per block in Features.attention_inputs"
        )
    needs_value = runner.attention == "relations" and "v" in runner.relation_projections
    if needs_value and any(x.value is None for x in got):
        raise RuntimeError(f"{role}: {type(model).__name__}.features returned no value tensors for 'v' relations")
    return [x._replace(causal=model.causal if x.causal is None else bool(x.causal)) for x in got]


def _concatenated(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, d]`` as ``[B, L, H * d]``: the heads concatenated, as the projection made them."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], x.shape[1] * x.shape[3])


def _scaling(x: AttentionInputs) -> float:
    """The block's score scaling as a float (``d ** -0.5`` when None)."""
    if x.scaling is None:
        return x.query.shape[-1] ** -0.5
    return float(x.scaling)


def _row_labels(ctx: LossContext, vocab: int) -> torch.Tensor:
    """``ctx.logit_labels()`` checked as ``fastkd.logit_kl`` checks ``labels``: flat int64 ``[B * L]``."""
    targets = ctx.logit_labels()
    return check_labels(targets, targets.shape, targets.device, vocab, "the logit rows [B, L]")


def _lm_head(model: ModelAdapter, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's LM-head weight and bias, whole: a DTensor (an FSDP2-sharded head) is gathered
    for the step, its gradient reduce-scattered (``fastkd.distributed.full_weight``)."""
    return full_head(role, *model.lm_head())


def logit_loss(ctx: LossContext) -> WeightedLosses:
    """``w_logit * KD`` (plus ``w_ce * CE`` when the stage has ``"ce"``) from one
    ``fused_linear_loss`` pass over the first ``V`` rows of both heads (``V`` as ``runner.vocab``
    says), each head's transform applied; values ``{"logit": KD}`` (and ``"ce": CE``). With an
    offline teacher, ``fused_linear_sparse_loss`` against the batch's stored top-k instead."""
    runner = ctx.runner
    if runner.teacher is None:
        return _offline_logit_loss(ctx)
    student_head, teacher_head = _lm_head(runner.student, "student"), _lm_head(runner.teacher, "teacher")
    vocab = min(student_head[0].shape[0], teacher_head[0].shape[0])  # runner.vocab was checked at construction
    student_weight, student_bias = head_rows(*student_head, vocab)
    teacher_weight, teacher_bias = head_rows(*teacher_head, vocab)
    student_hidden = ctx.student.head_input.flatten(0, -2)
    rows = ctx.logit_rows()
    with_ce = "ce" in ctx.stage.losses
    parts = fused_linear_loss(
        student_hidden, student_weight, ctx.teacher.head_input.flatten(0, -2), teacher_weight,
        check_mask(rows, rows.shape, rows.device, "the logit rows [B, L]").view(-1),
        _row_labels(ctx, vocab) if with_ce else None,
        student_bias=student_bias, teacher_bias=teacher_bias,
        temperature=runner.temperature, divergence=runner.divergence, beta=runner.beta,
        chunk_size=default_chunk_size(student_hidden.shape[0], vocab, student_hidden.device),
        student_head=runner.head_transforms["student"], teacher_head=runner.head_transforms["teacher"],
        kd_weight=ctx.weights["logit"], ce_weight=ctx.weights["ce"] if with_ce else 0.0,
        backend=_backend.resolve(student_hidden.device),
    )
    return WeightedLosses(parts.loss, {"logit": parts.kd, "ce": parts.ce} if with_ce else {"logit": parts.kd})


def _offline_logit_loss(ctx: LossContext) -> WeightedLosses:
    """The ``"logit"`` loss from an offline teacher: ``fastkd.fused_linear_sparse_kl`` of the
    student's head on the batch's ``teacher_ids``/``teacher_logprobs`` ``[B, L, k]`` (the
    teacher's distribution at each position, aligned with the logit rows), ``runner.tail``."""
    runner = ctx.runner
    weight, bias = _lm_head(runner.student, "student")
    student_hidden = ctx.student.head_input.flatten(0, -2)
    rows = ctx.logit_rows()
    ids, logprobs = check_sparse_teacher(
        ctx.batch["teacher_ids"], ctx.batch["teacher_logprobs"], rows.shape, rows.device, weight.shape[0],
        "the logit rows [B, L]",
    )
    with_ce = "ce" in ctx.stage.losses
    parts = fused_linear_sparse_loss(
        student_hidden, weight, ids, logprobs.to(acc_dtype(student_hidden)),
        check_mask(rows, rows.shape, rows.device, "the logit rows [B, L]").view(-1),
        _row_labels(ctx, weight.shape[0]) if with_ce else None, student_bias=bias,
        temperature=runner.temperature, tail=runner.tail,
        chunk_size=default_chunk_size(student_hidden.shape[0], weight.shape[0], student_hidden.device),
        student_head=runner.head_transforms["student"], kd_weight=ctx.weights["logit"],
        ce_weight=ctx.weights["ce"] if with_ce else 0.0, backend=_backend.resolve(student_hidden.device),
    )
    return WeightedLosses(parts.loss, {"logit": parts.kd, "ce": parts.ce} if with_ce else {"logit": parts.kd})


def cross_entropy_loss(ctx: LossContext) -> torch.Tensor:
    """``CE``, the student's hard-label cross-entropy over the rows with a target (module docstring),
    by ``F.cross_entropy`` on its whole logits."""
    weight, bias = _lm_head(ctx.runner.student, "student")
    scale, softcap = ctx.runner.head_transforms["student"]
    logits = F.linear(ctx.student.head_input, weight, bias).flatten(0, -2).float()
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    targets = _row_labels(ctx, weight.shape[0])
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce / (targets != IGNORE_INDEX).sum().clamp_min(1)


register_loss("hidden", hidden_loss, needs=("hidden",))
register_loss("att", attention_loss, needs=("attention",))
register_loss("logit", logit_loss, needs=("head",))
register_loss("ce", cross_entropy_loss, needs=("student_head", "labels"))
