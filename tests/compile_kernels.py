"""Compile every Triton kernel of fastkd for a CUDA GPU, on a machine that has none.

    python tests/compile_kernels.py 90 80        (the compute capabilities to compile for)

The losses' public functions run forward and backward on CPU tensors, over the dtypes, masks, kinds,
divergences, labels and tile shapes their launchers specialise on, on both the two-pass and the one-pass path
(``fastkd._one_pass.set_passes``; the backward's upstream gradient is 2, not the 1 the one-pass
forward assumes, so that it scales the gradients), with the ``"triton"`` backend selected and Triton's
launch replaced by a compile-only one aimed at each architecture: Triton's own compiler and PTX
assembler (shipped in its wheel) turn each kernel into a cubin, and nothing runs. This finds what the
interpreter cannot: code that the interpreter accepts and the GPU compiler rejects. Prints one JSON
line per compiled kernel variant ``{"arch", "kernel", "constants", "signature", "cubin_bytes"}``
(``signature``: the runtime arguments' Triton types); a compile error
is raised (exit status 1). Run it without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime import driver
from triton.runtime.jit import JITFunction

import fastkd
from fastkd import _backend, _one_pass


class CompileOnlyDriver(DriverBase):
    """Triton's view of a CUDA device of compute capability ``arch``: a target, no device."""

    def __init__(self, arch: int):
        super().__init__()
        self.arch = arch

    @classmethod
    def is_active(cls):
        return True

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch  # Triton keeps one kernel cache per device: one per architecture here

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):
        raise NotImplementedError("compile only")

    def get_benchmarker(self):
        raise NotImplementedError("compile only")


def compile_only(compiled: list):
    """A ``JITFunction.run`` that compiles (Triton's ``warmup``) and records the kernel, launching nothing."""
    run = JITFunction.run

    def compile_and_record(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        constants = {k: str(v) for k, v in kwargs.items()}
        signature = {k: str(v) for k, v in kernel.src.signature.items() if k not in kwargs}
        compiled.append((self.fn.__name__, constants, signature, len(kernel.asm["cubin"])))
        return kernel

    return compile_and_record


DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
               (torch.bfloat16, torch.float32), (torch.float64, torch.float64)]
# The divergences' and the labels' code works on the accumulator: a float32 one fed by 16-bit loads
# and a float64 one cover it.
ACC_DTYPE_PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)]
# (loss, its options, masks, dtype pairs): V=100 puts several rows in a program, V=5000 and D=5000
# one row over blocks; logit_kl's other divergences and its labels (a cross-entropy with its
# gradient), each divergence over both tiles, with and without a mask. attention_kl_qk: L=20 one
# 32-row tile, L=100 two 64-row tiles (four 32-row tiles for float64); head widths 16/24 (24 padded
# to 32), grouped-query attention on both sides (H=4, H_kv 2 and 1). sparse_logit_kl: each tail over
# both tiles (k = 8 stored entries per row, the teacher's dtype that of the stored log-probabilities),
# and with labels (their cross-entropy is a second pass against a one-entry teacher)
BOTH = (False, True)
LOSSES = [
    ("logit_kl", {"vocab": 100}, BOTH, DTYPE_PAIRS), ("logit_kl", {"vocab": 5000}, BOTH, DTYPE_PAIRS),
    *(("logit_kl", {"vocab": 100, "divergence": divergence, "labelled": True}, (True,), ACC_DTYPE_PAIRS)
      for divergence in ("forward", "reverse", "jsd", "tvd")),
    *(("logit_kl", {"vocab": 5000, "divergence": divergence}, (False,), ACC_DTYPE_PAIRS)
      for divergence in ("reverse", "jsd", "tvd")),
    ("hidden_mse", {}, BOTH, DTYPE_PAIRS), ("attention_kl", {"kind": "probs"}, BOTH, DTYPE_PAIRS),
    ("attention_kl", {"kind": "scores"}, BOTH, DTYPE_PAIRS),
    ("attention_kl_qk", {"length": 20, "causal": False}, BOTH, DTYPE_PAIRS),
    ("attention_kl_qk", {"length": 100, "causal": True}, BOTH, DTYPE_PAIRS),
    *(("sparse_logit_kl", {"vocab": vocab, "tail": tail}, BOTH, DTYPE_PAIRS)
      for vocab in (100, 5000) for tail in ("renormalize", "bucket")),
    ("sparse_logit_kl", {"vocab": 100, "tail": "bucket", "labelled": True}, (True,), ACC_DTYPE_PAIRS),
]
PASSES = ("two", "auto")  # "auto": the one-pass kernels where a loss has them


def run_loss(loss: str, s_dtype: torch.dtype, t_dtype: torch.dtype, masked: bool, vocab=None, kind=None,
             length=None, causal=False, divergence="forward", labelled=False, tail=None) -> None:
    """One loss, forward and backward (upstream gradient 2), on small CPU tensors of the given dtypes;
    ``labelled``: logit_kl or sparse_logit_kl with labels (one ignored) and a cross-entropy weight, so
    that its gradient reaches the kernels too. sparse_logit_kl's teacher: 8 stored entries per row,
    some padding, log-probabilities of ``t_dtype``."""
    if loss == "attention_kl_qk":
        query_s = torch.rand((2, 4, length, 16), dtype=s_dtype, requires_grad=True)
        key_s = torch.rand((2, 2, length, 16), dtype=s_dtype, requires_grad=True)
        query_t, key_t = torch.rand((2, 4, length, 24), dtype=t_dtype), torch.rand((2, 1, length, 24), dtype=t_dtype)
        mask = torch.ones((2, length), dtype=torch.bool) if masked else None
        (2 * fastkd.attention_kl_qk(query_s, key_s, query_t, key_t, mask=mask, causal=causal)).backward()
        return
    if loss in ("logit_kl", "sparse_logit_kl"):
        shapes, mask_shape = [(2, 3, vocab)], (2, 3)
    elif loss == "hidden_mse":
        shapes, mask_shape = [(2, 3, 40), (2, 3, 5000)], (2, 3)
    else:
        shapes, mask_shape = [(2, 2, 7, 7)], (2, 7)
    s = [torch.rand(shape, dtype=s_dtype, requires_grad=True) for shape in shapes]
    t = [torch.rand(shape, dtype=t_dtype) for shape in shapes]
    mask = torch.ones(mask_shape, dtype=torch.bool) if masked else None
    options = {}
    if labelled:
        labels = torch.randint(0, vocab, mask_shape)
        labels[0, 0] = -100
        options.update(labels=labels, ce_weight=0.5)
    if loss == "logit_kl":
        options.update(divergence=divergence, beta=0.3 if divergence == "jsd" else None)
        value = fastkd.logit_kl(s[0], t[0], temperature=2.0, mask=mask, **options)
    elif loss == "sparse_logit_kl":
        logprobs, ids = t[0].log_softmax(-1).topk(8, dim=-1)
        ids[0, 0, 5:] = -1  # padding
        temperature = 1.0 if tail == "bucket" else 2.0
        value = fastkd.sparse_logit_kl(s[0], ids, logprobs, temperature=temperature, mask=mask, tail=tail, **options)
    elif loss == "hidden_mse":
        value = fastkd.hidden_mse(s, t, mask=mask)
    else:
        value = fastkd.attention_kl(s, t, kind=kind, mask=mask)
    (2 * value).backward()


def main(archs: list[int]) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("compile_kernels.py compiles for a GPU: run it without TRITON_INTERPRET=1")
    compiled: list = []
    JITFunction.run = compile_only(compiled)
    _backend.triton_interpreted = lambda: True  # lets the "triton" backend take CPU tensors
    fastkd.set_backend("triton")
    for arch in archs:
        driver.set_active(CompileOnlyDriver(arch))
        cases = ((passes, loss, options, dtypes, masked) for passes, (loss, options, masks, pairs) in
                 itertools.product(PASSES, LOSSES) for dtypes in pairs for masked in masks)
        for passes, loss, options, (s_dtype, t_dtype), masked in cases:
            _one_pass.set_passes(passes)
            try:
                run_loss(loss, s_dtype, t_dtype, masked, **options)
            except Exception:
                print(f"while compiling {loss} {options} {s_dtype}/{t_dtype} mask={masked} passes={passes} "
                      f"for sm_{arch}:", file=sys.stderr)
                raise
        for kernel, constants, signature, cubin_bytes in compiled:
            print(json.dumps({"arch": arch, "kernel": kernel, "constants": constants, "signature": signature,
                              "cubin_bytes": cubin_bytes}))
        compiled.clear()
    print(f"triton {triton.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main([int(arch) for arch in sys.argv[1:]])
