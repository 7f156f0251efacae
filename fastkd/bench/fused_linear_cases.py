"""Benchmark cases of ``fused_linear_kl``: the logit KL of two LM heads, from hidden states.

Two ops: ``fused_linear_kl`` (the forward KL) and ``fused_linear_jsd_ce`` (generalized JSD with
beta 0.5 plus 0.5 x the hard-label cross-entropy, every valid token labelled), each with these
implementations (see ``fastkd.bench.cases``):

- ``fastkd``: ``fastkd.fused_linear_kl`` with the ``auto`` backend and its default chunk size.
- ``torch``: the materialised formula as users write it: both heads' logits in full, upcast to
  float32, then ``fastkd.eager.logit_kl`` (``F.kl_div`` of two ``log_softmax``es, masked mean, T^2).
- ``compile``: ``torch.compile`` of that function.
- ``liger`` (when ``liger_kernel`` imports): ``LIGER_CONFIG`` below (CUDA only: a Triton kernel);
  for ``fused_linear_jsd_ce`` ``LIGER_JSD_CE_CONFIG`` (plain PyTorch chunks: CPU too).

Floor: the four GEMMs the loss cannot avoid, ``2 N V (D_t + 3 D_s)`` FLOPs (the two heads' logits,
then ``dlogits @ W_s`` and ``dlogits.T @ h_s``; ``8 N D V`` when ``D_s = D_t = D``), over the measured
matmul rate; and the bytes of reading the hiddens and weights and writing their gradients.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from fastkd import eager
from fastkd.bench.cases import Case, _generator, _impls, _randn

TEMPERATURE = 2.0

LIGER_CONFIG = (
    "liger_kernel.transformers.fused_linear_jsd.LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=-100, "
    "temperature=T): beta 0 is the pure forward KL(teacher || student) branch of its JSD kernel, no "
    "hard loss; shift_labels = 0 on valid and -100 on masked tokens; its loss (mean over valid tokens, "
    "no T^2) times T^2; no biases"
)


JSD_BETA = 0.5
CE_WEIGHT = 0.5

LIGER_JSD_CE_CONFIG = (
    "liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(weight_hard_loss=CE_WEIGHT / T^2, weight_soft_loss=1, "
    "beta=0.5, temperature=T, compiled=<on CUDA>): its loss (JSD without T^2 plus the hard loss, each "
    "averaged over the labelled tokens) times T^2; labels -100 on the masked tokens; no biases"
)


def torch_fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, temperature):
    """The materialised formula: ``[N, V]`` logits of both heads in float32, then the logit KL."""
    student = F.linear(student_hidden, student_weight).float()
    teacher = F.linear(teacher_hidden, teacher_weight).float()
    return eager.logit_kl(student, teacher, mask, temperature)


def fastkd_fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, temperature):
    import fastkd.fused_linear

    return fastkd.fused_linear.fused_linear_kl(
        student_hidden, student_weight, teacher_hidden, teacher_weight, temperature=temperature, mask=mask
    )


def liger_fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, temperature):
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    labels = torch.where(mask, 0, -100)
    loss_fn = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=-100, temperature=temperature)
    return loss_fn(student_hidden, student_weight, teacher_hidden, teacher_weight, labels) * temperature**2


def torch_fused_linear_jsd_ce(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, temperature,
                              labels):
    """The materialised formula: both heads' float32 logits, TRL's JSD (times T^2) plus the cross-entropy."""
    student = F.linear(student_hidden, student_weight).float()
    teacher = F.linear(teacher_hidden, teacher_weight).float()
    jsd = eager.logit_divergence(student, teacher, mask, temperature, "jsd", JSD_BETA)
    return jsd + CE_WEIGHT * F.cross_entropy(student, labels, ignore_index=-100)


def fastkd_fused_linear_jsd_ce(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, temperature,
                               labels):
    import fastkd.fused_linear

    return fastkd.fused_linear.fused_linear_kl(
        student_hidden, student_weight, teacher_hidden, teacher_weight, temperature=temperature, mask=mask,
        divergence="jsd", beta=JSD_BETA, labels=labels, ce_weight=CE_WEIGHT,
    )


def liger_fused_linear_jsd_ce(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, temperature,
                              labels):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss_fn = LigerFusedLinearJSDLoss(
        weight_hard_loss=CE_WEIGHT / temperature**2, weight_soft_loss=1.0, beta=JSD_BETA, temperature=temperature,
        compiled=student_hidden.is_cuda,
    )
    return loss_fn(student_hidden, student_weight, teacher_hidden, teacher_weight, labels) * temperature**2


def _inputs(n, d_s, d_t, v, dtype, device):
    gen = _generator(device, 3)
    return {
        "student_hidden": _randn((n, d_s), gen, device, dtype).requires_grad_(),
        "student_weight": _randn((v, d_s), gen, device, dtype, 2.0 * d_s**-0.5).requires_grad_(),
        "teacher_hidden": _randn((n, d_t), gen, device, dtype),
        "teacher_weight": _randn((v, d_t), gen, device, dtype, 3.0 * d_t**-0.5),
        "mask": torch.rand(n, generator=gen, device=device) < 0.9,  # ~10% padding / prompt tokens
        "temperature": TEMPERATURE,
    }


# device -> size -> ((N, D_s, D_t, V), dtype)
SIZES = {
    "cpu": {
        "tiny": ((64, 32, 48, 1000), torch.float32),
        "quick": ((512, 128, 192, 32000), torch.float32),
        "default": ((4096, 256, 384, 32000), torch.float32),
    },
    "cuda": {
        "tiny": ((64, 64, 64, 1000), torch.bfloat16),
        "quick": ((2048, 4096, 4096, 128256), torch.bfloat16),
        "default": ((8192, 4096, 4096, 128256), torch.bfloat16),
    },
}


def _labelled_inputs(n, d_s, d_t, v, dtype, device):
    """``_inputs`` and a label for every valid token (-100 on the masked ones)."""
    inputs = _inputs(n, d_s, d_t, v, dtype, device)
    labels = torch.randint(0, v, (n,), generator=_generator(device, 5), device=device)
    return {**inputs, "labels": labels.masked_fill(~inputs["mask"], -100)}


# op -> (inputs, torch, fastkd, liger implementation, liger configuration)
_OPS = {
    "fused_linear_kl": (_inputs, torch_fused_linear_kl, fastkd_fused_linear_kl, liger_fused_linear_kl, LIGER_CONFIG),
    "fused_linear_jsd_ce": (
        _labelled_inputs, torch_fused_linear_jsd_ce, fastkd_fused_linear_jsd_ce, liger_fused_linear_jsd_ce,
        LIGER_JSD_CE_CONFIG,
    ),
}


def fused_linear_case(op: str, device: str, size: str) -> Case:
    (n, d_s, d_t, v), dtype = SIZES[device][size]
    make_inputs, torch_fn, fastkd_fn, liger_fn, liger_config = _OPS[op]
    elt = torch.empty((), dtype=dtype).element_size()
    impls = _impls(torch_fn, fastkd_fn, liger_fn, device)
    if op == "fused_linear_jsd_ce" and "liger" not in impls and importlib.util.find_spec("liger_kernel"):
        impls["liger"] = liger_fn  # plain PyTorch: it runs on CPU too
    return Case(
        op=op,
        shape=f"N={n} D_s={d_s} D_t={d_t} V={v}",
        dtype=dtype,
        device=device,
        size=size,
        make_inputs=lambda: make_inputs(n, d_s, d_t, v, dtype, device),
        impls=impls,
        bytes=elt * (2 * n * d_s + 2 * v * d_s + n * d_t + v * d_t),  # read h, W; write grad h_s, W_s
        flops=2 * n * v * (d_t + 3 * d_s),
        configs={"liger": liger_config},
    )


CASES = [fused_linear_case(op, device, size) for op in _OPS for device in SIZES for size in SIZES[device]]
