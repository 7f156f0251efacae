"""The runner's students on several processes: DDP- and FSDP2-wrapped models (PyTorch's own).

- **DDP** (``torch.nn.parallel.DistributedDataParallel``): DDP averages the gradients of a step only
  when its forward ran through the DDP module, so the runner runs the student's whole side of a step
  (its features and every loss) as that forward: :func:`forward_through` calls the step's function
  as the wrapped module's ``forward`` for that one call. Every parameter a stage's losses use is
  then reached from the forward's output; a stage that leaves some unused (``hidden`` without
  ``logit`` leaves the LM head unused) needs ``find_unused_parameters=True``, as DDP says. The
  runner's projections are a DDP module of their own.
- **FSDP2** (``torch.distributed.fsdp.fully_shard``): the runner calls the student's base model
  (transformers' ``model.base_model``, without its LM head), so that module must be a
  ``fully_shard`` unit of its own (:func:`check_fsdp`); the LM head's weight, a sharded DTensor
  outside its forward, is gathered by the logit loss (``fastkd.distributed.full_weight``). The
  projections are ``fully_shard``-ed on the student's mesh.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

try:
    from torch.distributed.fsdp import FSDPModule, fully_shard
except ImportError:  # an older torch: no FSDP2
    FSDPModule = fully_shard = None


def unwrap(model: object) -> tuple[object, str | None]:
    """``(the model inside, "ddp" | "fsdp" | None)``: a DDP module's ``module``; an FSDP2 model is itself."""
    if isinstance(model, DistributedDataParallel):
        return model.module, "ddp"
    if FSDPModule is not None and isinstance(model, FSDPModule):
        return model, "fsdp"
    return model, None


def check_fsdp(model: nn.Module) -> None:
    """An FSDP2 student's base model must be a ``fully_shard`` unit (module docstring)."""
    base = getattr(model, "base_model", model)
    if not isinstance(base, FSDPModule):
        raise ValueError(
            f"student: an FSDP2 model whose base model ({type(base).__name__}) is not fully_shard-ed; the runner "
            "calls the base model without the LM head, so shard it as a unit of its own: fully_shard(layer) for each "
            "layer, then fully_shard(model.base_model), then fully_shard(model) (fastkd.runner.shard_model does it)"
        )


def shard_model(model: nn.Module, mesh=None, **options) -> nn.Module:
    """``fully_shard`` a transformers model as the runner needs it: each decoder/encoder layer, the
    base model, the LM head, then the whole model (``options``: ``fully_shard``'s keywords)."""
    base = model.base_model
    layers = next((m for m in base.modules() if isinstance(m, nn.ModuleList)), None)
    for layer in layers or ():
        fully_shard(layer, mesh=mesh, **options)
    fully_shard(base, mesh=mesh, **options)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not getattr(model.get_input_embeddings(), "weight", None):
        fully_shard(head, mesh=mesh, **options)
    return fully_shard(model, mesh=mesh, **options)


@contextlib.contextmanager
def _as_forward(module: nn.Module, fn: Callable) -> Iterator[None]:
    """``module.forward`` is ``fn`` inside; an instance ``forward`` set before (a wrapper's) is put back."""
    saved = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def forward_through(wrapper: DistributedDataParallel, fn: Callable, *args):
    """``fn(*args)`` run as the forward of the DDP module ``wrapper`` (module docstring)."""
    with _as_forward(wrapper.module, fn):
        return wrapper(*args)


def init_from_environment(device: str, timeout_s: float) -> tuple[int, int]:
    """``(rank, world size)``; under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the default
    process group is initialised first: gloo on CPU, NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``),
    with ``timeout_s`` on every collective, so that a rank waiting on a failed one raises instead of
    hanging (torchrun then stops the others)."""
    import datetime
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return rank(), world_size()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), world


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
