"""The losses as users write them in eager PyTorch: the baselines of the benchmarks and of the plain way.

``m`` is a row mask (nonzero = the row counts), ``n = max(sum m, 1)``:

- :func:`logit_kl`: ``T^2 * sum_i m_i * KL(softmax(t_i / T) || softmax(s_i / T)) / n`` via ``F.kl_div``;
- :func:`logit_divergence`: the same mean of each of ``fastkd.logit_kl``'s divergences ("jsd" as
  TRL's ``generalized_jsd_loss`` computes it, times ``T^2``);
- :func:`logit_kl_ce`: :func:`logit_kl` plus ``ce_weight * F.cross_entropy`` of the student on the
  labels of the valid rows;
- :func:`sparse_logit_kl`: a stored top-k teacher against the student's full logits (DistillKit's
  renormalised top-k formula): ``T^2 * sum_i m_i * sum_j p_ij (log p_ij - log q_i[id_ij]) / n``;
- :func:`hidden_mse`: mean over layer pairs of ``F.mse_loss(s, t)``, or with a mask of
  ``sum_i m_i * mean_d (s_i - t_i)^2 / n``;
- :func:`attention_kl`: mean over layer pairs of ``sum_{b,h,i} m_bi * KL(p_bhi || q_bhi) / (H * n)``
  on probabilities, ``log q`` taken of ``max(q, TINY)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastkd._constants import TINY


def masked_mean(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum m * rows / max(sum m, 1)``, ``mask`` broadcast against ``rows``."""
    m = mask.to(rows.dtype)
    return (rows * m).sum() / m.sum().clamp_min(1)


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * masked mean over rows of KL(softmax(t/T) || softmax(s/T))``, via ``F.kl_div``."""
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    return masked_mean(kl, mask) * temperature**2


def logit_divergence(student, teacher, mask, temperature, divergence, beta=None) -> torch.Tensor:
    """The masked mean over rows of ``fastkd.logit_kl``'s ``divergence`` as users write it:
    ``F.kl_div`` of two ``log_softmax``es for the KLs (times ``T^2``); for ``"jsd"`` TRL's
    ``generalized_jsd_loss``: ``log m`` as the ``logsumexp`` of ``log q + log(1 - beta)`` and
    ``log p + log(beta)``, then ``beta KL(p || m) + (1 - beta) KL(q || m)`` (times ``T^2``); for
    ``"tvd"`` ``0.5 * |softmax(t / T) - softmax(s / T)|`` summed."""
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    if divergence == "tvd":
        return masked_mean(0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1), mask)
    if divergence == "forward":
        rows = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    elif divergence == "reverse":
        rows = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    else:
        beta_t = torch.tensor(beta, dtype=log_q.dtype, device=log_q.device)
        log_m = torch.logsumexp(torch.stack([log_q + torch.log(1 - beta_t), log_p + torch.log(beta_t)]), dim=0)
        kl_teacher = F.kl_div(log_m, log_p, reduction="none", log_target=True)
        kl_student = F.kl_div(log_m, log_q, reduction="none", log_target=True)
        rows = (beta * kl_teacher + (1 - beta) * kl_student).sum(-1)
    return masked_mean(rows, mask) * temperature**2


def logit_kl_ce(student, teacher, mask, temperature, labels, ce_weight) -> torch.Tensor:
    """``logit_kl`` plus ``ce_weight`` times the student's cross-entropy at T = 1 on ``labels``
    (-100 ignored) of the valid rows, as ``F.cross_entropy`` averages it."""
    targets = torch.where(mask, labels, -100)
    ce = F.cross_entropy(student.flatten(0, -2), targets.flatten(), ignore_index=-100)
    return logit_kl(student, teacher, mask, temperature) + ce_weight * ce


def sparse_logit_kl(student, teacher_ids, teacher_logprobs, mask, temperature) -> torch.Tensor:
    """``T^2 * masked mean over rows of sum_j p_j (log p_j - log q_{id_j})``, ``p`` the softmax of
    the stored log-probabilities over the k ids, ``q = softmax(s / T)`` over the whole vocabulary;
    padding ids (-1, log-probability -inf) have ``p = 0``."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    stored = teacher_ids >= 0
    log_q_ids = log_q.gather(-1, teacher_ids.clamp_min(0).long())
    log_p = F.log_softmax(teacher_logprobs.float().masked_fill(~stored, -torch.inf) / temperature, dim=-1)
    # a row with no stored entry (log_p NaN there) has p = 0 everywhere and contributes 0
    kl = (torch.where(stored, log_p.exp(), 0) * torch.where(stored, log_p - log_q_ids, 0)).sum(-1)
    return masked_mean(kl, mask) * temperature**2


def hidden_mse(
    students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over layer pairs of ``F.mse_loss(s, t)``; with ``mask`` (``[B, L]``), of the masked mean
    over rows of ``mean_d (s - t)^2``."""
    if mask is None:
        terms = [F.mse_loss(s, t) for s, t in zip(students, teachers)]
    else:
        terms = [masked_mean((s - t).pow(2).mean(-1), mask) for s, t in zip(students, teachers)]
    return sum(terms) / len(terms)


def attention_kl(
    students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """Mean over layer pairs of ``sum_{b,h,i} m_bi * KL(p_bhi || q_bhi) / (H * n)`` on probabilities
    ``[B, H, L, L]``; ``mask`` is ``[B, L]`` over the query rows."""
    total = 0
    for q, p in zip(students, teachers):
        kl = F.kl_div(torch.log(q.clamp_min(TINY)), p, reduction="none").sum(-1)  # [B, H, Lq]
        m = mask[:, None, :].to(kl.dtype)
        total = total + (kl * m).sum() / (kl.shape[1] * mask.sum().clamp_min(1))
    return total / len(students)
