"""The benchmark suite: the CLI end to end on tiny sizes, the correctness gate, the memory meter,
the ``attention_kl_qk`` and long-sequence runner cases at tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fastkd.bench import harness, sparse_cases
from fastkd.bench.cases import select_cases
from fastkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
ROW_FIELDS = {"op", "impl", "device", "dtype", "shape", "time_ms", "peak_mem_mb", "floor_ms", "floor_frac"}


def _run_cli(tmp_path: Path, device: str, capsys) -> dict:
    out = tmp_path / "bench"
    ops = "logit_kl,hidden_mse,attention_kl,attention_kl_qk"
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
    # attention_kl_qk's reference is the maps path; on CUDA its sdpa yardstick (its own reference) runs too
    qk_impls = ("maps", "fastkd") + (("sdpa",) if device == "cuda" else ())
    assert {(r["op"], r["impl"]) for r in rows} == {
        (op, impl) for op in ("logit_kl", "hidden_mse", "attention_kl") for impl in ("torch", "fastkd")
    } | {("attention_kl_qk", impl) for impl in qk_impls}
    for row in rows:
        assert ROW_FIELDS <= row.keys()
        assert row["device"] == device and row["time_ms"] > 0 and row["peak_mem_mb"] >= 0
        floor_ms = row["bytes"] / (machine["copy_bandwidth_gbs"] * 1e9) * 1e3
        if row["flops"]:
            floor_ms = max(floor_ms, row["flops"] / (machine["matmul_tflops"][row["dtype"]] * 1e12) * 1e3)
        assert row["floor_ms"] == pytest.approx(floor_ms)
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


_ALLOCATOR_POLICIES = """
import torch
from fastkd.runner.measure import fix_mmap_threshold, keep_freed_memory, proc_status_kb, reset_cpu_peak

def resident_mb_after_freeing():
    block = torch.ones(1 << 24)  # 64 MiB, every page touched
    del block
    return proc_status_kb("VmRSS") / 1024

fix_mmap_threshold()
before = proc_status_kb("VmRSS") / 1024
print(resident_mb_after_freeing() - before)
assert keep_freed_memory()
print(resident_mb_after_freeing() - before)
assert fix_mmap_threshold()
reset_cpu_peak()  # malloc_trim: what the kept heap holds goes back, as before a measurement
print(resident_mb_after_freeing() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_keep_freed_memory_keeps_a_freed_block_and_fix_mmap_threshold_returns_it():
    """In a process of its own (the policies are the process's): a freed 64 MiB block leaves the
    resident set under the 1 MiB mmap threshold, stays in it under keep_freed_memory (so that the
    next call reuses its pages), and leaves it again after fix_mmap_threshold and malloc_trim, what
    the harness does between timing and measuring memory."""
    done = subprocess.run([sys.executable, "-c", _ALLOCATOR_POLICIES], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    mapped, kept, mapped_again = (float(line) for line in done.stdout.split())
    assert mapped < 8 and mapped_again < 8
    assert kept > 56


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


# --------------------------------------------------------------------------------------------
# attention_kl_qk


def _qk_rows_by_shape(results: dict) -> dict[str, dict[str, dict]]:
    by_shape: dict[str, dict[str, dict]] = {}
    for row in results["rows"]:
        by_shape.setdefault(row["shape"], {})[row["impl"]] = row
    return by_shape


def test_attention_kl_qk_cases_check_time_and_measure_every_implementation():
    """Tiny sizes (GQA, d_s != d_t, causal, padding; and plain): fastkd, the maps path (the
    reference) and the eager formula, each checked against the maps path run in float64."""
    cases = select_cases("cpu", "tiny", ops=["attention_kl_qk"], impls=["fastkd", "torch"])
    assert [c.reference for c in cases] == ["maps", "maps"]
    assert list(select_cases("cpu", "tiny", ops=["attention_kl_qk"])[0].impls) == ["maps", "fastkd", "torch", "compile"]
    results = harness.run_cases(cases, reps=1, progress=lambda message: None)
    by_shape = _qk_rows_by_shape(results)
    assert sorted(by_shape) == sorted(c.shape for c in cases)
    assert any("causal padded" in shape and "H_kv=2/4" in shape for shape in by_shape)
    for rows in by_shape.values():
        assert set(rows) == {"maps", "fastkd", "torch"}
        for row in rows.values():
            assert row["op"] == "attention_kl_qk" and row["reference"] == "maps"
            assert row["max_err"] <= row["tolerance"] and row["tolerance"] <= 1e-4
            assert row["time_ms"] > 0 and row["peak_mem_mb"] >= 0 and row["flops"] > 0
        # the fastkd row's ratios are fastkd against the maps path
        fastkd_row, maps_row = rows["fastkd"], rows["maps"]
        assert fastkd_row["speedup_vs_ref"] == pytest.approx(maps_row["time_ms"] / fastkd_row["time_ms"])
        assert fastkd_row["config"].startswith("fastkd.attention_kl_qk")


def test_attention_kl_qk_baselines_are_the_formula():
    """maps and torch against the float64 formula of tests/reference.py (explicit scores, softmax
    and KL), value and gradients, on the tiny shapes."""
    from reference import attention_qk_rows, reduce

    from fastkd.bench.cases import _QK_TINY, _qk_inputs, maps_attention_kl_qk, torch_attention_kl_qk

    for shape in _QK_TINY:
        inputs = harness._cast(_qk_inputs(shape, torch.float32, "cpu"), torch.float64)
        q_s, k_s, q_t, k_t = (inputs[name] for name in ("student_q", "student_k", "teacher_q", "teacher_k"))
        rows = attention_qk_rows(q_s, k_s, q_t, k_t, q_s.shape[-1] ** -0.5, q_t.shape[-1] ** -0.5,
                                 inputs["mask"], shape.causal)
        want = reduce(rows, inputs["mask"], "mean", attention=True)
        want_grads = torch.autograd.grad(want, (q_s, k_s))
        for fn in (maps_attention_kl_qk, torch_attention_kl_qk):
            got = fn(**inputs)
            assert got.item() == pytest.approx(want.item(), rel=1e-10)
            for g, w in zip(torch.autograd.grad(got, (q_s, k_s)), want_grads):
                torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_attention_kl_qk_sizes_and_floors():
    cpu = {size: select_cases("cpu", size, ops=["attention_kl_qk"]) for size in ("quick", "default")}
    (default,) = cpu["default"]
    assert default.shape == "B=2 H=8 L=2048 d=64" and default.dtype == torch.float32
    assert cpu["quick"][0].shape == "B=2 H=8 L=256 d=64"
    n = 2 * 8 * 2048**2  # score elements per model
    assert default.flops == 8 * n * 64  # two score GEMMs, dq, dk
    assert default.bytes == 6 * (2 * 8 * 2048 * 64) * 4  # read q_s, k_s, q_t, k_t; write dq_s, dk_s
    cuda = select_cases("cuda", "default", ops=["attention_kl_qk"])  # listing needs no GPU
    assert [(c.shape, c.reference, list(c.impls)) for c in cuda] == [
        ("B=4 H=32 L=4096 d=128 causal", "maps", ["maps", "fastkd", "torch", "compile"]),
        ("B=4 H=32 L=4096 d=128 causal", "sdpa", ["sdpa"]),
    ]
    assert cuda[0].dtype == torch.bfloat16 and cuda[0].flops == 8 * (4 * 32 * 4096 * 4097 // 2) * 128
    assert "YARDSTICK" in cuda[1].configs["sdpa"]


def test_sdpa_yardstick_runs():
    """The CUDA-only yardstick, run on CPU: SDPA forward + backward to q and k, GQA included."""
    from fastkd.bench.cases import _QK_TINY, sdpa_case

    for shape in _QK_TINY:
        case = sdpa_case(shape, torch.float32, "cpu", "tiny")
        assert harness.check_case(case, case.make_inputs())["sdpa"]["max_err"] < 1e-5


# --------------------------------------------------------------------------------------------
# The runner at long lengths


def test_long_runner_cases_at_tiny_size():
    """att alone against hidden alone (each checked as its loss over the plain way's), and the three
    configurations, fastkd with attention='qk' against the plain way."""
    cases = select_cases("cpu", "tiny", ops=["runner_stage", "runner_long"])
    assert [c.op for c in cases] == ["runner_stage"] + ["runner_long"] * 3
    for case in cases[1:]:
        assert case.impls["fastkd"].attention == "qk"  # passed to StageRunner (the plain way has no such option)
        assert "attention='qk'" in case.configs["fastkd"]
    results = harness.run_cases(cases, reps=1, progress=lambda message: None)
    impls = {(row["op"], row["shape"].split(":")[0], row["impl"]) for row in results["rows"]}
    compared = "att alone vs hidden alone"
    presets = ("one-stage", "two-stage", "three-stage")
    assert impls == {("runner_stage", compared, "hidden"), ("runner_stage", compared, "att")} | {
        ("runner_long", preset, way) for preset in presets for way in ("plain", "fastkd")
    }
    for row in results["rows"]:
        assert row["max_err"] <= row["tolerance"] and row["time_ms"] > 0
    att = next(row for row in results["rows"] if row["impl"] == "att")
    assert att["reference"] == "hidden"  # speed-up = hidden ms / att ms, peak vs ref = att MB / hidden MB
    stage = cases[0]
    ratios = stage.impls["att"](**stage.make_inputs())
    assert torch.allclose(ratios, torch.ones_like(ratios), atol=1e-4)  # fastkd's att loss over the plain way's


def test_the_stage_case_fails_a_loss_that_differs_from_the_plain_way():
    """The check of runner_stage is real: fastkd's att stage over the plain way's *hidden* loss."""
    from fastkd.bench.runner_cases import LONG_SIZES, ConfigurationStep, PlainRatio

    (case,) = select_cases("cpu", "tiny", ops=["runner_stage"])
    dims = LONG_SIZES["cpu"]["tiny"]
    wrong = PlainRatio(ConfigurationStep("fastkd", (("att",),), dims, "cpu", "qk"),
                       ConfigurationStep("plain", (("hidden",),), dims, "cpu"))
    with pytest.raises(harness.BenchmarkError, match="'att' differs from the reference 'hidden'"):
        harness.check_case(replace(case, impls={**case.impls, "att": wrong}), case.make_inputs())


def test_the_runner_at_4096_is_opt_in():
    default = select_cases("cpu", "default")
    assert "runner_4096" not in {c.op for c in default}
    lengths = {c.op: c.shape.rsplit("x", 1)[1] for c in default if c.op in ("runner_stage", "runner_long")}
    assert lengths == {"runner_stage": "2048", "runner_long": "2048"}
    opted = select_cases("cpu", "default", ops=["runner_4096"])
    assert [c.shape.split(":")[0] for c in opted] == ["one-stage", "two-stage", "three-stage"]
    assert all(c.opt_in and c.shape.endswith("2x4096") and "teacher 4x256, student 2x128" in c.shape for c in opted)


def test_cpu_rounds_rotate_the_order_of_the_steps():
    """Each step follows each other one equally often, so that what one leaves behind (memory the
    system takes back, caches) is not always paid by the same next step."""
    from fastkd.bench.harness import time_cpu

    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = time_cpu(steps, reps=3)
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_sparse_cases_at_tiny_size():
    """The offline-teacher cases run and pass the check against DistillKit's eager formula (and the
    dense fused-linear case against its materialised formula); their floors count the student's
    GEMMs only (the dense case adds the teacher's)."""
    ops = ["fused_linear_sparse_kl", "fused_linear_kl_dense", "sparse_logit_kl"]
    cases = select_cases("cpu", "tiny", ops=ops, impls=["fastkd", "torch"])
    assert [c.op for c in cases] == ops
    (n, d, v, k), _ = sparse_cases.SIZES["cpu"]["tiny"]
    assert [c.flops for c in cases] == [6 * n * d * v, 8 * n * d * v, 0]
    results = harness.run_cases(cases, reps=1, progress=lambda message: None)
    assert {(row["op"], row["impl"]) for row in results["rows"]} == {(op, i) for op in ops for i in ("torch", "fastkd")}
    for row in results["rows"]:
        assert row["max_err"] <= row["tolerance"] and row["time_ms"] > 0


def test_runner_offline_case_at_tiny_size():
    """A logit stage from the stored top-k against the live teacher's, each checked as its loss over
    its own eager formula (DistillKit's for the offline one)."""
    (case,) = select_cases("cpu", "tiny", ops=["runner_offline"])
    assert case.reference == "live" and list(case.impls) == ["live", "offline"]
    results = harness.run_cases([case], reps=1, progress=lambda message: None)
    assert {row["impl"] for row in results["rows"]} == {"live", "offline"}
    for row in results["rows"]:
        assert row["max_err"] <= row["tolerance"] and row["time_ms"] > 0
    ratios = case.impls["offline"](**case.make_inputs())
    assert torch.allclose(ratios, torch.ones_like(ratios), atol=1e-4)
