"""fastkd: fused knowledge-distillation losses for PyTorch.

``hidden_mse``, ``attention_kl``, ``attention_kl_qk``, ``relation_kl``, ``logit_kl`` and
``fused_linear_kl`` (and their ``nn.Module`` forms) compute the distillation losses on one of several backends (``available_backends``,
``set_backend``, or the ``FASTKD_BACKEND`` environment variable); ``logit_mask`` says which
token rows a logit loss counts and ``logit_labels`` their targets. ``Stage``, ``Schedule`` and
``StageRunner`` distil a student from a teacher in one, two or three stages; ``register_loss`` adds a
loss that a ``Stage`` can name.
"""

from fastkd._backend import available_backends, get_backend, set_backend
from fastkd._one_pass import get_passes, set_passes
from fastkd.attention import attention_kl
from fastkd.attention_qk import attention_kl_qk, relation_kl
from fastkd.fused_linear import FusedLinearKLLoss, fused_linear_kl
from fastkd.hidden import hidden_mse
from fastkd.logit import LogitParts, logit_kl
from fastkd.masks import logit_labels, logit_mask
from fastkd.modules import AttentionKLLoss, HiddenMSELoss, LogitKLLoss
from fastkd.offline import OfflineTeacher, topk_logprobs
from fastkd.sparse import fused_linear_sparse_kl, sparse_logit_kl
from fastkd.runner import Schedule, Stage, StageRunner, register_loss

__all__ = [
    "AttentionKLLoss",
    "FusedLinearKLLoss",
    "HiddenMSELoss",
    "LogitKLLoss",
    "LogitParts",
    "OfflineTeacher",
    "Schedule",
    "Stage",
    "StageRunner",
    "attention_kl",
    "attention_kl_qk",
    "available_backends",
    "fused_linear_kl",
    "fused_linear_sparse_kl",
    "get_backend",
    "get_passes",
    "hidden_mse",
    "logit_kl",
    "logit_labels",
    "logit_mask",
    "register_loss",
    "relation_kl",
    "set_backend",
    "set_passes",
    "sparse_logit_kl",
    "topk_logprobs",
]
