"""``StageRunner``: distil a student from a teacher through a :class:`~fastkd.runner.Schedule`.

Step ``k`` of a stage computes ``loss = sum(w(k) * L)`` over the stage's losses (``w(k)``: the
weight, constant or a function of ``k``), each a loss registered in :mod:`fastkd.runner.losses`
(:func:`fastkd.register_loss` adds others), with ``m`` the padding mask (``attention_mask``) of the
batch. The built-in ones:

- ``hidden``: ``fastkd.hidden_mse([P_k(h_s[i_k])], [h_t[j_k]], mask=m)`` over the layer map's
  hidden pairs ``(i_k, j_k)``; ``P_k`` is a learned ``nn.Linear(D_s, D_t)`` per pair when the
  widths differ (``runner.projections``), the identity otherwise;
- ``att``, over the layer map's attention pairs, as ``attention`` says:

  - ``"qk"`` (the default when both models have as many attention heads, see ``attention``):
    ``fastkd.attention_kl_qk(q_s, k_s, q_t, k_t, mask=m, causal=c, student_scale=a_s,
    teacher_scale=a_t)``, the KL between the attention distributions ``softmax(q k^T * a)`` of
    the queries and keys each paired block's attention is called with (after rotary embeddings;
    grouped-query keys with their fewer heads) and its scaling ``a``; ``c``: whether the blocks'
    attention is causal. Every block's output is computed by SDPA and no ``[L, L]`` map is ever
    made. When a model's paired blocks have different scalings, the loss is the mean of each
    pair's own loss (what the sequence form's ``"mean"`` is);
  - ``"maps"``: ``fastkd.attention_kl(student maps, teacher maps, mask=m, kind="probs")`` on the
    probabilities before dropout, computed by eager attention in the paired blocks: the same
    value as ``"qk"`` up to float rounding, with ``[B, H, L, L]`` maps held for the backward pass;
  - ``"relations"`` (``relation_heads=R``): the mean over ``relation_projections`` (some of
    ``"q"``, ``"k"``, ``"v"``) of ``fastkd.relation_kl(x_s, x_t, relation_heads=R, mask=m,
    causal=c)``, ``x`` that projection as the attention receives it with its heads concatenated
    (``[B, L, H * d]``; ``H_kv * d`` for grouped-query keys and values): MiniLMv2's relations,
    so the models may differ in head count and head width.

  ``"qk"`` and ``"relations"`` need models whose attention scores are just ``q k^T * a`` besides
  the padding and causal masks (:mod:`fastkd.runner.models`): attention soft-capping, sliding or
  chunked windows, ALiBi, attention sinks are refused with the reason, pointing to ``"maps"``
  (whose eager attention applies the mask the model builds, so a sliding window is fine there);
- ``logit``: ``fastkd.fused_linear_kl(head input of the student, its LM-head weight, the teacher's
  two, temperature=T, mask=fastkd.logit_mask(labels, m, causal=...), divergence=..., beta=...,
  vocab=..., student/teacher softcap and logit scale)``, the constructor's ``divergence``,
  ``beta``, ``vocab`` and each model's head transform (``ModelAdapter.head_transform``: Gemma's
  ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``): the
  logits are never materialised; for a causal LM row ``i`` counts when token ``i + 1`` has a
  label, for a masked LM when token ``i`` has one (without ``labels``: every row of ``m``);
- ``ce``: the student's hard-label cross-entropy on the batch's ``labels``, ``sum_i (logsumexp(s_i)
  - s_i[y_i]) / max(n, 1)`` over the ``n`` rows with a target ``y = fastkd.logit_labels(labels, m,
  causal=...)`` (the rows ``logit_mask`` counts; a causal LM's row ``i`` has token ``i + 1``'s
  label). With ``logit`` in the stage it comes from the same pass (``w_logit * KD + w_ce * CE``);
  without, the teacher does not run. A batch without ``labels`` raises.

The models are asked only for what the stage's losses need (:class:`~fastkd.runner.losses.StageLoss`
``needs``): no LM head runs in a stage without ``logit`` or ``ce``, a stage with only ``logit``
asks for no hidden states, attention maps or attention inputs, and a model of which nothing is
needed does not run. The teacher runs in eval mode under ``torch.no_grad``, the student in train
mode.

The runner does not wait for the device during a step (a replayed CUDA graph does not; an eager
step may, inside transformers' forward pass; ``measure=True`` does, to time the step; writing a
checkpoint does). The weights of a step are written into a device tensor before it runs (a CUDA
graph reads them from there), and :meth:`StageRunner.step` returns
:class:`~fastkd.runner.metrics.Metrics` whose losses are copied to the host (one synchronisation)
only when one is read. Non-finite losses are watched on the device: after every step, the first
step whose losses were not all finite is recorded; that record is read whenever metrics are read,
every ``log_every`` steps and at the end of :meth:`StageRunner.run`, and before every checkpoint is
written, and then :class:`NonFiniteLossError` names the stage, the global step and the loss. So
:meth:`StageRunner.run` stops at most ``log_every`` steps after a loss became NaN or infinite, and
no checkpoint is ever written after such a step: the last one is left as it was.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastkd import _one_pass
from fastkd._validation import (
    VOCABS,
    check_choice,
    check_divergence,
    check_tail,
    check_temperature,
    check_vocab,
    is_dtensor,
)
from fastkd.fused_linear import check_head
from fastkd.offline import OfflineTeacher
from fastkd.runner import checkpoint
from fastkd.runner.graphs import StageGraph, make_capturable, log
from fastkd.runner.layer_map import LayerMap, resolve_layer_map
from fastkd.runner.losses import (
    OFFLINE_FIELDS,
    PROJECTION_FIELDS,
    LossContext,
    WeightedLosses,
    logit_loss,
    registered_losses,
)
from fastkd.runner.measure import StepMeter
from fastkd.runner.metrics import FiniteWatch, Metrics, NonFiniteLossError
from fastkd.runner.models import Features, ModelAdapter, TransformersAdapter, as_adapter
from fastkd.runner.parallel import check_fsdp, forward_through, fully_shard, rank, unwrap
from fastkd.runner.schedule import Schedule, Stage

# what a loss's need asks of the teacher, for the offline teacher's refusal
NEED_WORDS = {"hidden": "hidden states", "attention": "attention", "head": "LM-head input"}

ATTENTION_MODES = ("qk", "maps", "relations")
PROJECTIONS = tuple(PROJECTION_FIELDS)


@dataclass(frozen=True)
class Request:
    """What one stage asks of a model: hidden-state indices, attention blocks (their maps, or with
    ``attention_inputs`` ``"qk"``/``"qkv"`` their queries, keys and values), the LM-head input."""

    hidden: tuple[int, ...]
    attentions: tuple[int, ...]
    head_input: bool
    attention_inputs: str | None = None

    @property
    def empty(self) -> bool:
        """Whether nothing is asked (the model need not run)."""
        return not (self.hidden or self.attentions or self.head_input)

    def kwargs(self) -> dict[str, object]:
        """The keyword arguments of ``features``; ``attention_inputs`` only when set (a maps-only
        adapter's ``features`` need not take it)."""
        fields = vars(self).copy()
        if fields["attention_inputs"] is None:
            del fields["attention_inputs"]
        return fields


class Projections(nn.ModuleList):
    """The runner's hidden-state projections ``P_k``; called on the student's hidden states, in order."""

    def forward(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        return [projection(h) for projection, h in zip(self, hidden)]


class StageRunner:
    """Trains ``student`` from ``teacher`` through ``schedule`` (module docstring for the losses).

    Args:
        student, teacher: transformers models (causal LMs, BERT) or :class:`ModelAdapter` instances.
            ``teacher`` may also be an offline teacher: a :class:`fastkd.OfflineTeacher` (whose
            manifest is checked against the student) or None, and the batches carry its stored
            top-k (``teacher_ids``, ``teacher_logprobs`` ``[B, L, k]``, as ``OfflineTeacher``
            yields them). Then no teacher runs and the schedule's stages may use only ``logit``
            (``fastkd.fused_linear_sparse_kl`` on the student's head, with ``tail``) and ``ce``.
        schedule: the stages to run.
        optimizer: the user's optimizer over the student's parameters; the runner adds its
            projections to it as a new parameter group.
        layer_map: ``"uniform"``, ``"last"`` or ``(student, teacher)`` hidden-state pairs
            (see :mod:`fastkd.runner.layer_map`).
        temperature: the logit loss's temperature ``T``.
        divergence: the logit loss's divergence of each row, as ``fastkd.logit_kl``'s:
            ``"forward"`` (``T^2 KL(p_t || p_s)``), ``"reverse"``, ``"jsd"`` or ``"tvd"``.
        beta: ``"jsd"``'s mixing weight, in (0, 1) (None: 0.5); only with ``divergence="jsd"``.
        tail: an offline teacher's ``tail`` (``fastkd.sparse_logit_kl``): ``"renormalize"`` or
            ``"bucket"`` (``temperature=1``).
        vocab: ``"exact"`` (the LM heads must have one vocabulary size) or ``"common"`` (the logit
            loss compares the first ``min(V_s, V_t)`` rows of the heads, for vocabularies that
            differ by padding rows).
        attention: how ``att`` compares the paired blocks' attention (module docstring): ``"qk"``
            (from queries and keys, no maps), ``"maps"`` (from ``[B, H, L, L]`` probability maps) or
            ``"relations"``. None (the default): ``"relations"`` when ``relation_heads`` or
            ``relation_projections`` is given, else ``"qk"``, or ``"maps"`` where a model can only
            give maps (a maps-only :class:`ModelAdapter`, or attention that its queries and keys do
            not show, such as a sliding window; the reason is logged). ``"qk"`` and ``"maps"``
            need equal head counts: with different ones the default is refused, and
            ``attention="relations"`` is the way. The mode chosen is ``runner.attention``.
        relation_heads: the number ``R`` of relation heads each projection is split into for
            ``attention="relations"`` (required there; it must divide the widths of the chosen
            projections of both models).
        relation_projections: the projections whose relations are compared, a non-empty sequence of
            distinct ``"q"``, ``"k"``, ``"v"`` (default all three), for ``attention="relations"``.
        cuda_graphs: ``"auto"`` (on CUDA: capture each stage's step, see :mod:`fastkd.runner.graphs`),
            ``True`` (the same, but an error off CUDA) or ``False`` (eager).
        checkpoint_dir: when given, ``latest.pt`` there (``latest.dcp``, a directory, for an FSDP2
            student) is written at the end of every stage and, with ``checkpoint_every``, every that
            many steps.
        lr_scheduler: stepped after every optimizer step: a function ``optimizer -> scheduler``,
            called once the runner has added its projections' parameter group (so that the group
            is scheduled like the others), or a scheduler built on ``optimizer`` beforehand, which
            is only accepted when the runner adds no group.
        pad_to: the static sequence length of CUDA-graphed stages (default: the stage's first batch's).
        graph_warmup: eager steps before each stage's capture.
        quiet: no progress bar in :meth:`run`.
        log_every: :meth:`run` reads the losses (one host synchronisation) every that many steps,
            to show them and to check that they are finite (module docstring).
        measure: add ``time_ms`` and ``peak_mem_mb`` to every step's metrics
            (:mod:`fastkd.runner.measure`); this synchronises with the device twice per step.
    """

    def __init__(
        self,
        student: nn.Module | ModelAdapter,
        teacher: nn.Module | ModelAdapter | OfflineTeacher | None,
        schedule: Schedule,
        optimizer: torch.optim.Optimizer,
        *,
        layer_map: object = "uniform",
        temperature: float = 1.0,
        divergence: str = "forward",
        beta: float | None = None,
        vocab: str = "exact",
        tail: str = "renormalize",
        attention: str | None = None,
        relation_heads: int | None = None,
        relation_projections: Sequence[str] | None = None,
        cuda_graphs: str | bool = "auto",
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        lr_scheduler: object = None,
        pad_to: int | None = None,
        graph_warmup: int = 3,
        quiet: bool = False,
        log_every: int = 10,
        measure: bool = False,
    ) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule: expected a fastkd.Schedule, got {type(schedule).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        check_choice("cuda_graphs", cuda_graphs, ("auto", True, False))
        for name, value in (("checkpoint_every", checkpoint_every), ("pad_to", pad_to)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name}: expected a positive int or None, got {value!r}")
        if not isinstance(graph_warmup, int) or graph_warmup < 0:
            raise ValueError(f"graph_warmup: expected an int >= 0, got {graph_warmup!r}")
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every <= 0:
            raise ValueError(f"log_every: expected a positive int, got {log_every!r}")
        if not isinstance(measure, bool):
            raise TypeError(f"measure: expected a bool, got {type(measure).__name__}")
        attention, relation_heads, relation_projections = _check_attention_options(
            attention, relation_heads, relation_projections
        )
        # A DDP student runs its side of each step as the DDP module's forward (self.wrapper);
        # an FSDP2 one is used as it is (fastkd.runner.parallel).
        inner, self.parallel = unwrap(student)
        self.wrapper = student if self.parallel == "ddp" else None
        if self.parallel == "fsdp" and not isinstance(inner, ModelAdapter):
            check_fsdp(inner)
        self.student = as_adapter(inner, "student")
        # An offline teacher: the OfflineTeacher given (or None): self.teacher is then None.
        self.offline = teacher is None or isinstance(teacher, OfflineTeacher)
        self.offline_teacher = teacher if isinstance(teacher, OfflineTeacher) else None
        self.teacher = None if self.offline else as_adapter(teacher, "teacher")
        self.schedule = schedule
        self.optimizer = optimizer
        self.temperature = check_temperature(temperature)
        # As the logit kernels read them: beta is jsd's (0.5 when None), 0.0 (unread) for the others.
        self.divergence, self.beta = check_divergence(divergence, beta)
        self.vocab = check_choice("vocab", vocab, VOCABS)
        self.tail = check_tail(tail, self.temperature)
        # The losses registered now, name -> StageLoss: what the schedule's names mean for this runner.
        self.losses = registered_losses()
        if self.offline:
            self.layer_map = LayerMap(hidden=(), attention=())
        else:
            self.layer_map = resolve_layer_map(layer_map, self.student.num_layers, self.teacher.num_layers)
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.pad_to = pad_to
        self.graph_warmup = graph_warmup
        self.quiet = quiet or rank() != 0  # the progress bar of rank 0 only
        self.log_every = log_every
        self.measure = measure

        parameter = next(self.student.module.parameters())
        self.device = parameter.device
        # need -> the schedule's losses that need it (for the checks and their messages)
        needed_by: dict[str, list[str]] = {}
        for name in dict.fromkeys(name for stage in schedule for name in stage.losses):
            for need in self.losses[name].needs:
                needed_by.setdefault(need, []).append(name)
        if self.offline:
            self._check_offline(needed_by)
        # How 'att' is computed (the constructor's `attention`, resolved) and its relation options.
        self.attention = self._check_attention(attention, needed_by.get("attention"))
        self.relation_heads = relation_heads
        self.relation_projections = relation_projections
        if self.attention == "relations" and "attention" in needed_by:
            self._check_relation_widths()
        # role -> (logit_scale, softcap) of each model whose LM head a loss needs
        self.head_transforms = self._check_heads(needed_by)
        project = "hidden" in needed_by and self.student.hidden_size != self.teacher.hidden_size
        if optimizer is None and lr_scheduler is not None:
            raise ValueError("lr_scheduler: the runner steps no optimizer (optimizer=None), so it takes no scheduler")
        if optimizer is not None:
            _check_scheduler(lr_scheduler, len(optimizer.param_groups), project)
        self.projections = Projections()
        if project:
            self.projections.extend(
                nn.Linear(self.student.hidden_size, self.teacher.hidden_size, device=self.device, dtype=parameter.dtype)
                for _ in self.layer_map.hidden
            )
        # how the step calls the projections: through their own DDP module beside a DDP student
        self._project = self.projections
        if project and self.parallel == "ddp":
            self._project = DistributedDataParallel(self.projections, device_ids=self.wrapper.device_ids)
        elif project and self.parallel == "fsdp":
            mesh = next(p.device_mesh for p in self.student.module.parameters() if is_dtensor(p))
            for projection in self.projections:
                fully_shard(projection, mesh=mesh)
        if project and optimizer is not None:
            optimizer.add_param_group({"params": list(self.projections.parameters())})
        self.lr_scheduler = lr_scheduler(optimizer) if callable(lr_scheduler) else lr_scheduler
        if self.lr_scheduler is not None and not hasattr(self.lr_scheduler, "step"):
            raise TypeError(
                f"lr_scheduler: the function returned {type(self.lr_scheduler).__name__}, expected a scheduler"
            )

        # Why steps run eagerly; None when each stage's step is captured in a CUDA graph.
        self.graph_reason: str | None
        if cuda_graphs is True and (self.parallel is not None or optimizer is None):
            raise ValueError("cuda_graphs: True needs a student on one device and an optimizer the runner steps")
        if cuda_graphs is True and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs: True needs the student on CUDA, it is on {self.device}")
        if cuda_graphs is False:
            self.graph_reason = "cuda_graphs=False"
        elif optimizer is None:
            self.graph_reason = "the runner steps no optimizer (optimizer=None)"
        elif self.parallel is not None:
            self.graph_reason = f"the student is {self.parallel.upper()}-wrapped"
        elif self.device.type != "cuda":
            self.graph_reason = f"the student is on {self.device.type}"
        else:
            self.graph_reason = make_capturable(optimizer, self.device)
        if self.graph_reason is not None and rank() == 0:  # logs of rank 0 only
            level = logging.WARNING if self.device.type == "cuda" and cuda_graphs is not False else logging.INFO
            log.log(level, "CUDA graphs off, steps run eagerly: %s", self.graph_reason)

        self.step_index = 0
        self._stage_index: int | None = None
        self._requests: tuple[Request, Request] | None = None
        self._graph: StageGraph | None = None
        self._meter = StepMeter(self.device)
        # The weight of each of self.losses at the current step, read by the step (and its CUDA graph).
        self._weights = torch.zeros(len(self.losses), device=self.device)
        self._index = {name: i for i, name in enumerate(self.losses)}
        self._filled: tuple[tuple[str, float], ...] | None = None
        self._watch = FiniteWatch(self.device, 1 + len(self.losses))

    # ----------------------------------------------------------------------------------------
    # Set-up checks.

    def _check_attention(self, attention: str | None, users: list[str] | None) -> str:
        """The attention mode: ``attention`` checked against the models, or the default chosen;
        ``users``: the schedule's losses that need the attention (None: none does)."""
        if not users:
            return attention or "qk"
        if not self.layer_map.attention:
            raise ValueError(f"layer_map: a stage uses {', '.join(map(repr, users))} but the layer map pairs no blocks")
        heads = (self.student.num_heads, self.teacher.num_heads)
        if attention != "relations" and heads[0] != heads[1]:
            chosen = f"attention={attention!r} needs"
            if attention is None:
                chosen = "attention='qk' (the default) and 'maps' need"
            raise ValueError(
                f"{', '.join(users)}: {chosen} equal head counts, the student has {heads[0]} attention heads and "
                f"the teacher {heads[1]}; pass attention='relations' with relation_heads=R (R dividing both models' "
                "query, key and value widths), which compares MiniLMv2 relations and takes any head counts and widths"
            )
        problems = {}
        for side, (role, model) in enumerate((("student", self.student), ("teacher", self.teacher))):
            blocks = sorted({pair[side] for pair in self.layer_map.attention})
            problem = model.attention_inputs_unsupported(blocks)
            if problem is not None:
                problems[role] = f"the {role} ({type(model.module).__name__}): {problem}"
        if attention is None:
            if not problems:
                return "qk"
            log.info("%s: attention='maps', since %s", ", ".join(users), "; ".join(problems.values()))
            return "maps"
        if attention != "maps" and problems:
            raise ValueError(
                f"attention={attention!r}: {'; '.join(problems.values())}; its attention cannot be seen through "
                "the queries and keys, use attention='maps'"
            )
        return attention

    def _check_relation_widths(self) -> None:
        """``relation_heads`` divides each chosen projection's width of each transformers model."""
        for role, model in (("student", self.student), ("teacher", self.teacher)):
            if not isinstance(model, TransformersAdapter):
                continue  # a ModelAdapter's widths are checked by relation_kl at the first step
            config = model.module.config.get_text_config()
            heads = model.num_heads
            head_dim = getattr(config, "head_dim", None) or model.hidden_size // heads
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            counts = {"q": heads, "k": kv_heads, "v": kv_heads}
            for name in self.relation_projections:
                width = counts[name] * head_dim
                if width % self.relation_heads:
                    raise ValueError(
                        f"relation_heads: {self.relation_heads} does not divide the {role}'s "
                        f"{PROJECTION_FIELDS[name]} width {width} ({counts[name]} heads of {head_dim}); pick a count "
                        f"dividing the widths of relation_projections={self.relation_projections} in both models"
                    )

    def _check_offline(self, needed_by: dict[str, list[str]]) -> None:
        """An offline teacher gives the logit loss only: no stage may need its hidden states,
        attention or head input beyond the built-in ``logit``; the divergence is forward KL; the
        student matches the teacher's manifest."""
        live = {need: needed_by[need] for need in ("hidden", "attention") if need in needed_by}
        heads = [name for name in needed_by.get("head", []) if self.losses[name].fn is not logit_loss]
        if heads:
            live["head"] = heads
        if live:
            users = sorted({name for names in live.values() for name in names})
            raise ValueError(
                f"teacher: the schedule's {', '.join(map(repr, users))} need a live teacher (its "
                f"{', '.join(NEED_WORDS[need] for need in live)}), but the teacher is offline (stored top-k "
                "log-probabilities); an offline teacher gives 'logit' (and 'ce') only"
            )
        if "head" in needed_by and self.divergence != "forward":
            raise ValueError(
                f"divergence: an offline teacher's logit loss is the forward KL of its stored top-k "
                f"(fastkd.sparse_logit_kl), got divergence={self.divergence!r}"
            )
        if self.offline_teacher is not None:
            self.offline_teacher.check_student(self.student.module)

    def _check_heads(self, needed_by: dict[str, list[str]]) -> dict[str, tuple[float, float | None]]:
        """Check the LM heads the losses need (``"head"``: both models', ``"student_head"``: the
        student's): they exist, their vocabularies agree as ``vocab`` says and both models are causal
        or both masked LMs; return each such model's checked ``(logit_scale, softcap)``."""
        users = {"student": needed_by.get("head", []) + needed_by.get("student_head", []),
                 "teacher": needed_by.get("head", [])}
        transforms = {}
        for role, model in (("student", self.student), ("teacher", self.teacher)):
            if not users[role] or model is None:
                continue
            model.lm_head()  # raises where there is none
            scale, softcap = model.head_transform()
            transforms[role] = check_head(role, scale, softcap)
        if "head" in needed_by and self.teacher is not None:
            prefix = ", ".join(needed_by["head"])
            try:
                check_vocab(self.vocab, self.student.lm_head()[0].shape[0], self.teacher.lm_head()[0].shape[0],
                            ("the student's LM head", "the teacher's LM head"))
            except ValueError as error:
                raise ValueError(f"{prefix}: {error}") from None
            if self.student.causal != self.teacher.causal:
                kinds = {True: "a causal LM", False: "a masked LM"}
                raise ValueError(
                    f"{prefix}: the student is {kinds[self.student.causal]} and the teacher "
                    f"{kinds[self.teacher.causal]}, so their logits at a position predict different tokens"
                )
        return transforms

    # ----------------------------------------------------------------------------------------
    # Position in the schedule.

    @property
    def finished(self) -> bool:
        return self.step_index >= self.schedule.total_steps

    @property
    def stage(self) -> Stage:
        """The stage of the next step (the last stage once the schedule has ended)."""
        return self.schedule[self.schedule.locate(min(self.step_index, self.schedule.total_steps - 1))[0]]

    @property
    def graph_captured(self) -> bool:
        """Whether the current stage's step is captured in a CUDA graph."""
        return self._graph is not None and self._graph.captured

    def seek(self, step: int) -> None:
        """Move to global step ``step``: the next :meth:`step` runs that step of its stage."""
        if not isinstance(step, int) or not 0 <= step <= self.schedule.total_steps:
            raise ValueError(f"step: expected an int in 0..{self.schedule.total_steps}, got {step!r}")
        self.step_index = step

    def _needs(self, stage: Stage) -> set[str]:
        """What the stage's losses need (``NEEDS`` of :mod:`fastkd.runner.losses`)."""
        return {need for name in stage.losses for need in self.losses[name].needs}

    def _set_modes(self) -> None:
        """Student in train mode, teacher in eval mode, fastkd's attention on exactly in stages
        whose losses need the attention."""
        uses_att = "attention" in self._needs(self.schedule[self._stage_index])
        self.student.set_attention_maps(uses_att)
        self.student.module.train()
        if self.teacher is not None:
            self.teacher.set_attention_maps(uses_att)
            self.teacher.module.eval()

    def _enter_stage(self, index: int) -> None:
        needs = self._needs(self.schedule[index])
        uses_att = "attention" in needs
        pairs = {
            "hidden": self.layer_map.hidden if "hidden" in needs else (),
            "att": self.layer_map.attention if uses_att else (),
        }
        inputs = None
        if uses_att and self.attention != "maps":
            inputs = "qkv" if self.attention == "relations" and "v" in self.relation_projections else "qk"
        self._requests = tuple(
            Request(
                hidden=tuple(pair[side] for pair in pairs["hidden"]),
                attentions=tuple(pair[side] for pair in pairs["att"]),
                head_input=head_input,
                attention_inputs=inputs,
            )
            for side, head_input in ((0, bool(needs & {"head", "student_head"})),
                                     (1, "head" in needs and self.teacher is not None))
        )
        self._graph = None
        if self.graph_reason is None:
            self._graph = StageGraph(
                self._losses, self._eager_step, self.optimizer, warmup=self.graph_warmup, pad_to=self.pad_to
            )
        self._stage_index = index

    # ----------------------------------------------------------------------------------------
    # One step.

    def _losses(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[total, L_name for each loss of the stage]``, a 1-D float32 tensor: each loss's
        function called in the stage's order (:mod:`fastkd.runner.losses`), under
        ``expected_upstream(w_name)``; ``total = sum(w * L)`` with the weights read from
        ``self._weights``, a :class:`WeightedLosses` result's ``total`` as it is."""
        t = None
        if not self._requests[1].empty:
            with torch.no_grad():
                t = self.teacher.features(batch, **self._requests[1].kwargs())
        if self.wrapper is not None:
            return forward_through(self.wrapper, self._student_losses, batch, t)
        return self._student_losses(batch, t)

    def _student_losses(self, batch: Mapping[str, torch.Tensor], t: Features | None) -> torch.Tensor:
        """:meth:`_losses` given the teacher's features ``t``: the student's side of the step."""
        stage = self.schedule[self._stage_index]
        student_request = self._requests[0]
        s = None if student_request.empty else self.student.features(batch, **student_request.kwargs())
        student_hidden = [] if s is None else s.hidden
        if self.projections and student_hidden:
            student_hidden = self._project(student_hidden)
        weights = {name: self._weights[self._index[name]] for name in stage.losses}
        ctx = LossContext(self, stage, batch, s, t, student_hidden, [] if t is None else t.hidden, weights)
        values: dict[str, torch.Tensor] = {}
        total = None
        for name in stage.losses:
            if name in values:  # given by an earlier loss's WeightedLosses
                continue
            with _one_pass.expected_upstream(weights[name]):
                result = self.losses[name].fn(ctx)
            if isinstance(result, WeightedLosses):
                given = _check_values(name, stage, values, result.values)
                part = result.total.float()
            else:
                given = _check_values(name, stage, values, {name: result})
                part = weights[name] * given[name]
            values.update(given)
            total = part if total is None else total + part
        return torch.stack([total, *(values[name] for name in stage.losses)])

    def _fill_weights(self, stage: Stage, step: int) -> None:
        """Write the weights of step ``step`` of ``stage`` into ``self._weights`` (where they changed)."""
        weights = tuple((name, stage.weight(name, step)) for name in stage.losses)
        if weights != self._filled:
            for name, weight in weights:
                self._weights[self._index[name]].fill_(weight)
            self._filled = weights

    def _eager_step(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        values = self._losses(batch)
        values[0].backward()
        self.optimizer.step()
        return values.detach()

    def _prepare_batch(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(f"batch: expected a dict with 'input_ids' (and 'attention_mask'), got {type(batch).__name__}")
        prepared = {name: value.to(self.device, non_blocking=True) for name, value in batch.items()}
        if "attention_mask" not in prepared:
            prepared["attention_mask"] = torch.ones_like(prepared["input_ids"])
        stage = self.schedule[self._stage_index]
        if self.offline and "head" in self._needs(stage):
            missing = [name for name in OFFLINE_FIELDS if name not in prepared]
            if missing:
                raise ValueError(
                    f"batch: stage {stage.name!r} has 'logit' from an offline teacher, which needs the batch's "
                    f"{', '.join(map(repr, OFFLINE_FIELDS))} (as fastkd.OfflineTeacher yields them), but it has no "
                    f"{', '.join(map(repr, missing))}"
                )
        if "labels" not in prepared and "labels" in self._needs(stage):
            needing = [name for name in stage.losses if "labels" in self.losses[name].needs]
            raise ValueError(
                f"batch: stage {stage.name!r} has {', '.join(map(repr, needing))}, which needs the batch's 'labels' "
                "(the hard-label targets, as transformers takes them), but the batch has none"
            )
        return prepared

    def stage_losses(self, batch: Mapping[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The losses of global step ``step`` on ``batch``, for a caller that does the backward pass
        and the optimizer step itself (``fastkd.integrations.transformers.DistillationTrainer``):
        ``(total, {name: L_name})``, ``total = sum(w * L)`` with its graph, the values detached. The
        stage of ``step`` is entered (models' modes set) as :meth:`step` enters it."""
        if not isinstance(step, int) or not 0 <= step < self.schedule.total_steps:
            raise ValueError(f"step: expected an int in 0..{self.schedule.total_steps - 1}, got {step!r}")
        _, stage = self._begin(step)
        values = self._losses(self._prepare_batch(batch))
        return values[0], dict(zip(stage.losses, values[1:].detach()))

    def _begin(self, step: int) -> tuple[int, Stage]:
        """Get ready for global step ``step``: its stage entered, the models' modes and the step's
        weights set; ``(the stage's index, the stage)``."""
        index, step_in_stage = self.schedule.locate(step)
        if index != self._stage_index:
            self._enter_stage(index)
        self._set_modes()
        stage = self.schedule[index]
        self._fill_weights(stage, step_in_stage)
        return index, stage

    def step(self, batch: Mapping[str, torch.Tensor]) -> Metrics:
        """Run one optimizer step of the current stage on ``batch``; its metrics, without waiting for it.

        Metrics (a read-only mapping): ``stage`` (name), ``step`` (global, from 0), ``loss``
        (weighted total) and one ``loss_<name>`` per loss of the stage, read from the device when
        one is asked for (which also checks for non-finite losses, see the module docstring); with
        ``measure=True`` also ``time_ms`` and ``peak_mem_mb`` (peak memory of the step above what
        was held when it began, see :mod:`fastkd.runner.measure`).
        """
        if self.optimizer is None:
            raise RuntimeError("step: the runner was built with optimizer=None (stage_losses computes the losses)")
        if self.finished:
            raise RuntimeError(f"the schedule has ended after {self.schedule.total_steps} steps")
        index, stage = self._begin(self.step_index)
        batch = self._prepare_batch(batch)
        if self.measure:
            self._meter.start()
        values = self._graph.step(batch) if self._graph is not None else self._eager_step(batch)
        measured = {}
        if self.measure:
            seconds, peak = self._meter.stop()
            measured = {"time_ms": seconds * 1e3, "peak_mem_mb": peak}
        self._watch.update(self.step_index, values)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        metrics = Metrics(stage.name, self.step_index, _loss_names(stage), values, measured, self.check_finite)
        self.step_index += 1
        self._autosave(index)
        return metrics

    def run(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> Iterator[Metrics]:
        """Step through ``batches`` until the schedule ends or they run out, yielding each step's metrics.

        Every ``log_every`` steps and at the end, the losses are read: the progress bar shows them,
        and a loss that became non-finite raises :class:`NonFiniteLossError` (module docstring).
        """
        from tqdm.auto import tqdm

        bar = tqdm(total=self.schedule.total_steps, initial=self.step_index, disable=self.quiet, desc="distil")
        try:
            for batch in batches:
                if self.finished:
                    break
                metrics = self.step(batch)
                if self.step_index % self.log_every == 0 or self.finished:
                    # Reading the losses synchronises once and checks that every step so far was finite.
                    losses = {k: f"{v:.4g}" for k, v in metrics.items() if k.startswith("loss")}
                    bar.update(self.step_index - bar.n)
                    bar.set_postfix({"stage": metrics["stage"], **losses}, refresh=False)
                yield metrics
            self.check_finite()
        finally:
            bar.update(self.step_index - bar.n)
            bar.close()

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if a step so far had a non-finite loss (one host synchronisation)."""
        found = self._watch.read()
        if found is None:
            return
        step, values = found
        stage = self.schedule[self.schedule.locate(step)[0]]
        raise NonFiniteLossError(stage.name, step, dict(zip(_loss_names(stage), values)))

    # ----------------------------------------------------------------------------------------
    # Checkpoints.

    def save(self, path: str | os.PathLike) -> None:
        """Write a checkpoint (see :mod:`fastkd.runner.checkpoint`) to ``path``, after checking that
        every step so far had finite losses (:meth:`check_finite`)."""
        self.check_finite()
        checkpoint.save(self, path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save`; the next step is the saved position."""
        checkpoint.load(self, path)
        self._stage_index = None
        self._watch.reset()

    def _autosave(self, index: int) -> None:
        if self.checkpoint_dir is None:
            return
        stage_end = self.step_index == self.schedule.start(index) + self.schedule[index].steps
        periodic = self.checkpoint_every is not None and self.step_index % self.checkpoint_every == 0
        if stage_end or periodic:
            os.makedirs(self.checkpoint_dir, exist_ok=True)
            self.save(os.path.join(self.checkpoint_dir, "latest.dcp" if self.parallel == "fsdp" else "latest.pt"))


def _check_attention_options(
    attention: object, relation_heads: object, relation_projections: object
) -> tuple[str | None, int | None, tuple[str, ...] | None]:
    """The constructor's attention arguments, checked: (attention or None, relation_heads, projections)."""
    if attention is not None and attention not in ATTENTION_MODES:
        raise ValueError(
            f"attention: expected one of {', '.join(map(repr, ATTENTION_MODES))} (or None for the default), "
            f"got {attention!r}"
        )
    relation_given = relation_heads is not None or relation_projections is not None
    if attention not in (None, "relations") and relation_given:
        name = "relation_heads" if relation_heads is not None else "relation_projections"
        raise ValueError(f"{name}: only used with attention='relations', got attention={attention!r}")
    if attention != "relations" and not relation_given:
        return attention, None, None
    if relation_heads is None:
        raise ValueError("relation_heads: attention='relations' needs relation_heads=R, the number of relation heads")
    if isinstance(relation_heads, bool) or not isinstance(relation_heads, int):
        raise TypeError(f"relation_heads: expected a positive int, got {type(relation_heads).__name__}")
    if relation_heads <= 0:
        raise ValueError(f"relation_heads: expected a positive int, got {relation_heads}")
    if relation_projections is None:
        relation_projections = PROJECTIONS
    if isinstance(relation_projections, str) or not isinstance(relation_projections, (list, tuple, set, frozenset)):
        raise TypeError(
            "relation_projections: expected a sequence of some of 'q', 'k', 'v' such as ('q', 'k'), "
            f"got {relation_projections!r}"
        )
    names = list(relation_projections)
    unknown = [name for name in names if name not in PROJECTIONS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            "relation_projections: expected a non-empty sequence of distinct 'q', 'k', 'v', "
            f"got {relation_projections!r}"
        )
    return "relations", relation_heads, tuple(name for name in PROJECTIONS if name in names)


def _check_scheduler(lr_scheduler: object, groups: int, project: bool) -> None:
    """A scheduler built beforehand must schedule the optimizer's ``groups`` parameter groups and,
    if ``project``, the one the runner is about to add for its projections."""
    if lr_scheduler is None or callable(lr_scheduler):
        return
    if not hasattr(lr_scheduler, "step"):
        raise TypeError(
            "lr_scheduler: expected a function optimizer -> scheduler or a scheduler, "
            f"got {type(lr_scheduler).__name__}"
        )
    scheduled = getattr(lr_scheduler, "base_lrs", None)
    if scheduled is not None and len(scheduled) != groups + project:
        added = " and the runner adds one for its projections" if project else ""
        raise ValueError(
            f"lr_scheduler: it schedules {len(scheduled)} parameter group(s), but the optimizer has {groups}{added}; "
            "pass a function optimizer -> scheduler instead (e.g. "
            "lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, f)), which the runner calls once "
            "every group is there"
        )


def _check_values(
    name: str, stage: Stage, done: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The values loss ``name``'s function returned as float32 0-d tensors, after checking that they
    are such tensors, include ``name`` and are of the stage's losses not computed yet."""
    wrong = [n for n in values if n not in stage.losses or n in done]
    if name not in values or wrong:
        remaining = [n for n in stage.losses if n not in done]
        raise RuntimeError(
            f"loss {name!r}: its function returned values for {list(values)}; expected {name!r} and, in a "
            f"WeightedLosses, only losses of stage {stage.name!r} not computed yet ({remaining})"
        )
    for n, value in values.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 0 or not value.is_floating_point():
            got = f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else \
                type(value).__name__
            raise TypeError(f"loss {name!r}: its function returned {got} for {n!r}, expected a 0-d floating tensor")
    return {n: value.float() for n, value in values.items()}


def _loss_names(stage: Stage) -> list[str]:
    """The metric names of a step's losses: ``loss`` (the weighted total), then ``loss_<name>``."""
    return ["loss", *(f"loss_{name}" for name in stage.losses)]
