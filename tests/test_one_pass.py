"""The one-pass path (``fastkd._one_pass``): the forward writes the gradient, backward reads nothing
input-sized when the upstream gradient is the expected one, and nothing synchronises with the host.

``test_losses.py`` runs its whole sweep on both paths (the ``passes`` fixture) under a random
upstream gradient; here: upstream gradients of exactly the expected value and of others, sequences
of pairs, the dispatch of each path, the memory backward touches, the runner's weights, errors.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import SYNC_OPS, Recorder
from reference import run_and_compare

import fastkd
from fastkd import _one_pass

pytestmark = pytest.mark.usefixtures("nan_empty")

LOSSES = ["hidden_mse", "attention_probs", "attention_scores", "logit_kl"]


def make_inputs(name: str, device, pairs: int = 1, dtype=torch.float32):
    """(function, reference name, students (leaves), teachers, mask, options) for ``name``; with
    ``pairs > 1``, sequences of pairs of different shapes (hidden and attention)."""
    students, teachers = [], []
    for i in range(pairs):
        if name == "hidden_mse":
            shape = (3, 5 + 3 * i, 37 + 20 * i)
        elif name == "logit_kl":
            shape = (3, 5, 1000)
        else:
            shape = (3, 2 + i, 9, 9)
        s, t = torch.randn(shape) * 2, torch.randn(shape) * 2
        if name == "attention_probs":
            s, t = s.softmax(-1), t.softmax(-1)
        students.append(s.to(device, dtype).requires_grad_())
        teachers.append(t.to(device, dtype))
    mask = (torch.rand(students[0].shape[0], students[0].shape[-2]) < 0.7).to(device)
    if name == "hidden_mse":
        mask = None if pairs > 1 else mask  # pairs of different leading shapes share no mask
        return fastkd.hidden_mse, "hidden_mse", students, teachers, mask, {}
    if name == "logit_kl":
        return fastkd.logit_kl, "logit_kl", students[0], teachers[0], mask, {"temperature": 2.0}
    kind = name.split("_")[1]
    return fastkd.attention_kl, "attention_kl", students, teachers, mask, {"kind": kind}


@pytest.mark.parametrize("pairs", [1, 3])
@pytest.mark.parametrize("upstream", [1.0, -2.5, 0.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", LOSSES)
def test_matches_reference_for_any_upstream_gradient(device, passes, name, reduction, upstream, pairs):
    if name == "logit_kl" and pairs > 1:
        pytest.skip("logit_kl takes one pair")
    fn, ref, students, teachers, mask, options = make_inputs(name, device, pairs)
    run_and_compare(fn, ref, students, teachers, mask=mask, reduction=reduction, upstream=upstream, **options)


@contextlib.contextmanager
def two_pass():
    fastkd.set_passes("two")
    try:
        yield
    finally:
        fastkd.set_passes("auto")


@pytest.mark.parametrize("weight", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("name", LOSSES)
def test_expected_upstream_weight(device, name, weight):
    """Under the runner's ``expected_upstream(w)``, ``w * loss`` has the two-pass gradient (w = 0
    too), also when its own upstream gradient is not 1 (then the gradient is rescaled)."""
    fn, _, students, teachers, mask, options = make_inputs(name, device, pairs=1 if name == "logit_kl" else 2)
    leaves = students if isinstance(students, list) else [students]
    w = torch.tensor(weight, device=device)
    for factor in (1.0, 3.0):
        with two_pass():
            want_loss = fn(students, teachers, mask=mask, **options)
            want = torch.autograd.grad(factor * w * want_loss, leaves)
        with _one_pass.expected_upstream(w):
            loss = fn(students, teachers, mask=mask, **options)
        assert "with_gradients" in loss.grad_fn.name()
        got = torch.autograd.grad(factor * w * loss, leaves)
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
        for g, expected in zip(got, want):
            torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-9)


def _bodies():
    """The Python bodies of fastkd's custom ops, for the Recorder to look inside them."""
    from fastkd import attention, hidden, logit

    ops = {
        "fastkd::with_gradients": _one_pass.with_gradients,
        "fastkd::scale_gradients_": _one_pass.scale_gradients_,
        "fastkd::hidden_mse_rows_with_grad": hidden.hidden_mse_rows_with_grad,
        "fastkd::attention_kl_rows_with_grad": attention.attention_kl_rows_with_grad,
        "fastkd::logit_kl_rows_with_grad": logit.logit_kl_rows_with_grad,
    }
    return {name: op._init_fn for name, op in ops.items()}


@pytest.mark.parametrize("name", LOSSES)
def test_backward_reads_nothing_input_sized(device, name):
    """With the expected upstream gradient, backward runs one op (the scale kernel), allocates
    nothing, and hands the forward's gradient buffer to ``.grad`` as it is; no step synchronises
    with the host, forward or backward."""
    if fastkd.get_backend() == "torch":
        pytest.skip("the torch backend scales in torch ops, which pay the pass whatever the upstream value")
    if fastkd.get_backend() == "triton" and device.type == "cpu":
        pytest.skip("Triton's interpreter copies every tensor argument in and out of a launch (runs on CUDA)")
    fn, _, students, teachers, mask, options = make_inputs(name, device, pairs=1 if name == "logit_kl" else 2)
    leaves = students if isinstance(students, list) else [students]
    forward = Recorder(_bodies())
    with forward:
        loss = fn(students, teachers, mask=mask, **options)
    input_bytes = min(x.numel() * x.element_size() for x in leaves)
    buffers = {size for op, size in forward.produced if size >= input_bytes}
    assert buffers, "the forward pass wrote no gradient"
    backward = Recorder(_bodies())
    with backward:
        loss.backward()
    assert "fastkd::scale_gradients_" in backward.ops
    assert not [op for op in backward.ops if op.endswith("_backward")], backward.ops
    views = {"aten::detach", "aten::view", "aten::alias"}  # of the gradient handed on: no memory
    assert not [op for op, size in backward.produced if size >= input_bytes and op not in views], backward.produced
    assert not (forward.ops | backward.ops) & SYNC_OPS
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.is_contiguous()


def test_the_switch_selects_the_path():
    student = torch.randn(4, 50, requires_grad=True)
    teacher = torch.randn(4, 50)
    assert fastkd.get_passes() == "auto"
    assert "with_gradients" in fastkd.logit_kl(student, teacher).grad_fn.name()
    with two_pass():
        assert fastkd.get_passes() == "two"
        assert "with_gradients" not in fastkd.logit_kl(student, teacher).grad_fn.name()
    with pytest.raises(ValueError, match="passes"):
        fastkd.set_passes("one")


@pytest.mark.parametrize("case", ["reduction_none", "no_grad_student", "no_grad_mode"])
def test_two_pass_where_one_pass_does_not_apply(case):
    student = torch.randn(4, 50, requires_grad=case != "no_grad_student")
    teacher = torch.randn(4, 50)
    recorder = Recorder({})
    with recorder, torch.set_grad_enabled(case != "no_grad_mode"):
        loss = fastkd.hidden_mse(student, teacher, reduction="none" if case == "reduction_none" else "mean")
    assert "fastkd::hidden_mse_rows" in recorder.ops
    assert "fastkd::hidden_mse_rows_with_grad" not in recorder.ops
    if case == "reduction_none":
        loss.sum().backward()
        torch.testing.assert_close(student.grad, 2 * (student - teacher).detach() / 50)


def test_double_backward_and_second_backward_raise_clear_errors():
    student = torch.randn(4, 50, requires_grad=True)
    teacher = torch.randn(4, 50)
    loss = fastkd.hidden_mse(student, teacher)
    with pytest.raises(RuntimeError, match="double backward.*set_passes"):
        torch.autograd.grad(loss, student, create_graph=True)
    loss = fastkd.hidden_mse(student, teacher)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice.*set_passes"):
        loss.backward()
    with two_pass():
        (grad,) = torch.autograd.grad(fastkd.hidden_mse(student, teacher), student, create_graph=True)
    assert grad.requires_grad


def test_runner_weights_keep_the_fast_path(monkeypatch):
    """Inside the runner, every one-pass loss sees the upstream gradient it expected (its stage weight)."""
    from test_runner import make_batch, make_runner, teacher_and_student

    from fastkd.backends import torch_ref

    seen = []
    scale = torch_ref.scale_gradients_

    def spy(grads, upstream, expected):
        seen.append((upstream.item(), expected.item()))
        scale(grads, upstream, expected)

    monkeypatch.setattr(torch_ref, "scale_gradients_", spy)
    teacher, student = teacher_and_student("llama")
    schedule = fastkd.Schedule([fastkd.Stage("I", {"hidden": 0.5, "att": 2.0, "logit": 1.0}, steps=1)])
    fastkd.set_backend("torch")
    try:
        make_runner(student, teacher, schedule, attention="maps").step(make_batch())
    finally:
        fastkd.set_backend("auto")
    assert len(seen) == 2 and all(u == e for u, e in seen), seen
    assert sorted(e for _, e in seen) == [0.5, 2.0]
