"""Per-rank peak memory of fastkd's DTensor paths against one process, on 2 ranks.

Run under torchrun (CPU: gloo; CUDA: NCCL, one GPU per rank)::

    torchrun --nproc_per_node 2 benchmarks/distributed_memory.py --out result.json

Each rank measures one forward + backward (after one warm-up call) of:

- ``fused_linear_kl`` with FSDP2-sharded heads (``fully_shard``, ``Shard(0)``) on its own tokens,
  against the same call with plain, whole weights (what one process holds);
- ``logit_kl`` on vocabulary-sharded ``Shard(-1)`` DTensor logits, against ``logit_kl`` on the whole
  logits in one process.

Peak memory is measured above what is held when the call begins (``fastkd.runner.measure``): on
CPU the resident set, on CUDA the allocator's peak. The inputs are held before, so the figures are
what each call adds.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

import fastkd
from fastkd.runner.measure import StepMeter, fix_mmap_threshold
from fastkd.runner.parallel import init_from_environment


def measure(meter, fn, grads):
    """One call of ``fn`` after a warm-up one, with the gradients ``grads()`` returns freed before each."""
    for timed in (False, True):
        for x in grads():
            x.grad = None
        if timed:
            meter.start()
        fn()
    seconds, peak = meter.stop()
    return {"ms": seconds * 1e3, "peak_mb": peak}


def fused_linear_rows(device, meter, mesh, tokens, width, vocab):
    gen = torch.Generator(device="cpu").manual_seed(1 + dist.get_rank())
    h_s = torch.randn(tokens, width, generator=gen).to(device).requires_grad_()
    h_t = torch.randn(tokens, width, generator=gen).to(device)
    plain = [nn.Linear(width, vocab, bias=False, device=device) for _ in range(2)]
    sharded = [nn.Linear(width, vocab, bias=False, device=device) for _ in range(2)]
    for head in sharded:
        fully_shard(head, mesh=mesh)

    def call(heads):
        return lambda: fastkd.fused_linear_kl(h_s, heads[0].weight, h_t, heads[1].weight, temperature=2.0).backward()

    return {
        "single": measure(meter, call(plain), lambda: [h_s, plain[0].weight]),
        "fsdp2": measure(meter, call(sharded), lambda: [h_s, sharded[0].weight]),
    }


def vocab_parallel_rows(device, meter, mesh, rows, vocab):
    gen = torch.Generator(device="cpu").manual_seed(7)
    s = torch.randn(rows, vocab, generator=gen).to(device)
    t = torch.randn(rows, vocab, generator=gen).to(device)
    whole = s.clone().requires_grad_()
    s_sharded = distribute_tensor(s, mesh, [Shard(1)]).requires_grad_()
    t_sharded = distribute_tensor(t, mesh, [Shard(1)])
    del s

    def single():
        fastkd.logit_kl(whole, t, temperature=2.0).backward()

    def sharded():
        fastkd.logit_kl(s_sharded, t_sharded, temperature=2.0).backward()

    first = measure(meter, single, lambda: [whole])
    del whole, t
    return {"single": first, "vocab_parallel": measure(meter, sharded, lambda: [s_sharded])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--out")
    args = parser.parse_args()
    fix_mmap_threshold()
    rank, world = init_from_environment(args.device, 600)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if args.device.startswith("cuda") else "cpu")
    mesh = init_device_mesh(device.type, (world,))
    meter = StepMeter(device)
    result = {
        "rank": rank,
        "fused_linear_kl": fused_linear_rows(device, meter, mesh, args.tokens, args.width, args.vocab),
        "logit_kl": vocab_parallel_rows(device, meter, mesh, args.rows, args.vocab),
    }
    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        report = {
            "world": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "shapes": vars(args), "ranks": results,
        }
        text = json.dumps(report, indent=1)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
