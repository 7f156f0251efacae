"""``fused_linear_kl`` on every backend against the float64 materialised formula
``logit_kl(h_s @ W_s.T + b_s, h_t @ W_t.T + b_t)``: loss and the gradients of the student's hidden,
weight and bias, over chunkings, masks, temperatures, widths and dtypes; the proof that no
``[tokens, V]`` tensor is created; torch.compile; bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SYNC_OPS, Recorder, compile_cases
from reference import assert_close, logit_loss, rel_err

import fastkd
from fastkd.fused_linear import (
    FusedLinearKLLoss,
    default_chunk_size,
    fused_linear_kl,
    fused_linear_kl_forward,
)

pytestmark = pytest.mark.usefixtures("nan_empty")

RTOL = 1e-5
STUDENT = ("student_hidden", "student_weight", "student_bias")
TEACHER = ("teacher_hidden", "teacher_weight", "teacher_bias")


def make_inputs(device, lead=(3, 7), d_s=12, d_t=20, vocab=131, bias=True, dtype=torch.float32,
                teacher_dtype=None, logit_std=1.0):
    """Student ``[*lead, d_s]`` hidden, ``[V, d_s]`` weight (and bias) requiring grad; teacher
    ``[*lead, d_t]``, ``[V, d_t]`` (and bias) of ``teacher_dtype``; values drawn on the CPU.
    The student's logits have a standard deviation of about ``logit_std``, the teacher's 1.5x."""
    teacher_dtype = teacher_dtype or dtype

    def rand(*shape, dt, scale=1.0, grad=False):
        x = (torch.randn(shape) * scale).to(device=device, dtype=dt)
        return x.requires_grad_() if grad else x

    return {
        "student_hidden": rand(*lead, d_s, dt=dtype, grad=True),
        "student_weight": rand(vocab, d_s, dt=dtype, scale=logit_std * d_s**-0.5, grad=True),
        "student_bias": rand(vocab, dt=dtype, scale=0.5, grad=True) if bias else None,
        "teacher_hidden": rand(*lead, d_t, dt=teacher_dtype, scale=1.5),
        "teacher_weight": rand(vocab, d_t, dt=teacher_dtype, scale=logit_std * d_t**-0.5),
        "teacher_bias": rand(vocab, dt=teacher_dtype, scale=0.5) if bias else None,
    }


def head_logits(h, w, b, scale=1.0, softcap=None):
    """The materialised logits of a head: ``(h @ w.T + b) * scale``, soft-capped by ``c tanh(z / c)``."""
    z = (h @ w.T + (0 if b is None else b)) * scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def reference(inputs, temperature=1.0, mask=None, **options):
    """The float64 loss of the materialised logits, differentiable in the student's tensors
    (returned as float64 leaves: ``(loss, [hidden, weight, bias])``); ``options``: those of
    ``fused_linear_kl`` beyond the tensors (divergence, labels, vocab, softcaps, scales ...)."""
    students = [inputs[k] for k in STUDENT]
    h, w, b = [None if x is None else x.detach().double().cpu().requires_grad_() for x in students]
    h_t, w_t, b_t = [None if inputs[k] is None else inputs[k].detach().double().cpu() for k in TEACHER]
    heads = {side: {"scale": options.pop(f"{side}_logit_scale", 1.0), "softcap": options.pop(f"{side}_softcap", None)}
             for side in ("student", "teacher")}
    s = head_logits(h, w, b, **heads["student"])
    t = head_logits(h_t, w_t, b_t, **heads["teacher"])
    labels = options.pop("labels", None)
    loss = logit_loss(s, t, mask=None if mask is None else mask.cpu(), temperature=temperature,
                      labels=None if labels is None else labels.cpu(), **options)
    return loss, [h, w, b]


def check(inputs, temperature=1.0, mask=None, chunk_size=None, rtol=RTOL, upstream=None, elementwise=True, **options):
    """fused_linear_kl and the reference agree in loss and in the gradient of every student tensor
    that requires grad, under the same upstream gradient (random unless given); with
    ``elementwise=False`` gradients are compared norm-wise only."""
    loss = fused_linear_kl(**inputs, temperature=temperature, mask=mask, chunk_size=chunk_size, **options)
    want, leaves = reference(inputs, temperature, mask, **options)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss.detach(), want.detach(), rtol, "loss")
    g = torch.randn(()) if upstream is None else torch.tensor(upstream)
    students = [inputs[k] for k in STUDENT]
    present = [i for i, x in enumerate(students) if x is not None and x.requires_grad]
    got = torch.autograd.grad(loss, [students[i] for i in present], g.to(loss.device))
    wants = torch.autograd.grad(want, [leaves[i] for i in present], g.double())
    for i, a, b in zip(present, got, wants):
        assert a.dtype == students[i].dtype
        assert_close(a, b, rtol, ["grad hidden", "grad weight", "grad bias"][i], elementwise=elementwise)
    return loss


@pytest.mark.parametrize(
    "lead, chunk_size",
    [
        ((1,), None),  # one token
        ((4, 9), None),  # one chunk (the default chunk covers every token)
        ((4, 9), 36),  # one chunk, exactly
        ((4, 9), 5),  # many chunks, the last one short
        ((37,), 1),  # a chunk per token
        ((2, 3, 5), 4),  # three leading dims
    ],
    ids=str,
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(device, lead, chunk_size, bias):
    inputs = make_inputs(device, lead=lead, bias=bias)
    check(inputs, temperature=2.0, chunk_size=chunk_size)


@pytest.mark.parametrize("vocab", [1, 7, 1031], ids=str)  # 1031: prime, no block divides it
def test_vocab_sizes(device, vocab):
    check(make_inputs(device, lead=(11,), vocab=vocab), chunk_size=4)


DIVERGENCES = [{}, {"divergence": "reverse"}, {"divergence": "jsd", "beta": 0.7}, {"divergence": "tvd"}]


def random_labels(lead, vocab, device):
    labels = torch.randint(0, vocab, lead)
    labels[torch.rand(lead) < 0.2] = -100
    return labels.to(device)


@pytest.mark.parametrize("labelled", [False, True], ids=["kd", "kd+ce"])
@pytest.mark.parametrize("divergence", DIVERGENCES, ids=lambda d: d.get("divergence", "forward"))
def test_divergences_and_labels(device, divergence, labelled):
    """Each divergence, with and without the hard-label cross-entropy, over chunks cut through
    masked runs and through labelled rows."""
    inputs = make_inputs(device, lead=(4, 9), vocab=257, logit_std=3.0)
    mask = (torch.rand(4, 9) < 0.7).to(device)
    options = dict(divergence)
    if labelled:
        options.update(labels=random_labels((4, 9), 257, device), ce_weight=0.6)
    check(inputs, temperature=2.0, mask=mask, chunk_size=5, **options)
    if labelled:
        parts = fused_linear_kl(**inputs, temperature=2.0, mask=mask, chunk_size=5, return_parts=True, **options)
        kd = fused_linear_kl(**inputs, temperature=2.0, mask=mask, chunk_size=7, **divergence)
        assert abs(parts.kd.item() - kd.item()) <= 1e-5 * kd.item()
        assert abs(parts.loss.item() - (parts.kd + 0.6 * parts.ce).item()) <= 1e-5 * parts.loss.item()


@pytest.mark.parametrize("larger", ["student", "teacher"])
def test_vocab_common(device, larger):
    """``vocab="common"``: the first min(V_s, V_t) rows of both heads; the student's other rows get
    gradient 0."""
    inputs = make_inputs(device, lead=(13,), vocab=131)
    extra = {"student": ("student_weight", "student_bias"), "teacher": ("teacher_weight", "teacher_bias")}[larger]
    for name in extra:  # 9 padding rows of the larger head
        x = inputs[name].detach()
        grown = torch.cat([x, torch.randn(9, *x.shape[1:]).to(x)])
        inputs[name] = grown.requires_grad_() if x.requires_grad or inputs[name].requires_grad else grown
    labels = random_labels((13,), 131, device)
    check(inputs, temperature=2.0, chunk_size=4, vocab="common", labels=labels, ce_weight=0.3, divergence="jsd", beta=0.4)
    if larger == "student":
        loss = fused_linear_kl(**inputs, vocab="common", chunk_size=4)
        g_weight, g_bias = torch.autograd.grad(loss, [inputs["student_weight"], inputs["student_bias"]])
        assert g_weight[131:].eq(0).all() and g_bias[131:].eq(0).all()


@pytest.mark.parametrize(
    "head",
    [
        {"student_softcap": 3.0, "teacher_softcap": 5.0},  # Gemma-2 style (30.0 there, on larger logits)
        {"student_logit_scale": 0.0625, "teacher_logit_scale": 0.25},  # Cohere style
        {"student_logit_scale": 2.0, "student_softcap": 4.0, "teacher_logit_scale": 0.5},
    ],
    ids=["softcap", "scale", "both"],
)
@pytest.mark.parametrize("divergence", DIVERGENCES[:3], ids=lambda d: d.get("divergence", "forward"))
def test_transformed_heads(device, head, divergence):
    """Soft-capped and scaled logits, ``c tanh((h W^T + b) s / c)``: loss and exact gradients
    through the tanh, with labels on the capped logits."""
    inputs = make_inputs(device, lead=(3, 7), vocab=131, logit_std=6.0)
    labels = random_labels((3, 7), 131, device)
    check(inputs, temperature=1.5, chunk_size=4, labels=labels, ce_weight=0.5, **head, **divergence)


def materialised_error(inputs, temperature, mask, upstream):
    """The worst norm-wise relative error, in loss and student gradients, of ``fastkd.logit_kl``
    on the float32 logits materialised by torch: the float32 error of the formula itself."""
    students = [inputs[k] for k in STUDENT]
    s = inputs["student_hidden"] @ inputs["student_weight"].T + inputs["student_bias"]
    t = inputs["teacher_hidden"] @ inputs["teacher_weight"].T + inputs["teacher_bias"]
    loss = fastkd.logit_kl(s, t, temperature=temperature, mask=mask)
    got = [loss] + list(torch.autograd.grad(loss, students, upstream))
    want, leaves = reference(inputs, temperature, mask)
    wants = [want] + list(torch.autograd.grad(want, leaves, upstream.double()))
    return max(rel_err(a.detach(), b.detach()) for a, b in zip(got, wants))


@pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0, 7.0, 50.0], ids=str)
def test_temperatures(device, temperature):
    """Within 1e-5, or within twice the float32 error of the materialised formula where that is
    larger: at T = 0.05 the logits' own float32 rounding is magnified 20 times, and at T = 50 the
    KL is ~1e-3 of its terms, so float32 cancellation in sum p (log p - log q) shows."""
    inputs = make_inputs(device, logit_std=4.0)
    mask = (torch.rand(3, 7) < 0.7).to(device)
    upstream = torch.randn(())
    rtol = max(RTOL, 2 * materialised_error(inputs, temperature, mask, upstream.to(device)))
    check(inputs, temperature=temperature, mask=mask, chunk_size=6, rtol=rtol, upstream=upstream.item())


def test_masked_runs_cut_by_chunks(device):
    """Runs of 3 valid and 4 masked tokens, chunks of 5 rows: every chunk boundary cuts a run."""
    mask = (torch.arange(35) % 7 < 3).view(5, 7).to(device)
    check(make_inputs(device, lead=(5, 7)), mask=mask, chunk_size=5, upstream=-2.5)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32], ids=str)
def test_mask_dtypes(device, mask_dtype):
    """Nonzero is valid: 0.5 and -3 count as valid tokens."""
    values = torch.tensor([0.0, 0.5, -3.0, 1.0, 0.0, 2.0, 1.0]).repeat(3, 1)
    mask = values.to(mask_dtype).to(device)
    check(make_inputs(device), mask=mask, chunk_size=4)


@pytest.mark.parametrize("chunk_size", [None, 3], ids=str)
def test_all_masked(device, chunk_size):
    inputs = make_inputs(device)
    mask = torch.zeros(3, 7, dtype=torch.bool, device=device)
    loss = fused_linear_kl(**inputs, mask=mask, chunk_size=chunk_size)
    loss.backward(torch.tensor(3.0, device=device))
    assert loss.item() == 0.0
    for name in STUDENT:
        assert torch.equal(inputs[name].grad, torch.zeros_like(inputs[name])), name


def test_teacher_rows_without_finite_logit(device):
    """Tokens whose teacher logits are all -inf (a -inf feature times a positive weight column)
    contribute 0 and get no gradient; they still count in n."""
    inputs = make_inputs(device)
    teacher_weight, teacher_hidden = inputs["teacher_weight"].clone(), inputs["teacher_hidden"].clone()
    teacher_weight[:, 0] = teacher_weight[:, 0].abs() + 0.1
    teacher_hidden[0, 2, 0] = teacher_hidden[2, 5, 0] = float("-inf")
    inputs.update(teacher_weight=teacher_weight, teacher_hidden=teacher_hidden)
    mask = (torch.rand(3, 7) < 0.7).to(device)
    mask[0, 2] = True
    check(inputs, temperature=2.0, mask=mask, chunk_size=4)
    loss = fused_linear_kl(**inputs, temperature=2.0, mask=mask, chunk_size=4)
    (grad_hidden,) = torch.autograd.grad(loss, inputs["student_hidden"])
    assert grad_hidden[0, 2].eq(0).all() and grad_hidden[2, 5].eq(0).all()


def test_same_width(device):
    check(make_inputs(device, d_s=16, d_t=16), chunk_size=8)


@pytest.mark.parametrize("which", STUDENT)
def test_one_student_tensor_trained(device, which):
    """Only ``which`` requires grad (e.g. a frozen LM head): its gradient is still exact."""
    inputs = make_inputs(device)
    for name in STUDENT:
        inputs[name].requires_grad_(name == which)
    check(inputs, temperature=3.0, chunk_size=4, upstream=1.0)


def test_no_grad(device):
    inputs = make_inputs(device)
    with torch.no_grad():
        loss = fused_linear_kl(**inputs, chunk_size=4)
    assert not loss.requires_grad
    assert_close(loss, reference(inputs)[0].detach(), RTOL, "loss")


def test_teacher_gets_no_gradient(device):
    inputs = make_inputs(device)
    for name in TEACHER:
        inputs[name].requires_grad_()
    fused_linear_kl(**inputs, chunk_size=4).backward()
    for name in TEACHER:
        assert inputs[name].grad is None, name
    assert inputs["student_weight"].grad is not None


@pytest.mark.parametrize("dtype, teacher_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                                  (torch.float32, torch.bfloat16)], ids=str)
def test_dtypes(device, dtype, teacher_dtype):
    """Low-precision sides: float32 loss, gradients in the student's dtype, within 2e-2 of float64."""
    inputs = make_inputs(device, lead=(19,), dtype=dtype, teacher_dtype=teacher_dtype)
    check(inputs, temperature=2.0, chunk_size=4, rtol=2e-2, upstream=1.0, elementwise=False)


def test_float64(device):
    inputs = make_inputs(device, dtype=torch.float64)
    loss = fused_linear_kl(**inputs, chunk_size=5)
    assert loss.dtype == torch.float64
    assert_close(loss.detach(), reference(inputs)[0].detach(), 1e-12, "loss")


def test_noncontiguous_hidden(device):
    """A transposed hidden ``[L, B, D]`` view and a sliced weight."""
    inputs = make_inputs(device, lead=(7, 3))
    inputs["student_hidden"] = inputs["student_hidden"].detach().transpose(0, 1).requires_grad_()
    inputs["teacher_hidden"] = inputs["teacher_hidden"].transpose(0, 1)
    wide = torch.randn(131, 30).to(device)
    inputs["teacher_weight"] = wide[:, 5:25]
    check(inputs, chunk_size=4)


def test_module_equals_function(device):
    inputs = make_inputs(device)
    mask = (torch.rand(3, 7) < 0.6).to(device)
    module = FusedLinearKLLoss(temperature=4.0, chunk_size=5)
    got = module(inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
                 inputs["teacher_weight"], mask, student_bias=inputs["student_bias"],
                 teacher_bias=inputs["teacher_bias"])
    assert torch.equal(got, fused_linear_kl(**inputs, temperature=4.0, mask=mask, chunk_size=5))


def test_default_chunk_size():
    cpu = torch.device("cpu")
    assert default_chunk_size(4096, 32000, cpu) == (1 << 22) // 32000
    assert default_chunk_size(10, 32000, cpu) == 10
    assert default_chunk_size(0, 32000, cpu) == 1
    assert default_chunk_size(10**6, 1 << 23, cpu) == 1
    assert default_chunk_size(8192, 128256, torch.device("cuda")) == (1 << 28) // 128256


# --------------------------------------------------------------------------------------------
# No [tokens, V] tensor and no host synchronisation: every tensor an op produces is recorded.

def recorder() -> Recorder:
    return Recorder({"fastkd::fused_linear_kl": fused_linear_kl_forward})


def test_no_tokens_by_vocab_tensor(device):
    """No tensor of ``tokens * V * 2`` bytes or more (a ``[tokens, V]`` tensor of any dtype of 2
    bytes or more) exists at any time of forward and backward, and no op synchronises."""
    tokens, vocab = 64, 97
    inputs = make_inputs(device, lead=(4, 16), d_s=8, d_t=12, vocab=vocab)
    mask = (torch.rand(4, 16) < 0.8).to(device)
    with recorder() as rec:
        loss = fused_linear_kl(**inputs, temperature=2.0, mask=mask, chunk_size=16)
        loss.backward(torch.tensor(0.5, device=device))
    assert "fastkd::fused_linear_kl" in rec.ops, "the op was not recorded: the test would prove nothing"
    assert any(n == 16 * vocab * 4 for _, n in rec.produced), "no chunk of logits was recorded"
    big = [(name, n) for name, n in rec.produced if n >= tokens * vocab * 2]
    assert not big, f"tensors of >= {tokens * vocab * 2} bytes: {big}"
    assert not rec.ops & SYNC_OPS, f"host synchronisation: {sorted(rec.ops & SYNC_OPS)}"
    assert inputs["student_weight"].grad is not None


def test_recorder_sees_materialised_logits():
    """The recorder catches the eager formula's ``[tokens, V]`` logits (the test above can fail)."""
    inputs = make_inputs("cpu", lead=(64,), d_s=8, d_t=12, vocab=97)
    with recorder() as rec:
        s = inputs["student_hidden"].bfloat16() @ inputs["student_weight"].T.bfloat16()
    assert max(n for _, n in rec.produced) == s.numel() * 2 == 64 * 97 * 2


# --------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("case", compile_cases())
def test_compile_fullgraph(case):
    device, backend, compiler = case
    inputs = make_inputs(device)
    mask = (torch.rand(3, 7) < 0.7).to(device)

    def step(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias):
        return fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight,
                               student_bias=student_bias, teacher_bias=teacher_bias, temperature=2.0,
                               mask=mask, chunk_size=5)

    fastkd.set_backend(backend)
    try:
        got = torch.compile(step, fullgraph=True, backend=compiler)(**inputs)
        want = step(**inputs)
        students = [inputs[k] for k in STUDENT]
        assert_close(got.detach(), want.detach(), 1e-6, "loss")
        for a, b in zip(torch.autograd.grad(got, students), torch.autograd.grad(want, students)):
            assert_close(a, b, 1e-6, "gradient")
    finally:
        fastkd.set_backend("auto")
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# bad inputs: each error names the argument


def _bad(name, change):
    return pytest.param(name, change, id=f"{name}:{change.__name__}")


def student_hidden_int(x):
    x["student_hidden"] = torch.ones(3, 7, 12, dtype=torch.int64)


def student_hidden_list(x):
    x["student_hidden"] = [[1.0] * 12]


def student_weight_1d(x):
    x["student_weight"] = torch.randn(131 * 12)


def student_weight_width(x):
    x["student_weight"] = torch.randn(131, 13)


def teacher_weight_width(x):
    x["teacher_weight"] = torch.randn(131, 19)


def teacher_weight_vocab(x):
    x["teacher_weight"], x["teacher_bias"] = torch.randn(130, 20), None


def teacher_hidden_leading(x):
    x["teacher_hidden"] = torch.randn(3, 8, 20)


def student_bias_shape(x):
    x["student_bias"] = torch.randn(130)


def teacher_bias_dtype(x):
    x["teacher_bias"] = torch.randn(131, dtype=torch.float64)


def student_weight_dtype(x):
    x["student_weight"] = torch.randn(131, 12, dtype=torch.bfloat16)


def teacher_hidden_device(x):
    x["teacher_hidden"] = torch.randn(3, 7, 20, device="meta")


def mask_shape(x):
    x["mask"] = torch.ones(21, dtype=torch.bool)


def temperature_zero(x):
    x["temperature"] = 0.0


def temperature_nan(x):
    x["temperature"] = float("nan")


def chunk_size_zero(x):
    x["chunk_size"] = 0


def chunk_size_float(x):
    x["chunk_size"] = 2.0


def setter(**values):
    """A change that sets keyword arguments."""
    return lambda x: x.update(values)


LEAD_LABELS = torch.zeros(3, 7, dtype=torch.long)

BAD = [
    _bad("beta", setter(divergence="jsd", beta=1.0)),
    _bad("beta", setter(divergence="reverse", beta=0.5)),
    _bad("divergence", setter(divergence="kl")),
    _bad("labels", setter(labels=LEAD_LABELS.float())),
    _bad("labels", setter(labels=LEAD_LABELS[:, :6])),
    _bad("labels", setter(labels=LEAD_LABELS + 131)),
    _bad("ce_weight", setter(ce_weight=0.5)),
    _bad("ce_weight", setter(labels=LEAD_LABELS, ce_weight=-1.0)),
    _bad("vocab", setter(vocab="padded")),
    _bad("student_softcap", setter(student_softcap=0.0)),
    _bad("teacher_softcap", setter(teacher_softcap=-30.0)),
    _bad("student_logit_scale", setter(student_logit_scale=math.inf)),
    _bad("teacher_logit_scale", setter(teacher_logit_scale="2")),
    _bad("student_hidden", student_hidden_int),
    _bad("student_hidden", student_hidden_list),
    _bad("student_weight", student_weight_1d),
    _bad("student_weight", student_weight_width),
    _bad("teacher_weight", teacher_weight_width),
    _bad("teacher_weight", teacher_weight_vocab),
    _bad("teacher_hidden", teacher_hidden_leading),
    _bad("student_bias", student_bias_shape),
    _bad("teacher_bias", teacher_bias_dtype),
    _bad("student_weight", student_weight_dtype),
    _bad("teacher_hidden", teacher_hidden_device),
    _bad("mask", mask_shape),
    _bad("temperature", temperature_zero),
    _bad("temperature", temperature_nan),
    _bad("chunk_size", chunk_size_zero),
    _bad("chunk_size", chunk_size_float),
]


@pytest.mark.parametrize("name, change", BAD)
def test_bad_input(name, change):
    kwargs = make_inputs("cpu")
    change(kwargs)
    with pytest.raises((ValueError, TypeError), match=name):
        fused_linear_kl(**kwargs)


def test_vocab_mismatch_names_both_sizes_and_the_option():
    kwargs = make_inputs("cpu")
    kwargs["teacher_weight"] = torch.randn(130, 20)
    kwargs["teacher_bias"] = torch.randn(130)
    with pytest.raises(ValueError, match=r"V_t=130.*V_s=131.*vocab='common'"):
        fused_linear_kl(**kwargs)
    kwargs["labels"] = torch.full((3, 7), 130)  # in the student's vocabulary, not in the common one
    with pytest.raises(ValueError, match=r"labels: .*\[0, 130\)"):
        fused_linear_kl(**kwargs, vocab="common")


def test_module_with_divergence_labels_and_heads(device):
    inputs = make_inputs(device)
    labels = random_labels((3, 7), 131, device)
    options = {"temperature": 2.0, "chunk_size": 5, "divergence": "reverse", "ce_weight": 0.5,
               "student_softcap": 4.0, "teacher_logit_scale": 0.5}
    module = FusedLinearKLLoss(**options)
    got = module(inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
                 inputs["teacher_weight"], labels=labels, student_bias=inputs["student_bias"],
                 teacher_bias=inputs["teacher_bias"])
    assert torch.equal(got, fused_linear_kl(**inputs, labels=labels, **options))


def test_module_refuses_unknown_options():
    with pytest.raises(TypeError, match="temprature"):
        FusedLinearKLLoss(temprature=2.0)
