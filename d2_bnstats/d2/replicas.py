"""Do all processes hold the same model? A check of every parameter and buffer across processes.

DistributedDataParallel keeps parameters equal by construction, but buffers are per process
(detectron2 turns buffer broadcasting off): plain BN's running statistics differ between ranks, while
the plug-in's synchronised layers (SyncBN, RoIShuffleBN, the statistics of SyncEvalNorm/SyncMABN)
keep them equal. :func:`compare_replicas` states which tensors differ; the :class:`ReplicaCheck` hook
runs it at the end of training when ``BNSTATS.CHECK_REPLICAS`` is true and writes
``OUTPUT_DIR/replica_check.json``.
"""
import hashlib
import logging
import os
from typing import Dict

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch import nn

from ..outputs import write_json

logger = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def fingerprints(model: nn.Module) -> Dict[str, Dict[str, str]]:
    """SHA-1 of the exact bytes of every parameter and buffer, by name."""
    model = _unwrap(model)

    def digest(t: torch.Tensor) -> str:
        data = t.detach().cpu().contiguous().reshape(-1)
        return hashlib.sha1(data.view(torch.uint8).numpy().tobytes() + str((t.dtype, tuple(t.shape))).encode()).hexdigest()

    return {
        "parameters": {name: digest(p) for name, p in model.named_parameters()},
        "buffers": {name: digest(b) for name, b in model.named_buffers()},
    }


def compare_replicas(model: nn.Module) -> dict:
    """Collective: every process must call it. Returns, on every process, the names of the
    parameters and buffers whose values are not identical on all processes."""
    mine = fingerprints(model)
    everyone = comm.all_gather(mine)
    result = {"world_size": len(everyone)}
    for kind in ("parameters", "buffers"):
        names = sorted(set().union(*(f[kind].keys() for f in everyone)))
        result[kind] = len(names)
        result[f"mismatched_{kind}"] = [n for n in names if len({f[kind].get(n) for f in everyone}) > 1]
    return result


class ReplicaCheck(HookBase):
    """After a completed training run, compare the processes' models; log and write the result."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def after_train(self):
        if self.trainer.iter + 1 < self.trainer.max_iter:
            return  # training failed or was interrupted: other processes may not get here
        result = compare_replicas(self.trainer.model)
        for kind in ("parameters", "buffers"):
            bad = result[f"mismatched_{kind}"]
            if bad:
                logger.warning("%d of %d %s differ across %d processes, e.g. %s", len(bad), result[kind], kind, result["world_size"], bad[:5])
            else:
                logger.info("all %d %s are identical on the %d processes", result[kind], kind, result["world_size"])
        if comm.is_main_process() and self.output_dir:
            write_json(os.path.join(self.output_dir, "replica_check.json"), result)
