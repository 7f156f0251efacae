"""``sparse_logit_kl`` and ``fused_linear_sparse_kl`` (top-k offline teachers) on every backend
against the float64 formulas of ``reference.sparse_rows`` (the stored teacher spread over the whole
vocabulary): both tails, odd V and k (k = 1, k = V), padding ids, masks, temperatures from 0.05 to
50, extreme logits, every reduction and dtype, one- and two-pass paths, upstream gradients != 1;
no ``[tokens, V]`` tensor in the fused-linear form; torch.compile; bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SYNC_OPS, Recorder, compile_cases
from reference import assert_close, run_and_compare, sparse_loss

import fastkd
from fastkd.sparse import fused_linear_sparse_kl_forward, fused_linear_sparse_loss

pytestmark = pytest.mark.usefixtures("nan_empty")


def teacher_topk(lead, vocab, k, *, padded=True, finite_padding=False, scale=2.0, dtype=torch.float32):
    """A stored top-k teacher ``(ids, logprobs)`` of ``lead + (k,)``: the k largest of random
    logits' log-softmax (float64, then ``dtype``), in a random order within each row. With
    ``padded``, about a third of the rows keep fewer entries (the rest ids -1, log-probabilities
    -inf, or finite garbage with ``finite_padding``) and the first row keeps none."""
    logprobs = (torch.randn(*lead, vocab, dtype=torch.float64) * scale).log_softmax(-1)
    values, ids = logprobs.topk(k, dim=-1)
    order = torch.rand(values.shape).argsort(-1)
    values, ids = values.gather(-1, order), ids.gather(-1, order)
    if padded:
        flat_ids, flat_values = ids.view(-1, k), values.view(-1, k)
        keep = torch.randint(0, k + 1, (flat_ids.shape[0], 1))
        keep = torch.where(torch.rand(keep.shape) < 0.35, keep, k)
        keep[0] = 0
        dropped = torch.arange(k) >= keep
        flat_ids[dropped] = -1
        flat_values[dropped] = torch.randn(int(dropped.sum()), dtype=torch.float64) if finite_padding else -math.inf
    return ids, values.to(dtype)


def student_logits(lead, vocab, device, dtype=torch.float32, scale=1.5):
    return (torch.randn(*lead, vocab) * scale).to(device=device, dtype=dtype).requires_grad_()


def sparse_fn(students, teacher, **options):
    return fastkd.sparse_logit_kl(students, *teacher, **options)


def compare(s, ids, logprobs, device, **options):
    return run_and_compare(sparse_fn, "sparse_logit_kl", s, (ids.to(device), logprobs.to(device)), **options)


SHAPES = [(1, 1), (7, 1), (7, 3), (7, 7), (131, 16), (131, 131), (1001, 64)]


@pytest.mark.parametrize("vocab, k", SHAPES, ids=lambda x: str(x))
@pytest.mark.parametrize("temperature", [0.05, 1.0, 50.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_renormalize(device, passes, vocab, k, temperature, reduction):
    lead = (3, 5)
    ids, logprobs = teacher_topk(lead, vocab, k)
    mask = (torch.rand(lead) < 0.75).to(device)
    compare(student_logits(lead, vocab, device), ids, logprobs, device, mask=mask, reduction=reduction,
            temperature=temperature, tail="renormalize")


@pytest.mark.parametrize("vocab, k", SHAPES, ids=lambda x: str(x))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_bucket(device, passes, vocab, k, reduction, masked):
    lead = (3, 5)
    ids, logprobs = teacher_topk(lead, vocab, k)
    mask = (torch.rand(lead) < 0.75).to(device) if masked else None
    compare(student_logits(lead, vocab, device), ids, logprobs, device, mask=mask, reduction=reduction, tail="bucket")


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=lambda d: str(d).removeprefix("torch."))
def test_dtypes(device, passes, tail, dtype):
    lead, vocab = (4, 6), 257
    ids, logprobs = teacher_topk(lead, vocab, 32, dtype=dtype)
    mask = (torch.rand(lead) < 0.8).to(device)
    compare(student_logits(lead, vocab, device, dtype), ids, logprobs, device, mask=mask,
            temperature=1.0 if tail == "bucket" else 2.0, tail=tail)


@pytest.mark.parametrize("logprobs_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=lambda d: str(d).removeprefix("torch."))
def test_stored_dtypes_and_int32_ids(device, logprobs_dtype):
    """ids of int32 and log-probabilities of any float dtype (as files store them) are read as the
    float32 values they hold."""
    lead, vocab = (2, 9), 301
    ids, logprobs = teacher_topk(lead, vocab, 16, dtype=logprobs_dtype)
    compare(student_logits(lead, vocab, device), ids.int(), logprobs, device, temperature=3.0)


@pytest.mark.parametrize("tail, temperature", [("renormalize", 0.05), ("renormalize", 50.0), ("bucket", 1.0)])
def test_extreme_logits(device, passes, tail, temperature):
    """Student logits of +-1e4 (and a teacher of sharp log-probabilities), at the ends of the
    temperature range."""
    lead, vocab = (3, 4), 129
    ids, logprobs = teacher_topk(lead, vocab, 8, scale=30.0)
    s = torch.randn(*lead, vocab).sign() * 1e4 * torch.rand(*lead, vocab)
    compare(s.to(device).requires_grad_(), ids, logprobs, device, temperature=temperature, tail=tail)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_infinite_entries(device, passes, tail):
    """-inf teacher log-probabilities at stored ids have p = 0; student logits of -inf away from the
    stored ids (and at ids of p = 0) leave the divergence finite."""
    lead, vocab = (3, 6), 64
    ids, logprobs = teacher_topk(lead, vocab, 10, padded=False)
    logprobs[..., :3] = -math.inf
    s = torch.randn(*lead, vocab) * 2
    off = torch.ones(lead + (vocab,), dtype=torch.bool).scatter(-1, ids[..., 3:], False)
    s = torch.where(off & (torch.rand(s.shape) < 0.3), -math.inf, s)
    compare(s.to(device).requires_grad_(), ids, logprobs, device, tail=tail)


def test_bucket_without_a_tail(device, passes):
    """Stored ids that cover the vocabulary leave no tail class, even where the stored probabilities
    sum to less than 1 (here 0.9, with the student's tail mass exactly 0): only the KL terms."""
    lead, vocab = (3, 4), 23
    ids, logprobs = teacher_topk(lead, vocab, vocab, padded=False)
    logprobs = logprobs + math.log(0.9)
    s = student_logits(lead, vocab, device)
    compare(s, ids, logprobs, device, tail="bucket")
    p = logprobs.double().exp()
    log_q = s.detach().double().cpu().log_softmax(-1).gather(-1, ids)
    want = (p * (logprobs.double() - log_q)).sum(-1).mean()
    got = fastkd.sparse_logit_kl(s, ids.to(device), logprobs.to(device), tail="bucket")
    assert_close(got.detach(), want, 1e-5, "loss without a tail")


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_padding_is_ignored(device, tail):
    """Padding ids (-1) count for nothing whatever their log-probability: the loss and gradient
    equal those of the same rows with the padding removed (ids moved to the front, k cut)."""
    lead, vocab, k = (5, 4), 97, 12
    ids, logprobs = teacher_topk(lead, vocab, k, finite_padding=True)
    ids[..., 0], logprobs[..., 0] = -1, 0.5  # a finite log-probability on padding in every row
    ids[..., -1], logprobs[..., -1] = -1, -math.inf
    s = student_logits(lead, vocab, device)
    got = fastkd.sparse_logit_kl(s, ids.to(device), logprobs.to(device), tail=tail)
    want = sparse_loss(s.detach().double().cpu(), (ids[..., 1:-1], logprobs[..., 1:-1]), tail=tail)
    assert_close(got.detach(), want, 1e-5, "loss with padding")
    compare(s, ids, logprobs, device, tail=tail)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_rows_that_contribute_nothing(device, passes, tail):
    """All rows masked, or no row with a stored finite log-probability: loss 0, gradient 0."""
    lead, vocab = (2, 5), 33
    ids, logprobs = teacher_topk(lead, vocab, 4, padded=False)
    for mask, lp in ((torch.zeros(lead), logprobs), (None, torch.full_like(logprobs, -math.inf))):
        s = student_logits(lead, vocab, device)
        loss = fastkd.sparse_logit_kl(s, ids.to(device), lp.to(device), tail=tail,
                                      mask=None if mask is None else mask.to(device))
        (grad,) = torch.autograd.grad(loss, s, torch.tensor(2.5, device=device))
        assert loss.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_labels_and_parts(device, passes, tail, reduction):
    """``labels`` add ``ce_weight`` times the hard-label cross-entropy; ``return_parts`` gives both
    parts, equal to the losses computed alone."""
    lead, vocab = (3, 7), 211
    ids, logprobs = teacher_topk(lead, vocab, 16)
    labels = torch.randint(0, vocab, lead)
    labels[0, :3] = -100
    mask = (torch.rand(lead) < 0.8).to(device)
    options = dict(mask=mask, reduction=reduction, tail=tail, labels=labels.to(device), ce_weight=0.7)
    s = student_logits(lead, vocab, device)
    compare(s, ids, logprobs, device, **options)
    parts = fastkd.sparse_logit_kl(s, ids.to(device), logprobs.to(device), return_parts=True, **options)
    kd = sparse_loss(s.detach().double().cpu(), (ids, logprobs), mask=mask.cpu(), reduction=reduction, tail=tail)
    ce = (sparse_loss(s.detach().double().cpu(), (ids, logprobs), mask=mask.cpu(), reduction=reduction, tail=tail,
                      labels=labels, ce_weight=1.0) - kd)
    assert_close(parts.kd, kd, 1e-5, "kd part")
    assert_close(parts.ce, ce, 1e-5, "ce part")
    assert not parts.kd.requires_grad and not parts.ce.requires_grad


def test_noncontiguous_logits(device, passes):
    """A causal LM's ``logits[:, :-1]`` (a strided view) is read in place."""
    vocab = 150
    full = student_logits((3, 9), vocab, device)
    ids, logprobs = teacher_topk((3, 8), vocab, 20)
    compare(full[:, :-1], ids, logprobs, device, temperature=2.0)


def test_one_pass_and_two_pass_agree(device):
    lead, vocab = (4, 8), 257
    ids, logprobs = teacher_topk(lead, vocab, 16)
    s = student_logits(lead, vocab, device)
    results = []
    for mode in ("auto", "two"):
        fastkd.set_passes(mode)
        loss = fastkd.sparse_logit_kl(s, ids.to(device), logprobs.to(device), temperature=2.0)
        results.append((loss.detach(), *torch.autograd.grad(loss, s, torch.tensor(0.3, device=device))))
    fastkd.set_passes("auto")
    for a, b in zip(*results):
        assert_close(a, b, 1e-6, "one-pass vs two-pass")


# --------------------------------------------------------------------------------------------
# fused_linear_sparse_kl against the materialised student logits


def head(h, w, b=None, softcap=None):
    z = h @ w.T + (0 if b is None else b)
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def fused_inputs(device, lead, d, vocab, dtype=torch.float32, bias=True):
    def rand(*shape, scale=1.0):
        return (torch.randn(shape) * scale).to(device=device, dtype=dtype).requires_grad_()

    return rand(*lead, d), rand(vocab, d, scale=1.5 * d**-0.5), rand(vocab, scale=0.5) if bias else None


@pytest.mark.parametrize("tail, temperature", [("renormalize", 0.05), ("renormalize", 2.0), ("renormalize", 50.0),
                                                ("bucket", 1.0)])
@pytest.mark.parametrize("lead, chunk_size", [((1,), None), ((4, 9), None), ((4, 9), 5), ((37,), 1)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fused_linear_matches_reference(device, tail, temperature, lead, chunk_size, bias):
    d, vocab, k = 12, 131, 9
    h, w, b = fused_inputs(device, lead, d, vocab, bias=bias)
    ids, logprobs = teacher_topk(lead, vocab, k)
    mask = (torch.rand(lead) < 0.8).to(device)
    labels = torch.randint(0, vocab, lead)
    for options in ({}, {"labels": labels.to(device), "ce_weight": 0.4}, {"student_softcap": 3.0}):
        loss = fastkd.fused_linear_sparse_kl(h, w, ids.to(device), logprobs.to(device), student_bias=b,
                                             temperature=temperature, mask=mask, tail=tail, chunk_size=chunk_size,
                                             **options)
        leaves = [x.detach().double().cpu().requires_grad_() for x in (h, w, b) if x is not None]
        s = head(*leaves, softcap=options.get("student_softcap"))
        want = sparse_loss(s, (ids, logprobs), mask=mask.cpu(), temperature=temperature, tail=tail,
                           labels=None if "labels" not in options else labels, ce_weight=options.get("ce_weight", 0.0))
        assert loss.dtype == torch.float32 and loss.shape == ()
        assert_close(loss.detach(), want.detach(), 1e-5, f"loss {sorted(options)}", atol=1e-5 * temperature**2)
        upstream = torch.randn(())
        got = torch.autograd.grad(loss, [x for x in (h, w, b) if x is not None], upstream.to(device))
        wants = torch.autograd.grad(want, leaves, upstream.double())
        for name, a, e in zip(("hidden", "weight", "bias"), got, wants):
            assert_close(a, e, 1e-5, f"grad {name} {sorted(options)}", atol=1e-5 * temperature)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=lambda d: str(d).removeprefix("torch."))
def test_fused_linear_dtypes(device, dtype):
    lead, d, vocab = (3, 8), 16, 97
    h, w, b = fused_inputs(device, lead, d, vocab, dtype=dtype)
    ids, logprobs = teacher_topk(lead, vocab, 7)
    loss = fastkd.fused_linear_sparse_kl(h, w, ids.to(device), logprobs.to(device), student_bias=b, chunk_size=7)
    leaves = [x.detach().double().cpu().requires_grad_() for x in (h, w, b)]
    # the reference rounds the logits to the student's dtype, as the kernels' GEMM does
    want = sparse_loss(head(*leaves).to(dtype).double(), (ids, logprobs))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rtol = 1e-5 if dtype == torch.float64 else 2e-2
    assert_close(loss.detach(), want.detach(), rtol, "loss")
    grads = torch.autograd.grad(loss, (h, w, b))
    for g, x in zip(grads, (h, w, b)):
        assert g.dtype == dtype and g.shape == x.shape and torch.isfinite(g.double()).all()


def test_fused_linear_no_grad_and_one_tensor_trained(device):
    lead, d, vocab = (2, 5), 8, 61
    h, w, b = fused_inputs(device, lead, d, vocab)
    ids, logprobs = teacher_topk(lead, vocab, 5)
    teacher = (ids.to(device), logprobs.to(device))
    with torch.no_grad():
        value = fastkd.fused_linear_sparse_kl(h, w, *teacher, student_bias=b)
    assert not value.requires_grad
    w.requires_grad_(False)
    loss = fastkd.fused_linear_sparse_kl(h, w, *teacher, student_bias=b)
    assert_close(loss.detach(), value, 1e-6, "loss without grad")
    loss.backward()
    assert h.grad is not None and b.grad is not None and w.grad is None


def test_fused_linear_no_tokens_by_vocab_tensor(device):
    """No tensor of ``tokens * V * 2`` bytes or more exists at any time of forward and backward,
    no teacher head runs, and no op synchronises (the validated body; the CPU checks of the ids'
    values read them on the host, as ``fastkd._validation.check_values`` documents)."""
    tokens, vocab, d = 64, 97, 8
    h, w, b = fused_inputs(device, (tokens,), d, vocab)
    ids, logprobs = teacher_topk((tokens,), vocab, 6)
    mask = (torch.rand(tokens) < 0.8).float().to(device)
    labels = torch.randint(0, vocab, (tokens,)).to(device)
    with Recorder({"fastkd::fused_linear_sparse_kl": fused_linear_sparse_kl_forward}) as rec:
        parts = fused_linear_sparse_loss(
            h, w, ids.to(device), logprobs.to(device), mask, labels, student_bias=b, temperature=2.0,
            tail="renormalize", chunk_size=16, student_head=(1.0, None), ce_weight=0.5, backend=fastkd._backend.resolve(h.device),
        )
        parts.loss.backward(torch.tensor(0.5, device=device))
    assert "fastkd::fused_linear_sparse_kl" in rec.ops, "the op was not recorded: the test would prove nothing"
    assert any(n == 16 * vocab * 4 for _, n in rec.produced), "no chunk of logits was recorded"
    big = [(name, n) for name, n in rec.produced if n >= tokens * vocab * 2]
    assert not big, f"tensors of >= {tokens * vocab * 2} bytes: {big}"
    assert not rec.ops & SYNC_OPS, f"host synchronisation: {sorted(rec.ops & SYNC_OPS)}"
    assert w.grad is not None and h.grad is not None


# --------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("case", compile_cases())
@pytest.mark.parametrize("form", ["logits", "fused_linear"])
def test_compile_fullgraph(case, form):
    device, backend, compiler = case
    lead, d, vocab = (3, 7), 12, 131
    h, w, b = fused_inputs(device, lead, d, vocab)
    ids, logprobs = teacher_topk(lead, vocab, 9)
    ids, logprobs = ids.to(device), logprobs.to(device)
    mask = (torch.rand(lead) < 0.7).to(device)
    labels = torch.randint(0, vocab, lead).to(device)

    def step(h, w, b):
        if form == "logits":
            return fastkd.sparse_logit_kl(h @ w.T + b, ids, logprobs, temperature=2.0, mask=mask, labels=labels,
                                          ce_weight=0.5)
        return fastkd.fused_linear_sparse_kl(h, w, ids, logprobs, student_bias=b, temperature=2.0, mask=mask,
                                             chunk_size=5, labels=labels, ce_weight=0.5)

    fastkd.set_backend(backend)
    try:
        got = torch.compile(step, fullgraph=True, backend=compiler)(h, w, b)
        want = step(h, w, b)
        assert_close(got.detach(), want.detach(), 1e-6, "loss")
        for x, y in zip(torch.autograd.grad(got, (h, w, b)), torch.autograd.grad(want, (h, w, b))):
            assert_close(x, y, 1e-5, "gradient")
    finally:
        fastkd.set_backend("auto")
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# bad inputs: each error names the argument


def good_inputs():
    ids, logprobs = teacher_topk((2, 3), 11, 4, padded=False)
    return {"student_logits": torch.randn(2, 3, 11), "teacher_ids": ids, "teacher_logprobs": logprobs}


def _set(name, value, **options):
    def change(x):
        x[name] = value(x) if callable(value) else value
        x.update(options)

    return change


def _duplicate(x):
    ids = x["teacher_ids"].clone()
    ids[1, 2, 3] = ids[1, 2, 0]
    return ids


BAD = [
    ("teacher_ids", TypeError, _set("teacher_ids", lambda x: x["teacher_ids"].float())),
    ("teacher_ids", TypeError, _set("teacher_ids", [[1, 2]])),
    ("teacher_ids", ValueError, _set("teacher_ids", lambda x: x["teacher_ids"][:, :2])),
    ("teacher_ids", ValueError, _set("teacher_ids", lambda x: x["teacher_ids"][..., :0])),
    ("teacher_ids", ValueError, _set("teacher_ids", lambda x: x["teacher_ids"].clamp_max(10) + 1)),
    ("teacher_ids", ValueError, _set("teacher_ids", lambda x: x["teacher_ids"] - 5)),
    ("teacher_ids", ValueError, _set("teacher_ids", _duplicate)),
    ("teacher_ids", ValueError, _set("teacher_ids", torch.zeros(2, 3, 12, dtype=torch.int64),
                                     teacher_logprobs=torch.zeros(2, 3, 12))),
    ("teacher_logprobs", TypeError, _set("teacher_logprobs", lambda x: x["teacher_ids"])),
    ("teacher_logprobs", ValueError, _set("teacher_logprobs", lambda x: x["teacher_logprobs"][..., :3])),
    ("teacher_logprobs", ValueError, _set("teacher_logprobs", lambda x: x["teacher_logprobs"].fill_(math.nan))),
    ("teacher_logprobs", ValueError, _set("teacher_logprobs", lambda x: x["teacher_logprobs"].fill_(math.inf))),
    ("student_logits", TypeError, _set("student_logits", torch.ones(2, 3, 11, dtype=torch.int64))),
    ("student_logits", ValueError, _set("student_logits", torch.tensor(1.0))),
    ("tail", ValueError, _set("tail", "tails")),
    ("tail", ValueError, _set("tail", "bucket", temperature=2.0)),
    ("temperature", ValueError, _set("temperature", 0.0)),
    ("reduction", ValueError, _set("reduction", "avg")),
    ("mask", ValueError, _set("mask", torch.ones(2, 4))),
    ("labels", ValueError, _set("labels", torch.full((2, 3), 11))),
    ("ce_weight", ValueError, _set("ce_weight", 0.5)),
]


@pytest.mark.parametrize("name, error, change", [pytest.param(*b, id=f"{b[0]}-{i}") for i, b in enumerate(BAD)])
def test_bad_input(name, error, change):
    inputs = good_inputs()
    change(inputs)
    tensors = {k: inputs.pop(k) for k in ("student_logits", "teacher_ids", "teacher_logprobs")}
    with pytest.raises(error, match=name):
        fastkd.sparse_logit_kl(*tensors.values(), **inputs)


def test_fused_linear_bad_inputs():
    ids, logprobs = teacher_topk((2, 3), 11, 4, padded=False)
    h, w = torch.randn(2, 3, 5), torch.randn(11, 5)
    with pytest.raises(ValueError, match="teacher_ids"):
        fastkd.fused_linear_sparse_kl(h, w, ids[:1], logprobs[:1])
    with pytest.raises(ValueError, match="student_weight"):
        fastkd.fused_linear_sparse_kl(h, torch.randn(11, 6), ids, logprobs)
    with pytest.raises(ValueError, match="teacher_ids"):
        fastkd.fused_linear_sparse_kl(h, w[:8], ids.clamp_min(0) + 3, logprobs)
    with pytest.raises(ValueError, match="tail"):
        fastkd.fused_linear_sparse_kl(h, w, ids, logprobs, tail="bucket", temperature=0.5)
    with pytest.raises(ValueError, match="student_softcap"):
        fastkd.fused_linear_sparse_kl(h, w, ids, logprobs, student_softcap=-1.0)
    with pytest.raises(TypeError, match="chunk_size"):
        fastkd.fused_linear_sparse_kl(h, w, ids, logprobs, chunk_size=2.0)
