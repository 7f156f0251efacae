"""Which token rows of a batch a logit loss counts, and the label of each row.

transformers' ``labels`` are not shifted: a causal LM's logits at position ``i`` predict token
``i + 1``, so row ``i`` counts when position ``i`` is a real token and token ``i + 1`` has a label,
and that label is its target; a masked LM's (BERT's) logits at position ``i`` predict token ``i``
itself.
"""

from __future__ import annotations

import torch

from fastkd._validation import IGNORE_INDEX


def logit_mask(
    labels: torch.Tensor | None, attention_mask: torch.Tensor | None = None, *, causal: bool = True
) -> torch.Tensor:
    """The rows of ``[B, L]`` logits that a logit loss counts, a bool ``[B, L]`` tensor.

    With ``a_i = attention_mask[:, i] != 0`` (all True when ``attention_mask`` is None) and
    ``y_i = labels[:, i] != -100``:

    - causal LM (``causal=True``): row ``i`` is ``a_i & y_{i+1}``; the last row has no target and
      is False;
    - masked LM (``causal=False``): row ``i`` is ``a_i & y_i``;
    - ``labels`` None: row ``i`` is ``a_i`` (distillation needs no target).

    Pass the result as ``mask=`` to ``logit_kl`` or ``fused_linear_kl`` (flattened to ``[B * L]``
    when the logits are).
    """
    for name, value in (("labels", labels), ("attention_mask", attention_mask)):
        if value is not None and (not isinstance(value, torch.Tensor) or value.dim() != 2):
            raise TypeError(f"{name}: expected a [B, L] tensor or None, got {_describe(value)}")
    if labels is None and attention_mask is None:
        raise ValueError("labels, attention_mask: expected at least one of them, got None for both")
    if labels is not None and attention_mask is not None and labels.shape != attention_mask.shape:
        raise ValueError(
            f"attention_mask: shape {tuple(attention_mask.shape)} differs from labels' {tuple(labels.shape)}"
        )
    valid = None if attention_mask is None else attention_mask != 0
    if labels is None:
        return valid
    targets = labels != IGNORE_INDEX
    if causal:
        targets = torch.cat([targets[:, 1:], torch.zeros_like(targets[:, :1])], dim=1)
    return targets if valid is None else valid & targets


def logit_labels(
    labels: torch.Tensor, attention_mask: torch.Tensor | None = None, *, causal: bool = True
) -> torch.Tensor:
    """The target of each row of ``[B, L]`` logits, a ``[B, L]`` tensor of ``labels``' dtype:

    - causal LM (``causal=True``): row ``i``'s target is ``labels[:, i + 1]``;
    - masked LM (``causal=False``): row ``i``'s target is ``labels[:, i]``;

    and -100 (ignored) wherever ``logit_mask(labels, attention_mask, causal=causal)`` is False (the
    last row of a causal LM, padding, tokens without a label). Pass the result as ``labels=`` to
    ``logit_kl`` or ``fused_linear_kl`` (flattened to ``[B * L]`` when the logits are) with
    ``mask=logit_mask(...)``.
    """
    if labels is None:
        raise TypeError("labels: expected a [B, L] tensor of transformers labels, got None")
    rows = logit_mask(labels, attention_mask, causal=causal)
    if causal:
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    return labels.masked_fill(~rows, IGNORE_INDEX)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-D tensor of shape {tuple(value.shape)}"
    return type(value).__name__
