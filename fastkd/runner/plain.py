"""The plain way, which the runner is measured against: what a distillation script usually does.

Both models are called whole with ``output_hidden_states=True, output_attentions=True`` (eager
attention, which is what transformers needs to return the maps), the full logits are computed, and
the losses are written in eager PyTorch with the same pairs, projections, masks and weights as
:class:`~fastkd.runner.StageRunner` (so both compute the same losses when dropout is off):

- hidden: mean over pairs of ``sum_i m_i * mean_d (P(s) - t)^2 / n``;
- att: mean over pairs of ``sum_{b,h,i} m_bi * KL(p_bhi || q_bhi) / (H * n)``;
- logit: ``T^2 * sum_i m_i * KL(softmax(t_i / T) || softmax(s_i / T)) / n`` via ``F.kl_div``.

Only transformers models; never CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from fastkd.runner.models import TransformersAdapter
from fastkd.runner.runner import StageRunner

TINY = torch.finfo(torch.float32).tiny


def _masked_mean(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (rows * mask).sum() / mask.sum().clamp_min(1)


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
        mask = batch["attention_mask"].float()
        losses = []
        if "hidden" in stage.losses:
            terms = []
            for k, (i, j) in enumerate(self.layer_map.hidden):
                h = self.projections[k](s.hidden_states[i]) if self.projections else s.hidden_states[i]
                terms.append(_masked_mean((h - t.hidden_states[j]).pow(2).mean(-1), mask))
            losses.append(sum(terms) / len(terms))
        if "att" in stage.losses:
            terms = []
            for i, j in self.layer_map.attention:
                q, p = s.attentions[i], t.attentions[j]
                kl = F.kl_div(torch.log(q.clamp_min(TINY)), p, reduction="none").sum(-1)  # [B, H, L]
                terms.append(_masked_mean(kl, mask[:, None, :]) / q.shape[1])
            losses.append(sum(terms) / len(terms))
        if "logit" in stage.losses:
            logit_mask = mask if "labels" not in batch else mask * (batch["labels"] != -100)
            temp = self.temperature
            log_q = F.log_softmax(s.logits.float() / temp, dim=-1)
            log_p = F.log_softmax(t.logits.float() / temp, dim=-1)
            kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
            losses.append(_masked_mean(kl, logit_mask) * temp**2)
        total = sum(weight * loss for weight, loss in zip(stage.losses.values(), losses))
        return torch.stack([total, *losses])
