"""Shared fixture of the pytest-benchmark suites: each case's inputs, checked once."""

from __future__ import annotations

import pytest

from fastkd.bench.cases import Case
from fastkd.bench.harness import check_case


@pytest.fixture(scope="session")
def checked_inputs():
    """``checked_inputs(case)``: the case's inputs, once every implementation has matched the
    reference on them (``fastkd.bench.harness.check_case`` raises otherwise).

    Only the latest case's inputs are kept, so that memory holds one case at a time (the
    parametrisation keeps a case's benchmarks together)."""
    cache: dict[int, dict] = {}

    def get(case: Case) -> dict:
        if id(case) not in cache:
            cache.clear()
            inputs = case.make_inputs()
            check_case(case, inputs)
            cache[id(case)] = inputs
        return cache[id(case)]

    return get
