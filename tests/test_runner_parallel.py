"""The stage runner on 2 CPU processes (gloo): a DDP- and an FSDP2-wrapped student, each rank with
its own batches; every preset's steps keep the ranks' parameters equal, FSDP2 trains exactly as
DDP does, and a checkpoint saved on 2 ranks resumes to the uninterrupted run."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

pytest.importorskip("transformers")
pytest.importorskip("torch.distributed.fsdp")
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from fastkd.runner import Schedule, StageRunner  # noqa: E402
from fastkd.runner.parallel import shard_model  # noqa: E402
from ranks import run_ranks  # noqa: E402
from test_runner import llama, make_batch  # noqa: E402

PRESETS = {"one-stage": [2], "two-stage": [1, 1], "three-stage": [1, 1, 1]}
LR = 0.05


def _models():
    torch.manual_seed(0)
    return llama(4, 32), llama(2, 16)  # teacher, student (widths differ: the runner adds projections)


def _full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()


def _parameters(runner):
    """The student's and the projections' parameters, whole (gathered from FSDP2 shards)."""
    named = list(runner.student.module.named_parameters()) + list(runner.projections.named_parameters("p"))
    return {name: _full(p).clone() for name, p in named}


def _assert_same_on_ranks(params, what):
    for name, value in params.items():
        reference = value.clone()
        dist.broadcast(reference, 0)
        assert torch.equal(value, reference), f"{what}: {name} differs between the ranks"


def _runner(kind, preset, mesh, checkpoint_dir=None):
    teacher, student = _models()
    if kind == "ddp":
        wrapped = DistributedDataParallel(student, find_unused_parameters=True)
        params = wrapped.parameters()
    else:
        wrapped = shard_model(student, mesh)
        shard_model(teacher, mesh)
        params = wrapped.parameters()
    optimizer = torch.optim.SGD(params, lr=LR)
    return StageRunner(wrapped, teacher, Schedule.preset(preset, PRESETS[preset]), optimizer, quiet=True,
                       checkpoint_dir=checkpoint_dir)


def _batch(rank, step):
    return make_batch(seed=10 * step + rank, labels=True)


def _presets(rank, world, tmp):
    mesh = init_device_mesh("cpu", (world,))
    for preset, steps in PRESETS.items():
        trained = {}
        for kind in ("ddp", "fsdp"):
            runner = _runner(kind, preset, mesh)
            assert runner.parallel == kind and len(runner.projections) > 0
            before = _parameters(runner)
            for step in range(sum(steps)):
                metrics = runner.step(_batch(rank, step))
                assert torch.isfinite(torch.tensor(metrics["loss"])), f"{kind} {preset}: step {step}"
                _assert_same_on_ranks(_parameters(runner), f"{kind} {preset}, after step {step}")
            trained[kind] = _parameters(runner)
            moved = [n for n in before if not torch.equal(before[n], trained[kind][n])]
            assert any(n.startswith("p") for n in moved), f"{kind} {preset}: the projections did not train"
        # both average the ranks' gradients: the same SGD steps
        for name, value in trained["ddp"].items():
            torch.testing.assert_close(trained["fsdp"][name], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{preset}: FSDP2 and DDP differ in {name}: {m}")


def _resume(rank, world, tmp):
    mesh = init_device_mesh("cpu", (world,))
    for kind in ("ddp", "fsdp"):
        steps = sum(PRESETS["three-stage"])
        whole = _runner(kind, "three-stage", mesh)
        for step in range(steps):
            whole.step(_batch(rank, step))
        directory = f"{tmp}/{kind}"
        stopped = _runner(kind, "three-stage", mesh, checkpoint_dir=directory)
        stopped.step(_batch(rank, 0))  # the end of stage 1: a checkpoint
        saved = _parameters(stopped)  # gathered on every rank
        if kind == "fsdp" and rank == 0:
            torch.save(saved, f"{tmp}/fsdp_saved.pt")
        resumed = _runner(kind, "three-stage", mesh)
        resumed.load(f"{directory}/latest.{'dcp' if kind == 'fsdp' else 'pt'}")
        assert resumed.step_index == 1 and resumed.stage.name == whole.schedule[1].name
        for step in range(1, steps):
            resumed.step(_batch(rank, step))
        want = _parameters(whole)
        for name, value in _parameters(resumed).items():
            assert torch.equal(value, want[name]), f"{kind}: the resumed run differs in {name}"


def _refused(rank, world, tmp):
    mesh = init_device_mesh("cpu", (world,))
    from torch.distributed.fsdp import fully_shard

    teacher, student = _models()
    for layer in student.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(student, mesh=mesh)
    optimizer = torch.optim.SGD(student.parameters(), lr=LR)
    with pytest.raises(ValueError, match="student: an FSDP2 model whose base model"):
        StageRunner(student, teacher, Schedule.preset("one-stage", [1]), optimizer)
    wrapped = DistributedDataParallel(_models()[1])
    with pytest.raises(ValueError, match="cuda_graphs: True needs a student on one device"):
        StageRunner(wrapped, teacher, Schedule.preset("one-stage", [1]), optimizer, cuda_graphs=True)


def _all(rank, world, tmp):
    for case in (_refused, _presets, _resume):
        case(rank, world, tmp)


def _resume_on_one_rank(rank, world, tmp):
    """The 2 ranks' sharded checkpoint, loaded on 1 (DCP reshards it): the saved step and weights."""
    runner = _runner("fsdp", "three-stage", init_device_mesh("cpu", (world,)))
    runner.load(f"{tmp}/fsdp/latest.dcp")
    assert runner.step_index == 1
    want = torch.load(f"{tmp}/fsdp_saved.pt")
    for name, value in _parameters(runner).items():
        assert torch.equal(value, want[name]), f"{name} differs after loading on one rank"
    runner.step(_batch(0, 1))


def test_runner_on_two_ranks(tmp_path):
    run_ranks(_all, str(tmp_path), timeout=400)
    run_ranks(_resume_on_one_rank, str(tmp_path), world=1, timeout=120)


def _torchrun(args, timeout=240):
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_distill_under_torchrun(tmp_path):
    """``fastkd distill`` under torchrun, as it is: DDP on 2 ranks, rank 0's table, a checkpoint."""
    out = _torchrun(["-m", "fastkd", "distill", "--preset", "two-stage", "--steps", "2", "--seq-len", "16",
                     "--batch-size", "2", "--quiet", "--checkpoint-dir", str(tmp_path)])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("configuration") == 1, out.stdout  # one table: rank 0's
    assert "x 2 ranks" in out.stdout
    state = torch.load(tmp_path / "two-stage" / "latest.pt", weights_only=False)
    assert state["step"] == 4 and len(state["rng"]) == 2


FAILING_RANK = """
import sys, torch
from torch.nn.parallel import DistributedDataParallel
sys.path.insert(0, {tests!r})
from fastkd.runner import Schedule, StageRunner
from fastkd.runner.parallel import init_from_environment
from test_runner import llama, make_batch
rank, world = init_from_environment("cpu", timeout_s=30)
torch.manual_seed(0)
teacher, student = llama(4, 32), llama(2, 16)
student = DistributedDataParallel(student, find_unused_parameters=True)
runner = StageRunner(student, teacher, Schedule.preset("one-stage", [50]), torch.optim.SGD(student.parameters(), lr=0.1),
                     quiet=True)
for step in range(50):
    if rank == 1 and step == 2:
        raise RuntimeError("rank 1 stops here")
    runner.step(make_batch(seed=step + rank)).items()
"""


def test_failing_rank_stops_the_others(tmp_path):
    """A rank that raises stops the run with its error (torchrun stops the other rank, whose
    collectives would fail on their timeout anyway), in bounded time."""
    import os
    import time

    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK.format(tests=os.path.dirname(__file__)))
    began = time.monotonic()
    out = _torchrun([str(script)], timeout=120)
    assert out.returncode != 0
    assert "rank 1 stops here" in out.stderr + out.stdout
    assert time.monotonic() - began < 120
