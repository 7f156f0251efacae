"""Run a function on 2 CPU processes joined by a gloo process group, bounded in time.

``run_ranks(target, *args)`` spawns the processes, each calling ``target(rank, world, *args)`` inside
an initialised process group (gloo, a timeout on every collective), and fails the calling test with
the first rank's traceback, or when they have not finished within ``timeout`` seconds (then every
process is killed, so a hang cannot outlive the test).
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, target, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        target(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(target, *args, world: int = 2, timeout: float = 240.0) -> None:
    context = mp.start_processes(
        _entry, args=(world, _free_port(), target, args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise AssertionError(f"{target.__name__}: the {world} ranks did not finish within {timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
