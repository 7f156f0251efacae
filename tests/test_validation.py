"""Every bad input raises a ValueError or TypeError that names the argument, before any kernel
runs; the backend can be chosen by name, and an unknown name is refused."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch

import fastkd


def x(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape).to(device=device, dtype=dtype)


def p(*shape):
    return torch.softmax(torch.randn(shape), -1)


def i(*shape):
    return torch.randint(0, 3, shape)


H, A, L = fastkd.hidden_mse, fastkd.attention_kl, fastkd.logit_kl
PAIR = "student|teacher"

# (call, exception type, regular expression the message must match)
BAD = {
    # hidden_mse
    "hidden_width": (lambda: H(x(4, 8), x(4, 9)), ValueError, PAIR),
    "hidden_rows": (lambda: H(x(4, 8), x(5, 8)), ValueError, PAIR),
    "hidden_broadcast": (lambda: H(x(1, 8), x(4, 8)), ValueError, PAIR),
    "hidden_rank_mismatch": (lambda: H(x(2, 4, 8), x(8, 8)), ValueError, PAIR),
    "hidden_0d": (lambda: H(torch.tensor(1.0), torch.tensor(2.0)), ValueError, "student"),
    "hidden_int_student": (lambda: H(i(4, 8), x(4, 8)), TypeError, "student"),
    "hidden_int_teacher": (lambda: H(x(4, 8), i(4, 8)), TypeError, "teacher"),
    "hidden_bool_student": (lambda: H(i(4, 8).bool(), x(4, 8)), TypeError, "student"),
    "hidden_complex_student": (lambda: H(x(4, 8).to(torch.complex64), x(4, 8)), TypeError, "student"),
    "hidden_not_tensor": (lambda: H(3.0, x(4, 8)), TypeError, "student"),
    "hidden_mask_rows": (lambda: H(x(4, 8), x(4, 8), mask=torch.ones(5)), ValueError, "mask"),
    "hidden_mask_extra_dim": (lambda: H(x(4, 8), x(4, 8), mask=torch.ones(4, 1)), ValueError, "mask"),
    "hidden_mask_full_shape": (lambda: H(x(4, 8), x(4, 8), mask=torch.ones(4, 8)), ValueError, "mask"),
    "hidden_mask_complex": (
        lambda: H(x(4, 8), x(4, 8), mask=torch.ones(4, dtype=torch.complex64)), (TypeError, ValueError), "mask"),
    "hidden_teacher_device": (lambda: H(x(4, 8), x(4, 8, device="meta")), ValueError, "teacher"),
    "hidden_mask_device": (lambda: H(x(4, 8), x(4, 8), mask=torch.ones(4, device="meta")), ValueError, "mask"),
    "hidden_reduction": (lambda: H(x(4, 8), x(4, 8), reduction="avg"), ValueError, "reduction"),
    "hidden_reduction_none_object": (lambda: H(x(4, 8), x(4, 8), reduction=None), ValueError, "reduction"),
    "hidden_seq_lengths": (lambda: H([x(4, 8), x(4, 3)], [x(4, 8)]), ValueError, PAIR),
    "hidden_seq_empty": (lambda: H([], []), ValueError, PAIR),
    "hidden_seq_vs_tensor": (lambda: H([x(4, 8)], x(4, 8)), (TypeError, ValueError), PAIR),
    "hidden_seq_second_pair": (lambda: H([x(4, 8), x(4, 3)], [x(4, 8), x(4, 5)]), ValueError, PAIR),
    "hidden_seq_mask": (
        lambda: H([x(4, 8), x(2, 2, 3)], [x(4, 8), x(2, 2, 3)], mask=torch.ones(4)), ValueError, "mask"),
    # attention_kl
    "attention_3d": (lambda: A(p(2, 5, 7), p(2, 5, 7)), ValueError, "student"),
    "attention_5d": (lambda: A(p(1, 2, 3, 5, 7), p(1, 2, 3, 5, 7)), ValueError, "student"),
    "attention_teacher_3d": (lambda: A(p(2, 3, 5, 7), p(3, 5, 7)), ValueError, "teacher"),
    "attention_keys": (lambda: A(p(2, 3, 5, 7), p(2, 3, 5, 8)), ValueError, PAIR),
    "attention_heads": (lambda: A(p(2, 3, 5, 7), p(2, 4, 5, 7)), ValueError, PAIR),
    "attention_int": (lambda: A(i(2, 3, 5, 7), p(2, 3, 5, 7)), TypeError, "student"),
    "attention_int_teacher": (lambda: A(p(2, 3, 5, 7), i(2, 3, 5, 7)), TypeError, "teacher"),
    "attention_mask_keys": (lambda: A(p(2, 3, 5, 7), p(2, 3, 5, 7), mask=torch.ones(2, 7)), ValueError, "mask"),
    "attention_mask_4d": (
        lambda: A(p(2, 3, 5, 7), p(2, 3, 5, 7), mask=torch.ones(2, 3, 5, 7)), ValueError, "mask"),
    "attention_mask_rows": (lambda: A(p(2, 3, 5, 7), p(2, 3, 5, 7), mask=torch.ones(2, 5, 1)), ValueError, "mask"),
    "attention_kind": (lambda: A(p(2, 3, 5, 7), p(2, 3, 5, 7), kind="logits"), ValueError, "kind"),
    "attention_scores_mask_not_square": (
        lambda: A(x(2, 3, 5, 7), x(2, 3, 5, 7), kind="scores", mask=torch.ones(2, 5)), ValueError, "mask|kind"),
    "attention_reduction": (lambda: A(p(2, 3, 5, 7), p(2, 3, 5, 7), reduction="max"), ValueError, "reduction"),
    "attention_teacher_device": (lambda: A(p(2, 3, 5, 7), p(2, 3, 5, 7).to("meta")), ValueError, "teacher"),
    "attention_seq_lengths": (lambda: A([p(2, 3, 5, 7)], [p(2, 3, 5, 7)] * 2), ValueError, PAIR),
    "attention_seq_empty": (lambda: A((), ()), ValueError, PAIR),
    "attention_seq_mask": (
        lambda: A([p(2, 3, 5, 7), p(2, 3, 4, 7)], [p(2, 3, 5, 7), p(2, 3, 4, 7)], mask=torch.ones(2, 5)),
        ValueError, "mask"),
    "attention_seq_second_pair": (
        lambda: A([p(2, 3, 5, 7), p(2, 3, 5, 7)], [p(2, 3, 5, 7), p(2, 2, 5, 7)]), ValueError, PAIR),
    # logit_kl
    "logit_vocab": (lambda: L(x(4, 10), x(4, 11)), ValueError, PAIR),
    "logit_rows": (lambda: L(x(4, 10), x(3, 10)), ValueError, PAIR),
    "logit_0d": (lambda: L(torch.tensor(1.0), torch.tensor(1.0)), ValueError, "student"),
    "logit_int": (lambda: L(i(4, 10), x(4, 10)), TypeError, "student"),
    "logit_int_teacher": (lambda: L(x(4, 10), i(4, 10)), TypeError, "teacher"),
    "logit_mask": (lambda: L(x(2, 4, 10), x(2, 4, 10), mask=torch.ones(8)), ValueError, "mask"),
    "logit_mask_device": (lambda: L(x(4, 10), x(4, 10), mask=torch.ones(4, device="meta")), ValueError, "mask"),
    "logit_teacher_device": (lambda: L(x(4, 10), x(4, 10, device="meta")), ValueError, "teacher"),
    "logit_reduction": (lambda: L(x(4, 10), x(4, 10), reduction="batchmean"), ValueError, "reduction"),
    "logit_sequence": (lambda: L([x(4, 10)], [x(4, 10)]), (TypeError, ValueError), "student"),
    **{
        f"logit_temperature_{t}": (lambda t=t: L(x(4, 10), x(4, 10), temperature=t), ValueError, "temperature")
        for t in [0.0, -1.0, math.nan, math.inf, -math.inf]
    },
    "logit_temperature_str": (
        lambda: L(x(4, 10), x(4, 10), temperature="2"), (TypeError, ValueError), "temperature"),
    "logit_vocab_names_option": (lambda: L(x(4, 10), x(4, 11)), ValueError, "vocab='common'"),
    "logit_vocab_choice": (lambda: L(x(4, 10), x(4, 10), vocab="padded"), ValueError, "vocab"),
    "logit_divergence": (lambda: L(x(4, 10), x(4, 10), divergence="kl"), ValueError, "divergence"),
    **{
        f"logit_beta_{b}": (lambda b=b: L(x(4, 10), x(4, 10), divergence="jsd", beta=b), ValueError, "beta")
        for b in [0.0, 1.0, -0.5, 1.5, math.nan]
    },
    "logit_beta_type": (lambda: L(x(4, 10), x(4, 10), divergence="jsd", beta="0.5"), TypeError, "beta"),
    "logit_beta_other_divergence": (lambda: L(x(4, 10), x(4, 10), beta=0.5), ValueError, "beta"),
    "logit_labels_float": (lambda: L(x(4, 10), x(4, 10), labels=torch.zeros(4)), TypeError, "labels"),
    "logit_labels_bool": (lambda: L(x(4, 10), x(4, 10), labels=torch.zeros(4, dtype=torch.bool)), TypeError, "labels"),
    "logit_labels_shape": (lambda: L(x(2, 4, 10), x(2, 4, 10), labels=i(8)), ValueError, "labels"),
    "logit_labels_full_shape": (lambda: L(x(4, 10), x(4, 10), labels=i(4, 10)), ValueError, "labels"),
    "logit_labels_too_large": (lambda: L(x(4, 10), x(4, 10), labels=torch.tensor([0, 1, 10, 2])), ValueError, "labels"),
    "logit_labels_negative": (lambda: L(x(4, 10), x(4, 10), labels=torch.tensor([0, -1, 3, 2])), ValueError, "labels"),
    "logit_labels_device": (lambda: L(x(4, 10), x(4, 10), labels=i(4).to("meta")), ValueError, "labels"),
    "logit_labels_not_tensor": (lambda: L(x(4, 10), x(4, 10), labels=[0, 1, 2, 3]), TypeError, "labels"),
    "logit_ce_weight_without_labels": (lambda: L(x(4, 10), x(4, 10), ce_weight=0.5), ValueError, "ce_weight"),
    "logit_ce_weight_negative": (lambda: L(x(4, 10), x(4, 10), labels=i(4), ce_weight=-0.1), ValueError, "ce_weight"),
    "logit_ce_weight_nan": (lambda: L(x(4, 10), x(4, 10), labels=i(4), ce_weight=math.nan), ValueError, "ce_weight"),
    "logit_ce_weight_type": (lambda: L(x(4, 10), x(4, 10), labels=i(4), ce_weight="1"), TypeError, "ce_weight"),
    "logit_ce_weight_tensor_shape": (
        lambda: L(x(4, 10), x(4, 10), labels=i(4), ce_weight=torch.ones(2)), TypeError, "ce_weight"),
    # modules
    "module_logit_ce_weight_without_labels": (
        lambda: fastkd.LogitKLLoss(ce_weight=0.5)(x(4, 10), x(4, 10)), ValueError, "ce_weight"),
    "module_logit_divergence": (
        lambda: fastkd.LogitKLLoss(divergence="js")(x(4, 10), x(4, 10)), ValueError, "divergence"),
    "module_hidden_reduction": (
        lambda: fastkd.HiddenMSELoss(reduction="avg")(x(4, 8), x(4, 8)), ValueError, "reduction"),
    "module_attention_kind": (
        lambda: fastkd.AttentionKLLoss(kind="logits")(p(2, 3, 5, 7), p(2, 3, 5, 7)), ValueError, "kind"),
    "module_logit_temperature": (
        lambda: fastkd.LogitKLLoss(temperature=0.0)(x(4, 10), x(4, 10)), ValueError, "temperature"),
    "module_logit_mask": (
        lambda: fastkd.LogitKLLoss()(x(4, 10), x(4, 10), mask=torch.ones(5)), ValueError, "mask"),
    # backend
    "set_backend_unknown": (lambda: fastkd.set_backend("nope"), ValueError, "backend"),
    "set_backend_none": (lambda: fastkd.set_backend(None), ValueError, "backend"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case):
    call, error, name = BAD[case]
    with pytest.raises(error) as info:
        call()
    assert re.search(name, str(info.value)), f"message does not name {name!r}: {info.value}"


@pytest.mark.parametrize(
    "call,numbers",
    [
        (lambda: L(x(4, 10), x(4, 11)), ["10", "11"]),
        (lambda: H(x(4, 8), x(4, 9)), ["8", "9"]),
        (lambda: H(x(4, 8), x(4, 8), mask=torch.ones(5)), ["4", "5"]),
        (lambda: A(p(2, 3, 5, 7), p(2, 3, 5, 7), mask=torch.ones(2, 7)), ["5", "7"]),
    ],
    ids=["vocab", "width", "mask", "attention_mask"],
)
def test_message_gives_shapes(call, numbers):
    """The message says what it got and what it expected."""
    with pytest.raises(ValueError) as info:
        call()
    assert all(n in str(info.value) for n in numbers), str(info.value)


def test_set_backend_keeps_working_after_error():
    fastkd.set_backend("torch")
    with pytest.raises(ValueError):
        fastkd.set_backend("nope")
    try:
        assert torch.isfinite(fastkd.logit_kl(x(3, 10), x(3, 10)))
    finally:
        fastkd.set_backend("auto")


def test_available_backends():
    names = fastkd.available_backends()
    assert "torch" in names and set(names) <= {"torch", "triton", "native"}
    for name in names + ["auto"]:
        fastkd.set_backend(name)
    fastkd.set_backend("auto")


SCRIPT = "import torch, fastkd; print(float(fastkd.logit_kl(torch.zeros(2, 5), torch.zeros(2, 5))))"


@pytest.mark.parametrize("name,ok", [("torch", True), ("nope", False)])
def test_backend_environment_variable(name, ok):
    """``FASTKD_BACKEND`` picks the backend; an unknown name fails with a message naming it."""
    env = {**os.environ, "FASTKD_BACKEND": name}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    if ok:
        assert run.returncode == 0 and float(run.stdout.split()[-1]) == 0.0, run.stderr
    else:
        assert run.returncode != 0 and "ValueError" in run.stderr and "backend" in run.stderr, run.stderr
