"""A launched worker whose function returns leaves no process group for the interpreter's shutdown.

With a gloo group still alive at shutdown, a process that has done all its work can abort
("terminate called without an active exception", SIGABRT) and the whole run is reported failed.
The abort is rare and timing-dependent; what it needs — a group alive when the interpreter shuts
down — is checked directly: each worker records, from an exit handler (which runs during shutdown),
whether a process group is still initialised. The collective in the function must still give the
exact sum, so the group was there while the function ran."""
import atexit
import os

import torch
import torch.distributed as dist

from d2_bnstats.d2.launch import launch


def _record_at_exit(path):
    with open(path, "w") as f:
        f.write(f"initialized={dist.is_initialized()}")


def _sum_ranks_then_note_the_group_at_exit(out_dir):
    rank = dist.get_rank()
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    with open(os.path.join(out_dir, f"sum{rank}"), "w") as f:
        f.write(str(total.item()))
    atexit.register(_record_at_exit, os.path.join(out_dir, f"exit{rank}"))


def test_workers_destroy_their_process_group_once_every_process_has_returned(tmp_path):
    world_size = 2
    launch(_sum_ranks_then_note_the_group_at_exit, world_size, args=(str(tmp_path),))
    for rank in range(world_size):
        assert (tmp_path / f"sum{rank}").read_text() == str(float(sum(range(1, world_size + 1))))
        assert (tmp_path / f"exit{rank}").read_text() == "initialized=False", f"rank {rank}"
