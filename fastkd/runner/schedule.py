"""Stages and schedules: which losses, with which weights, for how many steps.

A :class:`Stage` trains with a weighted sum of some of the registered losses
(:mod:`fastkd.runner.losses`: the built-in ``"hidden"``, ``"att"``, ``"logit"``, ``"ce"``, and any
that :func:`~fastkd.runner.losses.register_loss` added); a :class:`Schedule` runs stages one after
the other. A weight is a constant or a
function ``weight(k) -> float`` of the step ``k`` within the stage (from 0), called before each step
and checked then (finite, >= 0). The presets are the three configurations, every weight 1.0 unless
``weights`` says otherwise:

==============  ====================  ====================  ===========
preset          Stage "I"             Stage "II"            Stage "III"
==============  ====================  ====================  ===========
``one-stage``   hidden + att + logit
``two-stage``   hidden + att          logit
``three-stage`` hidden + att          hidden + att + logit  logit
==============  ====================  ====================  ===========
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from fastkd._validation import check_choice
from fastkd.runner.losses import registered_losses

PRESETS: dict[str, tuple[tuple[str, ...], ...]] = {
    "one-stage": (("hidden", "att", "logit"),),
    "two-stage": (("hidden", "att"), ("logit",)),
    "three-stage": (("hidden", "att"), ("hidden", "att", "logit"), ("logit",)),
}

STAGE_NAMES = ("I", "II", "III")

Weight = float | Callable[[int], float]


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


def _check_weight(where: str, weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise TypeError(f"{where}: expected a float weight, got {type(weight).__name__}")
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{where}: expected a finite weight >= 0, got {weight!r}")
    return float(weight)


def _check_losses(losses: object) -> Mapping[str, Weight]:
    registered = tuple(registered_losses())
    if not isinstance(losses, Mapping):
        raise TypeError(f"losses: expected a mapping of loss name to weight, got {type(losses).__name__}")
    if not losses:
        raise ValueError(f"losses: expected at least one of {', '.join(registered)}, got an empty mapping")
    checked = {}
    for name, weight in losses.items():
        if name not in registered:
            raise ValueError(
                f"losses: unknown loss {name!r}, expected some of the registered losses "
                f"{', '.join(map(repr, registered))} (fastkd.register_loss adds one)"
            )
        checked[name] = weight if callable(weight) else _check_weight(f"losses[{name!r}]", weight)
    # Registry order (hidden, att, logit, ce, then the users' in the order registered), whatever order
    # the caller wrote.
    return MappingProxyType({name: checked[name] for name in registered if name in checked})


@dataclass(frozen=True, eq=True)
class Stage:
    """One stage: ``loss = sum(w_name(k) * L_name for name in losses)`` at its step ``k``, for ``steps`` steps.

    Args:
        name: shown in metrics and the progress bar.
        losses: maps registered loss names (``"hidden"``, ``"att"``, ``"logit"``, ``"ce"`` or one
            that ``fastkd.register_loss`` added) to a weight: a float >= 0, or a function of the
            step within the stage (0 .. steps - 1) returning one.
        steps: number of optimizer steps, > 0.
    """

    name: str
    losses: Mapping[str, Weight]
    steps: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name: expected a non-empty str, got {self.name!r}")
        object.__setattr__(self, "losses", _check_losses(self.losses))
        _check_count("steps", self.steps)

    __hash__ = None  # the losses mapping is not hashable

    def weight(self, name: str, step: int) -> float:
        """The weight of loss ``name`` at step ``step`` of the stage (a function's value, checked)."""
        weight = self.losses[name]
        if not callable(weight):
            return weight
        return _check_weight(f"losses[{name!r}] of stage {self.name!r} at step {step}", weight(step))


class Schedule:
    """Stages run in order; global step ``k`` (from 0) belongs to the stage whose range holds it."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        if isinstance(stages, Stage) or not isinstance(stages, Sequence):
            raise TypeError(f"stages: expected a sequence of Stage, got {type(stages).__name__}")
        if not stages:
            raise ValueError("stages: expected at least one Stage, got an empty sequence")
        for i, stage in enumerate(stages):
            if not isinstance(stage, Stage):
                raise TypeError(f"stages[{i}]: expected a Stage, got {type(stage).__name__}")
        self.stages: tuple[Stage, ...] = tuple(stages)

    @classmethod
    def preset(
        cls, name: str, steps: Sequence[int], weights: Mapping[str, Weight] | None = None
    ) -> Schedule:
        """One of ``"one-stage"``, ``"two-stage"``, ``"three-stage"`` (table in the module docstring).

        ``steps`` gives one step count per stage; ``weights`` (default 1.0 each) the weight of each
        loss wherever a stage uses it.
        """
        layout = PRESETS[check_choice("name", name, PRESETS)]
        if isinstance(steps, int) or not isinstance(steps, Sequence):
            raise TypeError(f"steps: expected a sequence of {len(layout)} step count(s), got {steps!r}")
        if len(steps) != len(layout):
            raise ValueError(
                f"steps: preset {name!r} has {len(layout)} stage(s), got {len(steps)} step count(s) {list(steps)}"
            )
        weights = {} if weights is None else dict(_check_losses(weights))
        return cls(
            [
                Stage(STAGE_NAMES[i], {loss: weights.get(loss, 1.0) for loss in losses}, _check_count(f"steps[{i}]", n))
                for i, (losses, n) in enumerate(zip(layout, steps))
            ]
        )

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def locate(self, step: int) -> tuple[int, int]:
        """``(stage index, step within the stage)`` of global step ``step``; IndexError past the end."""
        if step < 0:
            raise IndexError(f"step: got {step}, expected >= 0")
        for index, stage in enumerate(self.stages):
            if step < stage.steps:
                return index, step
            step -= stage.steps
        raise IndexError("step: past the end of the schedule")

    def start(self, index: int) -> int:
        """The global step at which stage ``index`` begins."""
        return sum(stage.steps for stage in self.stages[:index])

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __getitem__(self, index: int) -> Stage:
        return self.stages[index]

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.name}: {'+'.join(s.losses)} x{s.steps}" for s in self.stages)
        return f"Schedule({parts})"
