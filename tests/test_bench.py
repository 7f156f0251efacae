"""The benchmark suite: the CLI end to end on tiny sizes, the correctness gate, the memory meter."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fastkd.bench import harness
from fastkd.bench.cases import select_cases
from fastkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
ROW_FIELDS = {"op", "impl", "device", "dtype", "shape", "time_ms", "peak_mem_mb", "floor_ms", "floor_frac"}


def _run_cli(tmp_path: Path, device: str, capsys) -> dict:
    out = tmp_path / "bench"
    ops = "logit_kl,hidden_mse,attention_kl"
    args = ["bench", "--size", "tiny", "--ops", ops, "--impls", "fastkd", "--reps", "2", "--device", device]
    args += ["--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for column in ("op", "impl", "time ms", "peak MB", "speed-up", "% of floor"):
        assert column in printed
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| op |" in (out / "results.md").read_text()
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
)
def test_cli_writes_results(tmp_path, capsys, device):
    results = _run_cli(tmp_path, device, capsys)
    machine = results["machine"]
    assert machine["device"] == device and machine["torch"] == torch.__version__
    assert machine["copy_bandwidth_gbs"] > 0
    rows = results["rows"]
    assert {(r["op"], r["impl"]) for r in rows} == {
        (op, impl) for op in ("logit_kl", "hidden_mse", "attention_kl") for impl in ("torch", "fastkd")
    }
    for row in rows:
        assert ROW_FIELDS <= row.keys()
        assert row["device"] == device and row["time_ms"] > 0 and row["peak_mem_mb"] >= 0
        bandwidth = machine["copy_bandwidth_gbs"] * 1e9
        assert row["floor_ms"] == pytest.approx(row["bytes"] / bandwidth * 1e3)
        assert row["max_err"] <= row["tolerance"]


def test_floor_bytes_of_the_loss_cases():
    """One-pass minimum: read student and teacher, write the student's gradient."""
    cases = {c.op: c for c in select_cases("cpu", "tiny")}
    assert cases["logit_kl"].bytes == 3 * 64 * 1000 * 4
    assert cases["hidden_mse"].bytes == 3 * 3 * (2 * 8 * 64) * 4
    assert cases["attention_kl"].bytes == 3 * 2 * (2 * 2 * 16 * 16) * 4


def _wrong_loss(student, teacher, mask, temperature):
    """Forgets Hinton's T^2 factor."""
    log_q = torch.log_softmax(student / temperature, -1)
    log_p = torch.log_softmax(teacher / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (kl * mask).sum() / mask.sum()


class _DoubledGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def _wrong_gradient(student, teacher, mask, temperature):
    """Right loss, gradient twice too large."""
    import fastkd

    return fastkd.logit_kl(_DoubledGradient.apply(student), teacher, temperature=temperature, mask=mask)


def _with_wrong_fastkd(wrong):
    (case,) = select_cases("cpu", "tiny", ops=["logit_kl"], impls=["fastkd"])
    return replace(case, impls={**case.impls, "fastkd": wrong})


@pytest.mark.parametrize("wrong", [_wrong_loss, _wrong_gradient])
def test_a_wrong_implementation_fails_the_run(wrong):
    with pytest.raises(harness.BenchmarkError, match="'fastkd' differs from the reference"):
        harness.run_cases([_with_wrong_fastkd(wrong)], reps=1, progress=lambda message: None)


def test_keep_going_leaves_a_wrong_implementation_out_and_names_it():
    results = harness.run_cases([_with_wrong_fastkd(_wrong_loss)], reps=1, keep_going=True, progress=lambda m: None)
    assert [row["impl"] for row in results["rows"]] == ["torch"]
    (message,) = results["failures"]
    assert "'fastkd' differs from the reference" in message


def test_cli_exits_1_on_a_wrong_implementation(tmp_path, capsys, monkeypatch):
    import fastkd.bench.cases

    monkeypatch.setattr(fastkd.bench.cases, "select_cases", lambda *args: [_with_wrong_fastkd(_wrong_gradient)])
    assert main(["bench", "--size", "tiny", "--device", "cpu", "--out", str(tmp_path)]) == 1
    assert "FAILED" in capsys.readouterr().err
    assert not (tmp_path / "results.md").exists()


def test_the_reference_runs_in_float64_on_cpu():
    (case,) = select_cases("cpu", "tiny", ops=["hidden_mse"], impls=["torch"])
    seen = []

    def recording(students, teachers):
        seen.append(students[0].dtype)
        return case.impls["torch"](students, teachers)

    checks = harness.check_case(replace(case, impls={"torch": recording}), case.make_inputs())
    assert seen == [torch.float64, torch.float32]
    assert checks["torch"]["max_err"] < 1e-6


def test_max_error_flags_non_finite_values():
    ref = [torch.ones(3)]
    assert harness.max_error([torch.tensor([1.0, float("nan"), 1.0])], ref) == float("inf")
    assert harness.max_error([torch.tensor([1.0, 1.5, 1.0])], ref) == pytest.approx(0.5)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_cpu_peak_memory_counts_what_a_step_allocates():
    """40 MiB live at once (8 x 1 MiB blocks kept + a 32 MiB temporary), then all freed."""

    def step():
        kept = [torch.ones(1 << 18) for _ in range(8)]  # 8 x 1 MiB float32
        temporary = torch.ones(1 << 23)  # 32 MiB
        return len(kept) + temporary.numel()

    step()
    measured = min(harness.peak_memory_mb(step, "cpu") for _ in range(3))
    assert measured == pytest.approx(40.0, rel=0.05)


def test_distill_subcommand_passes_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("fastkd.distill")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "fastkd.distill", fake)
    assert main(["distill", "--steps", "3"]) == 7
    assert seen == [["--steps", "3"]]


def test_python_m_fastkd_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "fastkd", "bench", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--out" in done.stdout
