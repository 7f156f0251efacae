"""The Triton kernels compile for the GPUs they are meant for (sm_80: A100, sm_90: H100), checked on a
machine without one: ``tests/compile_kernels.py`` runs in a subprocess, outside the interpreter."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import fastkd

pytest.importorskip("triton")

from fastkd.backends import triton as triton_backend  # noqa: E402

TESTS = pathlib.Path(__file__).parent
ARCHS = (80, 90)


def run_uninterpreted(args: list[str]) -> subprocess.CompletedProcess:
    """``python *args`` with this process's fastkd on the path and Triton's interpreter off (the whole
    compile of both architectures takes minutes on two CPU cores)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(pathlib.Path(fastkd.__file__).parents[1]), str(TESTS)])
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=1800)


def test_every_kernel_compiles_for_each_architecture():
    result = run_uninterpreted([str(TESTS / "compile_kernels.py"), *map(str, ARCHS)])
    assert result.returncode == 0, result.stderr[-6000:]
    compiled = [json.loads(line) for line in result.stdout.splitlines()]
    kernels = {name for name in vars(triton_backend) if name.endswith("_kernel")}
    assert len(kernels) == 11
    flags = ("True", "False")
    for arch in ARCHS:
        of_arch = [entry for entry in compiled if entry["arch"] == arch]
        assert {entry["kernel"] for entry in of_arch} == kernels
        assert all(entry["cubin_bytes"] > 0 for entry in of_arch)
        # every specialisation the launchers use: masks, all accumulator dtypes, and each kernel's
        # directions: the two-pass forward and backward, and the one-pass forward with the gradient
        assert {entry["constants"]["ACC"] for entry in of_arch} == {"fp32", "fp64"}
        assert {entry["constants"].get("HAS_MASK") for entry in of_arch} == {"True", "False", None}
        unmasked = {entry["kernel"] for entry in of_arch if "HAS_MASK" not in entry["constants"]}
        assert unmasked == {"_scale_gradients_kernel"}
        variants = {(entry["kernel"], *(entry["constants"].get(name) for name in ("ROWS", "GRAD", "SCORES")))
                    for entry in of_arch}
        assert variants >= {
            ("_hidden_kernel", "True", "False", None), ("_hidden_kernel", "False", "True", None),
            ("_hidden_kernel", "True", "True", None),
            *(("_attention_forward_kernel", None, grad, scores) for grad in flags for scores in flags),
            *(("_attention_backward_kernel", None, None, scores) for scores in flags),
        }
        # the logit kernels: the forward KL over every dtype pair; every divergence, with and without
        # labels (their cross-entropy's gradient with them), each direction, over a float32 and a
        # float64 accumulator
        logit = {(entry["kernel"], entry["signature"]["p_s"], entry["signature"]["p_t"],
                  *(entry["constants"].get(name) for name in ("DIVERGENCE", "HAS_LABELS", "GRAD", "CE_GRAD")))
                 for entry in of_arch if entry["kernel"].startswith("_logit")}
        pairs = {(entry["signature"]["p_s"], entry["signature"]["p_t"]) for entry in of_arch
                 if entry["kernel"] == "_logit_forward_kernel"}
        assert pairs == {("*fp32", "*fp32"), ("*bf16", "*bf16"), ("*fp16", "*fp16"), ("*bf16", "*fp32"),
                         ("*fp64", "*fp64")}
        assert logit >= {
            variant
            for divergence in ("forward", "reverse", "jsd", "tvd") for labels in flags
            for pair in (pairs if (divergence, labels) == ("forward", "False") else [("*bf16", "*bf16"), ("*fp64", "*fp64")])
            for variant in (
                ("_logit_forward_kernel", *pair, divergence, labels, "False", "False"),
                ("_logit_forward_kernel", *pair, divergence, labels, "True", labels),
                ("_logit_backward_kernel", *pair, divergence, None, None, labels),
            )
        }
        # the sparse (top-k teacher) kernels: both tails, each direction, over every student dtype
        sparse = {(entry["kernel"], entry["signature"]["p_s"], entry["constants"].get("TAIL"),
                   entry["constants"].get("GRAD")) for entry in of_arch if entry["kernel"].startswith("_sparse")}
        assert sparse >= {
            variant
            for dtype in ("*fp32", "*bf16", "*fp16", "*fp64") for tail in ("renormalize", "bucket")
            for variant in (("_sparse_forward_kernel", dtype, tail, "False"), ("_sparse_forward_kernel", dtype, tail, "True"),
                            ("_sparse_backward_kernel", dtype, tail, None))
        }
        assert {entry["signature"]["p_ids"] for entry in of_arch if entry["kernel"].startswith("_sparse")} == {"*i64"}
        labelled = {entry["signature"]["p_labels"] for entry in of_arch if "True" in
                    (entry["constants"].get("HAS_LABELS"), entry["constants"].get("CE_GRAD"))}
        assert labelled == {"*i64"}
        # the one-pass backward scales the gradients of every student dtype
        scaled = {entry["signature"]["p_grad"] for entry in of_arch if entry["kernel"] == "_scale_gradients_kernel"}
        assert scaled == {"*fp32", "*fp64", "*bf16", "*fp16"}
        # floating scalars (the temperature, jsd's beta, the score scales) reach the kernels as float64
        # whatever the accumulator, so float64 inputs are never scaled by float32 factors
        scalars = {(entry["kernel"], name, ty) for entry in of_arch for name, ty in entry["signature"].items()
                   if not ty.startswith("*") and ty.startswith(("fp", "bf"))}
        assert {name for _, name, _ in scalars} == {"temperature", "beta", "scale_s", "scale_t"}
        assert {ty for _, _, ty in scalars} == {"fp64"}


def test_a_kernel_the_gpu_compiler_rejects_fails_the_check(tmp_path):
    """A variable of two types on the two sides of a runtime branch: the interpreter runs it, the
    compiler does not; the compile-only launch must raise."""
    script = textwrap.dedent(
        """
        import torch, triton, triton.language as tl
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction
        from compile_kernels import CompileOnlyDriver, compile_only

        @triton.jit
        def two_types(p, n):
            if n > 0:
                x = 1
            else:
                x = tl.zeros([4], tl.float32)
            tl.store(p + tl.arange(0, 4), x)

        JITFunction.run = compile_only([])
        driver.set_active(CompileOnlyDriver(90))
        two_types[(1,)](torch.zeros(4), 3)
        """
    )
    (tmp_path / "two_types.py").write_text(script)
    result = run_uninterpreted([str(tmp_path / "two_types.py")])
    assert result.returncode != 0
    assert "CompilationError" in result.stderr
