"""``torch.compile(fullgraph=True)`` of a function that calls a loss: it compiles without a graph
break, forward and backward, and gives what eager gives (and the float64 formula).

Inductor compiles the torch backend and the default (``auto``) one on CPU, and the Triton one on
CUDA; the other CPU backends go through ``aot_eager``, which traces the same graph with the ops' fake implementations and autograd
but skips code generation.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compile_cases
from reference import assert_close, run_and_compare

import fastkd


def loss_case(name: str, device):
    """``(function, reference name, students, teachers, mask, options)``; students are leaves."""
    def r(*shape, softmax=False):
        x = torch.randn(shape) * 2
        return (torch.softmax(x, -1) if softmax else x).to(device)

    if name == "hidden_mse":
        return fastkd.hidden_mse, name, r(3, 5, 300), r(3, 5, 300), r(3, 5) > 0, {}
    if name == "hidden_pairs":
        return fastkd.hidden_mse, "hidden_mse", [r(3, 5, 300), r(3, 5, 7)], [r(3, 5, 300), r(3, 5, 7)], \
            r(3, 5) > 0, {}
    if name == "logit_kl":
        return fastkd.logit_kl, name, r(3, 5, 1000), r(3, 5, 1000), r(3, 5) > 0, {"temperature": 2.0}
    if name == "logit_jsd_labels":
        labels = torch.randint(0, 1000, (3, 5))
        labels[0, :2] = -100
        options = {"temperature": 2.0, "divergence": "jsd", "beta": 0.3, "labels": labels.to(device), "ce_weight": 0.5}
        return fastkd.logit_kl, "logit_kl", r(3, 5, 1000), r(3, 5, 1000), r(3, 5) > 0, options
    if name == "attention_probs":
        return fastkd.attention_kl, "attention_kl", r(2, 3, 5, 7, softmax=True), \
            r(2, 3, 5, 7, softmax=True), r(2, 5) > 0, {"kind": "probs"}
    if name == "attention_scores":
        return fastkd.attention_kl, "attention_kl", r(2, 3, 5, 5), r(2, 3, 5, 5), r(2, 5) > 0, \
            {"kind": "scores"}
    # attention_pairs
    return fastkd.attention_kl, "attention_kl", [r(2, 3, 5, 5), r(2, 1, 5, 5)], \
        [r(2, 3, 5, 5), r(2, 1, 5, 5)], r(2, 5) > 0, {"kind": "scores"}


NAMES = ["hidden_mse", "hidden_pairs", "logit_kl", "logit_jsd_labels", "attention_probs", "attention_scores",
         "attention_pairs"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", compile_cases(auto=True))
def test_compile_matches_eager(case, name):
    device, backend, compiler = case
    fastkd.set_backend(backend)
    try:
        fn, ref, s, t, mask, options = loss_case(name, device)
        s_list = s if isinstance(s, list) else [s]
        for x in s_list:
            x.requires_grad_()

        def step(students, teachers, mask=None, reduction="mean", **options):
            return fn(students, teachers, mask=mask, reduction=reduction, **options)

        for reduction in ("mean", "none"):
            compiled = torch.compile(step, fullgraph=True, backend=compiler)
            got = compiled(s, t, mask=mask, reduction=reduction, **options)
            want = step(s, t, mask=mask, reduction=reduction, **options)
            got_list = got if isinstance(got, list) else [got]
            want_list = want if isinstance(want, list) else [want]
            upstream = [torch.randn(w.shape).to(device) for w in want_list]
            got_grads = torch.autograd.grad(got_list, s_list, upstream)
            want_grads = torch.autograd.grad(want_list, s_list, upstream)
            for a, b in zip(got_list + list(got_grads), want_list + list(want_grads)):
                assert_close(a.detach(), b.detach(), 1e-6, f"{reduction}: compiled vs eager")
            run_and_compare(compiled, ref, s, t, mask=mask, reduction=reduction, **options)
    finally:
        fastkd.set_backend("auto")
        torch._dynamo.reset()



@pytest.mark.parametrize("case", compile_cases())
def test_compiled_labels_out_of_range_assert_on_the_device(case):
    """Under torch.compile the labels' range is checked by a device assert (no host sync): a label
    of V fails the call with the argument named."""
    device, backend, compiler = case
    fastkd.set_backend(backend)
    try:
        s, t = torch.randn(4, 50).to(device).requires_grad_(), torch.randn(4, 50).to(device)

        def step(labels):
            return fastkd.logit_kl(s, t, labels=labels, ce_weight=1.0)

        compiled = torch.compile(step, fullgraph=True, backend=compiler)
        compiled(torch.tensor([0, 1, 49, -100], device=device)).backward()
        with pytest.raises(RuntimeError, match="labels: expected class ids in"):
            compiled(torch.tensor([0, 1, 50, -100], device=device))
            if device == "cuda":
                torch.cuda.synchronize()
    finally:
        fastkd.set_backend("auto")
        torch._dynamo.reset()
