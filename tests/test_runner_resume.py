"""Killed runs resume: ``fastkd distill --checkpoint-dir`` killed with SIGKILL in the middle of a
stage or while it writes a checkpoint, then started again, ends with the weights of the run that
was never interrupted; checkpoint writes are durable, and a failed one leaves the previous
checkpoint as it was."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from fastkd.distill import main  # noqa: E402
from fastkd.runner import Schedule  # noqa: E402
from test_runner import V, TinyAdapter, TinyLM, make_batch, make_runner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8  # two-stage, 4 steps per stage; checkpoints after steps 2, 4, 6 and 8

# Kill the run when it is about to run global step KILL_AT (the middle of stage I).
KILL_IN_STAGE = """
import os, signal, sys
from fastkd.distill import main
from fastkd.runner import StageRunner

step = StageRunner.step

def killing_step(self, batch):
    if self.step_index == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, batch)

StageRunner.step = killing_step
main(sys.argv[1:])
"""

# Kill the run in the middle of writing its KILL_AT-th checkpoint: half of the file is written.
KILL_IN_WRITE = """
import io, os, signal, sys
import torch
from fastkd.distill import main

save, writes = torch.save, []

def half_save(obj, f, *args, **kwargs):
    writes.append(f)
    if len(writes) == int(os.environ["KILL_AT"]):
        buffer = io.BytesIO()
        save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f, *args, **kwargs)

torch.save = half_save
main(sys.argv[1:])
"""


@pytest.fixture
def distill_args(tmp_path):
    """``argv(name)``: the arguments of one run whose checkpoints, log and saved student are under
    ``tmp_path / name``: a tiny Llama pair (the student with attention dropout, so that the RNG
    state matters), two-stage, 4 steps per stage, a checkpoint every 2 steps."""
    for role, (layers, width, dropout) in {"teacher": (2, 32, 0.0), "student": (1, 16, 0.1)}.items():
        config = LlamaConfig(vocab_size=V, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=4, attention_dropout=dropout)
        config.to_json_file(tmp_path / f"{role}.json")
    (tmp_path / "data.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)

    def argv(name):
        run = tmp_path / name
        return [
            "--teacher", str(tmp_path / "teacher.json"), "--student", str(tmp_path / "student.json"),
            "--preset", "two-stage", "--steps", "4", "--batch-size", "2", "--seq-len", "8",
            "--data", str(tmp_path / "data.txt"), "--no-plain", "--quiet",
            "--checkpoint-dir", str(run / "ck"), "--checkpoint-every", "2",
            "--save", str(run / "out"), "--log", str(tmp_path / f"{name}.jsonl"),
        ]

    return argv


def killed(driver, argv, kill_at):
    env = {**os.environ, "KILL_AT": str(kill_at), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", driver, *argv], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr


def log_of(argv):
    path = Path(argv[argv.index("--log") + 1])
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(record):
    return {k: v for k, v in record.items() if k.startswith("loss")}


def assert_same_student(argv, reference_argv):
    out, reference = (Path(a[a.index("--save") + 1]) / "two-stage" for a in (argv, reference_argv))
    got, want = (LlamaForCausalLM.from_pretrained(d).state_dict() for d in (out, reference))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    got, want = (torch.load(d / "projections.pt") for d in (out, reference))
    assert all(torch.equal(got[name], want[name]) for name in want)


@pytest.mark.parametrize("driver, kill_at, resumed_at", [(KILL_IN_STAGE, 3, 2), (KILL_IN_WRITE, 3, 4)],
                         ids=["in-stage", "in-checkpoint-write"])
def test_killed_distill_resumes_bit_for_bit(distill_args, capsys, driver, kill_at, resumed_at):
    whole = distill_args("whole")
    assert main(whole) == 0
    full = log_of(whole)
    assert [r["step"] for r in full] == list(range(STEPS))

    run = distill_args("killed")
    killed(driver, run, kill_at)
    checkpoint = Path(run[run.index("--checkpoint-dir") + 1]) / "two-stage" / "latest.pt"
    assert torch.load(checkpoint, weights_only=False)["step"] == resumed_at
    if driver is KILL_IN_WRITE:
        assert checkpoint.with_name("latest.pt.tmp").exists()  # the half-written file, never renamed
    before_kill = log_of(run)
    assert [losses(r) for r in before_kill] == [losses(r) for r in full[: len(before_kill)]]

    capsys.readouterr()
    assert main(run) == 0
    assert f"resuming two-stage from {checkpoint.parent} at step {resumed_at}" in capsys.readouterr().out
    resumed = log_of(run)[len(before_kill):]
    assert [r["step"] for r in resumed] == list(range(resumed_at, STEPS))
    assert [losses(r) for r in resumed] == [losses(r) for r in full[resumed_at:]]
    assert_same_student(run, whole)


def test_finished_checkpoint_runs_no_step(distill_args, capsys):
    run = distill_args("twice")
    assert main(run) == 0
    capsys.readouterr()
    assert main(run) == 0
    out = capsys.readouterr().out
    assert f"at step {STEPS}" in out
    rows = [line.split()[:3] for line in out.splitlines() if line.startswith("two-stage")]
    assert rows == [["two-stage", "fastkd", "0"]]


# ------------------------------------------------------------------------------------------
# The checkpoint write.


def tiny_runner(tmp_path, steps=4):
    torch.manual_seed(0)
    student, teacher = TinyAdapter(TinyLM(1, 8)), TinyAdapter(TinyLM(2, 16))
    return make_runner(student, teacher, Schedule.preset("one-stage", steps=[steps]), checkpoint_dir=tmp_path,
                       checkpoint_every=1)


def test_checkpoint_write_is_durable(tmp_path, monkeypatch):
    runner = tiny_runner(tmp_path)
    events = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recorded_replace(src, dst):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    runner.step(make_batch())
    path = os.path.realpath(tmp_path / "latest.pt")
    events = [(event, *map(os.path.realpath, paths)) for event, *paths in events]
    assert events == [("fsync", f"{path}.tmp"), ("replace", f"{path}.tmp", path), ("fsync", os.path.dirname(path))]


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    runner = tiny_runner(tmp_path)
    runner.step(make_batch())
    path = tmp_path / "latest.pt"
    previous = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="could not write the checkpoint .*No space left on device.*unchanged") as info:
        runner.step(make_batch(1))
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == previous
    assert os.listdir(tmp_path) == ["latest.pt"]
    monkeypatch.undo()
    runner.load(path)
    assert runner.step_index == 1
