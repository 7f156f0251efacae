"""``fastkd.eager``, the one copy of the eager losses that the benchmarks and the plain way use,
against the float64 formulas of ``reference.reference_loss``."""

from __future__ import annotations

import pytest
import torch

from fastkd import eager
from fastkd.bench.cases import select_cases
from reference import reference_loss


def rows_mask(*shape):
    mask = torch.rand(shape) < 0.7
    mask.view(-1)[0] = True
    return mask


def probs(*shape):
    return torch.softmax(torch.randn(shape, dtype=torch.float64) * 2, -1)


@pytest.mark.parametrize("mask_kind", ["bool", "int"])
def test_eager_losses_match_float64_formulas(mask_kind):
    convert = (lambda m: m) if mask_kind == "bool" else (lambda m: m.long())
    s, t = torch.randn(6, 11, dtype=torch.float64) * 3, torch.randn(6, 11, dtype=torch.float64) * 3
    mask = rows_mask(6)
    want = reference_loss("logit_kl", s, t, mask=mask, temperature=2.0)
    assert eager.logit_kl(s, t, convert(mask), 2.0).item() == pytest.approx(want.item(), rel=1e-12)

    students = [torch.randn(2, 5, 8, dtype=torch.float64) for _ in range(3)]
    teachers = [torch.randn(2, 5, 8, dtype=torch.float64) for _ in range(3)]
    mask = rows_mask(2, 5)
    want = reference_loss("hidden_mse", students, teachers, mask=mask)
    assert eager.hidden_mse(students, teachers, mask=convert(mask)).item() == pytest.approx(want.item(), rel=1e-12)
    want = reference_loss("hidden_mse", students, teachers)
    assert eager.hidden_mse(students, teachers).item() == pytest.approx(want.item(), rel=1e-12)

    students = [probs(2, 3, 5, 5) for _ in range(2)]
    teachers = [probs(2, 3, 5, 5) for _ in range(2)]
    want = reference_loss("attention_kl", students, teachers, mask=mask, kind="probs")
    assert eager.attention_kl(students, teachers, convert(mask)).item() == pytest.approx(want.item(), rel=1e-12)


def test_bench_baselines_are_the_eager_losses():
    torch_impls = {case.op: case.impls["torch"] for case in select_cases("cpu", "tiny", ops=["logit_kl", "hidden_mse",
                                                                                              "attention_kl"])}
    assert torch_impls == {"logit_kl": eager.logit_kl, "hidden_mse": eager.hidden_mse,
                           "attention_kl": eager.attention_kl}
