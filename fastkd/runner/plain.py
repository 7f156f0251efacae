"""The plain way, which the runner is measured against: what a distillation script usually does.

Both models are called whole with ``output_hidden_states=True, output_attentions=True`` (eager
attention, which is what transformers needs to return the maps), the full logits are computed, and
the losses are the eager ones of :mod:`fastkd.eager`, with the same pairs, projections, masks and
weights as :class:`~fastkd.runner.StageRunner` (so both compute the same losses when dropout is off):

- hidden: mean over pairs of ``sum_i m_i * mean_d (P(s) - t)^2 / n``, ``m`` the padding mask;
- att: mean over pairs of ``sum_{b,h,i} m_bi * KL(p_bhi || q_bhi) / (H * n)``;
- logit: ``T^2 * sum_i m_i * KL(softmax(t_i / T) || softmax(s_i / T)) / n`` via ``F.kl_div``, ``m``
  the rows of :func:`fastkd.logit_mask`.

Only transformers models; never CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fastkd import eager
from fastkd.masks import logit_mask
from fastkd.runner.models import TransformersAdapter
from fastkd.runner.runner import StageRunner


class PlainRunner(StageRunner):
    """A :class:`StageRunner` whose steps are the plain way (module docstring); same arguments."""

    def __init__(self, student, teacher, schedule, optimizer, **kwargs) -> None:
        kwargs["cuda_graphs"] = False
        super().__init__(student, teacher, schedule, optimizer, **kwargs)
        for model in (self.student, self.teacher):
            if not isinstance(model, TransformersAdapter):
                raise TypeError("the plain way runs transformers models only")

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
        losses = []
        if "hidden" in stage.losses:
            pairs = self.layer_map.hidden
            students = [s.hidden_states[i] for i, _ in pairs]
            if self.projections:
                students = [p(h) for p, h in zip(self.projections, students)]
            losses.append(eager.hidden_mse(students, [t.hidden_states[j] for _, j in pairs], mask=mask))
        if "att" in stage.losses:
            pairs = self.layer_map.attention
            losses.append(
                eager.attention_kl([s.attentions[i] for i, _ in pairs], [t.attentions[j] for _, j in pairs], mask)
            )
        if "logit" in stage.losses:
            rows = logit_mask(batch.get("labels"), mask, causal=self.student.causal)
            losses.append(eager.logit_kl(s.logits.float(), t.logits.float(), rows, self.temperature))
        return self._weighted(stage, losses)
