"""detectron2's DefaultTrainer with the plug-in's defaults.

Differences from ``DefaultTrainer``, each for a reason:
- evaluation is COCO (bbox, plus segm with masks) through pycocotools when detectron2's compiled
  evaluator is missing;
- multi-process training on CPU works: detectron2's ``create_ddp_model`` always passes
  ``device_ids=[local_rank]``, which DistributedDataParallel rejects for CPU modules;
- with ``BNSTATS.CHECK_REPLICAS`` the processes' parameters and buffers are compared at the end of
  training (``d2_bnstats.d2.replicas``);
- population statistics (:mod:`d2_bnstats.d2.population`): detectron2's ``PreciseBN`` hook is
  replaced, at the same place in the hook list (after ``LRScheduler``, before ``PeriodicCheckpointer``
  and ``EvalHook``), by one that is correct across processes and covers every BN-type layer;
  ``BNSTATS.FROZEN_BN`` adds FrozenBN late in training; ``BNSTATS.TEST_BATCH_STATS`` evaluates with
  the statistics of k-image test batches;
- ``BNSTATS.INIT`` is applied after ``MODEL.WEIGHTS`` is loaded for a new run (re-initialised
  statistics, d2_bnstats/d2/weights.py).
"""
import contextlib

from detectron2.engine import DefaultTrainer, hooks
from detectron2.engine import defaults as d2_defaults
from detectron2.utils import comm

from .config import bnstats_node
from .evaluation import build_coco_evaluator
from .population import build_batched_test_loader, build_population_hooks, evaluation_statistics, test_batch_stats_enabled
from .replicas import ReplicaCheck
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

    def build_hooks(self):
        """detectron2's hooks, with its ``PreciseBN`` replaced by ours at the same position."""
        cfg = self.cfg
        if cfg.TEST.PRECISE_BN.ENABLED:
            # let detectron2 build its list without its PreciseBN (and without its train loader)
            stock_cfg = cfg.clone()
            stock_cfg.defrost()
            stock_cfg.TEST.PRECISE_BN.ENABLED = False
            stock_cfg.freeze()
            self.cfg = stock_cfg
        try:
            ret = super().build_hooks()
        finally:
            self.cfg = cfg  # the evaluation closure reads self.cfg when it runs
        ret = [h for h in ret if not isinstance(h, hooks.PreciseBN)]
        ours = build_population_hooks(cfg, self.model, type(self))
        position = next((i + 1 for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler)), None)
        if position is None:
            position = next(
                (i for i, h in enumerate(ret) if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))), len(ret)
            )
        ret[position:position] = ours
        bnstats = bnstats_node(cfg)
        if bnstats is not None and bnstats.get("CHECK_REPLICAS", False):
            ret.append(ReplicaCheck(cfg.OUTPUT_DIR))
        return ret

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        if test_batch_stats_enabled(cfg):
            return build_batched_test_loader(
                cfg, dataset_name, cfg.BNSTATS.TEST_BATCH_STATS.IMS_PER_BATCH, trainer_cls=super(Trainer, cls)
            )
        return super().build_test_loader(cfg, dataset_name)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        with evaluation_statistics(cfg, model):
            return super().test(cfg, model, evaluators)
