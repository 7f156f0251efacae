"""The Triton backend's layer-pair tables: reused while cached, evicted oldest first."""

from __future__ import annotations

import pytest
import torch

triton_backend = pytest.importorskip("fastkd.backends.triton")


def test_tables_are_cached_by_content_and_evicted_oldest_first(monkeypatch):
    monkeypatch.setattr(triton_backend, "_TABLES", {})
    monkeypatch.setattr(triton_backend, "_MAX_TABLES", 3)
    cpu = torch.device("cpu")
    first = triton_backend._pair_table([(1, 2, 3)], cpu)
    assert first.tolist() == [[1, 2, 3]] and first.dtype == torch.int64
    assert triton_backend._pair_table([(1, 2, 3)], cpu) is first
    for i in range(3):
        triton_backend._pair_table([(i, 0, 0)], cpu)
    again = triton_backend._pair_table([(1, 2, 3)], cpu)
    assert again is not first and again.tolist() == first.tolist()
    assert len(triton_backend._TABLES) == 3
