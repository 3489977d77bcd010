"""Run a function in N real processes joined by a gloo process group (CPU), and collect results.

    results = run_distributed(fn, world_size=2, args=(x,))   # fn(rank, world_size, *args) -> value

``fn`` must be a module-level function (it is pickled by reference). Each process also gets
detectron2's per-machine process group, so detectron2.utils.comm works inside ``fn``.
"""
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, fn, world_size, port, args, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        from d2_bnstats.d2.launch import setup_local_process_group

        setup_local_process_group(world_size, 0)
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size=2, args=(), timeout=300):
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _worker, args=(fn, world_size, _free_port(), args, out_dir), nprocs=world_size, join=False,
            start_method="spawn",
        )
        deadline = time.time() + timeout
        while not context.join(timeout=1):
            if time.time() > deadline:
                for p in context.processes:
                    p.kill()
                raise TimeoutError(f"distributed run of {fn.__name__} did not finish in {timeout}s (hang?)")
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world_size)]
