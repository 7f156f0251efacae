"""Benchmark cases of ``logit_kl``'s other divergences and of its hard-label cross-entropy.

Each case has the inputs of the ``logit_kl`` case of the same device and size (``_logit_inputs``:
N x V logits, T = 2, about 10 % of the rows masked), so that its ``fastkd`` row reads against the
``fastkd`` row of ``logit_kl`` (the forward KL) of the same run:

- ``logit_kl_reverse``, ``logit_kl_jsd`` (beta 0.5), ``logit_kl_tvd``: ``fastkd.logit_kl(...,
  divergence=...)``; ``torch`` is :func:`fastkd.eager.logit_divergence` (TRL's formula for
  ``"jsd"``), ``compile`` its ``torch.compile``;
- ``logit_kl_ce``: ``fastkd.logit_kl(..., labels=labels, ce_weight=0.5)`` with about 5 % of the
  labels -100; ``torch`` is :func:`fastkd.eager.logit_kl_ce` (``F.kl_div`` plus ``F.cross_entropy``).

Floor: the bytes of ``logit_kl`` (read s, t; write the gradient), the labels' 8 bytes a row aside.
"""

from __future__ import annotations

import functools

import torch

from fastkd import eager
from fastkd.bench.cases import LOSS_SIZES, Case, _generator, _impls, _logit_inputs

JSD_BETA = 0.5
CE_WEIGHT = 0.5


def fastkd_divergence(student, teacher, mask, temperature, divergence, beta=None):
    import fastkd

    return fastkd.logit_kl(student, teacher, temperature=temperature, mask=mask, divergence=divergence, beta=beta)


def fastkd_kl_ce(student, teacher, mask, temperature, labels, ce_weight):
    import fastkd

    return fastkd.logit_kl(student, teacher, temperature=temperature, mask=mask, labels=labels, ce_weight=ce_weight)


def _labelled_inputs(n, v, dtype, device):
    inputs = _logit_inputs(n, v, dtype, device)
    gen = _generator(device, 4)
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    ignored = torch.rand(n, generator=gen, device=device) < 0.05
    return {**inputs, "labels": labels.masked_fill(ignored, -100), "ce_weight": CE_WEIGHT}


# op -> (the keyword arguments fixed for every implementation, or None for the labelled case)
_OPS = {
    "logit_kl_reverse": {"divergence": "reverse"},
    "logit_kl_jsd": {"divergence": "jsd", "beta": JSD_BETA},
    "logit_kl_tvd": {"divergence": "tvd"},
    "logit_kl_ce": None,
}


def divergence_case(op: str, device: str, size: str) -> Case:
    (n, v), dtype = LOSS_SIZES["logit_kl"][device][size]
    options = _OPS[op]
    if options is None:
        make_inputs = functools.partial(_labelled_inputs, n, v, dtype, device)
        impls = _impls(eager.logit_kl_ce, fastkd_kl_ce, None, device)
    else:
        make_inputs = functools.partial(_logit_inputs, n, v, dtype, device)
        impls = _impls(
            functools.partial(eager.logit_divergence, **options), functools.partial(fastkd_divergence, **options),
            None, device,
        )
    elt = torch.empty((), dtype=dtype).element_size()
    return Case(
        op=op,
        shape=f"N={n} V={v}",
        dtype=dtype,
        device=device,
        size=size,
        make_inputs=make_inputs,
        impls=impls,
        bytes=3 * n * v * elt,  # read s, t; write grad s
    )


CASES = [
    divergence_case(op, device, size) for op in _OPS for device in LOSS_SIZES["logit_kl"] for size in LOSS_SIZES["logit_kl"][device]
]
