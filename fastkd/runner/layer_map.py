"""Which student hidden state and attention map is distilled from which teacher one.

Numbering (as transformers' ``output_hidden_states``): hidden state 0 is the embedding output and
hidden state ``i`` (1..L) the output of block ``i``; attention map ``j`` (0..L-1) belongs to block
``j + 1``. A student of ``M`` blocks learns from a teacher of ``N`` blocks:

- ``"uniform"`` (TinyBERT's mapping ``g(m) = m * N / M``): student hidden state ``i`` pairs with
  teacher hidden state ``i * N // M`` for ``i = 0..M`` (embeddings with embeddings, last with
  last), and student block ``m`` (1..M) attends like teacher block ``m * N // M``.
- ``"last"``: the last hidden states (``M`` with ``N``) and the last blocks' attention maps.
- an explicit sequence of ``(student, teacher)`` hidden-state pairs; each pair of blocks
  (``student >= 1`` and ``teacher >= 1``) also pairs those blocks' attention maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerMap:
    """Hidden-state pairs (indices 0..L) and attention pairs (block indices 0..L-1), as ``(student, teacher)``."""

    hidden: tuple[tuple[int, int], ...]
    attention: tuple[tuple[int, int], ...]


def resolve_layer_map(spec: object, student_layers: int, teacher_layers: int) -> LayerMap:
    """The :class:`LayerMap` of ``"uniform"``, ``"last"`` or explicit pairs (module docstring)."""
    m, n = student_layers, teacher_layers
    if spec == "uniform":
        hidden = tuple((i, i * n // m) for i in range(m + 1))
    elif spec == "last":
        hidden = ((m, n),)
    elif isinstance(spec, Sequence) and not isinstance(spec, str):
        hidden = tuple(_check_pair(i, pair, m, n) for i, pair in enumerate(spec))
        if not hidden:
            raise ValueError("layer_map: expected at least one (student, teacher) pair, got an empty sequence")
    else:
        raise ValueError(f"layer_map: got {spec!r}, expected 'uniform', 'last' or a list of (student, teacher) pairs")
    attention = tuple((s - 1, t - 1) for s, t in hidden if s >= 1 and t >= 1)
    return LayerMap(hidden, attention)


def _check_pair(index: int, pair: object, m: int, n: int) -> tuple[int, int]:
    if (
        not isinstance(pair, Sequence)
        or len(pair) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
    ):
        raise TypeError(f"layer_map[{index}]: expected a (student, teacher) pair of ints, got {pair!r}")
    s, t = pair
    if not 0 <= s <= m:
        raise ValueError(f"layer_map[{index}]: student hidden state {s} out of range 0..{m} (student has {m} blocks)")
    if not 0 <= t <= n:
        raise ValueError(f"layer_map[{index}]: teacher hidden state {t} out of range 0..{n} (teacher has {n} blocks)")
    return s, t
