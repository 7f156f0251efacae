"""Test setup: Triton's interpreter where there is no GPU, one seed per test, and the ``device``
fixture that runs a test once per (device, backend).

On a machine without CUDA, ``TRITON_INTERPRET=1`` is set before anything imports Triton, so that the
Triton kernels run on CPU tensors. With CUDA they are compiled for the GPU instead, and the CPU cases
cover the other backends.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import fastkd  # noqa: E402  (after TRITON_INTERPRET)

NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def device_backend_cases() -> list:
    """``cpu-<name>`` for every backend usable on CPU tensors, ``cuda-torch`` and ``cuda-triton``
    (skipped without CUDA)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    cases = [
        pytest.param(("cpu", name), id=f"cpu-{name}")
        for name in fastkd.available_backends()
        if name != "triton" or interpreted
    ]
    cases += [
        pytest.param(("cuda", name), id=f"cuda-{name}", marks=NEEDS_CUDA)
        for name in ("torch", "triton")
    ]
    return cases


def compile_cases(auto: bool = False) -> list:
    """``(device, backend, compiler)`` for ``torch.compile`` tests: inductor for the torch backend
    on CPU (and for ``auto`` too if asked) and for Triton on CUDA (skipped without CUDA); aot_eager
    (fake implementations and autograd traced, no code generation) for the other CPU backends,
    Triton only where it is interpreted."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    cases = [pytest.param(("cpu", "torch", "inductor"), id="cpu-torch-inductor")]
    if auto:
        cases.append(pytest.param(("cpu", "auto", "inductor"), id="cpu-auto-inductor"))
    cases += [
        pytest.param(("cpu", name, "aot_eager"), id=f"cpu-{name}-aot_eager")
        for name in fastkd.available_backends()
        if name != "torch" and (name != "triton" or interpreted)
    ]
    cases.append(pytest.param(("cuda", "triton", "inductor"), id="cuda-triton-inductor", marks=NEEDS_CUDA))
    return cases


@pytest.fixture(params=device_backend_cases())
def device(request):
    """The device of a test's inputs; the backend of the case is selected while the test runs."""
    dev, name = request.param
    fastkd.set_backend(name)
    yield torch.device(dev)
    fastkd.set_backend("auto")


@pytest.fixture(params=["auto", "two"], ids=["one-pass", "two-pass"])
def passes(request):
    """A loss's one-pass path where it applies (``"auto"``), or always its two-pass path."""
    fastkd._one_pass.set_passes(request.param)
    yield request.param
    fastkd._one_pass.set_passes("auto")


@pytest.fixture(autouse=True)
def seed(request):
    """Fresh random inputs for every test, reproducible from the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def nan_empty(monkeypatch):
    """``torch.empty``/``torch.empty_like`` return NaN-filled floating tensors, so that a result
    that reads or returns memory nothing wrote shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(x):
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))


# Host synchronisations a dispatch mode can see.
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero", "aten::item"}


class Recorder(TorchDispatchMode):
    """Records (op name, bytes) of every tensor an op produces, and the ops' names. The custom ops
    named in ``bodies`` are run through their Python bodies under this mode, so that the ops inside
    them are recorded too. Sizes are in bytes because Triton's interpreter views storages as uint8."""

    def __init__(self, bodies: dict):
        super().__init__()
        self.bodies = bodies
        self.produced: list[tuple[str, int]] = []
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        self.ops.add(name)
        if name in self.bodies:
            with self:
                return self.bodies[name](*args, **kwargs)
        out = func(*args, **kwargs)
        self.produced += [
            (name, x.numel() * x.element_size()) for x in tree_leaves(out) if isinstance(x, torch.Tensor)
        ]
        return out
