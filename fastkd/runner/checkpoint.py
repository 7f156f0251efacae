"""Runner checkpoints: everything needed to continue at the same step of the same stage.

A checkpoint (``torch.save`` of a dict; load only files you trust, it is a pickle) holds the
student's and the projections' ``state_dict``, the optimizer's and the LR scheduler's, the global
step, the schedule (checked on load: names, step counts and weights, a weight function by its
qualified name, which is the same in every process) and the RNG states of Python, NumPy, torch's
CPU generator and every CUDA device. The teacher is not saved: it does not change. On CPU, a run
stopped in the middle of a stage and resumed from its checkpoint with the remaining batches gives
bit-for-bit the losses and weights of the uninterrupted run.

On several processes (``fastkd.runner.parallel``): with a DDP student (every rank holds the same
weights) rank 0 writes the file and the others wait for it; the RNG states of every rank are in it,
each restored on its rank when the number of ranks is the same. With an FSDP2 student, ``path`` is a
directory written by ``torch.distributed.checkpoint`` (each rank its shards of the student, the
projections and the optimizer; rank 0 the rest): it can be loaded on another number of ranks,
which DCP reshards. It is written to ``<path>.tmp`` and renamed to ``path`` by rank 0 once every
rank has written its part (the previous one is ``<path>.old`` between the two renames).

Writes are durable: the checkpoint goes to ``<path>.tmp``, which is flushed and ``fsync``-ed, then
renamed over ``path`` (``os.replace``, atomic) and the directory is ``fsync``-ed. A process killed
at any point leaves either the previous checkpoint or the new one at ``path``; a write that fails
(a full disk) removes the temporary file, leaves the previous checkpoint as it was and raises
``OSError``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fastkd._files import fsync_directory
from fastkd.runner.parallel import barrier, rank, world_size

FORMAT = 1


def _weight_key(weight) -> float | str:
    """A constant weight itself; a function by its module and qualified name."""
    if not callable(weight):
        return weight
    owner = weight if hasattr(weight, "__qualname__") else type(weight)
    return f"{owner.__module__}.{owner.__qualname__}"


def _schedule_key(schedule) -> list[tuple[str, dict[str, float | str], int]]:
    return [
        (stage.name, {name: _weight_key(weight) for name, weight in stage.losses.items()}, stage.steps)
        for stage in schedule
    ]


def _rng_state() -> dict[str, object]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, object]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_states() -> list[dict[str, object]]:
    """The RNG states of every rank, in rank order (one without a process group)."""
    if world_size() == 1:
        return [_rng_state()]
    states = [None] * world_size()
    dist.all_gather_object(states, _rng_state())
    return states


def _own_rng_state(states: list[dict[str, object]]) -> dict[str, object] | None:
    return states[rank()] if len(states) == world_size() else None


def _trained(runner) -> nn.Module:
    """The student and the projections as one module (the FQNs of a DCP checkpoint)."""
    return nn.ModuleDict({"student": runner.student.module, "projections": runner.projections})


def _common_state(runner) -> dict[str, object]:
    return {
        "format": FORMAT,
        "step": runner.step_index,
        "schedule": _schedule_key(runner.schedule),
        "lr_scheduler": None if runner.lr_scheduler is None else runner.lr_scheduler.state_dict(),
        "rng": _rng_states(),
    }


def save(runner, path: str | os.PathLike) -> None:
    """Write ``runner``'s checkpoint to ``path``, durably (module docstring)."""
    path = os.fspath(path)
    if runner.parallel == "fsdp":
        _save_sharded(runner, path)
        return
    state = _common_state(runner)
    if rank() == 0:
        state.update(
            student=runner.student.module.state_dict(), projections=runner.projections.state_dict(),
            optimizer=runner.optimizer.state_dict(),
        )
        _write(state, path)
    barrier()


def _save_sharded(runner, path: str) -> None:
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = get_state_dict(_trained(runner), runner.optimizer)
    tmp = f"{path}.tmp"
    if rank() == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    barrier()
    dcp.save({"model": model, "optimizer": optimizer, "runner": _common_state(runner)}, checkpoint_id=tmp)
    barrier()
    if rank() == 0:  # the previous checkpoint is <path>.old for the moment between the two renames
        old = f"{path}.old"
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_directory(os.path.dirname(os.path.abspath(path)))
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def _write(state: dict[str, object], path: str) -> None:
    """``torch.save`` to ``<path>.tmp``, fsync, rename over ``path`` (module docstring)."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if not isinstance(error, OSError):
            raise
        message = f"could not write the checkpoint {path} ({error}); the previous checkpoint, if any, is unchanged"
        raise (OSError(message) if error.errno is None else OSError(error.errno, message)) from error
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def load(runner, path: str | os.PathLike) -> None:
    """Restore ``runner`` from the checkpoint at ``path`` (its schedule must be the saved one)."""
    if runner.parallel == "fsdp":
        _load_sharded(runner, os.fspath(path))
        return
    state = torch.load(path, map_location=runner.device, weights_only=False)
    _check(state, runner, path)
    runner.student.module.load_state_dict(state["student"])
    runner.projections.load_state_dict(state["projections"])
    runner.optimizer.load_state_dict(state["optimizer"])
    _restore(runner, state)


def _load_sharded(runner, path: str) -> None:
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optimizer = get_state_dict(_trained(runner), runner.optimizer)
    state = {"model": model, "optimizer": optimizer, "runner": _common_state(runner)}
    dcp.load(state, checkpoint_id=path)
    _check(state["runner"], runner, path)
    set_state_dict(_trained(runner), runner.optimizer, model_state_dict=model, optim_state_dict=optimizer)
    _restore(runner, state["runner"])


def _check(state: dict[str, object], runner, path) -> None:
    if state.get("format") != FORMAT:
        raise ValueError(f"path: {path} is not a fastkd runner checkpoint (format {state.get('format')!r})")
    if state["schedule"] != _schedule_key(runner.schedule):
        raise ValueError(
            f"schedule: the checkpoint was written for {state['schedule']}, this runner has "
            f"{_schedule_key(runner.schedule)}"
        )


def _restore(runner, state: dict[str, object]) -> None:
    """The scheduler, this rank's RNG states (when saved for as many ranks) and the step."""
    if runner.lr_scheduler is not None and state["lr_scheduler"] is not None:
        runner.lr_scheduler.load_state_dict(state["lr_scheduler"])
    rng = _own_rng_state(state["rng"])
    if rng is not None:
        rng["torch"] = rng["torch"].cpu()
        rng["cuda"] = [s.cpu() for s in rng["cuda"]]
        _set_rng_state(rng)
    runner.seek(state["step"])
