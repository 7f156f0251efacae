"""Runner checkpoints: everything needed to continue at the same step of the same stage.

A checkpoint (``torch.save`` of a dict; load only files you trust, it is a pickle) holds the
student's and the projections' ``state_dict``, the optimizer's and the LR scheduler's, the global
step, the schedule (checked on load: names, step counts and weights, a weight function by its
qualified name, which is the same in every process) and the RNG states of Python, NumPy, torch's
CPU generator and every CUDA device. The teacher is not saved: it does not change. On CPU, a run
stopped in the middle of a stage and resumed from its checkpoint with the remaining batches gives
bit-for-bit the losses and weights of the uninterrupted run.

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

import numpy as np
import torch

from fastkd._files import fsync_directory

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


def save(runner, path: str | os.PathLike) -> None:
    """Write ``runner``'s checkpoint to ``path``, durably (module docstring)."""
    state = {
        "format": FORMAT,
        "step": runner.step_index,
        "schedule": _schedule_key(runner.schedule),
        "student": runner.student.module.state_dict(),
        "projections": runner.projections.state_dict(),
        "optimizer": runner.optimizer.state_dict(),
        "lr_scheduler": None if runner.lr_scheduler is None else runner.lr_scheduler.state_dict(),
        "rng": _rng_state(),
    }
    path = os.fspath(path)
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
    state = torch.load(path, map_location=runner.device, weights_only=False)
    if state.get("format") != FORMAT:
        raise ValueError(f"path: {path} is not a fastkd runner checkpoint (format {state.get('format')!r})")
    if state["schedule"] != _schedule_key(runner.schedule):
        raise ValueError(
            f"schedule: the checkpoint was written for {state['schedule']}, this runner has "
            f"{_schedule_key(runner.schedule)}"
        )
    runner.student.module.load_state_dict(state["student"])
    runner.projections.load_state_dict(state["projections"])
    runner.optimizer.load_state_dict(state["optimizer"])
    if runner.lr_scheduler is not None and state["lr_scheduler"] is not None:
        runner.lr_scheduler.load_state_dict(state["lr_scheduler"])
    state["rng"]["torch"] = state["rng"]["torch"].cpu()
    state["rng"]["cuda"] = [s.cpu() for s in state["rng"]["cuda"]]
    _set_rng_state(state["rng"])
    runner.seek(state["step"])
