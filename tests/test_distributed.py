"""fastkd's losses on DTensors, on 2 CPU processes (gloo): FSDP2-sharded heads in the fused-linear
losses, vocabulary-parallel (``Shard(-1)``), batch-sharded and replicated logits in ``logit_kl``,
each against the float64 reference of the same tokens, and the set-ups fastkd refuses."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastkd
from ranks import run_ranks
from reference import assert_close, logit_loss, sparse_loss

pytest.importorskip("torch.distributed.fsdp")
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor  # noqa: E402

V, D, N = 97, 24, 30  # vocabulary (odd: the two ranks' slices differ), width, tokens per rank
RTOL = 2e-5
F64 = torch.float64


def _tokens(rank, dtype=torch.float32):
    """Rank ``rank``'s hidden states of both models, labels and mask (the same on every process)."""
    gen = torch.Generator().manual_seed(100 + rank)
    h_s = torch.randn(N, D, generator=gen, dtype=dtype)
    h_t = torch.randn(N, 2 * D, generator=gen, dtype=dtype)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[:4] = -100
    mask = (torch.rand(N, generator=gen) > 0.2).float()
    return h_s, h_t, labels, mask


def _heads():
    gen = torch.Generator().manual_seed(7)
    student = nn.Linear(D, V)
    teacher = nn.Linear(2 * D, V)
    with torch.no_grad():
        for p in (*student.parameters(), *teacher.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen))
    return student, teacher


def _reference_head(rank, student, teacher, options):
    """(loss, grads of student weight, bias and hidden) of rank ``rank``'s tokens in float64."""
    h_s, h_t, labels, mask = _tokens(rank)
    w = student.weight.detach().to(F64).requires_grad_()
    b = student.bias.detach().to(F64).requires_grad_()
    h = h_s.to(F64).requires_grad_()
    s = h @ w.T + b
    t = h_t.to(F64) @ teacher.weight.detach().to(F64).T + teacher.bias.detach().to(F64)
    loss = logit_loss(s, t, mask=mask, labels=labels, **options)
    loss.backward()
    return loss.detach(), w.grad, b.grad, h.grad


HEAD_OPTIONS = dict(temperature=2.0, divergence="jsd", beta=0.3, ce_weight=0.4)


def _fsdp_head(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    student, teacher = _heads()
    wants = [_reference_head(r, student, teacher, HEAD_OPTIONS) for r in range(world)]
    fully_shard(student, mesh=mesh)
    fully_shard(teacher, mesh=mesh)
    assert isinstance(student.weight, DTensor) and student.weight.placements == (Shard(0),)
    h_s, h_t, labels, mask = _tokens(rank)
    h_s.requires_grad_()
    loss = fastkd.fused_linear_kl(
        h_s, student.weight, h_t, teacher.weight, student_bias=student.bias, teacher_bias=teacher.bias,
        mask=mask, labels=labels, chunk_size=7, **HEAD_OPTIONS,
    )
    assert not isinstance(loss, DTensor)
    assert_close(loss, wants[rank][0], RTOL, f"rank {rank}'s loss")
    (1.5 * loss).backward()
    assert isinstance(student.weight.grad, DTensor) and student.weight.grad.placements == (Shard(0),)
    # FSDP2 averages the ranks' gradients: the whole gradient is the mean of the ranks' own
    for got, want, name in ((student.weight.grad, 1, "weight"), (student.bias.grad, 2, "bias")):
        mean = 1.5 * sum(w[want] for w in wants) / world
        assert_close(got.full_tensor(), mean, RTOL, f"the {name}'s gathered gradient")
    assert_close(h_s.grad, 1.5 * wants[rank][3], RTOL, "the hidden states' gradient")
    assert teacher.weight.grad is None


def _fsdp_sparse_head(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    student, _ = _heads()
    gen = torch.Generator().manual_seed(5 + rank)
    h_s = torch.randn(N, D, generator=gen)
    ids = torch.stack([torch.randperm(V, generator=gen)[:6] for _ in range(N)])
    logprobs = torch.log_softmax(torch.randn(N, 6, generator=gen), -1) - 0.5
    w = student.weight.detach().to(F64).requires_grad_()
    s = h_s.to(F64) @ w.T + student.bias.detach().to(F64)
    want = sparse_loss(s, (ids, logprobs), temperature=1.5)
    want.backward()
    grads = torch.zeros(world, *w.shape, dtype=F64)
    grads[rank] = w.grad
    dist.all_reduce(grads)
    fully_shard(student, mesh=mesh)
    loss = fastkd.fused_linear_sparse_kl(h_s, student.weight, ids, logprobs, student_bias=student.bias,
                                         temperature=1.5)
    assert_close(loss, want.detach(), RTOL, f"rank {rank}'s sparse loss")
    loss.backward()
    assert_close(student.weight.grad.full_tensor(), grads.mean(0), RTOL, "the sparse loss's weight gradient")


class _Allocations(TorchDispatchMode):
    """The largest plain tensor an op returns (DTensors are views of the ranks' tensors)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
                self.largest = max(self.largest, x.numel())
        return out


def _logits(seed, shape=(3, 10, V)):
    """Student and teacher logits with extreme rows: +-1e4, a teacher row without a finite entry,
    a teacher row whose finite entries are all in the last rank's slice of the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(shape, generator=gen)
    t = 3 * torch.randn(shape, generator=gen)
    s[0, 0] *= 3e3
    t[0, 1] *= 3e3
    t[1, 2] = -torch.inf
    t[1, 3, : V - 20] = -torch.inf
    labels = torch.randint(0, V, shape[:-1], generator=gen)
    labels[2, :3] = -100
    labels[1, 4] = V - 1  # in the last slice
    mask = torch.ones(shape[:-1])
    mask[2, 7:] = 0
    return s, t, labels, mask


DIVERGENCES = [("forward", None, 1.0), ("reverse", None, 0.5), ("jsd", 0.7, 4.0), ("tvd", None, 1.0)]


def _vocab_parallel(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    for seed, (divergence, beta, temperature) in enumerate(DIVERGENCES):
        s, t, labels, mask = _logits(seed)
        if divergence == "reverse":  # the reverse KL of a student entry the teacher rules out is +inf
            t[1, 3] = torch.where(torch.isinf(t[1, 3]), -1e4, t[1, 3])
        options = dict(temperature=temperature, divergence=divergence, beta=beta)
        for reduction, ce_weight in (("mean", 0.3), ("sum", 0.0), ("none", 1.2)):
            s64 = s.to(F64).requires_grad_()
            want = logit_loss(s64, t, mask=mask, labels=labels, reduction=reduction, ce_weight=ce_weight, **options)
            upstream = torch.rand(want.shape, generator=torch.Generator().manual_seed(3)) + 0.5
            (want * upstream).sum().backward()
            student = distribute_tensor(s, mesh, [Shard(2)]).requires_grad_()
            teacher = distribute_tensor(t, mesh, [Shard(-1)])
            with _Allocations() as allocations:
                loss = fastkd.logit_kl(student, teacher, mask=mask, labels=labels, reduction=reduction,
                                       ce_weight=ce_weight, **options)
                (loss * distribute_tensor(upstream.float(), mesh, [Replicate()])).sum().backward()
            what = f"{divergence}, {reduction}"
            assert isinstance(loss, DTensor) and loss.placements == (Replicate(),), what
            assert_close(loss.full_tensor(), want.detach(), RTOL, f"{what}: loss")
            assert student.grad.placements == (Shard(2),), what
            assert_close(student.grad.full_tensor(), s64.grad, RTOL, f"{what}: gradient")
            # no rank holds a tensor of the whole logits' size: its slices only
            assert allocations.largest < s.numel(), f"{what}: a tensor of {allocations.largest} elements"


def _colwise_parallel_head(rank, world):
    """A tensor-parallel LM head (ColwiseParallel, DTensor output): logit_kl on its logits, and the
    head weight's gradient, as in one process."""
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    student, teacher = _heads()
    h_s, h_t, labels, mask = _tokens(0)  # the same tokens on every rank of a tensor-parallel group
    w = student.weight.detach().to(F64).requires_grad_()
    s = h_s.to(F64) @ w.T + student.bias.detach().to(F64)
    t = h_t.to(F64) @ teacher.weight.detach().to(F64).T + teacher.bias.detach().to(F64)
    want = logit_loss(s, t, mask=mask, labels=labels, **HEAD_OPTIONS)
    want.backward()
    for head in (student, teacher):
        parallelize_module(head, mesh, ColwiseParallel(use_local_output=False))
    loss = fastkd.logit_kl(student(h_s), teacher(h_t).detach(), mask=mask, labels=labels, **HEAD_OPTIONS)
    assert_close(loss.full_tensor(), want.detach(), RTOL, "the tensor-parallel head's loss")
    loss.backward()
    assert student.weight.grad.placements == (Shard(0),)
    assert_close(student.weight.grad.full_tensor(), w.grad, RTOL, "the tensor-parallel head's weight gradient")


def _batch_sharded_and_replicated(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    s, t, labels, mask = _logits(11)
    for placement in (Shard(0), Shard(1), Replicate()):
        for reduction in ("mean", "sum", "none"):
            s64 = s.to(F64).requires_grad_()
            want = logit_loss(s64, t, mask=mask, labels=labels, reduction=reduction, ce_weight=0.5, temperature=2.0)
            want.sum().backward()
            student = distribute_tensor(s, mesh, [placement]).requires_grad_()
            teacher = distribute_tensor(t, mesh, [placement])
            parts = fastkd.logit_kl(student, teacher, mask=distribute_tensor(mask, mesh, [placement]),
                                    labels=labels, reduction=reduction, ce_weight=0.5, temperature=2.0,
                                    return_parts=True)
            what = f"{placement}, {reduction}"
            assert_close(parts.loss.full_tensor(), want.detach(), RTOL, f"{what}: loss")
            parts.loss.sum().backward()
            assert student.grad.placements == (placement,), what
            assert_close(student.grad.full_tensor(), s64.grad, RTOL, f"{what}: gradient")
            kd = logit_loss(s, t, mask=mask, reduction=reduction, temperature=2.0)
            assert_close(parts.kd.full_tensor(), kd, RTOL, f"{what}: the kd part")


def _refused(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    s, t, labels, mask = _logits(0)
    student, teacher = distribute_tensor(s, mesh, [Shard(2)]), distribute_tensor(t, mesh, [Shard(2)])
    with pytest.raises(ValueError, match="teacher_logits: a plain tensor"):
        fastkd.logit_kl(student, t)
    with pytest.raises(ValueError, match="teacher_logits: placed"):
        fastkd.logit_kl(student, distribute_tensor(t, mesh, [Shard(0)]))
    other = DeviceMesh("cpu", list(reversed(range(world))))
    with pytest.raises(ValueError, match="teacher_logits: its device mesh"):
        fastkd.logit_kl(student, distribute_tensor(t, other, [Shard(2)]))
    flat = init_device_mesh("cpu", (1, world))
    with pytest.raises(ValueError, match="student_logits: a DTensor on a 2-D device mesh"):
        fastkd.logit_kl(distribute_tensor(s, flat, [Replicate(), Shard(2)]),
                        distribute_tensor(t, flat, [Replicate(), Shard(2)]))
    head, teacher_head = _heads()
    h_s, h_t, _, _ = _tokens(rank)
    weight = distribute_tensor(head.weight.detach(), mesh, [Shard(1)])
    with pytest.raises(ValueError, match=r"student_weight: a DTensor placed Shard\(dim=1\)"):
        fastkd.fused_linear_kl(h_s, weight, h_t, teacher_head.weight)
    with pytest.raises(ValueError, match="teacher_weight: its device mesh"):
        fastkd.fused_linear_kl(h_s, distribute_tensor(head.weight.detach(), mesh, [Shard(0)]), h_t,
                               distribute_tensor(teacher_head.weight.detach(), other, [Shard(0)]))
    with pytest.raises(TypeError, match="student_hidden: a DTensor"):
        fastkd.fused_linear_kl(distribute_tensor(h_s, mesh, [Shard(0)]), head.weight, h_t, teacher_head.weight)
    with pytest.raises(TypeError, match="student: a DTensor"):
        fastkd.hidden_mse(distribute_tensor(h_s, mesh, [Shard(0)]), distribute_tensor(h_s, mesh, [Shard(0)]))


def _all_loss_cases(rank, world):
    for case in (_fsdp_head, _fsdp_sparse_head, _vocab_parallel, _colwise_parallel_head, _batch_sharded_and_replicated,
                 _refused):
        case(rank, world)


def test_losses_on_dtensors():
    run_ranks(_all_loss_cases)
