"""Benchmark cases of the offline (top-k) teacher losses, ``fastkd.sparse``.

- ``fused_linear_sparse_kl``: the student's head ``[N, D] x [V, D]`` against a stored teacher of k
  log-probabilities per token, T = 2, ``tail="renormalize"``, about 10 % of the tokens masked.
  ``fastkd``: ``fastkd.fused_linear_sparse_kl`` (chunks, no logits held, no teacher head);
  ``torch``: DistillKit's sparse formula as users write it (:func:`fastkd.eager.sparse_logit_kl`
  on the student's full float32 logits ``[N, V]``); ``compile``: its ``torch.compile``.
- ``fused_linear_kl_dense``: ``fastkd.fused_linear_kl`` with a live teacher head of the student's
  width (``D_t = D``) at the same N, V: the dense loss the sparse one replaces, timed in the same
  run (its ``torch`` row is the materialised dense formula).
- ``sparse_logit_kl``: ``fastkd.sparse_logit_kl`` on student logits ``[N, V]`` against the eager
  formula.

Floors: ``fused_linear_sparse_kl`` the student's three GEMMs, ``6 N D V`` FLOPs (the dense form
adds the teacher's ``2 N D V``), over the measured matmul rate, and the bytes of reading the hidden
and the weight and writing their gradients; ``sparse_logit_kl`` the bytes of reading the logits and
writing their gradient (the k stored entries a row aside).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd import eager
from fastkd.bench.cases import Case, _generator, _impls, _randn

TEMPERATURE = 2.0


def _teacher_topk(n, v, k, device):
    """``(ids, logprobs)``: the top k of random log-probabilities per row (int32, float16: what a
    ``fastkd teacher-topk`` shard holds), a few rows with fewer stored entries (padding)."""
    gen = _generator(device, 7)
    logprobs = (torch.randn((n, v), generator=gen, device=device) * 3.0).log_softmax(-1)
    values, ids = logprobs.topk(k, dim=-1)
    short = torch.rand(n, generator=gen, device=device) < 0.02
    cut = torch.arange(k, device=device) >= k // 2
    padded = short[:, None] & cut
    return ids.masked_fill(padded, -1).int(), values.masked_fill(padded, -torch.inf).half()


def _fused_inputs(n, d, v, k, dtype, device):
    gen = _generator(device, 3)
    ids, logprobs = _teacher_topk(n, v, k, device)
    return {
        "student_hidden": _randn((n, d), gen, device, dtype).requires_grad_(),
        "student_weight": _randn((v, d), gen, device, dtype, 2.0 * d**-0.5).requires_grad_(),
        "teacher_ids": ids,
        "teacher_logprobs": logprobs,
        "mask": torch.rand(n, generator=gen, device=device) < 0.9,
        "temperature": TEMPERATURE,
    }


def _dense_inputs(n, d, v, dtype, device):
    gen = _generator(device, 3)
    return {
        "student_hidden": _randn((n, d), gen, device, dtype).requires_grad_(),
        "student_weight": _randn((v, d), gen, device, dtype, 2.0 * d**-0.5).requires_grad_(),
        "teacher_hidden": _randn((n, d), gen, device, dtype),
        "teacher_weight": _randn((v, d), gen, device, dtype, 3.0 * d**-0.5),
        "mask": torch.rand(n, generator=gen, device=device) < 0.9,
        "temperature": TEMPERATURE,
    }


def _logit_inputs(n, v, k, dtype, device):
    gen = _generator(device, 0)
    ids, logprobs = _teacher_topk(n, v, k, device)
    return {
        "student": _randn((n, v), gen, device, dtype, 3.0).requires_grad_(),
        "teacher_ids": ids,
        "teacher_logprobs": logprobs,
        "mask": torch.rand(n, generator=gen, device=device) < 0.9,
        "temperature": TEMPERATURE,
    }


def torch_fused_linear_sparse_kl(student_hidden, student_weight, teacher_ids, teacher_logprobs, mask, temperature):
    """DistillKit's formula on the student's full float32 logits ``[N, V]``."""
    logits = F.linear(student_hidden, student_weight).float()
    return eager.sparse_logit_kl(logits, teacher_ids, teacher_logprobs, mask, temperature)


def fastkd_fused_linear_sparse_kl(student_hidden, student_weight, teacher_ids, teacher_logprobs, mask, temperature):
    import fastkd

    return fastkd.fused_linear_sparse_kl(student_hidden, student_weight, teacher_ids, teacher_logprobs,
                                         temperature=temperature, mask=mask)


def torch_fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, temperature):
    student = F.linear(student_hidden, student_weight).float()
    teacher = F.linear(teacher_hidden, teacher_weight).float()
    return eager.logit_kl(student, teacher, mask, temperature)


def fastkd_fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, temperature):
    import fastkd

    return fastkd.fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                  temperature=temperature, mask=mask)


def fastkd_sparse_logit_kl(student, teacher_ids, teacher_logprobs, mask, temperature):
    import fastkd

    return fastkd.sparse_logit_kl(student, teacher_ids, teacher_logprobs, temperature=temperature, mask=mask)


# device -> size -> ((N, D, V, k), dtype)
SIZES = {
    "cpu": {
        "tiny": ((64, 32, 1000, 16), torch.float32),
        "quick": ((512, 128, 32000, 64), torch.float32),
        "default": ((4096, 256, 32000, 64), torch.float32),
    },
    "cuda": {
        "tiny": ((64, 64, 1000, 16), torch.bfloat16),
        "quick": ((2048, 4096, 128256, 64), torch.bfloat16),
        "default": ((8192, 4096, 128256, 64), torch.bfloat16),
    },
}


def sparse_cases(device: str, size: str) -> list[Case]:
    (n, d, v, k), dtype = SIZES[device][size]
    elt = torch.empty((), dtype=dtype).element_size()
    common = dict(dtype=dtype, device=device, size=size)
    stored = n * k * (4 + 2)  # int32 ids, float16 log-probabilities
    return [
        Case(
            op="fused_linear_sparse_kl", shape=f"N={n} D={d} V={v} k={k}", **common,
            make_inputs=lambda: _fused_inputs(n, d, v, k, dtype, device),
            impls=_impls(torch_fused_linear_sparse_kl, fastkd_fused_linear_sparse_kl, None, device),
            bytes=elt * (2 * n * d + 2 * v * d) + stored,  # read h, W; write grad h, W
            flops=6 * n * d * v,
        ),
        Case(
            op="fused_linear_kl_dense", shape=f"N={n} D_s=D_t={d} V={v}", **common,
            make_inputs=lambda: _dense_inputs(n, d, v, dtype, device),
            impls=_impls(torch_fused_linear_kl, fastkd_fused_linear_kl, None, device),
            bytes=elt * (3 * n * d + 3 * v * d),  # read h_s, W_s, h_t, W_t; write grad h_s, W_s
            flops=8 * n * d * v,
        ),
        Case(
            op="sparse_logit_kl", shape=f"N={n} V={v} k={k}", **common,
            make_inputs=lambda: _logit_inputs(n, v, k, dtype, device),
            impls=_impls(eager.sparse_logit_kl, fastkd_sparse_logit_kl, None, device),
            bytes=2 * n * v * elt + stored,  # read s; write grad s
        ),
    ]


CASES = [case for device in SIZES for size in SIZES[device] for case in sparse_cases(device, size)]
