"""detectron2's DefaultTrainer with the plug-in's defaults.

Differences from ``DefaultTrainer``, each for a reason:
- evaluation is COCO (bbox, plus segm with masks) through pycocotools when detectron2's compiled
  evaluator is missing;
- multi-process training on CPU works: detectron2's ``create_ddp_model`` always passes
  ``device_ids=[local_rank]``, which DistributedDataParallel rejects for CPU modules;
- with ``BNSTATS.CHECK_REPLICAS`` the processes' parameters and buffers are compared at the end of
  training (``d2_bnstats.d2.replicas``).
"""
import contextlib

from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.utils import comm

from .evaluation import build_coco_evaluator


def _model_device_type(model) -> str:
    for p in model.parameters():
        return p.device.type
    return "cpu"


@contextlib.contextmanager
def cpu_aware_ddp():
    """Within the block, detectron2's ``create_ddp_model`` builds a CPU-compatible DDP for CPU models."""
    original = d2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if comm.get_world_size() > 1 and "device_ids" not in kwargs and _model_device_type(model) == "cpu":
            kwargs["device_ids"] = None
        return original(model, **kwargs)

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` for d2_bnstats configs (see module docstring)."""

    def __init__(self, cfg):
        with cpu_aware_ddp():
            super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_coco_evaluator(cfg, dataset_name, output_folder)

    def build_hooks(self):
        hooks = super().build_hooks()
        bnstats = self.cfg.get("BNSTATS", None)
        if bnstats is not None and bnstats.get("CHECK_REPLICAS", False):
            from .replicas import ReplicaCheck

            hooks.append(ReplicaCheck(self.cfg.OUTPUT_DIR))
        return hooks
