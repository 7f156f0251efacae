"""Present benchmark results: a text table, ``results.json``, ``results.md`` and a PNG chart."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

COLUMNS = ("op", "shape", "dtype", "impl", "time ms", "peak MB", "speed-up", "peak vs ref", "% of floor", "1st call ms")


def _cells(row: dict[str, Any]) -> list[str]:
    mem = row["mem_vs_ref"]
    return [
        row["op"],
        row["shape"],
        row["dtype"],
        row["impl"],
        f"{row['time_ms']:.3f}",
        f"{row['peak_mem_mb']:.1f}",
        f"{row['speedup_vs_ref']:.2f}x",
        "n/a" if mem is None else f"{mem:.2f}x",
        f"{100 * row['floor_frac']:.1f}",
        f"{row['first_call_ms']:.0f}",
    ]


def _machine_line(machine: dict[str, Any]) -> str:
    where = machine["gpu"] if machine["device"] == "cuda" else f"{machine['cpu']} ({machine['cpu_threads']} threads)"
    return (
        f"{machine['device']}: {where}; torch {machine['torch']}, triton {machine['triton']}, "
        f"Python {machine['python']}, fastkd backend {machine['fastkd_backend']}; "
        f"copy bandwidth {machine['copy_bandwidth_gbs']:.1f} GB/s; {machine['date']}"
    )


def text_table(results: dict[str, Any]) -> str:
    """The rows as an aligned text table, the machine on the first line."""
    body = [list(COLUMNS)] + [_cells(row) for row in results["rows"]]
    widths = [max(len(line[i]) for line in body) for i in range(len(COLUMNS))]
    # text columns left-aligned, numbers right-aligned
    lines = [
        "  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in body
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([_machine_line(results["machine"]), *lines])


def _configs(results: dict[str, Any]) -> list[str]:
    seen: dict[tuple[str, str], str] = {}
    for row in results["rows"]:
        if row["config"]:
            seen.setdefault((row["op"], row["impl"]), row["config"])
    return [f"- `{op}` / `{impl}`: {config}" for (op, impl), config in seen.items()]


def markdown(results: dict[str, Any]) -> str:
    """``results.md``: the machine, the table and what each implementation runs."""
    head = "| " + " | ".join(COLUMNS) + " |"
    rule = "|" + "|".join("---" if i < 4 else "---:" for i in range(len(COLUMNS))) + "|"
    rows = ["| " + " | ".join(_cells(row)) + " |" for row in results["rows"]]
    notes = [
        "",
        "One call is forward + backward (for `runner`, a training step per stage): median time, peak",
        "memory above the inputs. Speed-up and peak are relative to the case's reference (`torch`,",
        "eager PyTorch, for the losses; `plain` for `runner`), against which every row was checked",
        "first. `% of floor`: the time the op's minimum bytes take at the measured copy bandwidth (or",
        "its FLOPs at the measured matmul rate, if longer) over the time taken (`benchmarks/NOTES.md`).",
        "`1st call ms`: the first call (for `compile`, the compilation).",
        "",
        "Implementations:",
        "",
        *_configs(results),
    ]
    if results.get("failures"):
        notes += ["", "**Failed** (left out of the table):", "", *[f"- {message}" for message in results["failures"]]]
    title = ["# fastkd benchmark", "", _machine_line(results["machine"]), ""]
    return "\n".join([*title, head, rule, *rows, *notes]) + "\n"


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def chart(results: dict[str, Any], path: Path) -> None:
    """A PNG with two panels: speed-up and peak memory, each relative to the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = [row for row in results["rows"] if row["impl"] != row["reference"]]
    labels = [f"{row['op']} {_shorten(row['shape'], 28)} {row['dtype']}: {row['impl']}" for row in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 1.8), sharey=True)
    panels = (
        ("speedup_vs_ref", "speed-up vs the reference (higher is better)"),
        ("mem_vs_ref", "peak memory vs the reference (lower is better)"),
    )
    for ax, (key, title) in zip(axes, panels):
        values = [row[key] if row[key] else float("nan") for row in rows]  # no bar where unmeasurable
        colors = ["tab:green" if row["impl"] == "fastkd" else "tab:gray" for row in rows]
        ax.barh(range(len(rows)), values, color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        for y, value in enumerate(values):
            if not math.isnan(value):
                ax.text(value, y, f" {value:.2f}x", va="center", fontsize=8)
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(_machine_line(results["machine"]).split(";")[0], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(results: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def write(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``results.json``, ``results.md`` and (with matplotlib) ``results.png`` into ``out_dir``."""
    paths = [write_json(results, out_dir), out_dir / "results.md"]
    paths[1].write_text(markdown(results))
    if importlib.util.find_spec("matplotlib") is not None and results["rows"]:
        paths.append(out_dir / "results.png")
        chart(results, paths[2])
    return paths
