"""The stage runner: distil a student from a teacher in one, two or three stages.

``Stage`` and ``Schedule`` (:mod:`.schedule`) say which losses run for how many steps, of those
registered in :mod:`.losses` (the built-in ``hidden``, ``att``, ``logit``, ``ce``, and the users'
through ``register_loss``); ``StageRunner`` (:mod:`.runner`) runs them, asking each model only for
the features a stage's losses need
(:mod:`.models`: transformers glue, which gives the attention loss the paired blocks' queries and
keys (``attention="qk"``, the default), their projections (``"relations"``) or their maps
(``"maps"``), and the ``ModelAdapter`` interface for plain modules), pairing
layers (:mod:`.layer_map`), capturing each stage's step in a CUDA graph (:mod:`.graphs`), keeping
each step's losses on the device until they are read and stopping at a non-finite one
(:mod:`.metrics`) and writing resumable checkpoints (:mod:`.checkpoint`), with a DDP- or
FSDP2-wrapped student too (:mod:`.parallel`). :mod:`.plain` is the plain way it is measured against.
"""

from fastkd.runner.losses import LossContext, StageLoss, WeightedLosses, register_loss, registered_losses
from fastkd.runner.metrics import Metrics, NonFiniteLossError
from fastkd.runner.models import AttentionInputs, Features, ModelAdapter
from fastkd.runner.parallel import shard_model
from fastkd.runner.runner import StageRunner
from fastkd.runner.schedule import Schedule, Stage

__all__ = [
    "AttentionInputs", "Features", "LossContext", "Metrics", "ModelAdapter", "NonFiniteLossError", "Schedule", "Stage",
    "StageLoss", "StageRunner", "WeightedLosses", "register_loss", "registered_losses", "shard_model",
]
