"""Run a worker on several gloo ranks (CPU) for the 2-rank parity tests: ``from spawn_ranks import run_ranks``."""
from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, out_dir, world: int, timeout_s: float = 120) -> None:
    """``worker(rank, port, out_dir)`` on ``world`` spawned processes; kill them and fail after ``timeout_s``."""
    ctx = mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers did not finish")
