"""The runner's logit-family options and its loss registry, on tiny transformers models on CPU:
``"ce"`` beside ``"logit"`` (one pass) and alone (no teacher), ``divergence``/``beta``/``vocab``,
and a user-registered loss (a cosine hidden loss) with weights that change per step, through a
checkpoint and a resume.

Expected values are ``fastkd.logit_kl`` and ``F.cross_entropy`` of the models' own output logits
(and the float64 formulas of ``reference.reference_loss``), computed before the optimizer step;
expected gradients are plain autograd through those formulas.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import fastkd  # noqa: E402
from fastkd import eager  # noqa: E402
from fastkd.runner import Schedule, Stage, WeightedLosses  # noqa: E402
from fastkd.runner.plain import PlainRunner  # noqa: E402
from reference import reference_loss  # noqa: E402
from test_runner import V, eager_outputs, llama, make_batch, make_runner  # noqa: E402

T = 2.0


def prompt_batch(seed=0):
    """Labels -100 on a two-token prompt of row 0 and on the padding of row 1."""
    batch = make_batch(seed, labels=True)
    batch["labels"][batch["attention_mask"] == 0] = -100
    return batch


def pair():
    """A student and a teacher whose LM heads are scaled up to logits of a few units, so that the
    divergences differ well beyond float32 rounding."""
    torch.manual_seed(0)
    student, teacher = llama(2, 16), llama(4, 32)
    with torch.no_grad():
        for model in (student, teacher):
            model.lm_head.weight.mul_(20.0)
    return student, teacher


def own_logits(model, batch):
    return eager_outputs(model, batch).logits


def rows_and_targets(batch):
    return (fastkd.logit_mask(batch["labels"], batch["attention_mask"]),
            fastkd.logit_labels(batch["labels"], batch["attention_mask"]))


def assert_same_gradients(model, reference):
    """Every parameter's .grad equals the reference model's (to float32 rounding)."""
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            scale = q.grad.abs().max().item()
            assert (p.grad - q.grad).abs().max().item() <= 2e-4 * scale + 1e-8, name


# ------------------------------------------------------------------------------------------
# "ce" in the logit pass, and alone.


def test_logit_and_ce_stage_end_to_end():
    student, teacher = pair()
    batch = prompt_batch()
    s, t = own_logits(student, batch), own_logits(teacher, batch)
    rows, targets = rows_and_targets(batch)
    want = fastkd.logit_kl(s, t, mask=rows, labels=targets, ce_weight=0.5, temperature=T, return_parts=True)
    exact = reference_loss("logit_kl", s, t, mask=rows, labels=targets, ce_weight=0.5, temperature=T)
    assert want.loss.item() == pytest.approx(exact.item(), rel=1e-5)
    assert want.ce.item() > 1.0 and want.kd.item() > 1e-3  # both parts count

    runner = make_runner(student, teacher, Schedule([Stage("I", {"logit": 1.0, "ce": 0.5}, 3)]), temperature=T)
    before = [p.detach().clone() for p in student.parameters()]
    metrics = runner.step(batch)
    assert dict(metrics).keys() == {"stage", "step", "loss", "loss_logit", "loss_ce"}
    assert metrics["loss"] == pytest.approx(want.loss.item(), rel=1e-4)
    assert metrics["loss_logit"] == pytest.approx(want.kd.item(), rel=1e-4)
    assert metrics["loss_ce"] == pytest.approx(want.ce.item(), rel=1e-4)
    assert all(not torch.equal(b, p) for b, p in zip(before, student.parameters()))
    later = [runner.step(prompt_batch(k)) for k in (1, 2)]
    assert all(math.isfinite(m["loss"]) for m in later)


@pytest.mark.parametrize("weights", [(1.0, 0.5), (0.7, 2.0)])
def test_logit_and_ce_gradients_are_the_weighted_sums(weights):
    """The step's gradient is that of w_logit * KD + w_ce * CE computed by plain autograd."""
    w_logit, w_ce = weights
    student, teacher = pair()
    reference = copy.deepcopy(student)
    batch = prompt_batch()
    rows, targets = rows_and_targets(batch)
    runner = make_runner(student, teacher, Schedule([Stage("I", {"logit": w_logit, "ce": w_ce}, 1)]), temperature=T)
    runner.step(batch)

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    s = reference(**inputs).logits
    with torch.no_grad():
        t = teacher(**inputs).logits
    kd = eager.logit_kl(s, t, rows, T)
    ce = F.cross_entropy(s.flatten(0, -2), targets.flatten(), ignore_index=-100)
    (w_logit * kd + w_ce * ce).backward()
    assert_same_gradients(student, reference)


def test_ce_alone_runs_no_teacher_and_matches_cross_entropy():
    student, teacher = pair()
    reference = copy.deepcopy(student)
    batch = prompt_batch()
    _, targets = rows_and_targets(batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    s = reference(**inputs).logits
    want = F.cross_entropy(s.flatten(0, -2), targets.flatten(), ignore_index=-100)
    (0.5 * want).backward()

    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    teacher.model.register_forward_hook(lambda *args: calls.append(1))
    runner = make_runner(student, teacher, Schedule([Stage("ce", {"ce": 0.5}, 2)]))
    metrics = runner.step(batch)
    assert metrics["loss_ce"] == pytest.approx(want.item(), rel=1e-5)
    assert metrics["loss"] == pytest.approx(0.5 * want.item(), rel=1e-5)
    assert not calls, "the teacher ran in a ce-only stage"
    assert_same_gradients(student, reference)


def test_ce_without_labels_is_refused():
    student, teacher = pair()
    runner = make_runner(student, teacher, Schedule([Stage("I", {"logit": 1.0, "ce": 0.5}, 2)]))
    with pytest.raises(ValueError, match="batch: stage 'I' has 'ce', which needs the batch's 'labels'"):
        runner.step(make_batch())
    assert runner.step_index == 0  # the step did not run
    runner.step(prompt_batch())  # a batch with labels runs
    # Without 'ce' labels are optional.
    make_runner(student, teacher, Schedule([Stage("I", {"logit": 1.0}, 1)])).step(make_batch())


# ------------------------------------------------------------------------------------------
# divergence, beta, vocab.


@pytest.mark.parametrize("divergence, beta", [("reverse", None), ("jsd", 0.3), ("jsd", None), ("tvd", None)])
def test_divergence_and_beta_reach_the_logit_loss(divergence, beta):
    student, teacher = pair()
    batch = prompt_batch()
    s, t = own_logits(student, batch), own_logits(teacher, batch)
    rows, _ = rows_and_targets(batch)
    want = fastkd.logit_kl(s, t, mask=rows, temperature=T, divergence=divergence, beta=beta)
    forward = fastkd.logit_kl(s, t, mask=rows, temperature=T)
    assert abs(want.item() - forward.item()) > 1e-2 * forward.item()
    runner = make_runner(student, teacher, Schedule([Stage("I", {"logit": 1.0}, 1)]), temperature=T,
                         divergence=divergence, beta=beta)
    assert runner.step(batch)["loss_logit"] == pytest.approx(want.item(), rel=1e-4)


def test_plain_way_computes_the_same_options():
    """The plain way (whole models, eager losses) gives the runner's jsd + ce losses."""
    batch = prompt_batch()
    schedule = Schedule([Stage("I", {"logit": 1.0, "ce": 0.5}, 1)])
    options = dict(temperature=T, divergence="jsd", beta=0.3)
    fast = make_runner(*pair(), schedule, **options).step(batch)
    student, teacher = pair()
    plain = PlainRunner(student, teacher, schedule, torch.optim.AdamW(student.parameters()), quiet=True,
                        **options).step(batch)
    for key in ("loss", "loss_logit", "loss_ce"):
        assert plain[key] == pytest.approx(fast[key], rel=1e-4)
    with pytest.raises(ValueError, match="stage 'I' has 'cosine'; the plain way computes"):
        PlainRunner(student, teacher, Schedule([Stage("I", {"cosine": 1.0}, 1)]),
                    torch.optim.AdamW(student.parameters()), quiet=True)


def test_vocab_common_compares_the_first_rows():
    student, _ = pair()
    torch.manual_seed(1)
    teacher = llama(4, 32)
    teacher.resize_token_embeddings(V + 3)  # 3 padding rows
    schedule = Schedule([Stage("I", {"logit": 1.0, "ce": 0.5}, 1)])
    with pytest.raises(ValueError, match=r"logit: the teacher's LM head: vocabulary size V_t=100 .*vocab='common'"):
        make_runner(student, teacher, schedule)
    batch = prompt_batch()
    s, t = own_logits(student, batch), own_logits(teacher, batch)
    rows, targets = rows_and_targets(batch)
    want = fastkd.logit_kl(s, t, mask=rows, temperature=T, labels=targets, ce_weight=0.5, vocab="common")
    runner = make_runner(student, teacher, schedule, temperature=T, vocab="common")
    assert runner.step(batch)["loss"] == pytest.approx(want.item(), rel=1e-4)


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"divergence": "kl"}, ValueError, "divergence: got 'kl'"),
        ({"beta": 0.5}, ValueError, "beta: only divergence='jsd' takes a beta"),
        ({"divergence": "jsd", "beta": 1.0}, ValueError, r"beta: expected a number in the open interval \(0, 1\)"),
        ({"divergence": "jsd", "beta": "half"}, TypeError, "beta: expected a Python float"),
        ({"vocab": "all"}, ValueError, "vocab: got 'all'"),
    ],
)
def test_logit_option_errors(options, error, words):
    with pytest.raises(error, match=words):
        make_runner(*pair(), Schedule([Stage("I", {"logit": 1.0}, 1)]), **options)


# ------------------------------------------------------------------------------------------
# A user-registered loss.


def cosine_loss(ctx):
    """Mean over the hidden pairs of ``sum_i m_i (1 - cos(P(h_s)_i, h_t_i)) / max(sum_i m_i, 1)``."""
    m = ctx.mask.float()
    terms = [((1 - F.cosine_similarity(s, t, dim=-1)) * m).sum() / m.sum().clamp_min(1)
             for s, t in zip(ctx.student_hidden, ctx.teacher_hidden)]
    return torch.stack(terms).mean()


fastkd.register_loss("cosine", cosine_loss, needs=("hidden",), replace=True)


def ramp(k):
    return 0.25 + 0.5 * k


def decay(k):
    return 2.0**-k


def cosine_schedule():
    return Schedule([Stage("I", {"hidden": ramp, "cosine": decay}, 3), Stage("II", {"cosine": ramp, "logit": 1.0}, 2)])


def test_registered_loss_end_to_end(tmp_path):
    student, teacher = pair()
    runner = make_runner(student, teacher, cosine_schedule(), temperature=T, checkpoint_dir=tmp_path)
    batch = make_batch()
    proj = [(p.weight.detach().clone(), p.bias.detach().clone()) for p in runner.projections]
    s_out, t_out = eager_outputs(student, batch), eager_outputs(teacher, batch)
    m = batch["attention_mask"].double()
    want = []
    for (i, j), (w, b) in zip(runner.layer_map.hidden, proj):
        s = s_out.hidden_states[i].double() @ w.double().T + b.double()
        cos = F.cosine_similarity(s, t_out.hidden_states[j].double(), dim=-1)
        want.append(((1 - cos) * m).sum() / m.sum())
    want = torch.stack(want).mean().item()
    assert want > 0.1

    records = list(runner.run([batch] + [make_batch(k) for k in range(1, 5)]))
    assert records[0]["loss_cosine"] == pytest.approx(want, rel=1e-5)
    for k, r in enumerate(records[:3]):
        assert set(r) == {"stage", "step", "loss", "loss_hidden", "loss_cosine"}
        assert r["loss"] == pytest.approx(ramp(k) * r["loss_hidden"] + decay(k) * r["loss_cosine"], rel=1e-6)
    for k, r in enumerate(records[3:]):
        assert r["loss"] == pytest.approx(ramp(k) * r["loss_cosine"] + r["loss_logit"], rel=1e-6)
    assert records[2]["loss_cosine"] < records[0]["loss_cosine"]  # it trains
    saved = torch.load(tmp_path / "latest.pt", weights_only=False)["schedule"]
    assert saved[0][1] == {"hidden": f"{__name__}.ramp", "cosine": f"{__name__}.decay"}


def test_registered_loss_resumes_bit_for_bit(tmp_path):
    """Stop in the middle of stage I (hidden + cosine), resume in fresh objects: same losses and weights."""

    def build():
        torch.manual_seed(0)
        student = llama(2, 16, dropout=0.1)
        torch.manual_seed(1)
        return make_runner(student, llama(4, 32), cosine_schedule())

    data = [make_batch(k) for k in range(5)]
    torch.manual_seed(123)
    whole = build()
    full = list(whole.run(data))
    torch.manual_seed(123)
    first = build()
    head = list(first.run(data[:2]))
    first.save(tmp_path / "ck.pt")
    torch.manual_seed(999)
    second = build()
    second.load(tmp_path / "ck.pt")
    assert second.step_index == 2 and second.stage.name == "I"
    tail = list(second.run(data[2:]))
    assert [dict(r) for r in head + tail] == [dict(r) for r in full]
    for a, b in zip(whole.student.module.state_dict().values(), second.student.module.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(whole.projections.parameters(), second.projections.parameters()):
        assert torch.equal(a, b)


def test_a_registered_loss_is_asked_only_for_what_it_needs():
    """A loss needing only the student's head input: the teacher does not run, no hidden states come."""
    seen = {}

    def logit_norm(ctx):
        seen.update(teacher=ctx.teacher, hidden=ctx.student_hidden)
        weight, bias = ctx.runner.student.lm_head()
        return F.linear(ctx.student.head_input, weight, bias).pow(2).mean()

    fastkd.register_loss("logit_norm", logit_norm, needs=("student_head",), replace=True)
    student, teacher = pair()
    metrics = make_runner(student, teacher, Schedule([Stage("I", {"logit_norm": 1.0}, 1)])).step(make_batch())
    assert seen == {"teacher": None, "hidden": []}
    assert math.isfinite(metrics["loss_logit_norm"])


def test_registry_errors():
    assert list(fastkd.runner.registered_losses())[:4] == ["hidden", "att", "logit", "ce"]
    with pytest.raises(ValueError, match="name: a loss 'hidden' is registered already; pass replace=True"):
        fastkd.register_loss("hidden", cosine_loss, needs=("hidden",))
    with pytest.raises(ValueError, match="name: a loss 'cosine' is registered already"):
        fastkd.register_loss("cosine", cosine_loss, needs=("hidden",))
    for bad in ("", "my loss", 3):
        with pytest.raises(ValueError, match="name: expected an identifier"):
            fastkd.register_loss(bad, cosine_loss, needs=("hidden",))
    with pytest.raises(TypeError, match="fn: expected a function"):
        fastkd.register_loss("other", 1.0, needs=("hidden",))
    with pytest.raises(TypeError, match="needs: expected a collection"):
        fastkd.register_loss("other", cosine_loss, needs="hidden")
    with pytest.raises(ValueError, match="needs: unknown 'logits', expected some of 'hidden', 'attention'"):
        fastkd.register_loss("other", cosine_loss, needs=("hidden", "logits"))
    with pytest.raises(TypeError, match="replace: expected a bool"):
        fastkd.register_loss("other", cosine_loss, needs=("hidden",), replace=1)
    assert "other" not in fastkd.runner.registered_losses()
    with pytest.raises(ValueError, match="unknown loss 'cosin', expected some of the registered losses 'hidden', "
                                         "'att', 'logit', 'ce', .*'cosine'"):
        Stage("I", {"cosin": 1.0}, 1)


def test_loss_function_results_are_checked():
    student, teacher = pair()

    def not_scalar(ctx):
        return torch.stack([cosine_loss(ctx)] * 2)

    def foreign(ctx):
        loss = cosine_loss(ctx)
        return WeightedLosses(loss, {"bad_values": loss, "hidden": loss})

    fastkd.register_loss("bad_values", not_scalar, needs=("hidden",), replace=True)
    runner = make_runner(student, teacher, Schedule([Stage("I", {"bad_values": 1.0}, 1)]))
    with pytest.raises(TypeError, match=r"loss 'bad_values': its function returned a torch.float32 tensor of shape "
                                        r"\(2,\) for 'bad_values', expected a 0-d floating tensor"):
        runner.step(make_batch())
    fastkd.register_loss("bad_values", foreign, needs=("hidden",), replace=True)
    runner = make_runner(student, teacher, Schedule([Stage("I", {"bad_values": 1.0}, 1)]))
    with pytest.raises(RuntimeError, match="loss 'bad_values': its function returned values for"):
        runner.step(make_batch())
