"""The plain way, which the runner is measured against: what a distillation script usually does.

Both models are called whole with ``output_hidden_states=True, output_attentions=True`` (eager
attention, which is what transformers needs to return the maps), the full logits are computed, and
the losses are the eager ones of :mod:`fastkd.eager`, with the same pairs, projections, masks and
weights as :class:`~fastkd.runner.StageRunner` (so both compute the same losses when dropout is off):

- hidden: mean over pairs of ``sum_i m_i * mean_d (P(s) - t)^2 / n``, ``m`` the padding mask;
- att: mean over pairs of ``sum_{b,h,i} m_bi * KL(p_bhi || q_bhi) / (H * n)``;
- logit: ``sum_i m_i * r_i / n`` of the runner's divergence ``r_i`` of the models' own output logits
  (``eager.logit_divergence``: ``T^2 KL(softmax(t_i / T) || softmax(s_i / T))`` via ``F.kl_div`` for
  ``"forward"``), ``m`` the rows of :func:`fastkd.logit_mask`, over the first ``min(V_s, V_t)``
  entries with ``vocab="common"``;
- ce: ``F.cross_entropy`` of the student's output logits on :func:`fastkd.logit_labels`.

Only transformers models and those four losses; never CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from fastkd import eager
from fastkd._validation import IGNORE_INDEX
from fastkd.masks import logit_labels, logit_mask
from fastkd.runner.models import TransformersAdapter
from fastkd.runner.runner import StageRunner

PLAIN_LOSSES = ("hidden", "att", "logit", "ce")


class PlainRunner(StageRunner):
    """A :class:`StageRunner` whose steps are the plain way (module docstring); same arguments."""

    def __init__(self, student, teacher, schedule, optimizer, **kwargs) -> None:
        kwargs["cuda_graphs"] = False
        super().__init__(student, teacher, schedule, optimizer, **kwargs)
        for model in (self.student, self.teacher):
            if not isinstance(model, TransformersAdapter):
                raise TypeError("the plain way runs transformers models only")
        for stage in schedule:
            other = [name for name in stage.losses if name not in PLAIN_LOSSES]
            if other:
                raise ValueError(
                    f"schedule: stage {stage.name!r} has {', '.join(map(repr, other))}; the plain way computes "
                    f"{', '.join(map(repr, PLAIN_LOSSES))} only"
                )

    def _set_modes(self) -> None:
        self.student.module.train()
        self.teacher.module.eval()
        for model in (self.student, self.teacher):
            if model.module.config._attn_implementation != "eager":
                model.module.set_attn_implementation("eager")

    def _losses(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        stage = self.schedule[self._stage_index]
        inputs = {name: value for name, value in batch.items() if name != "labels"}
        with torch.no_grad():
            t = self.teacher.module(**inputs, output_hidden_states=True, output_attentions=True, use_cache=False)
        s = self.student.module(**inputs, output_hidden_states=True, output_attentions=True, use_cache=False)
        mask = batch["attention_mask"]
        losses = {}
        if "hidden" in stage.losses:
            pairs = self.layer_map.hidden
            students = [s.hidden_states[i] for i, _ in pairs]
            if self.projections:
                students = [p(h) for p, h in zip(self.projections, students)]
            losses["hidden"] = eager.hidden_mse(students, [t.hidden_states[j] for _, j in pairs], mask=mask)
        if "att" in stage.losses:
            pairs = self.layer_map.attention
            losses["att"] = eager.attention_kl(
                [s.attentions[i] for i, _ in pairs], [t.attentions[j] for _, j in pairs], mask
            )
        if "logit" in stage.losses:
            rows = logit_mask(batch.get("labels"), mask, causal=self.student.causal)
            vocab = min(s.logits.shape[-1], t.logits.shape[-1])
            losses["logit"] = eager.logit_divergence(
                s.logits[..., :vocab].float(), t.logits[..., :vocab].float(), rows, self.temperature,
                self.divergence, self.beta,
            )
        if "ce" in stage.losses:
            targets = logit_labels(batch["labels"], mask, causal=self.student.causal)
            logits = s.logits.float().flatten(0, -2)
            losses["ce"] = F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX)
        values = [losses[name].float() for name in stage.losses]
        total = sum(self._weights[self._index[name]] * value for name, value in zip(stage.losses, values))
        return torch.stack([total, *values])
