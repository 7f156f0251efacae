"""Conventions of the source tree itself: the design document is the repository's own, constants are
defined once, the kernels keep one notation, and the Triton pair tables name their fields once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("fastkd", "kernels") for p in (REPO / d).rglob("*") if p.suffix in (".py", ".cpp", ".h")]
TEXTS = SOURCES + [p for p in REPO.glob("*.md")] + list((REPO / "docs").rglob("*.md")) + \
    list((REPO / "benchmarks").glob("*.md")) + [p for p in (REPO / "tests").glob("*.py") if p.name != Path(__file__).name]


def test_every_reference_points_inside_the_repository():
    assert (REPO / "docs" / "design.md").is_file()
    outside = re.compile(r"\.\./shared|(^|[^/a-z_])" + "DESIGN" + r"\.md")
    offenders = [str(p.relative_to(REPO)) for p in TEXTS if outside.search(p.read_text())]
    assert not offenders, f"files pointing outside the repository: {offenders}"


def test_tiny_is_defined_once():
    """float32's smallest normal number: fastkd._constants in Python, numeric_limits in C++."""
    definition = re.compile(r"=\s*(torch\.finfo\(torch\.float32\)\.tiny|1\.17549\d*e-38)|constexpr\(1\.17549")
    places = [str(p.relative_to(REPO)) for p in SOURCES if definition.search(p.read_text())]
    assert places == ["fastkd/_constants.py"]


@pytest.mark.parametrize("path", ["kernels/rows.h", "kernels/logit.cpp", "kernels/attention.cpp", "kernels/hidden.cpp",
                                  "fastkd/backends/triton.py"])
def test_kernels_keep_one_notation(path):
    """Student first, `_s`/`_t` names: no teacher-as-`a` (lse_a, m_a, kept_a), and in Triton no
    `m_` prefix for anything but boolean masks (the running maxima are max_s, max_t)."""
    text = (REPO / path).read_text()
    assert not re.search(r"\b(lse_[ab]|m_[ab]|z_[ab]|kept_[ab]|low_[ab]|lowest_[ab])\b", text)
    assert not re.search(r"\bm_[st]\b", text)


def test_pair_tables_name_their_fields_once():
    triton_backend = pytest.importorskip("fastkd.backends.triton")
    table = triton_backend.PairTable("p_s", "n_rows", "D")
    assert (table.p_s, table.n_rows, table.D, table.width) == (0, 1, 2, 3)
    assert table.pack(D=7, p_s=5, n_rows=6) == (5, 6, 7)
    with pytest.raises(KeyError, match="table fields"):
        table.pack(p_s=5, n_rows=6)
    for fields in (triton_backend.HIDDEN_TABLE, triton_backend.ATTENTION_TABLE):
        assert fields.width == len(set(fields.fields))
