"""Multi-process launch that also works on CPU-only machines (gloo).

detectron2's ``launch`` spawns one process per GPU. Older versions (the 2022 snapshot) assert that
CUDA is available and hard-code NCCL; newer ones fall back to gloo. This wrapper delegates to
detectron2 whenever CUDA is available and otherwise runs the same recipe with gloo, so that
``--num-gpus 2`` on a CPU machine means "2 processes", on every detectron2 version.
"""
import inspect
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

DEFAULT_TIMEOUT = timedelta(minutes=30)
logger = logging.getLogger(__name__)


def launch(
    main_func,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = None,
    args=(),
    timeout: timedelta = DEFAULT_TIMEOUT,
):
    """Like ``detectron2.engine.launch``; ``num_gpus_per_machine`` is processes per machine on CPU."""
    if num_gpus_per_machine < 1 or num_machines < 1:
        raise ValueError(
            f"--num-gpus and --num-machines must be >= 1, got {num_gpus_per_machine} and {num_machines}"
        )
    if torch.cuda.is_available():
        kwargs = dict(num_machines=num_machines, machine_rank=machine_rank, dist_url=dist_url, args=args)
        if "timeout" in inspect.signature(d2_launch).parameters:  # older detectron2 has no timeout
            kwargs["timeout"] = timeout
        return d2_launch(main_func, num_gpus_per_machine, **kwargs)
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' only works on one machine; pass --dist-url tcp://HOST:PORT")
        from detectron2.engine.launch import _find_free_port

        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def _cpu_worker(local_rank, main_func, world_size, per_machine, machine_rank, dist_url, args, timeout):
    global_rank = machine_rank * per_machine + local_rank
    # Share the cores between the processes instead of oversubscribing them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_machine))
    try:
        dist.init_process_group(
            backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout
        )
    except Exception:
        logger.error("could not initialise the gloo process group at %s", dist_url)
        raise
    setup_local_process_group(per_machine, machine_rank)
    comm.synchronize()
    main_func(*args)


def setup_local_process_group(per_machine: int, machine_rank: int) -> None:
    """Create detectron2's per-machine process group (its API differs between versions)."""
    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(per_machine)
        return
    num_machines = dist.get_world_size() // per_machine
    for i in range(num_machines):
        group = dist.new_group(list(range(i * per_machine, (i + 1) * per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
