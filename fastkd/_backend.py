"""Which backend computes a loss: ``set_backend``, ``available_backends`` and the ``auto`` rule.

``auto`` (the default, or ``FASTKD_BACKEND``) picks ``triton`` for CUDA tensors and ``native`` for
CPU tensors, falling back to ``torch`` (with one warning) where the native kernels cannot be built.
``triton`` runs on CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from fastkd._validation import check_choice

BACKENDS = ("auto", "torch", "triton", "native")

_selected: str | None = None
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # once: torch.compile cannot trace find_spec


def _check_name(name: object) -> str:
    return check_choice("backend", name, BACKENDS)


def set_backend(name: str) -> None:
    """Select the backend for every later loss call: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``."""
    global _selected
    _selected = _check_name(name)


def get_backend() -> str:
    """The selected backend name: ``set_backend``'s, else ``FASTKD_BACKEND``, else ``"auto"``."""
    if _selected is not None:
        return _selected
    return _check_name(os.environ.get("FASTKD_BACKEND", "auto"))


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _native_available() -> bool:
    from fastkd.backends import native

    return native.is_available()


def available_backends() -> list[str]:
    """The concrete backends usable in this process (``"torch"`` always)."""
    names = ["torch"]
    if _TRITON_INSTALLED and (torch.cuda.is_available() or triton_interpreted()):
        names.append("triton")
    if _native_available():
        names.append("native")
    return names


def resolve(device: torch.device) -> str:
    """The concrete backend that computes a loss on tensors of ``device``."""
    name = get_backend()
    if name == "auto":
        if device.type == "cuda" and _TRITON_INSTALLED:
            return "triton"
        if device.type == "cpu" and _native_available():
            return "native"
        return "torch"
    if name == "triton":
        if not _TRITON_INSTALLED:
            raise ValueError("backend: 'triton' was selected but triton is not installed")
        if device.type != "cuda" and not triton_interpreted():
            raise ValueError(
                f"backend: 'triton' needs CUDA tensors (got {device.type}); "
                "on CPU it runs only under TRITON_INTERPRET=1"
            )
    if name == "native":
        if device.type != "cpu":
            raise ValueError(f"backend: 'native' runs on CPU tensors, got {device.type}")
        if not _native_available():
            raise ValueError("backend: 'native' was selected but its C++ kernels could not be built")
    return name


def module(name: str):
    """The backend module that implements ``name`` (see ``fastkd.backends``)."""
    return importlib.import_module(f"fastkd.backends.{'torch_ref' if name == 'torch' else name}")
