"""``nn.Module`` forms of the losses: the constructor takes the options, ``forward`` the tensors."""

from __future__ import annotations

from torch import nn

from fastkd.attention import attention_kl
from fastkd.hidden import hidden_mse
from fastkd.logit import logit_kl


class HiddenMSELoss(nn.Module):
    """``hidden_mse(student, teacher, mask=mask, reduction=reduction)``."""

    def __init__(self, *, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, student, teacher, mask=None):
        return hidden_mse(student, teacher, mask=mask, reduction=self.reduction)


class AttentionKLLoss(nn.Module):
    """``attention_kl(student, teacher, mask=mask, kind=kind, reduction=reduction)``."""

    def __init__(self, *, kind: str = "probs", reduction: str = "mean"):
        super().__init__()
        self.kind, self.reduction = kind, reduction

    def forward(self, student, teacher, mask=None):
        return attention_kl(student, teacher, mask=mask, kind=self.kind, reduction=self.reduction)


class LogitKLLoss(nn.Module):
    """``logit_kl(student_logits, teacher_logits, mask=mask, labels=labels, **options)`` with the
    options (``temperature``, ``reduction``, ``divergence``, ``beta``, ``ce_weight``, ``vocab``) fixed
    at construction."""

    def __init__(self, *, temperature: float = 1.0, reduction: str = "mean", divergence: str = "forward",
                 beta: float | None = None, ce_weight: float = 0.0, vocab: str = "exact"):
        super().__init__()
        self.temperature, self.reduction = temperature, reduction
        self.divergence, self.beta, self.ce_weight, self.vocab = divergence, beta, ce_weight, vocab

    def forward(self, student_logits, teacher_logits, mask=None, labels=None):
        return logit_kl(
            student_logits, teacher_logits, temperature=self.temperature, mask=mask, reduction=self.reduction,
            divergence=self.divergence, beta=self.beta, labels=labels,
            ce_weight=self.ce_weight, vocab=self.vocab,
        )
