"""Every loss, on every backend, one-pass and two-pass, against the float64 formulas of
``reference.py``: values, dtypes and student gradients under a random upstream gradient, over
shapes, masks, dtypes, strides, temperatures, extreme values and sequences of layer pairs."""

from __future__ import annotations

import pytest
import torch
from reference import reference_loss, run_and_compare

import fastkd

pytestmark = pytest.mark.usefixtures("nan_empty", "passes")

REDUCTIONS = ["mean", "sum", "none"]
MASKS = ["none", "random", "zeros"]
LOW = [torch.bfloat16, torch.float16]


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def randn(shape, device, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    """Normal values drawn on the CPU (same values on every device), as a fresh tensor."""
    return (torch.randn(shape) * scale).to(device=device, dtype=dtype)


def probs(shape, device, dtype=torch.float32) -> torch.Tensor:
    """Rows of a softmax over the last dim."""
    return torch.softmax(torch.randn(shape) * 2, dim=-1).to(device=device, dtype=dtype)


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.requires_grad_()


def make_mask(kind: str, shape, device):
    """``None``, a random bool mask with about 30 % of the rows masked, or all rows masked."""
    if kind == "none":
        return None
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.bool, device=device)
    return (torch.rand(shape) < 0.7).to(device)


# --------------------------------------------------------------------------------------------
# hidden_mse

HIDDEN_SHAPES = [(1237,), (7, 1), (5, 300), (2, 3, 1237), (2, 2, 3, 1030)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", HIDDEN_SHAPES, ids=shape_id)
def test_hidden_mse(device, shape, mask, reduction):
    s, t = leaf(randn(shape, device)), randn(shape, device, scale=2.0)
    m = make_mask(mask, shape[:-1], device)
    out = run_and_compare(fastkd.hidden_mse, "hidden_mse", s, t, mask=m, reduction=reduction)
    if reduction == "none":
        assert out.shape == shape[:-1]


@pytest.mark.parametrize(
    "s_dtype,t_dtype",
    [(torch.bfloat16,) * 2, (torch.float16,) * 2, (torch.float64,) * 2,
     (torch.bfloat16, torch.float32), (torch.float32, torch.float16)],
    ids=str,
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hidden_mse_dtypes(device, s_dtype, t_dtype, reduction):
    shape = (3, 5, 1100)
    s, t = leaf(randn(shape, device, s_dtype)), randn(shape, device, t_dtype)
    m = make_mask("random", shape[:-1], device)
    run_and_compare(fastkd.hidden_mse, "hidden_mse", s, t, mask=m, reduction=reduction)


def views(layout: str, device, width: int, scale: float = 1.0):
    """Non-contiguous student (a view of a leaf) and teacher of shape ``[3, 6, width]``:
    ``shifted`` = ``x[:, :-1]`` / ``x[:, 1:]`` of ``[3, 7, width]``, ``transposed`` = leading dims
    swapped, ``strided_last`` = every other element of the last dim."""
    if layout == "shifted":
        s = leaf(randn((3, 7, width), device, scale=scale))[:, :-1]
        t = randn((3, 7, width), device, scale=scale)[:, 1:]
    elif layout == "transposed":
        s = leaf(randn((6, 3, width), device, scale=scale)).transpose(0, 1)
        t = randn((6, 3, width), device, scale=scale).transpose(0, 1)
    else:
        s = leaf(randn((3, 6, 2 * width), device, scale=scale))[..., ::2]
        t = randn((3, 6, 2 * width), device, scale=scale)[..., 1::2]
    assert not s.is_contiguous() and not t.is_contiguous()
    return s, t, (3, 6)


@pytest.mark.parametrize("layout", ["shifted", "transposed", "strided_last"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_hidden_mse_noncontiguous(device, layout, reduction):
    s, t, lead = views(layout, device, width=333)
    m = make_mask("random", lead, device)
    run_and_compare(fastkd.hidden_mse, "hidden_mse", s, t, mask=m, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("container", [list, tuple])
def test_hidden_mse_pairs(device, reduction, masked, container):
    """Layer pairs of different shapes; with a mask, all pairs share the leading dims."""
    shapes = [(2, 5, 37), (2, 5, 1030), (2, 5, 1)] if masked else [(2, 5, 37), (3, 1030), (4, 2, 3, 64)]
    s = container(leaf(randn(shape, device)) for shape in shapes)
    t = container(randn(shape, device, scale=1.5) for shape in shapes)
    m = make_mask("random", (2, 5), device) if masked else None
    out = run_and_compare(fastkd.hidden_mse, "hidden_mse", s, t, mask=m, reduction=reduction)
    if reduction == "none":
        assert isinstance(out, list) and [o.shape for o in out] == [x.shape[:-1] for x in s]


def test_hidden_mse_equals_mse_loss(device):
    s, t = randn((4, 3, 250), device), randn((4, 3, 250), device)
    want = torch.nn.functional.mse_loss(s.double(), t.double())
    got = fastkd.hidden_mse(s, t)
    assert abs(got.item() - want.item()) <= 1e-5 * want.item()


# --------------------------------------------------------------------------------------------
# logit_kl, with each divergence

LOGIT_SHAPES = [(7, 1000), (2, 5, 1237), (2, 2, 3, 4099), (3, 1), (4, 2)]
DIVERGENCES = {
    "forward": {},
    "reverse": {"divergence": "reverse"},
    "jsd": {"divergence": "jsd", "beta": 0.3},
    "tvd": {"divergence": "tvd"},
}


@pytest.fixture(params=list(DIVERGENCES))
def divergence(request):
    """The keyword arguments of one divergence of ``logit_kl``."""
    return DIVERGENCES[request.param]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", LOGIT_SHAPES, ids=shape_id)
def test_logit_kl(device, shape, mask, reduction, divergence):
    s, t = leaf(randn(shape, device, scale=3.0)), randn(shape, device, scale=3.0)
    m = make_mask(mask, shape[:-1], device)
    out = run_and_compare(fastkd.logit_kl, "logit_kl", s, t, mask=m, reduction=reduction, **divergence)
    if reduction == "none":
        assert out.shape == shape[:-1]


@pytest.mark.parametrize("temperature", [0.01, 0.05, 0.3, 1.0, 2.5, 50.0, 100.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logit_kl_temperature(device, temperature, reduction, divergence):
    """Logits scale with T, so that softmax(x / T) stays comparable and the loss well conditioned."""
    shape = (6, 1237)
    s = leaf(randn(shape, device, scale=2.0 * temperature))
    t = randn(shape, device, scale=2.0 * temperature)
    m = make_mask("random", shape[:-1], device)
    run_and_compare(fastkd.logit_kl, "logit_kl", s, t, mask=m, reduction=reduction,
                    temperature=temperature, **divergence)


@pytest.mark.parametrize("temperature", [0.01, 0.05, 50.0, 100.0])
def test_logit_kl_temperature_unscaled(device, temperature, divergence):
    """Unit-scale logits at extreme temperatures: finite, and close to the formula within what
    float32 allows: at T = 50 the two distributions are nearly uniform and the divergence is ~1e-4
    of the log-probabilities it is made from, so float32 loses about T^2 eps / var(logits) of it
    (here var = 1; the bound allows four times that, and at least 1e-3). Away from "forward", the
    gradient vanishes as the distributions turn one-hot at small T (c q (a - S) of 1e-100 at T = 0.01):
    there float32 can only round it, by eps of its terms: c = T (1 / T for "tvd") times the size of
    a - S, up to the row's divergence S itself (a reverse KL of ~500 at T = 0.01)."""
    s, t = leaf(randn((5, 1000), device)), randn((5, 1000), device)
    got = fastkd.logit_kl(s, t, temperature=temperature, **divergence)
    (g,) = torch.autograd.grad(got, s)
    s64 = s.detach().double().requires_grad_()
    want = reference_loss("logit_kl", s64, t, temperature=temperature, **divergence)
    (want_g,) = torch.autograd.grad(want, s64)
    eps = torch.finfo(torch.float32).eps
    rtol = max(1e-3, 4 * temperature**2 * eps)
    tvd = divergence.get("divergence") == "tvd"
    rows = reference_loss("logit_kl", s64.detach(), t, temperature=temperature, reduction="none", **divergence)
    largest_s = 1.0 if tvd else 1.0 + rows.abs().max().item() / temperature**2
    scale = (1 / temperature if tvd else temperature) * largest_s
    assert torch.isfinite(got) and torch.isfinite(g).all()
    assert abs(got.item() - want.item()) <= rtol * abs(want.item())
    assert (g.double() - want_g).norm() <= rtol * want_g.norm() + 4 * eps * scale


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("temperature", [0.01, 0.05, 1.0, 50.0, 100.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logit_kl_large_logits(device, dtype, temperature, reduction, divergence):
    """Logits uniform in [-1e4, 1e4]: no overflow, no NaN, still the formula."""
    shape = (2, 3, 1000)
    s = leaf(((torch.rand(shape) * 2 - 1) * 1e4).to(device, dtype))
    t = ((torch.rand(shape) * 2 - 1) * 1e4).to(device, dtype)
    m = make_mask("random", shape[:-1], device)
    run_and_compare(fastkd.logit_kl, "logit_kl", s, t, mask=m, reduction=reduction,
                    temperature=temperature, **divergence)


@pytest.mark.parametrize(
    "s_dtype,t_dtype",
    [(torch.bfloat16,) * 2, (torch.float16,) * 2, (torch.float64,) * 2,
     (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
    ids=str,
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_logit_kl_dtypes(device, s_dtype, t_dtype, reduction, divergence):
    shape = (3, 4, 1237)
    s = leaf(randn(shape, device, s_dtype, scale=3.0))
    t = randn(shape, device, t_dtype, scale=3.0)
    m = make_mask("random", shape[:-1], device)
    run_and_compare(fastkd.logit_kl, "logit_kl", s, t, mask=m, reduction=reduction, temperature=2.0, **divergence)


@pytest.mark.parametrize("layout", ["shifted", "transposed", "strided_last"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logit_kl_noncontiguous(device, layout, reduction, divergence):
    s, t, lead = views(layout, device, width=1031, scale=3.0)
    m = make_mask("random", lead, device)
    run_and_compare(fastkd.logit_kl, "logit_kl", s, t, mask=m, reduction=reduction, temperature=1.5, **divergence)


def banned_entries(shape, dtype, device, where):
    """Logits with about 10 % of the teacher's entries (and the last 37) -inf, also the student's
    there for ``where="both"``: (student leaf, teacher)."""
    s, t = torch.randn(shape) * 3, torch.randn(shape) * 3
    banned = torch.rand(shape) < 0.1
    banned[..., -37:] = True
    t = t.masked_fill(banned, float("-inf"))
    if where == "both":
        s = s.masked_fill(banned, float("-inf"))
    return leaf(s.to(device, dtype)), t.to(device, dtype)


@pytest.mark.parametrize("where", ["teacher", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logit_kl_neg_inf_teacher(device, where, dtype, divergence):
    """Teacher logits of -inf (a padded vocabulary, banned tokens) give p = 0 and add nothing,
    also where the student's logit is -inf too. The reverse KL of a student with mass where the
    teacher has none is +inf, exactly."""
    s, t = banned_entries((4, 3, 1100), dtype, device, where)
    m = make_mask("random", (4, 3), device)
    if where == "teacher" and divergence.get("divergence") == "reverse":  # every row has such entries
        rows = fastkd.logit_kl(s, t, mask=m, reduction="none", temperature=2.0, **divergence)
        assert torch.equal(rows, torch.where(m, torch.inf, 0.0).to(rows.dtype))
        return
    for reduction in REDUCTIONS:
        run_and_compare(fastkd.logit_kl, "logit_kl", s, t, mask=m, reduction=reduction,
                        temperature=2.0, **divergence)


def test_reverse_kl_infinite_where_the_teacher_has_no_mass(device):
    """q_v > 0 = p_v: KL(q || p) is +inf on that row, 0 on masked rows, finite on the others."""
    s, t = banned_entries((4, 3, 1100), torch.float32, device, "both")
    t = t.detach().clone()
    t[1, 2, 5] = float("-inf")  # the student keeps a finite logit there
    with torch.no_grad():
        s[1, 2, 5] = 0.0
    m = torch.ones(4, 3, dtype=torch.bool, device=device)
    m[3, 0] = False
    rows = fastkd.logit_kl(s, t, mask=m, reduction="none", divergence="reverse", temperature=2.0)
    assert rows[1, 2] == float("inf")
    others = torch.ones(4, 3, dtype=torch.bool)
    others[1, 2] = False
    assert torch.isfinite(rows[others.to(device)]).all() and rows[3, 0] == 0


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logit_kl_teacher_row_without_finite_logit(device, dtype, mask, divergence):
    """A row whose teacher logits are all -inf contributes 0 and gets gradient 0; it still counts
    in n when the mask keeps it (n is decided by the mask alone)."""
    shape = (3, 4, 1030)
    s, t = torch.randn(shape) * 3, torch.randn(shape) * 3
    t[0, 1] = t[2, 3] = float("-inf")
    s[2, 3] = float("-inf")  # the student's row is empty too
    s, t = leaf(s.to(device, dtype)), t.to(device, dtype)
    m = make_mask(mask, shape[:-1], device)
    options = {"temperature": 2.0, **divergence}
    for reduction in REDUCTIONS:
        run_and_compare(fastkd.logit_kl, "logit_kl", s, t, mask=m, reduction=reduction, **options)
        out = fastkd.logit_kl(s, t, mask=m, reduction=reduction, **options)
        (grad,) = torch.autograd.grad(out.sum() * 1.5, s)
        assert grad[0, 1].eq(0).all() and grad[2, 3].eq(0).all()
        if reduction == "none":
            assert out[0, 1] == 0 and out[2, 3] == 0
    keep_all = torch.ones(shape[:-1], dtype=torch.bool, device=device)
    with_rows = fastkd.logit_kl(s, t, mask=keep_all, reduction="sum", **options) / keep_all.sum()
    assert torch.equal(fastkd.logit_kl(s, t, mask=keep_all, **options), with_rows)


def random_labels(shape, vocab, device, ignored=0.2):
    """Class ids in [0, vocab), about ``ignored`` of them -100."""
    labels = torch.randint(0, vocab, shape)
    labels[torch.rand(shape) < ignored] = -100
    return labels.to(device)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0, 8.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask", MASKS)
def test_logit_kl_labels(device, mask, reduction, temperature, divergence):
    """``KD + ce_weight * CE`` with the hard-label cross-entropy at T = 1 from the same pass; some
    labels -100, some rows masked. T = 2 and 8 take the native kernel's squares of the student's
    exps for the cross-entropy's softmax, T = 3 exps of their own."""
    shape = (3, 5, 1031)
    s, t = leaf(randn(shape, device, scale=3.0)), randn(shape, device, scale=3.0)
    m = make_mask(mask, shape[:-1], device)
    labels = random_labels(shape[:-1], shape[-1], device)
    run_and_compare(fastkd.logit_kl, "logit_kl", s, t, mask=m, reduction=reduction, temperature=temperature,
                    labels=labels, ce_weight=0.7, **divergence)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [0.05, 4.0, 50.0])
def test_logit_kl_labels_large_logits(device, dtype, temperature, divergence):
    """Logits in [-1e4, 1e4] with labels, at both ends of the temperature range; one teacher row
    without a finite logit (its cross-entropy still counts), one row without a label."""
    shape = (2, 3, 1000)
    s = ((torch.rand(shape) * 2 - 1) * 1e4).to(device, dtype)
    t = ((torch.rand(shape) * 2 - 1) * 1e4).to(device, dtype)
    t[1, 2] = float("-inf")
    s = leaf(s)
    labels = random_labels(shape[:-1], shape[-1], device, ignored=0.0)
    labels[0, 1] = -100
    m = make_mask("random", shape[:-1], device)
    for reduction in REDUCTIONS:
        run_and_compare(fastkd.logit_kl, "logit_kl", s, t, mask=m, reduction=reduction, temperature=temperature,
                        labels=labels, ce_weight=1.5, **divergence)


def test_logit_kl_parts(device, divergence):
    """``return_parts=True``: ``kd`` is the loss without labels, ``ce`` the cross-entropy over the
    labelled valid rows, ``loss = kd + ce_weight * ce`` (a 0-d tensor weight too); the parts are
    detached and the loss's gradient is that of ``kd + ce_weight * ce``."""
    shape = (4, 9, 513)
    s, t = leaf(randn(shape, device, scale=3.0)), randn(shape, device, scale=3.0)
    m = make_mask("random", shape[:-1], device)
    labels = random_labels(shape[:-1], shape[-1], device)
    options = {"temperature": 2.0, "mask": m, **divergence}
    weight = torch.tensor(0.25, device=device)
    parts = fastkd.logit_kl(s, t, labels=labels, ce_weight=weight, return_parts=True, **options)
    assert isinstance(parts, fastkd.LogitParts)
    kd = fastkd.logit_kl(s, t, **options)
    valid = (labels != -100) & m
    ce = torch.nn.functional.cross_entropy(s.detach()[valid].double(), labels[valid])
    assert not parts.kd.requires_grad and not parts.ce.requires_grad
    assert abs(parts.kd.item() - kd.item()) <= 1e-6 * abs(kd.item())
    assert abs(parts.ce.item() - ce.item()) <= 1e-5 * ce.item()
    assert abs(parts.loss.item() - (kd.item() + 0.25 * ce.item())) <= 1e-5 * parts.loss.item()
    (got,) = torch.autograd.grad(parts.loss * 2.0, s)
    ce_grad = torch.zeros(shape, dtype=torch.float64)
    probs_s = torch.softmax(s.detach().double(), -1) - torch.nn.functional.one_hot(labels.clamp_min(0), shape[-1])
    ce_grad[valid.cpu()] = probs_s[valid].cpu() / valid.sum().item()
    (kd_grad,) = torch.autograd.grad(kd * 2.0, s)
    want = kd_grad.double().cpu() + 2.0 * 0.25 * ce_grad
    assert (got.double().cpu() - want).norm() <= 1e-5 * want.norm()
    without = fastkd.logit_kl(s, t, return_parts=True, **options)
    assert without.ce is None and torch.equal(without.loss.detach(), without.kd)


@pytest.mark.parametrize("larger", ["student", "teacher"])
def test_logit_kl_vocab_common(device, larger, divergence):
    """``vocab="common"``: the first min(V_s, V_t) logits of both, the student's others get
    gradient 0; with labels in the common range."""
    v_s, v_t = (1031, 1000) if larger == "student" else (1000, 1031)
    s, t = leaf(randn((3, 4, v_s), device, scale=3.0)), randn((3, 4, v_t), device, scale=3.0)
    m = make_mask("random", (3, 4), device)
    labels = random_labels((3, 4), 1000, device)
    for reduction in REDUCTIONS:
        run_and_compare(fastkd.logit_kl, "logit_kl", s, t, mask=m, reduction=reduction, temperature=2.0,
                        labels=labels, ce_weight=0.5, vocab="common", **divergence)
    (grad,) = torch.autograd.grad(fastkd.logit_kl(s, t, vocab="common", **divergence), s)
    assert grad[..., 1000:].eq(0).all()


TEMPERATURE_SWEEP = [1e-300, 1e-30, 1e-3, 0.0099, 0.01, 0.05, 1.0, 50.0, 100.0, 100.5, 1e3, 1e20, 1e300]


@pytest.mark.parametrize("temperature", TEMPERATURE_SWEEP)
def test_logit_kl_any_positive_temperature(device, temperature):
    """Every finite T > 0 either gives a finite result equal to the float64 formula (logits of +-1e4
    here; of unit scale at both ends of the range in test_logit_kl_temperature_unscaled) or is
    refused with the supported range named."""
    low, high = 0.01, 100.0
    s = leaf(((torch.rand(4, 700) * 2 - 1) * 1e4).to(device))
    t = ((torch.rand(4, 700) * 2 - 1) * 1e4).to(device)
    if not low <= temperature <= high:
        with pytest.raises(ValueError, match=r"temperature: .*\[0.01, 100\]"):
            fastkd.logit_kl(s, t, temperature=temperature)
        return
    run_and_compare(fastkd.logit_kl, "logit_kl", s, t, temperature=temperature)


@pytest.mark.parametrize("temperature", [0.3, 3.0, 7.0])
@pytest.mark.parametrize("name", ["logit_kl", "hidden_mse", "attention_probs", "attention_scores"])
def test_float64_inputs_keep_float64_precision(device, name, temperature):
    """float64 inputs are computed in float64 throughout, scalars included (1 / T and T^2 are not
    float32 numbers here): loss and gradient agree with the formula to 1e-12."""
    fn, ref, s, t, mask_shape, options = loss_inputs(name, device, torch.float64)
    if name == "logit_kl":
        options = {"temperature": temperature}
    mask = make_mask("random", mask_shape, device)
    got = fn(s, t, mask=mask, **options)
    (grad,) = torch.autograd.grad(got * 0.7, s)
    s64 = s.detach().clone().requires_grad_()
    want = reference_loss(ref, s64, t, mask=mask, **options)
    (want_grad,) = torch.autograd.grad(want * 0.7, s64)
    assert got.dtype == torch.float64
    assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item())
    assert (grad - want_grad).norm() <= 1e-12 * want_grad.norm()


# --------------------------------------------------------------------------------------------
# attention_kl

PROBS_SHAPES = [(2, 3, 5, 7), (1, 2, 4, 1030), (2, 1, 3, 1), (3, 2, 1, 33)]
SCORES_SHAPES = [(2, 3, 6, 6), (2, 2, 9, 9)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", PROBS_SHAPES, ids=shape_id)
def test_attention_kl_probs(device, shape, mask, reduction):
    s, t = leaf(probs(shape, device)), probs(shape, device)
    m = make_mask(mask, (shape[0], shape[2]), device)
    out = run_and_compare(fastkd.attention_kl, "attention_kl", s, t, mask=m, reduction=reduction,
                          kind="probs")
    if reduction == "none":
        assert out.shape == shape[:3]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", SCORES_SHAPES, ids=shape_id)
def test_attention_kl_scores(device, shape, mask, reduction):
    s, t = leaf(randn(shape, device, scale=2.0)), randn(shape, device, scale=2.0)
    m = make_mask(mask, (shape[0], shape[2]), device)
    out = run_and_compare(fastkd.attention_kl, "attention_kl", s, t, mask=m, reduction=reduction,
                          kind="scores")
    if reduction == "none":
        assert out.shape == shape[:3]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_attention_kl_scores_long_rows(device, reduction):
    """Rows of 1030 keys, with scattered -inf in the student and lowest values in the teacher."""
    shape = (1, 2, 3, 1030)
    s, t = torch.randn(shape) * 2, torch.randn(shape) * 2
    s = s.masked_fill(torch.rand(shape) < 0.05, float("-inf"))
    t = t.masked_fill(torch.rand(shape) < 0.05, torch.finfo(torch.float32).min)
    s, t = leaf(s.to(device)), t.to(device)
    run_and_compare(fastkd.attention_kl, "attention_kl", s, t, reduction=reduction, kind="scores")


def causal_left_padded(batch, heads, length, pads, fill, dtype, device):
    """Student and teacher scores ``[B, H, L, L]`` as an eager causal LM produces them with left
    padding (``pads[b]`` padding tokens): blocked keys hold ``fill`` (``-inf``, or the dtype's
    lowest value). ``fill="mixed"``: the teacher has -inf, the student the lowest value. Returns
    the scores and the padding mask ``[B, L]`` (1 = real token)."""
    q = torch.arange(length)
    mask = q[None, :] >= torch.tensor(pads)[:, None]
    blocked = (q[None, :] > q[:, None])[None, None] | ~mask[:, None, None, :]
    lowest = torch.finfo(dtype).min
    s_fill = {"-inf": float("-inf"), "min": lowest, "mixed": lowest}[fill]
    t_fill = {"-inf": float("-inf"), "min": lowest, "mixed": float("-inf")}[fill]
    shape = (batch, heads, length, length)
    s = (torch.randn(shape) * 2).to(dtype).masked_fill(blocked, s_fill)
    t = (torch.randn(shape) * 2).to(dtype).masked_fill(blocked, t_fill)
    return leaf(s.to(device)), t.to(device), mask.to(device)


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("fill", ["-inf", "min", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_kl_scores_left_padding(device, dtype, fill, with_mask):
    """Padded queries have no key left: their rows are 0 (with or without the mask), never NaN.
    The third sequence is padding only."""
    s, t, mask = causal_left_padded(3, 2, 7, [0, 3, 7], fill, dtype, device)
    for reduction in REDUCTIONS:
        run_and_compare(fastkd.attention_kl, "attention_kl", s, t, kind="scores",
                        mask=mask if with_mask else None, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_kl_probs_causal(device, dtype):
    """Probabilities from a causal, left-padded softmax (exact zeros where p and q are both 0)."""
    s, t, mask = causal_left_padded(3, 2, 7, [0, 3, 6], "min", torch.float32, device)
    s = leaf(torch.softmax(s.detach(), -1).to(dtype))
    t = torch.softmax(t, -1).to(dtype)
    for reduction in REDUCTIONS:
        run_and_compare(fastkd.attention_kl, "attention_kl", s, t, kind="probs", mask=mask,
                        reduction=reduction)


def test_attention_kl_probs_zero_student(device):
    """q = 0 where p > 0: log q is taken at 1.1754944e-38 (finite loss, no gradient there)."""
    shape = (2, 2, 4, 40)
    q = torch.softmax(torch.randn(shape) * 2, -1).masked_fill(torch.rand(shape) < 0.2, 0.0)
    s, t = leaf(q.to(device)), probs(shape, device)
    for reduction in REDUCTIONS:
        run_and_compare(fastkd.attention_kl, "attention_kl", s, t, kind="probs", reduction=reduction)


@pytest.mark.parametrize(
    "s_dtype,t_dtype",
    [(torch.bfloat16,) * 2, (torch.float16,) * 2, (torch.float64,) * 2,
     (torch.bfloat16, torch.float32)],
    ids=str,
)
@pytest.mark.parametrize("kind", ["probs", "scores"])
def test_attention_kl_dtypes(device, s_dtype, t_dtype, kind):
    shape = (2, 3, 6, 6)
    make = probs if kind == "probs" else randn
    s, t = leaf(make(shape, device, s_dtype)), make(shape, device, t_dtype)
    m = make_mask("random", (2, 6), device)
    for reduction in REDUCTIONS:
        run_and_compare(fastkd.attention_kl, "attention_kl", s, t, kind=kind, mask=m,
                        reduction=reduction)


@pytest.mark.parametrize("kind", ["probs", "scores"])
def test_attention_kl_noncontiguous(device, kind):
    """Maps laid out as [B, Lq, H, Lk] and seen as [B, H, Lq, Lk]."""
    make = probs if kind == "probs" else randn
    s = leaf(make((2, 5, 3, 5), device)).transpose(1, 2)
    t = make((2, 5, 3, 5), device).transpose(1, 2)
    m = make_mask("random", (2, 5), device)
    for reduction in REDUCTIONS:
        run_and_compare(fastkd.attention_kl, "attention_kl", s, t, kind=kind, mask=m,
                        reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", ["probs", "scores"])
def test_attention_kl_pairs(device, kind, masked, reduction):
    """Layer pairs with different heads and keys; with a mask they share B and Lq."""
    if masked:
        shapes = [(2, 3, 6, 6), (2, 1, 6, 6), (2, 4, 6, 6)] if kind == "scores" else \
            [(2, 3, 6, 7), (2, 1, 6, 130), (2, 4, 6, 6)]
    else:
        shapes = [(2, 3, 6, 7), (1, 1, 3, 1030), (3, 1, 2, 2)]
    make = probs if kind == "probs" else randn
    s = [leaf(make(shape, device)) for shape in shapes]
    t = [make(shape, device) for shape in shapes]
    m = make_mask("random", (2, 6), device) if masked else None
    out = run_and_compare(fastkd.attention_kl, "attention_kl", s, t, kind=kind, mask=m,
                          reduction=reduction)
    if reduction == "none":
        assert isinstance(out, list) and [o.shape for o in out] == [x.shape[:3] for x in s]


# --------------------------------------------------------------------------------------------
# all losses

LOSSES = {
    "hidden_mse": dict(shape=(3, 4, 1030), options={}),
    "logit_kl": dict(shape=(3, 4, 1030), options={"temperature": 2.0}),
    "attention_probs": dict(shape=(3, 2, 4, 6), options={"kind": "probs"}),
    "attention_scores": dict(shape=(3, 2, 4, 4), options={"kind": "scores"}),
}


def loss_inputs(name, device, dtype=torch.float32):
    """``(function, reference name, student leaf, teacher, mask shape, options)`` of one loss."""
    case = LOSSES[name]
    shape = case["shape"]
    make = probs if name == "attention_probs" else randn
    s, t = leaf(make(shape, device, dtype)), make(shape, device, dtype)
    if name.startswith("attention"):
        return fastkd.attention_kl, "attention_kl", s, t, (shape[0], shape[2]), case["options"]
    return getattr(fastkd, name), name, s, t, shape[:-1], case["options"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", LOSSES)
def test_all_rows_masked(device, name, reduction, dtype):
    """A mask of zeros gives exactly 0 and a gradient of exactly 0, without NaN."""
    fn, _, s, t, mask_shape, options = loss_inputs(name, device, dtype)
    out = fn(s, t, mask=torch.zeros(mask_shape, dtype=torch.bool, device=device),
             reduction=reduction, **options)
    (out * 3.0).sum().backward()
    assert (out == 0).all(), out
    assert (s.grad == 0).all()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64,
                                        torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", LOSSES)
def test_mask_dtypes(device, name, mask_dtype):
    """Any nonzero mask value marks a valid row (here 1, 2 and 0.5 for floating masks)."""
    fn, ref, s, t, mask_shape, options = loss_inputs(name, device)
    values = torch.tensor([0, 1, 2, 0.5] if mask_dtype.is_floating_point else [0, 1, 2, 1])
    mask = values[torch.randint(0, 4, mask_shape)].to(device, mask_dtype)
    for reduction in REDUCTIONS:
        run_and_compare(fn, ref, s, t, mask=mask, reduction=reduction, **options)


@pytest.mark.parametrize("name", LOSSES)
def test_teacher_gets_no_gradient(device, name):
    fn, _, s, t, _, options = loss_inputs(name, device)
    t.requires_grad_()
    fn(s, t, **options).backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all()


MODULES = {
    "hidden_mse": fastkd.HiddenMSELoss,
    "logit_kl": fastkd.LogitKLLoss,
    "attention_probs": fastkd.AttentionKLLoss,
    "attention_scores": fastkd.AttentionKLLoss,
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", LOSSES)
def test_module_equals_function(device, name, reduction):
    fn, _, s, t, mask_shape, options = loss_inputs(name, device)
    mask = make_mask("random", mask_shape, device)
    module = MODULES[name](reduction=reduction, **options)
    assert isinstance(module, torch.nn.Module)
    got = module(s, t, mask=mask)
    (got_grad,) = torch.autograd.grad(got.sum(), s)
    want = fn(s, t, mask=mask, reduction=reduction, **options)
    (want_grad,) = torch.autograd.grad(want.sum(), s)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    # the default reduction is "mean", and plain .backward() (grad_output = 1) works
    plain = MODULES[name](**options)(s, t)
    plain.backward()
    assert torch.equal(plain, fn(s, t, **options))
    assert torch.isfinite(s.grad).all()


def test_logit_module_with_divergence_and_labels(device):
    """``LogitKLLoss`` fixes the divergence, beta, ce_weight and vocab; labels go to forward."""
    s, t = leaf(randn((3, 4, 1031), device, scale=3.0)), randn((3, 4, 1000), device, scale=3.0)
    mask = make_mask("random", (3, 4), device)
    labels = random_labels((3, 4), 1000, device)
    options = {"temperature": 2.0, "divergence": "jsd", "beta": 0.3, "ce_weight": 0.5, "vocab": "common"}
    module = fastkd.LogitKLLoss(**options)
    got = module(s, t, mask=mask, labels=labels)
    (got_grad,) = torch.autograd.grad(got, s)
    want = fastkd.logit_kl(s, t, mask=mask, labels=labels, **options)
    (want_grad,) = torch.autograd.grad(want, s)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
