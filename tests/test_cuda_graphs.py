"""CUDA only: each loss's forward and backward, one-pass and two-pass, captured in a
``torch.cuda.CUDAGraph`` and replayed on new inputs (new students, teachers, masks and upstream
gradients, 1 and others, copied into the static buffers),
checked against the float64 formula after every replay; and each loss run under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any host synchronisation."""

from __future__ import annotations

import pytest
import torch
from conftest import NEEDS_CUDA
from reference import assert_close, reference_loss, tolerances

import fastkd

pytestmark = NEEDS_CUDA

NAMES = ["hidden_mse", "hidden_pairs", "logit_kl", "attention_probs", "attention_scores",
         "attention_pairs"]


def draw(name: str, dtype: torch.dtype, mask_kind: str = "random"):
    """Fresh CPU inputs of fixed shapes for one loss: ``(function, reference name, students,
    teachers, mask, options)``; students and teachers are lists (one pair unless ``*_pairs``).
    ``mask_kind="zeros"`` masks every row."""

    def r(*shape, scale=2.0):
        return (torch.randn(shape) * scale).to(dtype)

    def p(*shape):
        return torch.softmax(torch.randn(shape) * 2, -1).to(dtype)

    def causal(*shape):
        """Scores with the causal part blocked by -inf (first half of the batch) or the lowest
        value (second half)."""
        x = r(*shape)
        blocked = torch.ones(shape[-2:], dtype=torch.bool).triu(1)
        half = shape[0] // 2
        x[:half] = x[:half].masked_fill(blocked, float("-inf"))
        x[half:] = x[half:].masked_fill(blocked, torch.finfo(dtype).min)
        return x

    def mask(*shape):
        if mask_kind == "zeros":
            return torch.zeros(shape, dtype=torch.bool)
        return torch.rand(shape) < 0.7

    if name == "hidden_mse":
        return fastkd.hidden_mse, name, [r(4, 33, 1100)], [r(4, 33, 1100)], mask(4, 33), {}
    if name == "hidden_pairs":
        return (fastkd.hidden_mse, "hidden_mse", [r(4, 33, 1100), r(4, 33, 64), r(4, 33, 3)],
                [r(4, 33, 1100), r(4, 33, 64), r(4, 33, 3)], mask(4, 33), {})
    if name == "logit_kl":
        return (fastkd.logit_kl, name, [r(4, 33, 4099)], [r(4, 33, 4099)], mask(4, 33),
                {"temperature": 2.0})
    if name == "attention_probs":
        return (fastkd.attention_kl, "attention_kl", [p(2, 4, 17, 1030)], [p(2, 4, 17, 1030)],
                mask(2, 17), {"kind": "probs"})
    if name == "attention_scores":
        return (fastkd.attention_kl, "attention_kl", [causal(2, 4, 40, 40)], [causal(2, 4, 40, 40)],
                mask(2, 40), {"kind": "scores"})
    return (fastkd.attention_kl, "attention_kl", [causal(2, 4, 40, 40), causal(2, 1, 40, 40)],
            [causal(2, 4, 40, 40), causal(2, 1, 40, 40)], mask(2, 40), {"kind": "scores"})


def pairs(name: str, xs: list):
    return xs if name.endswith("pairs") else xs[0]


def outputs(out) -> list:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def reference(name, ref, s, t, mask, reduction, options, upstream):
    """The float64 values and student gradients for the CPU inputs ``s``, ``t``, ``mask``."""
    s64 = [x.double().requires_grad_() for x in s]
    want = reference_loss(ref, pairs(name, s64), pairs(name, t), mask=mask, reduction=reduction,
                          **options)
    wants = want if isinstance(want, list) else [want]
    grads = torch.autograd.grad(wants, s64, [u.double() for u in upstream])
    return wants, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graph_replay(backend, name, reduction, dtype, passes):
    fastkd.set_backend(backend)
    try:
        fn, ref, s0, t0, m0, options = draw(name, dtype)
        s = [x.cuda().requires_grad_() for x in s0]
        t = [x.cuda() for x in t0]
        mask = m0.cuda()
        shapes = [o.shape for o in outputs(fn(pairs(name, s), pairs(name, t), mask=mask,
                                                reduction=reduction, **options))]
        upstream = [torch.randn(shape, device="cuda") for shape in shapes]

        def step():
            outs = outputs(fn(pairs(name, s), pairs(name, t), mask=mask, reduction=reduction,
                               **options))
            torch.autograd.backward(outs, upstream)
            return outs

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                for x in s:
                    x.grad = None
                step()
        torch.cuda.current_stream().wait_stream(side)
        for x in s:
            x.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = step()

        loss_rtol, grad_rtol = tolerances(s[0])
        for trial, mask_kind in enumerate(["random", "random", "zeros", "random"]):
            _, _, s1, t1, m1, _ = draw(name, dtype, mask_kind)
            # a scalar loss's upstream gradient: 1 (the one-pass fast path) and others, in turn
            u1 = [torch.ones(shape) if trial % 2 == 0 and reduction != "none" else torch.randn(shape)
                  for shape in shapes]
            with torch.no_grad():
                for dst, src in zip(s + t + [mask] + upstream, s1 + t1 + [m1] + u1):
                    dst.copy_(src)
            graph.replay()
            torch.cuda.synchronize()
            wants, want_grads = reference(name, ref, s1, t1, m1, reduction, options, u1)
            for o, w in zip(outs, wants, strict=True):
                assert_close(o.detach(), w.detach(), loss_rtol, f"replay {trial}: loss")
            for x, w in zip(s, want_grads, strict=True):
                assert_close(x.grad, w, grad_rtol, f"replay {trial}: grad")
    finally:
        fastkd.set_backend("auto")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_host_sync(backend, name, reduction):
    """After one warm-up call (which may compile kernels), forward and backward never synchronise."""
    fastkd.set_backend(backend)
    try:
        fn, _, s0, t0, m0, options = draw(name, torch.bfloat16)
        s = [x.cuda().requires_grad_() for x in s0]
        t = [x.cuda() for x in t0]
        mask = m0.cuda()

        def step():
            outs = outputs(fn(pairs(name, s), pairs(name, t), mask=mask, reduction=reduction,
                               **options))
            torch.autograd.backward(outs, [torch.ones_like(o) * 0.5 for o in outs])

        step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    finally:
        fastkd.set_backend("auto")
