"""The runner's steps: LR schedulers over the projections' group, no host synchronisation, loss
weights that change per step, and the stop at a non-finite loss. Tiny models on CPU, plus one
CUDA-graph test under ``torch.cuda.set_sync_debug_mode("error")``."""

from __future__ import annotations

import collections
import math
import os
import sys

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

pytest.importorskip("transformers")

import fastkd  # noqa: E402
from fastkd.runner import Features, NonFiniteLossError, Schedule, Stage, StageRunner  # noqa: E402
from test_runner import TinyAdapter, TinyLM, llama, make_batch, make_runner  # noqa: E402

HIDDEN = Schedule([Stage("I", {"hidden": 1.0}, 6)])


def ramp(k):
    return 0.25 + 0.5 * k


def decay(k):
    return 2.0**-k


# ------------------------------------------------------------------------------------------
# LR schedulers.

SCHEDULERS = {
    "lambda": lambda optimizer: LambdaLR(optimizer, lambda k: 0.5**k),
    "onecycle": lambda optimizer: OneCycleLR(optimizer, max_lr=0.1, total_steps=6),
}


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_scheduler_function_schedules_the_projections_group(kind):
    torch.manual_seed(0)
    student, teacher = llama(2, 16), llama(4, 32)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    runner = StageRunner(student, teacher, HIDDEN, optimizer, lr_scheduler=SCHEDULERS[kind], quiet=True)
    assert len(optimizer.param_groups) == 2 and len(runner.lr_scheduler.base_lrs) == 2
    # The same schedule on a one-group optimizer gives the learning rate every group must have.
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    expected = SCHEDULERS[kind](probe)
    for k in range(6):
        want = probe.param_groups[0]["lr"]
        if kind == "lambda":
            assert want == pytest.approx(1e-2 * 0.5**k)
        assert [group["lr"] for group in optimizer.param_groups] == [want, want]
        runner.step(make_batch(k))
        probe.step()
        expected.step()


def test_scheduler_built_before_the_projections_group_is_refused():
    torch.manual_seed(0)
    student, teacher = llama(2, 16), llama(4, 32)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="lr_scheduler: .*pass a function optimizer -> scheduler"):
        StageRunner(student, teacher, HIDDEN, optimizer, lr_scheduler=LambdaLR(optimizer, lambda k: 1.0))
    assert len(optimizer.param_groups) == 1  # refused before the optimizer was changed
    with pytest.raises(TypeError, match="lr_scheduler"):
        StageRunner(student, teacher, HIDDEN, optimizer, lr_scheduler=0.1)
    # Equal widths: no projections, no new group, a scheduler built beforehand is right.
    same = llama(2, 32)
    optimizer = torch.optim.AdamW(same.parameters(), lr=1e-2)
    scheduler = LambdaLR(optimizer, lambda k: 0.5**k)
    runner = StageRunner(same, teacher, HIDDEN, optimizer, lr_scheduler=scheduler, quiet=True)
    runner.step(make_batch())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-2)


# ------------------------------------------------------------------------------------------
# No host synchronisation in a step.

SYNCS = ("tolist", "item", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
FASTKD_DIR = os.path.dirname(fastkd.__file__)


@pytest.fixture
def fastkd_syncs(monkeypatch):
    """Counts, by (method, calling function), the calls of tensor methods that wait for the device
    (``tolist``, ``item``, truth value, ...) made by fastkd's own code; transformers and torch.optim
    make some themselves, which are not counted."""
    calls = collections.Counter()

    def counted(name, method):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(FASTKD_DIR):
                calls[(name, caller.co_name)] += 1
            return method(self, *args, **kwargs)

        return wrapper

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    return calls


def test_step_never_reads_the_device(fastkd_syncs):
    torch.manual_seed(0)
    stage = Stage("I", {"hidden": ramp, "att": 1.0, "logit": decay}, 5)
    runner = make_runner(llama(2, 16), llama(4, 32), Schedule([stage]), lr_scheduler=SCHEDULERS["lambda"])
    batch = make_batch(labels=True)
    records = [runner.step(batch) for _ in range(3)]
    assert not fastkd_syncs, dict(fastkd_syncs)
    # Reading a value converts the step's losses once, after checking them: both are seen above.
    assert math.isfinite(records[1]["loss"])
    assert dict(records[1]).keys() == {"stage", "step", "loss", "loss_hidden", "loss_att", "loss_logit"}
    assert records[1]["step"] == 1 and records[1]["stage"] == "I"
    assert fastkd_syncs == {("tolist", "_losses"): 1, ("tolist", "read"): 1}


def test_run_reads_the_losses_every_log_every_steps(fastkd_syncs):
    torch.manual_seed(0)
    runner = make_runner(llama(2, 16), llama(4, 32), Schedule([Stage("I", {"logit": 1.0}, 7)]), log_every=3)
    reads = []
    for metrics in runner.run([make_batch(k) for k in range(7)]):
        reads.append(fastkd_syncs[("tolist", "_losses")])
    # After steps 3 and 6 (every 3 steps), and after step 7, the schedule's end.
    assert reads == [0, 0, 1, 1, 1, 2, 3]
    with pytest.raises(ValueError, match="log_every"):
        make_runner(llama(2, 16), llama(4, 32), HIDDEN, log_every=0)


# ------------------------------------------------------------------------------------------
# Loss weights that are functions of the step.


def weighted_schedule(first=ramp):
    return Schedule([Stage("I", {"hidden": first, "att": 1.0, "logit": decay}, 3), Stage("II", {"logit": ramp}, 2)])


def test_weight_functions_are_applied_at_every_step(tmp_path):
    torch.manual_seed(0)
    runner = make_runner(llama(2, 16), llama(4, 32), weighted_schedule(), checkpoint_dir=tmp_path)
    records = list(runner.run([make_batch(k) for k in range(5)]))
    for k, r in enumerate(records[:3]):
        want = ramp(k) * r["loss_hidden"] + 1.0 * r["loss_att"] + decay(k) * r["loss_logit"]
        assert r["loss"] == pytest.approx(want, rel=1e-6)
    for k, r in enumerate(records[3:]):  # steps are counted from the start of their stage
        assert r["loss"] == pytest.approx(ramp(k) * r["loss_logit"], rel=1e-6)
    # Checkpoints name a weight function, so that another process finds the same schedule.
    saved = torch.load(tmp_path / "latest.pt", weights_only=False)["schedule"]
    assert saved[0][1]["hidden"] == f"{__name__}.ramp" and saved[0][1]["att"] == 1.0
    make_runner(llama(2, 16), llama(4, 32), weighted_schedule()).load(tmp_path / "latest.pt")
    other = make_runner(llama(2, 16), llama(4, 32), weighted_schedule(first=decay))
    with pytest.raises(ValueError, match="schedule"):
        other.load(tmp_path / "latest.pt")


@pytest.mark.parametrize(
    "weight, error, words",
    [
        (lambda k: -1.0 if k == 2 else 1.0, ValueError, "-1.0"),
        (lambda k: math.nan if k == 2 else 1.0, ValueError, "nan"),
        (lambda k: "big" if k == 2 else 1.0, TypeError, "str"),
    ],
)
def test_weight_function_values_are_checked_when_called(weight, error, words):
    torch.manual_seed(0)
    schedule = Schedule([Stage("I", {"hidden": 1.0}, 1), Stage("II", {"logit": weight}, 4)])
    runner = make_runner(llama(2, 16), llama(4, 32), schedule)
    runner.step(make_batch())
    runner.step(make_batch())
    runner.step(make_batch())
    with pytest.raises(error, match=rf"losses\['logit'\] of stage 'II' at step 2: .*{words}"):
        runner.step(make_batch())
    assert runner.step_index == 3  # the step did not run


# ------------------------------------------------------------------------------------------
# A non-finite loss stops the run.


class NaNFrom(TinyAdapter):
    """A TinyAdapter whose hidden states are NaN from step ``bad`` on (counted in calls)."""

    def __init__(self, module, bad):
        super().__init__(module)
        self.bad, self.calls = bad, 0

    def features(self, batch, **request):
        features = super().features(batch, **request)
        self.calls += 1
        if self.calls > self.bad:
            features = Features([h * math.nan for h in features.hidden], features.attentions, features.head_input)
        return features


def nan_runner(steps, bad, **kwargs):
    torch.manual_seed(0)
    student, teacher = NaNFrom(TinyLM(2, 12), bad), TinyAdapter(TinyLM(4, 24))
    return make_runner(student, teacher, Schedule.preset("one-stage", steps=[steps]), **kwargs)


def test_non_finite_loss_stops_before_the_next_checkpoint(tmp_path):
    runner = nan_runner(10, bad=5, checkpoint_dir=tmp_path, checkpoint_every=2, log_every=4)
    path = tmp_path / "latest.pt"
    with pytest.raises(NonFiniteLossError) as info:
        for metrics in runner.run([make_batch(k) for k in range(10)]):
            if metrics["step"] == 3:  # the checkpoint of step 4 was just written
                written, stat = path.read_bytes(), path.stat()
    error = info.value
    assert (error.stage, error.step, error.names) == ("I", 5, ["loss_hidden"])
    assert "stage 'I', global step 5: loss_hidden became non-finite" in str(error)
    assert math.isnan(error.losses["loss_hidden"]) and math.isfinite(error.losses["loss_att"])
    assert runner.step_index == 6  # found when the checkpoint of step 6 was about to be written
    assert path.read_bytes() == written and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert os.listdir(tmp_path) == ["latest.pt"]
    saved = torch.load(path, weights_only=False)
    assert saved["step"] == 4 and all(torch.isfinite(v).all() for v in saved["student"].values())


def test_non_finite_loss_is_found_within_log_every_steps():
    runner = nan_runner(12, bad=5, log_every=4)
    seen = []
    with pytest.raises(NonFiniteLossError, match="global step 5: loss_hidden") as info:
        for metrics in runner.run([make_batch(k) for k in range(12)]):
            seen.append(metrics["step"])
    assert seen == list(range(7)) and runner.step_index == 8  # found at the read after step 8
    assert runner.step_index - info.value.step <= runner.log_every
    # step() alone: found when a value is read.
    runner = nan_runner(12, bad=1)
    runner.step(make_batch())
    metrics = runner.step(make_batch())
    with pytest.raises(NonFiniteLossError, match="global step 1"):
        metrics["loss"]
    assert NonFiniteLossError("I", 3, {"loss": math.inf, "loss_att": 1.0}).names == ["loss"]


# ------------------------------------------------------------------------------------------
# CUDA: replayed steps never synchronise.


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphed_steps_never_synchronise():
    torch.manual_seed(0)
    teacher, student = llama(4, 64).cuda(), llama(2, 32).cuda()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    steps = 40
    schedule = Schedule([Stage("I", {"hidden": ramp, "att": 1.0, "logit": decay}, steps)])
    runner = StageRunner(student, teacher, schedule, optimizer, graph_warmup=2, quiet=True,
                         lr_scheduler=lambda opt: LambdaLR(opt, lambda k: 0.99**k))
    batches = [{name: t.cuda() for name, t in make_batch(k, labels=True).items()} for k in range(4)]
    records = [runner.step(batches[k]) for k in range(3)]  # two warm-up steps, then the capture
    assert runner.graph_captured
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        records += [runner.step(batches[k % 4]) for k in range(3, steps)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for k, r in enumerate(records):
        want = ramp(k) * r["loss_hidden"] + r["loss_att"] + decay(k) * r["loss_logit"]
        assert r["loss"] == pytest.approx(want, rel=1e-5)
    assert optimizer.param_groups[1]["lr"].item() == pytest.approx(1e-3 * 0.99**steps)
