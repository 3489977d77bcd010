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
- running statistics that come out of a step non-finite (a NaN or Inf in some layer's batch) are
  undone once per step, for every BN-type layer, torch's included, before any other hook sees them
  (:class:`~d2_bnstats.d2.statistics_health.StepGuardHook`, first in the hook list); the layers then
  skip their own per-call check;
- ``BNSTATS.INIT`` is applied after ``MODEL.WEIGHTS`` is loaded for a new run (re-initialised
  statistics, d2_bnstats/d2/weights.py);
- checkpoints hold the optimizer, LR-scheduler and (with AMP) grad-scaler state on every detectron2
  version, so that ``--resume`` continues the run where it stopped: detectron2 versions whose
  trainer ``state_dict`` leaves one of them out (the 2022 snapshot saves neither the optimizer nor
  the grad scaler) get it as a checkpointable of the trainer's ``DetectionCheckpointer``, under the
  key older detectron2 versions used (``optimizer``, ``scheduler``, ``grad_scaler``). Whatever
  detectron2 already saves is not saved twice (:func:`checkpoint_training_state`);
- checkpoints are written atomically and ``--resume`` skips a damaged last checkpoint
  (:class:`~d2_bnstats.d2.checkpoint.AtomicCheckpointer`, which replaces detectron2's checkpointer
  before the hooks that save are built).
"""
import contextlib
import logging

from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, hooks
from detectron2.engine import defaults as d2_defaults
from detectron2.utils import comm

from .checkpoint import atomic_checkpointer
from .config import bnstats_node
from .datasets import FileNamingMapper
from .evaluation import build_coco_evaluator
from .losses import DetectionLossHook
from .population import build_batched_test_loader, build_population_hooks, evaluation_statistics, test_batch_stats_enabled
from .replicas import ReplicaCheck
from .statistics_health import StatisticsHealthHook, StepGuardHook
from .weights import after_loading_weights

logger = logging.getLogger(__name__)


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


@contextlib.contextmanager
def recording_step_trainers(built: list):
    """Within the block, each ``SimpleTrainer``/``AMPTrainer`` that ``DefaultTrainer`` builds is
    appended to ``built``: detectron2 keeps it only in a private attribute, and its grad scaler is
    part of the training state."""
    names = [name for name in ("SimpleTrainer", "AMPTrainer") if hasattr(d2_defaults, name)]
    originals = {name: getattr(d2_defaults, name) for name in names}

    def recording(cls):
        def build(*args, **kwargs):
            step_trainer = cls(*args, **kwargs)
            built.append(step_trainer)
            return step_trainer

        return build

    for name, cls in originals.items():
        setattr(d2_defaults, name, recording(cls))
    try:
        yield
    finally:
        for name, cls in originals.items():
            setattr(d2_defaults, name, cls)


def _same_state(a, b) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):  # tensors compare elementwise
        return False


def _holds(saved, state) -> bool:
    """Whether ``state`` is ``saved`` or a value of a dict nested in it."""
    if _same_state(saved, state):
        return True
    return isinstance(saved, dict) and any(_holds(v, state) for v in saved.values())


def checkpoint_training_state(checkpointer, trainer_state, objects: dict) -> list:
    """Make ``checkpointer`` save and load each of ``objects`` (key → object with ``state_dict`` and
    ``load_state_dict``) that detectron2 does not already save, and return the keys added.

    Feature detection instead of version numbers: an object is saved already when it is one of the
    checkpointer's checkpointables (early detectron2 versions passed ``optimizer=``, ``scheduler=``)
    or when its state is part of ``trainer_state``, the trainer's own ``state_dict()`` taken right
    after construction (newer detectron2 nests the optimizer and grad scaler there; its LR-scheduler
    hook saves the scheduler). An object with an empty state (a disabled grad scaler) has nothing
    to save.
    """
    added = []
    for key, obj in objects.items():
        if obj is None or not hasattr(obj, "state_dict") or not hasattr(obj, "load_state_dict"):
            continue
        if any(held is obj for held in checkpointer.checkpointables.values()):
            continue
        state = obj.state_dict()
        if not state or _holds(trainer_state, state):
            continue
        if key in checkpointer.checkpointables:
            raise KeyError(f"cannot checkpoint the {key} state: the checkpointer already uses the key {key!r}")
        checkpointer.add_checkpointable(key, obj)
        added.append(key)
    return added


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` for d2_bnstats configs (see module docstring)."""

    def __init__(self, cfg):
        step_trainers = []
        with cpu_aware_ddp(), recording_step_trainers(step_trainers):
            super().__init__(cfg)
        grad_scaler = getattr(step_trainers[-1], "grad_scaler", None) if step_trainers else None
        trainer_state = self.state_dict() if hasattr(self, "state_dict") else {}
        training_state = {
            "optimizer": self.optimizer,
            "scheduler": getattr(self, "scheduler", None),
            "grad_scaler": grad_scaler,
        }
        added = checkpoint_training_state(self.checkpointer, trainer_state, training_state)
        if added:
            logger.info("checkpoints also hold: %s (this detectron2's trainer does not save them)", ", ".join(added))

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
        # DefaultTrainer builds the hooks right after its checkpointer: the periodic checkpointer
        # and the final PreciseBN save must get the atomic one
        self.checkpointer = atomic_checkpointer(self.checkpointer)
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
        # before the writers, so the skip counts go out with the same step's metrics
        writer = next((i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)), len(ret))
        ret[writer:writer] = [StatisticsHealthHook(), DetectionLossHook()]
        # first: the step's non-finite statistics are undone before any other hook sees them
        ret.insert(0, StepGuardHook())
        bnstats = bnstats_node(cfg)
        if bnstats is not None and bnstats.get("CHECK_REPLICAS", False):
            ret.append(ReplicaCheck(cfg.OUTPUT_DIR))
        return ret

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's loader; an image that fails to load names its file and image id."""
        return build_detection_train_loader(cfg, mapper=FileNamingMapper(DatasetMapper(cfg, is_train=True)))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        if test_batch_stats_enabled(cfg):
            return build_batched_test_loader(
                cfg, dataset_name, cfg.BNSTATS.TEST_BATCH_STATS.IMS_PER_BATCH, trainer_cls=super(Trainer, cls)
            )
        return build_detection_test_loader(cfg, dataset_name, mapper=FileNamingMapper(DatasetMapper(cfg, is_train=False)))

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        with evaluation_statistics(cfg, model):
            return super().test(cfg, model, evaluators)
