"""detectron2's DefaultTrainer with the plug-in's defaults.

Differences from ``DefaultTrainer``, each for a reason:
- evaluation is COCO (bbox, plus segm with masks) through pycocotools when detectron2's compiled
  evaluator is missing;
- multi-process training on CPU works: detectron2's ``create_ddp_model`` always passes
  ``device_ids=[local_rank]``, which DistributedDataParallel rejects for CPU modules;
- ``BNSTATS.INIT`` is applied after ``MODEL.WEIGHTS`` is loaded for a new run (re-initialised
  statistics, d2_bnstats/d2/weights.py).
"""
import contextlib

from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.utils import comm

from .evaluation import build_coco_evaluator
from .weights import after_loading_weights


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

    def resume_or_load(self, resume=True):
        """detectron2's, then ``BNSTATS.INIT`` (e.g. reset statistics) unless the run resumed."""
        super().resume_or_load(resume=resume)
        after_loading_weights(self.cfg, self.model, resumed=resume and self.checkpointer.has_checkpoint())

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_coco_evaluator(cfg, dataset_name, output_folder)
