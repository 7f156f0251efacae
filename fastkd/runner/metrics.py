"""Step metrics that stay on the device until read, and the watch for non-finite losses.

A step's losses are a device tensor; :class:`Metrics` turns them into Python floats only when a
loss is read, all of them with one ``tolist()`` (one host synchronisation), then keeps them. The
:class:`FiniteWatch` keeps, on the device, the first step whose losses were not all finite and its
losses, updated with ``torch.where`` after every step; reading it is one synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite: the stage, the global step and the losses of that step.

    ``losses`` maps ``"loss"`` and each ``"loss_<name>"`` of the stage to its value at ``step``;
    ``names`` are the non-finite ones among the stage's losses (``["loss"]`` when only the weighted
    total is).
    """

    def __init__(self, stage: str, step: int, losses: Mapping[str, float]) -> None:
        self.stage, self.step, self.losses = stage, step, dict(losses)
        parts = [name for name, value in self.losses.items() if name != "loss" and not math.isfinite(value)]
        self.names = parts or ["loss"]
        values = ", ".join(f"{name}={value:.6g}" for name, value in self.losses.items())
        super().__init__(
            f"stage {stage!r}, global step {step}: {', '.join(self.names)} became non-finite ({values}); "
            "the run stopped, and no checkpoint was written after that step"
        )


class FiniteWatch:
    """The first step whose losses were not all finite (-1: none yet) and its losses, on the device."""

    def __init__(self, device: torch.device, size: int) -> None:
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.values = torch.zeros(size, device=device)

    def update(self, step: int, values: torch.Tensor) -> None:
        """Record ``values`` (1-D, at most ``size`` long) of global step ``step`` if it is the first bad one."""
        first = (self.step < 0) & ~torch.isfinite(values).all()
        self.step = torch.where(first, step, self.step)
        self.values = torch.where(first, F.pad(values, (0, self.values.numel() - values.numel())), self.values)

    def read(self) -> tuple[int, list[float]] | None:
        """``(step, values)`` of the first bad step, or None; synchronises with the device."""
        step = self.step.tolist()
        return None if step < 0 else (step, self.values.tolist())

    def reset(self) -> None:
        self.step.fill_(-1)


class Metrics(Mapping):
    """One step's metrics: ``stage``, ``step``, ``loss``, ``loss_<name>`` ... and, when measured,
    ``time_ms`` and ``peak_mem_mb``.

    The losses stay in the device tensor ``values`` until one is read; then ``on_read()`` runs
    (the runner's check for non-finite losses) and every loss is converted at once.
    """

    def __init__(
        self,
        stage: str,
        step: int,
        names: Sequence[str],
        values: torch.Tensor,
        measured: Mapping[str, float],
        on_read: Callable[[], None],
    ) -> None:
        self._fixed = {"stage": stage, "step": step, **measured}
        self._names = tuple(names)
        self._values = values
        self._on_read = on_read
        self._floats: dict[str, float] | None = None

    def _losses(self) -> dict[str, float]:
        if self._floats is None:
            self._on_read()
            self._floats = dict(zip(self._names, self._values.tolist()))
        return self._floats

    def __getitem__(self, key: str) -> object:
        if key in self._fixed:
            return self._fixed[key]
        if key in self._names:
            return self._losses()[key]
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self._fixed or key in self._names

    def __iter__(self) -> Iterator[str]:
        yield "stage"
        yield "step"
        yield from self._names
        yield from (key for key in self._fixed if key not in ("stage", "step"))

    def __len__(self) -> int:
        return len(self._fixed) + len(self._names)

    def __repr__(self) -> str:
        return f"Metrics({dict(self)!r})"
