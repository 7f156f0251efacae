"""Runner checkpoints: everything needed to continue at the same step of the same stage.

A checkpoint (``torch.save`` of a dict; load only files you trust, it is a pickle) holds the
student's and the projections' ``state_dict``, the optimizer's and the LR scheduler's, the global
step, the schedule (checked on load) and the RNG states of Python, NumPy, torch's CPU generator
and every CUDA device. The teacher is not saved: it does not change. On CPU, a run stopped in the
middle of a stage and resumed from its checkpoint with the remaining batches gives bit-for-bit the
losses and weights of the uninterrupted run.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

FORMAT = 1


def _schedule_key(schedule) -> list[tuple[str, dict[str, float], int]]:
    return [(stage.name, dict(stage.losses), stage.steps) for stage in schedule]


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
    """Write ``runner``'s checkpoint to ``path`` (atomically: a temporary file, then a rename)."""
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
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


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
