"""The stage runner with an offline teacher: batches that carry the teacher's stored top-k
(``teacher_ids``, ``teacher_logprobs``), no teacher model. With ``k = V`` and ``tail="renormalize"``
the stored teacher is the whole distribution, so the steps must equal those of the same stage with
the live teacher; the refusals of what an offline teacher cannot give."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
from test_runner import B, L, V, llama, make_batch  # noqa: E402

from fastkd.runner import Schedule, Stage, StageRunner  # noqa: E402


def stored_teacher(teacher, batch, k):
    """The teacher's top-k log-probabilities at every position of ``batch`` (float32), ids -1 and
    log-probabilities -inf on padding, as an offline teacher stores them."""
    inputs = {name: batch[name] for name in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logprobs = teacher(**inputs).logits.double().log_softmax(-1)
    values, ids = logprobs.topk(k, dim=-1)
    padding = batch["attention_mask"] == 0
    ids[padding], values[padding] = -1, -torch.inf
    return {"teacher_ids": ids.int(), "teacher_logprobs": values.float()}


def run(student, teacher, schedule, batches, **options):
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    runner = StageRunner(student, teacher, schedule, optimizer, quiet=True, **options)
    return [{name: float(v) for name, v in m.items() if name.startswith("loss")} for m in runner.run(batches)]


@pytest.mark.parametrize("losses", [{"logit": 1.0}, {"logit": 1.0, "ce": 0.5}], ids=["logit", "logit+ce"])
def test_offline_with_the_whole_distribution_equals_the_live_teacher(losses):
    torch.manual_seed(0)
    teacher, student = llama(4, 32), llama(2, 16)
    schedule = Schedule([Stage("kd", steps=3, losses=losses)])
    batches = [make_batch(seed, labels=True) for seed in range(3)]
    offline = [{**batch, **stored_teacher(teacher, batch, V)} for batch in batches]
    live = run(copy.deepcopy(student), teacher, schedule, batches, temperature=2.0)
    trained = copy.deepcopy(student)
    stored = run(trained, None, schedule, offline, temperature=2.0)
    assert len(live) == len(stored) == 3
    for a, b in zip(live, stored):
        assert a.keys() == b.keys()
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-4), name


def test_offline_top_k_trains_the_student():
    """A logit-only schedule from a k = 8 store lowers the stored-teacher loss of a fixed batch by a fifth."""
    torch.manual_seed(1)
    teacher, student = llama(4, 32), llama(2, 16)
    batch = {**make_batch(0), **stored_teacher(teacher, make_batch(0), 8)}
    for tail, temperature in (("renormalize", 2.0), ("bucket", 1.0)):
        losses = run(copy.deepcopy(student), None, Schedule([Stage("kd", steps=12, losses={"logit": 1.0})]),
                     [batch] * 12, temperature=temperature, tail=tail)
        assert losses[-1]["loss_logit"] < 0.8 * losses[0]["loss_logit"], (tail, losses)


@pytest.mark.parametrize(
    "losses, options, words",
    [
        ({"hidden": 1.0, "logit": 1.0}, {}, "'hidden' need a live teacher"),
        ({"att": 1.0}, {}, "'att' need a live teacher"),
        ({"logit": 1.0}, {"divergence": "reverse"}, "divergence"),
        ({"logit": 1.0}, {"tail": "bucket", "temperature": 2.0}, "tail"),
    ],
)
def test_offline_refusals(losses, options, words):
    student = llama(2, 16)
    optimizer = torch.optim.AdamW(student.parameters())
    with pytest.raises(ValueError, match=words):
        StageRunner(student, None, Schedule([Stage("s", steps=1, losses=losses)]), optimizer, **options)


def test_offline_batch_without_the_stored_teacher():
    student = llama(2, 16)
    runner = StageRunner(student, None, Schedule([Stage("s", steps=1, losses={"logit": 1.0})]),
                         torch.optim.AdamW(student.parameters()), quiet=True)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        runner.step({**make_batch(0), "teacher_ids": torch.zeros(B, L, 4, dtype=torch.int32)})


def test_offline_ce_only_stage_needs_no_stored_teacher():
    student = llama(2, 16)
    runner = StageRunner(student, None, Schedule([Stage("s", steps=1, losses={"ce": 1.0})]),
                         torch.optim.AdamW(student.parameters()), quiet=True)
    metrics = runner.step(make_batch(0, labels=True))
    assert float(metrics["loss_ce"]) > 0
