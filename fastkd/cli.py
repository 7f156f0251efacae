"""The ``fastkd`` command: ``fastkd bench`` (the benchmark suite), ``fastkd distill`` and ``fastkd teacher-topk``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _bench_parser(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmark every loss against eager PyTorch, torch.compile and Liger-Kernel",
        description="Check each implementation against eager PyTorch, then time forward + backward, "
        "measure peak memory and compare with the floor set by the measured bandwidth. Writes "
        "results.json, results.md and results.png into --out.",
    )
    bench.add_argument("--quick", action="store_true", help="smaller sizes and fewer runs (same as --size quick)")
    bench.add_argument(
        "--size", choices=("tiny", "quick", "default"), default=None, help="case sizes (default: default)"
    )
    bench.add_argument("--ops", default=None, help="comma-separated ops, e.g. logit_kl,hidden_mse (default: all)")
    bench.add_argument(
        "--impls",
        default=None,
        help="comma-separated implementations, e.g. fastkd,torch (default: all; the reference always runs)",
    )
    bench.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    bench.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed runs per implementation, at most (default: 10; 5 with --quick); on CPU, runs stop "
        "after 3 once a case's timing has taken 30 s (3 s with --quick)",
    )
    bench.add_argument(
        "--keep-going",
        action="store_true",
        help="on a failed check, leave the implementation out and go on; the exit status is still 1",
    )
    bench.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="output folder (default: ./bench-results)"
    )


def _names(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def bench(args: argparse.Namespace) -> int:
    import torch

    from fastkd.bench import report
    from fastkd.bench.cases import select_cases
    from fastkd.bench.harness import BenchmarkError, run_cases

    if args.quick and args.size not in (None, "quick"):
        raise SystemExit("fastkd bench: --quick and --size are exclusive")
    size = "quick" if args.quick else (args.size or "default")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastkd bench: --device cuda, but CUDA is not available")
    reps = args.reps if args.reps is not None else (10 if size == "default" else 5)
    budget_s = 30.0 if size == "default" else 3.0
    if reps < 1:
        raise SystemExit(f"fastkd bench: --reps must be >= 1, got {reps}")
    try:
        cases = select_cases(device, size, _names(args.ops), _names(args.impls))
    except ValueError as error:
        raise SystemExit(f"fastkd bench: {error}") from None
    if not cases:
        raise SystemExit(f"fastkd bench: no {size} cases for {device}")
    saved: list[dict] = []  # the results so far, written after every case

    def save(partial: dict) -> None:
        saved[:] = [partial]
        report.write_json(partial, args.out)

    try:
        results = run_cases(cases, reps=reps, budget_s=budget_s, keep_going=args.keep_going, on_case=save)
    except BenchmarkError as error:
        if saved:
            saved[0]["failures"].append(str(error))
            report.write_json(saved[0], args.out)
        print(f"fastkd bench: FAILED: {error}", file=sys.stderr)
        return 1
    print(report.text_table(results))
    for path in report.write(results, args.out):
        print(f"wrote {path}")
    for message in results["failures"]:
        print(f"fastkd bench: FAILED: {message}", file=sys.stderr)
    return 1 if results["failures"] else 0


def main(argv: list[str] | None = None) -> int:
    """Run ``fastkd <command>`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="fastkd", description="Fused knowledge-distillation losses for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    _bench_parser(sub)
    sub.add_parser("distill", help="distil a student from a teacher (see `fastkd distill --help`)", add_help=False)
    sub.add_parser(
        "teacher-topk", help="write a teacher's top-k log-probabilities for offline distillation "
        "(see `fastkd teacher-topk --help`)", add_help=False,
    )
    if argv[:1] == ["distill"]:
        from fastkd.distill import main as distill_main

        return distill_main(argv[1:])
    if argv[:1] == ["teacher-topk"]:
        from fastkd.offline import main as teacher_topk_main

        return teacher_topk_main(argv[1:])
    args = parser.parse_args(argv)
    return bench(args)
