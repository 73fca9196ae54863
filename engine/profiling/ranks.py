"""Local tensor-parallel ranks for tests and benchmarks: processes that join a process group over
127.0.0.1 and run a function."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(fn: Callable[..., object], world: int, *args, device_type: str = "cpu",
              timeout_s: float = 120.0) -> None:
    """Spawn ``world`` processes that join a process group over 127.0.0.1 and run
    ``fn(rank, world, *args)`` (tests and benchmarks). ``device_type="cpu"``: gloo, one thread
    per rank; ``"cuda"``: NCCL, rank ``r`` on ``cuda:r``."""
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_rank_main, args=(world, port, device_type, timeout_s, fn, args), nprocs=world, join=True)


def _rank_main(rank: int, world: int, port: int, device_type: str, timeout_s: float, fn: Callable[..., object],
               args: tuple) -> None:
    device = None
    if device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # ranks share the cores; oversubscribed threads are far slower
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), device_id=device)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
