"""The contract of ``fastkd.backends``, checked on each backend's functions directly: the layout of
the stats a forward pass leaves (float64 log-sum-exps, -inf for a row that contributes nothing) and
the zero gradient of such rows; and, for Triton, that every launch runs on the inputs' device."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import CUDA

import fastkd
from fastkd import _backend
from fastkd._layout import rows_view


def backend_functions(device):
    """The module of the backend the ``device`` fixture selected."""
    return _backend.module(_backend.resolve(device))


def test_logit_stats_and_rows_that_contribute_nothing(device):
    """Masked rows and rows whose teacher has no finite logit: value 0, stats -inf, gradient 0;
    every other row: the float64 log-sum-exps of s / T and t / T."""
    temperature = 1.5
    s, t = torch.randn(2, 5, 300) * 3, torch.randn(2, 5, 300) * 3
    t[0, 1] = float("-inf")
    t[1, 4, ::3] = float("-inf")  # a partly masked vocabulary still counts
    mask = torch.ones(10)
    mask[[3, 7]] = 0
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[1, 3, 7]] = True
    kernels = backend_functions(device)
    s_rows, t_rows, m = rows_view(s.to(device)), rows_view(t.to(device)), mask.to(device)
    rows, ce_rows, stats = kernels.logit_forward(s_rows, t_rows, m, temperature, "forward", 0.0, None)
    assert stats.dtype == torch.float64 and stats.shape == (4, 10) and ce_rows.shape == (0,)
    want = torch.stack([(s.double() / temperature).logsumexp(-1).flatten(),
                        (t.double() / temperature).logsumexp(-1).flatten()])
    stats = stats[:2].cpu()
    assert torch.isneginf(stats).equal(dead[None].expand(2, 10))
    # float64 lses of float32 terms: s / T, exp, the sum and the log each round at float32
    # precision, by more on some CPUs (the torch backend has been seen 16 ulps off); 1e-5 of an lse
    # near 8 is ~160 ulps, still far below what a wrong formula gives
    error = ((stats[:, ~dead] - want[:, ~dead]).abs() / want[:, ~dead].abs()).max().item()
    assert error < 1e-5, f"largest relative error of the stats: {error:.3g}"
    assert rows.cpu()[dead].eq(0).all() and torch.isfinite(rows).all()
    full_stats = torch.cat([stats, torch.full((1, 10), -torch.inf, dtype=torch.float64), torch.zeros(1, 10, dtype=torch.float64)])
    grad = kernels.logit_backward(s_rows, t_rows, m, temperature, "forward", 0.0, None, full_stats.to(device),
                                  torch.randn(10).to(device), None)
    grad = grad.cpu().view(10, 300)
    assert grad[dead].eq(0).all() and torch.isfinite(grad).all() and grad[~dead].abs().sum() > 0


@pytest.mark.parametrize("divergence, beta", [("reverse", 0.0), ("jsd", 0.3), ("tvd", 0.0)])
def test_logit_stats_of_divergences_and_labels(device, divergence, beta):
    """stats[2] is lse(s) at T = 1 on the rows with a cross-entropy (valid, labelled), -inf on the
    others; stats[3] is S = sum_v q_v a_v of the divergence (fastkd.backends); ce_rows is
    lse(s) - s[label] there, 0 elsewhere; a row without a teacher keeps its cross-entropy."""
    temperature = 2.0
    s, t = torch.randn(2, 5, 300) * 3, torch.randn(2, 5, 300) * 3
    t[0, 1] = float("-inf")
    labels = torch.randint(0, 300, (10,))
    labels[[2, 6]] = -100
    mask = torch.ones(10)
    mask[7] = 0
    kernels = backend_functions(device)
    s_rows, t_rows = rows_view(s.to(device)), rows_view(t.to(device))
    rows, ce_rows, stats = kernels.logit_forward(s_rows, t_rows, mask.to(device), temperature, divergence, beta,
                                                 labels.to(device))
    stats, ce_rows = stats.cpu(), ce_rows.cpu()
    x = s.double().flatten(0, 1)
    with_ce = torch.ones(10, dtype=torch.bool)
    with_ce[[2, 6, 7]] = False
    assert torch.isneginf(stats[2]).equal(~with_ce)
    lse = x.logsumexp(-1)
    assert ((stats[2][with_ce] - lse[with_ce]).abs() / lse[with_ce].abs()).max() < 1e-5
    want_ce = torch.where(with_ce, lse - x.gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1), 0)
    assert ((ce_rows.double() - want_ce).abs() <= 1e-5 * want_ce.abs().max()).all()
    log_q = (x / temperature).log_softmax(-1)
    log_p = (t.double().flatten(0, 1) / temperature).log_softmax(-1)
    q, p = log_q.exp(), log_p.exp()
    if divergence == "reverse":
        want_s = (q * (log_q - log_p)).sum(-1)
    elif divergence == "jsd":
        want_s = (1 - beta) * (q * (log_q - torch.log(beta * p + (1 - beta) * q))).sum(-1)
    else:
        want_s = 0.5 * (q * torch.sign(q - p)).sum(-1)
    kd = torch.ones(10, dtype=torch.bool)
    kd[[1, 7]] = False  # no teacher, masked
    assert ((stats[3][kd] - want_s[kd]).abs() <= 1e-5 * want_s[kd].abs().max()).all()
    assert rows.cpu()[~kd].eq(0).all()


def test_attention_stats_and_rows_that_contribute_nothing(device):
    """kind="scores": masked query rows and rows with every key dropped have stats -inf and get
    gradient 0; kind="probs" leaves no stats."""
    batch, heads, length = 2, 2, 6
    s, t = torch.randn(batch, heads, length, length) * 2, torch.randn(batch, heads, length, length) * 2
    s[0, 1, 2] = float("-inf")  # every key of (0, 1, 2) dropped by the student
    t[1, 0, 4, :] = torch.finfo(torch.float32).min  # and of (1, 0, 4) by the teacher
    mask = torch.ones(batch, length)
    mask[1, 5] = 0  # query (and key) 5 of batch 1 is padding
    kernels = backend_functions(device)
    rows, stats = kernels.attention_forward([s.to(device)], [t.to(device)], mask.to(device), "scores")
    dead = torch.zeros(batch, heads, length, dtype=torch.bool)
    dead[0, 1, 2] = dead[1, 0, 4] = True
    dead[1, :, 5] = True
    keep = mask[:, None, None, :].expand_as(s) != 0
    want = torch.stack([s.double().masked_fill(~keep, -torch.inf).logsumexp(-1),
                        t.double().masked_fill(~keep, -torch.inf).logsumexp(-1)]).flatten(1)
    dead = dead.flatten()
    stats = stats.cpu()
    assert torch.isneginf(stats).equal(dead[None].expand(2, -1))
    # float64 lses of float32 terms: s / T, exp, the sum and the log each round at float32
    # precision, by more on some CPUs (the torch backend has been seen 16 ulps off); 1e-5 of an lse
    # near 8 is ~160 ulps, still far below what a wrong formula gives
    error = ((stats[:, ~dead] - want[:, ~dead]).abs() / want[:, ~dead].abs()).max().item()
    assert error < 1e-5, f"largest relative error of the stats: {error:.3g}"
    assert rows.cpu()[dead].eq(0).all()
    (grad,) = kernels.attention_backward([s.to(device)], [t.to(device)], mask.to(device), "scores",
                                         stats.to(device), torch.randn(dead.numel()).to(device))
    grad = grad.cpu().flatten(0, 2)
    assert grad[dead].eq(0).all() and torch.isfinite(grad).all() and grad[~dead].abs().sum() > 0
    probs = torch.softmax(s, -1).to(device)
    _, no_stats = kernels.attention_forward([probs], [torch.softmax(t, -1).to(device)], None, "probs")
    assert no_stats.shape == (2, 0)


# --------------------------------------------------------------------------------------------
# Triton launches on the inputs' device


def run_every_loss(device):
    """Forward and backward of each loss (each attention kind, from queries and keys, the sparse
    teacher's two tails) on small tensors of ``device``, two-pass and one-pass (backward under an
    upstream gradient of 2, so that the one-pass gradient is scaled)."""
    s = torch.randn(2, 3, 50, device=device, requires_grad=True)
    t = torch.randn(2, 3, 50, device=device)
    for passes in ("two", "auto"):
        fastkd.set_passes(passes)
        try:
            (2 * fastkd.logit_kl(s, t, temperature=2.0)).backward()
            ids = torch.tensor([3, 49, -1], device=device).expand(2, 3, 3)
            logprobs = torch.tensor([-0.5, -1.5, -3.0], device=device).expand(2, 3, 3)
            for tail in ("renormalize", "bucket"):
                (2 * fastkd.sparse_logit_kl(s, ids, logprobs, tail=tail)).backward()
            (2 * fastkd.hidden_mse([s, s[:, :2]], [t, t[:, :2]])).backward()
            for kind in ("probs", "scores"):
                maps = torch.softmax(torch.randn(2, 2, 4, 4, device=device), -1).requires_grad_()
                teacher = torch.softmax(torch.randn(2, 2, 4, 4, device=device), -1)
                (2 * fastkd.attention_kl(maps, teacher, kind=kind)).backward()
        finally:
            fastkd.set_passes("auto")
    query = torch.randn(2, 2, 5, 16, device=device, requires_grad=True)
    fastkd.attention_kl_qk(query, query[:, :1], torch.randn(2, 2, 5, 8, device=device),
                           torch.randn(2, 2, 5, 8, device=device), causal=True).backward()
    return s.grad


def test_every_triton_launch_runs_inside_its_inputs_device_context(monkeypatch):
    """Each kernel launch happens while the inputs' device is made current (the guard that sends a
    launch to ``cuda:1`` when ``cuda:0`` is current): checked under the interpreter by recording the
    device contexts entered and the launches made inside them."""
    if CUDA or "triton" not in fastkd.available_backends():
        pytest.skip("runs the Triton kernels under the interpreter (the CUDA case is the next test)")
    from fastkd.backends import triton as triton_backend

    entered, launches, depth = [], [], [0]

    @contextlib.contextmanager
    def recording_context(device):
        entered.append(device)
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    kernel_type = type(triton_backend._logit_forward_kernel)
    run = kernel_type.run

    def recording_run(self, *args, **kwargs):
        launches.append((self.fn.__name__, depth[0] > 0))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(triton_backend, "_device_context", recording_context)
    monkeypatch.setattr(kernel_type, "run", recording_run)
    fastkd.set_backend("triton")
    try:
        run_every_loss(torch.device("cpu"))
    finally:
        fastkd.set_backend("auto")
    kernels = {name for name in vars(triton_backend) if name.endswith("_kernel")}
    assert {name for name, _ in launches} == kernels
    assert all(inside for _, inside in launches), launches
    assert entered and all(device == torch.device("cpu") for device in entered)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_inputs_on_a_cuda_device_that_is_not_current():
    """Inputs on cuda:1 while cuda:0 is current: the Triton kernels run on cuda:1 and give the
    torch backend's results."""
    grads = {}
    for backend in ("torch", "triton"):
        fastkd.set_backend(backend)
        torch.manual_seed(0)
        with torch.cuda.device(0):
            grads[backend] = run_every_loss(torch.device("cuda:1"))
    fastkd.set_backend("auto")
    assert grads["triton"].device == torch.device("cuda:1")
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-5, atol=1e-7)
