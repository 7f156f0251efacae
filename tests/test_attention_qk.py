"""``attention_kl_qk`` and ``relation_kl`` against float64 formulas written from their definitions
(explicit scores, softmax and KL in ``reference``), on every backend: odd lengths, lengths of several
tiles, grouped-query attention, different head widths, causal and padding masks (left padding with
causal leaves rows with no key), low-precision and float64 inputs, every reduction, layer pairs of
different shapes, ``grad_output != 1``; then memory (no ``[L, L]`` tensor), no host
synchronisation, ``torch.compile`` and bad inputs."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import NEEDS_CUDA, SYNC_OPS, Recorder, compile_cases
from reference import assert_close, attention_qk_rows, reduce, rel_err, relation_rows

import fastkd
from fastkd import attention_qk
from fastkd.backends import qk_chunks


def qk_inputs(device, batch=2, heads=4, length=37, kv_s=2, kv_t=1, d_s=16, d_t=24, dtype=torch.float32,
              teacher_dtype=None, spread=1.5):
    """(q_s, k_s, q_t, k_t): the student's leaves require grad."""
    def r(*shape, dt):
        return (torch.randn(shape) * spread).to(device, dt)

    teacher_dtype = teacher_dtype or dtype
    q_s = r(batch, heads, length, d_s, dt=dtype).requires_grad_()
    k_s = r(batch, kv_s, length, d_s, dt=dtype).requires_grad_()
    return q_s, k_s, r(batch, heads, length, d_t, dt=teacher_dtype), r(batch, kv_t, length, d_t, dt=teacher_dtype)


def padding_mask(batch, length, device, left=True):
    """Row 0: right padding of 3; row 1: left padding of 5 (with causal, its first valid query
    still has keys, and every padded query is masked); further rows random."""
    mask = (torch.rand(batch, length) < 0.8).float()
    mask[0] = 1
    mask[0, -3:] = 0
    if batch > 1:
        mask[1] = 1
        mask[1, :5] = 0 if left else 1
    return mask.to(device)


def reference_value(pairs, mask, causal, reduction, scales=None, dtype=torch.float64):
    """The loss of ``pairs`` [(q_s, k_s, q_t, k_t)] by the float64 (or ``dtype``) formula, and the
    student leaves it was computed from."""
    values, leaves = [], []
    for i, (q_s, k_s, q_t, k_t) in enumerate(pairs):
        a = q_s.detach().to(dtype).requires_grad_()
        b = k_s.detach().to(dtype).requires_grad_()
        scale_s, scale_t = scales[i] if scales else (q_s.shape[-1] ** -0.5, q_t.shape[-1] ** -0.5)
        rows = attention_qk_rows(a, b, q_t, k_t, scale_s, scale_t, mask, causal, dtype)
        values.append(reduce(rows, mask, reduction, attention=True))
        leaves += [a, b]
    return values, leaves


def combine(values, reduction, is_sequence):
    if not is_sequence:
        return values[0]
    if reduction == "none":
        return values
    total = torch.stack(values).sum()
    return total / len(values) if reduction == "mean" else total


def check_against_formula(pairs, *, mask=None, causal=False, reduction="mean", scales=None, loss_rtol=1e-5,
                          grad_rtol=1e-5):
    """fastkd's value and gradients of ``(q_s, k_s)`` of every pair against the float64 formula,
    under a random upstream gradient; where the same formula in float32 is further off than the
    tolerance (an ill-conditioned KL), four times that error is allowed."""
    is_sequence = len(pairs) > 1
    args = [list(x) for x in zip(*pairs)] if is_sequence else list(pairs[0])
    options = {}
    if scales:
        options = {"student_scale": scales[0][0], "teacher_scale": scales[0][1]}
    out = fastkd.attention_kl_qk(*args, mask=mask, causal=causal, reduction=reduction, **options)
    outs = out if isinstance(out, list) else [out]
    students = [x for q_s, k_s, _, _ in pairs for x in (q_s, k_s)]

    def formula(dtype):
        values, leaves = reference_value(pairs, mask, causal, reduction, scales, dtype)
        value = combine(values, reduction, is_sequence)
        return (value if isinstance(value, list) else [value]), leaves

    wants, leaves64 = formula(torch.float64)
    upstream = [torch.randn(w.shape, dtype=torch.float64) * 1.7 for w in wants]
    want_grads = torch.autograd.grad([w for w in wants], leaves64, [u.to(w.device) for u, w in zip(upstream, wants)],
                                     allow_unused=True)
    wants32, leaves32 = formula(torch.float32)
    grads32 = torch.autograd.grad(wants32, leaves32, [u.to(w.device, w.dtype) for u, w in zip(upstream, wants32)],
                                  allow_unused=True)
    for o, w, w32 in zip(outs, wants, wants32):
        rtol = max(loss_rtol, 4 * rel_err(w32.detach(), w.detach()))
        assert o.dtype == (torch.float64 if pairs[0][0].dtype == torch.float64 else torch.float32)
        assert_close(o.detach(), w.detach(), rtol, "loss")
    grads = torch.autograd.grad(outs, students, [u.to(o.device, o.dtype) for u, o in zip(upstream, outs)])
    for i, (x, g, w, g32) in enumerate(zip(students, grads, want_grads, grads32)):
        assert g.dtype == x.dtype and g.shape == x.shape
        rtol = max(grad_rtol, 4 * rel_err(g32, w))
        assert_close(g, w, rtol, f"grad of {'k_s' if i % 2 else 'q_s'} of pair {i // 2}")
    return out


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_matches_formula(device, causal, masked):
    """L = 37: not a multiple of any tile; GQA on both sides with different head widths."""
    pairs = [qk_inputs(device)]
    mask = padding_mask(2, 37, device) if masked else None
    check_against_formula(pairs, mask=mask, causal=causal)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_pairs_of_different_shapes(device, reduction):
    """Two pairs (one without GQA, one with 8 query heads on 2 key heads), L = 70: several tiles
    of 16 or 32, and several query chunks on CPU (set small below)."""
    pairs = [qk_inputs(device, heads=2, length=70, kv_s=2, kv_t=2, d_s=8, d_t=8),
             qk_inputs(device, heads=8, length=70, kv_s=2, kv_t=4, d_s=32, d_t=16)]
    check_against_formula(pairs, mask=padding_mask(2, 70, device), causal=True, reduction=reduction)


def test_query_chunks_on_cpu(device, monkeypatch):
    """The CPU backends' chunks of query rows (here 3 rows of one head per chunk) give the same."""
    monkeypatch.setattr(qk_chunks, "CHUNK_ELEMENTS", 3 * 4 * 29)
    pairs = [qk_inputs(device, length=29)]
    for causal in (False, True):
        check_against_formula(pairs, mask=padding_mask(2, 29, device), causal=causal)


def test_scales(device):
    pairs = [qk_inputs(device, length=19)]
    check_against_formula(pairs, causal=True, scales=[(0.3, 2.0)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(device, dtype):
    """Low-precision inputs, fp32 accumulation: the loss as precise as for fp32 inputs (the
    reference reads the same rounded inputs), gradients rounded to the student's dtype."""
    pairs = [qk_inputs(device, length=33, dtype=dtype, teacher_dtype=torch.float32)]
    check_against_formula(pairs, mask=padding_mask(2, 33, device), causal=True, grad_rtol=1e-2)
    pairs = [qk_inputs(device, length=21, dtype=torch.float32, teacher_dtype=dtype)]
    check_against_formula(pairs, causal=False)


def test_float64(device):
    pairs = [qk_inputs(device, length=23, dtype=torch.float64)]
    check_against_formula(pairs, mask=padding_mask(2, 23, device), causal=True, loss_rtol=1e-10, grad_rtol=1e-10)


def test_extreme_scores(device):
    """Scores of ~1e3: near one-hot distributions, KL of ~1e2."""
    pairs = [qk_inputs(device, length=17, spread=8.0)]
    check_against_formula(pairs, mask=padding_mask(2, 17, device), causal=True)


def test_near_uniform_distributions(device):
    """Scores of ~1e-4: a KL of ~1e-8, the difference of log-sum-exps of ~log L, which float32
    holds to ~2e-7; the loss and the gradients are checked to that absolute precision."""
    q_s, k_s, q_t, k_t = qk_inputs(device, length=17, spread=0.01)
    loss = fastkd.attention_kl_qk(q_s, k_s, q_t, k_t, causal=True)
    (want,), leaves = reference_value([(q_s, k_s, q_t, k_t)], None, True, "mean")
    assert abs(loss.item() - want.item()) < 1e-6
    for g, w in zip(torch.autograd.grad(loss, [q_s, k_s]), torch.autograd.grad(want, leaves)):
        assert (g.double().cpu() - w.cpu()).abs().max() < 1e-7


def test_rows_without_keys_and_all_masked(device):
    """Left padding with causal: padded queries (whose keys are all dropped) give 0, the first
    valid one sees only itself (KL 0), later ones count; a fully masked batch gives 0 and zero
    gradients, never NaN."""
    q_s, k_s, q_t, k_t = qk_inputs(device, length=12)
    mask = torch.ones(2, 12, device=device)
    mask[1, :7] = 0
    none = fastkd.attention_kl_qk(q_s, k_s, q_t, k_t, mask=mask, causal=True, reduction="none")
    assert none[1, :, :7].eq(0).all() and none[1, :, 7].abs().max() < 1e-6 and none[1, :, 8:].gt(0).all()
    assert torch.isfinite(none).all()
    zero = torch.zeros(2, 12, device=device)
    loss = fastkd.attention_kl_qk(q_s, k_s, q_t, k_t, mask=zero, causal=True)
    g_q, g_k = torch.autograd.grad(loss * 3.0, [q_s, k_s])
    assert loss.item() == 0 and g_q.eq(0).all() and g_k.eq(0).all()


def test_teacher_and_unused_inputs_get_no_gradient(device):
    q_s, k_s, q_t, k_t = qk_inputs(device, length=9)
    q_t.requires_grad_()
    k_s.requires_grad_(False)
    loss = fastkd.attention_kl_qk(q_s, k_s, q_t, k_t, causal=True)
    loss.backward()
    assert q_t.grad is None and k_s.grad is None and q_s.grad.abs().sum() > 0


def test_equals_attention_kl_of_the_scores(device):
    """The definition: attention_kl(kind="scores") of the explicit scores (same GQA rule)."""
    q_s, k_s, q_t, k_t = qk_inputs(device, length=15, kv_s=4, kv_t=4, d_t=16)
    mask = padding_mask(2, 15, device)
    future = torch.ones(15, 15, dtype=torch.bool, device=device).triu(1)
    s = (q_s @ k_s.transpose(-1, -2) * 16**-0.5).masked_fill(future, -torch.inf)
    t = (q_t @ k_t.transpose(-1, -2) * 16**-0.5).masked_fill(future, -torch.inf)
    want = fastkd.attention_kl(s, t, mask=mask, kind="scores", reduction="none")
    got = fastkd.attention_kl_qk(q_s, k_s, q_t, k_t, mask=mask, causal=True, reduction="none")
    assert_close(got.detach(), want.detach(), 1e-5, "rows")


# --------------------------------------------------------------------------------------------
# relation_kl


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_relation_kl_matches_formula(device, causal):
    """Student 4 relation heads of width 8, teacher of width 12; pairs; each reduction."""
    mask = padding_mask(2, 21, device)
    students = [(torch.randn(2, 21, 32) * 2).to(device).requires_grad_() for _ in range(2)]
    teachers = [(torch.randn(2, 21, 48) * 2).to(device) for _ in range(2)]
    for reduction in ("mean", "sum", "none"):
        out = fastkd.relation_kl(students, teachers, relation_heads=4, mask=mask, causal=causal, reduction=reduction)
        leaves = [s.detach().double().requires_grad_() for s in students]
        values = [reduce(relation_rows(s, t, 4, mask, causal), mask, reduction, attention=True) for s, t in
                  zip(leaves, teachers)]
        want = combine(values, reduction, True)
        outs, wants = (out, want) if reduction == "none" else ([out], [want])
        upstream = [torch.randn(w.shape, dtype=torch.float64) for w in wants]
        for o, w in zip(outs, wants):
            assert_close(o.detach(), w.detach(), 1e-5, f"relation_kl {reduction}")
        grads = torch.autograd.grad(outs, students, [u.float().to(device) for u in upstream])
        want_grads = torch.autograd.grad(wants, leaves, [u.to(device) for u in upstream])
        for g, w in zip(grads, want_grads):
            assert_close(g, w, 1e-5, f"relation_kl grad {reduction}")


def test_relation_kl_single_pair_is_the_qk_loss_of_the_split(device):
    x_s, x_t = torch.randn(2, 10, 12, device=device), torch.randn(2, 10, 30, device=device)
    got = fastkd.relation_kl(x_s, x_t, relation_heads=3)
    s, t = x_s.view(2, 10, 3, 4).transpose(1, 2), x_t.view(2, 10, 3, 10).transpose(1, 2)
    assert_close(got, fastkd.attention_kl_qk(s, s, t, t), 1e-6, "relation_kl")


# --------------------------------------------------------------------------------------------
# memory and host synchronisation


def recorder() -> Recorder:
    return Recorder({
        "fastkd::attention_kl_qk_rows": attention_qk.attention_kl_qk_rows._init_fn,
        "fastkd::attention_kl_qk_rows_backward": attention_qk.attention_kl_qk_rows_backward._init_fn,
    })


def test_no_length_by_length_tensor(device, monkeypatch):
    """No tensor of ``L * L * 4`` bytes (one head's float32 map) or more, forward and backward,
    with query chunks of 16 rows on CPU; and no op that synchronises with the host."""
    batch, heads, length = 2, 2, 64
    monkeypatch.setattr(qk_chunks, "CHUNK_ELEMENTS", heads * 16 * length)
    q_s, k_s, q_t, k_t = qk_inputs(device, batch=batch, heads=heads, length=length, kv_s=1, kv_t=2, d_s=8, d_t=8)
    mask = padding_mask(batch, length, device)
    with recorder() as rec:
        loss = fastkd.attention_kl_qk(q_s, k_s, q_t, k_t, mask=mask, causal=True)
        loss.backward(torch.tensor(0.5, device=device))
    assert {"fastkd::attention_kl_qk_rows", "fastkd::attention_kl_qk_rows_backward"} <= rec.ops, \
        "the ops were not recorded: the test would prove nothing"
    big = [(name, n) for name, n in rec.produced if n >= length * length * 4]
    assert not big, f"tensors of >= {length * length * 4} bytes: {big}"
    assert not rec.ops & SYNC_OPS, f"host synchronisation: {sorted(rec.ops & SYNC_OPS)}"
    assert q_s.grad.abs().sum() > 0 and k_s.grad.abs().sum() > 0


def test_recorder_sees_a_map():
    """The recorder catches the maps path's ``[B, H, L, L]`` scores (the test above can fail)."""
    q_s, k_s, _, _ = qk_inputs("cpu", batch=1, heads=2, length=64, kv_s=2, d_s=8)
    with recorder() as rec:
        q_s @ k_s.transpose(-1, -2)
    assert max(n for _, n in rec.produced) == 2 * 64 * 64 * 4


# --------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("case", compile_cases(auto=True))
def test_compile_fullgraph(case):
    device, backend, compiler = case
    q_s, k_s, q_t, k_t = qk_inputs(device, length=13)
    x_s, x_t = torch.randn(2, 13, 16, device=device, requires_grad=True), torch.randn(2, 13, 24, device=device)
    mask = padding_mask(2, 13, device)

    def step(q_s, k_s, x_s):
        return (fastkd.attention_kl_qk(q_s, k_s, q_t, k_t, mask=mask, causal=True)
                + fastkd.relation_kl(x_s, x_t, relation_heads=4, mask=mask))

    fastkd.set_backend(backend)
    try:
        got = torch.compile(step, fullgraph=True, backend=compiler)(q_s, k_s, x_s)
        want = step(q_s, k_s, x_s)
        assert_close(got.detach(), want.detach(), 1e-6, "loss")
        for a, b in zip(torch.autograd.grad(got, [q_s, k_s, x_s]), torch.autograd.grad(want, [q_s, k_s, x_s])):
            assert_close(a, b, 1e-6, "gradient")
    finally:
        fastkd.set_backend("auto")
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# bad inputs: each error names the argument


def _qk_call(**changes):
    q_s, k_s, q_t, k_t = (x.detach() for x in qk_inputs("cpu", length=6))
    args = {"student_q": q_s, "student_k": k_s, "teacher_q": q_t, "teacher_k": k_t}
    options = {k: changes.pop(k) for k in list(changes) if k not in args}
    args.update(changes)
    return lambda: fastkd.attention_kl_qk(*args.values(), **options)


BAD_QK = {
    "q rank": (_qk_call(student_q=torch.randn(2, 4, 6)), ValueError, "student_q"),
    "k width": (_qk_call(student_k=torch.randn(2, 2, 6, 15)), ValueError, "student_k"),
    "k length": (_qk_call(teacher_k=torch.randn(2, 1, 7, 24)), ValueError, "teacher_k"),
    "H % H_kv": (_qk_call(student_k=torch.randn(2, 3, 6, 16)), ValueError, "H_kv=3"),
    "heads differ": (_qk_call(teacher_q=torch.randn(2, 2, 6, 24), teacher_k=torch.randn(2, 1, 6, 24)),
                     ValueError, "teacher_q"),
    "k dtype": (_qk_call(student_k=torch.randn(2, 2, 6, 16, dtype=torch.float64)), TypeError, "student_k"),
    "integer q": (_qk_call(teacher_q=torch.ones(2, 4, 6, 24, dtype=torch.long)), TypeError, "teacher_q"),
    "mask shape": (_qk_call(mask=torch.ones(2, 5)), ValueError, "mask"),
    "causal": (_qk_call(causal=1), TypeError, "causal"),
    "scale": (_qk_call(student_scale=0.0), ValueError, "student_scale"),
    "scale type": (_qk_call(teacher_scale="1"), TypeError, "teacher_scale"),
    "reduction": (_qk_call(reduction="avg"), ValueError, "reduction"),
    "sequence and tensor": (lambda: fastkd.attention_kl_qk([torch.randn(1, 1, 2, 2)], torch.randn(1, 1, 2, 2),
                                                           torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2)),
                            TypeError, "student_k: Tensor"),
    "layer counts": (lambda: fastkd.attention_kl_qk(*[[torch.randn(1, 1, 2, 2)]] * 3, [torch.randn(1, 1, 2, 2)] * 2),
                     ValueError, "teacher_k: got 2 layers"),
    "relation heads": (lambda: fastkd.relation_kl(torch.randn(2, 5, 12), torch.randn(2, 5, 12), relation_heads=5),
                       ValueError, "relation_heads=5"),
    "relation heads type": (lambda: fastkd.relation_kl(torch.randn(2, 5, 12), torch.randn(2, 5, 12),
                                                       relation_heads=2.0), TypeError, "relation_heads"),
    "relation rank": (lambda: fastkd.relation_kl(torch.randn(2, 5, 3, 4), torch.randn(2, 5, 12), relation_heads=2),
                      ValueError, "student"),
    "relation length": (lambda: fastkd.relation_kl(torch.randn(2, 5, 12), torch.randn(2, 6, 12), relation_heads=2),
                        ValueError, "teacher"),
}


@pytest.mark.parametrize("name", list(BAD_QK))
def test_bad_input(name):
    call, error, words = BAD_QK[name]
    with pytest.raises(error, match=re.escape(words)):
        call()


# --------------------------------------------------------------------------------------------
# CUDA graphs and host synchronisation on a GPU


@NEEDS_CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replays_match_the_formula(dtype):
    """Forward and backward captured once in a CUDA graph, replayed on new queries, keys and masks
    copied into the static inputs: each replay matches the float64 formula; and the call raises
    nothing under ``set_sync_debug_mode("error")`` (no host synchronisation)."""
    fastkd.set_backend("auto")
    static = [x.detach().cuda() for x in qk_inputs("cpu", length=150, dtype=dtype)]
    static[0].requires_grad_()
    static[1].requires_grad_()
    static_mask = padding_mask(2, 150, "cuda")

    def step():
        loss = fastkd.attention_kl_qk(*static, mask=static_mask, causal=True)
        return (loss, *torch.autograd.grad(loss, static[:2]))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    for _ in range(3):
        fresh = qk_inputs("cpu", length=150, dtype=dtype)
        mask = padding_mask(2, 150, "cpu")
        with torch.no_grad():
            for buffer, x in zip(static, fresh):
                buffer.copy_(x)
            static_mask.copy_(mask)
        graph.replay()
        (want,), leaves = reference_value([tuple(x.double() for x in fresh)], mask.double(), True, "mean")
        want_grads = torch.autograd.grad(want, leaves)
        assert_close(outputs[0].cpu(), want, 1e-5, "loss")
        for got, w in zip(outputs[1:], want_grads):
            assert_close(got.cpu(), w, 1e-5 if dtype == torch.float32 else 1e-2, "gradient")
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
