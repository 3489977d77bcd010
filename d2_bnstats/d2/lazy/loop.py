"""The plug-in's training-loop pieces for a LazyConfig: hooks, loading weights, evaluation.

The yacs path gets them from d2_bnstats' ``Trainer`` (d2/trainer.py). A loop in the style of
detectron2's ``tools/lazyconfig_train_net.py`` builds its own hook list; with the plug-in::

    model = d2_bnstats.build_lazy_model(cfg)                   # instead of instantiate(cfg.model)
    ...
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        *d2_bnstats.lazy.build_hooks(cfg, model),              # where DefaultTrainer puts PreciseBN
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer),
        hooks.EvalHook(cfg.train.eval_period, lambda: d2_bnstats.lazy.evaluate(cfg, model)),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period),
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    d2_bnstats.lazy.after_loading_weights(cfg, model, resumed=args.resume and checkpointer.has_checkpoint())

and for ``--eval-only``: load the weights, :func:`prepare_for_evaluation`, :func:`evaluate`. The hooks
are :mod:`d2_bnstats.d2.population`'s and :mod:`d2_bnstats.d2.replicas`'; PreciseBN reads its
batches from ``cfg.dataloader.train`` with ``num_workers=0`` (as detectron2's PreciseBN hook does).
"""
import logging
from typing import Callable, List, Optional

from detectron2.config import instantiate
from detectron2.engine import HookBase
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils.registry import locate
from torch import nn

from ...layers.frozen_bn import freeze_batch_statistics
from ..evaluation import DetectionCountingCOCOEvaluator
from ..population import (
    FrozenBNHook,
    PreciseBNHook,
    PreciseBNRunner,
    batched_loader,
    evaluation_statistics,
    frozen_bn_enabled,
    test_batch_stats_enabled,
)
from .. import weights
from ..replicas import ReplicaCheck
from ..statistics_health import StepGuardHook
from .model import check_config
from .view import LazyView

logger = logging.getLogger(__name__)


def train_loader_factory(cfg) -> Callable[[], object]:
    """Builds ``cfg.dataloader.train`` with ``num_workers=0`` when called."""

    def build():
        node = cfg.dataloader.train
        call = {key: node[key] for key in node.keys()}
        if "num_workers" in call:
            call["num_workers"] = 0
        return instantiate(call)

    return build


def _runner(cfg, view: LazyView, model: nn.Module, build_loader) -> PreciseBNRunner:
    if not view.has("SOLVER.IMS_PER_BATCH"):
        raise ValueError("PreciseBN needs the images per step: set dataloader.train.total_batch_size")
    return PreciseBNRunner(view.cfg, model, build_loader or train_loader_factory(cfg))


def build_hooks(cfg, model: nn.Module, build_loader: Optional[Callable[[], object]] = None) -> List[HookBase]:
    """The plug-in's hooks for a LazyConfig: ``[StepGuardHook][, FrozenBNHook][, PreciseBNHook][,
    ReplicaCheck]``: the once-per-step non-finite guard of ``model``'s running statistics
    (:class:`~d2_bnstats.d2.statistics_health.StepGuardHook`), then what ``bnstats.FROZEN_BN``,
    ``bnstats.PRECISE_BN`` (PreciseBN before every evaluation: every ``train.eval_period``
    iterations and after the last) and ``bnstats.CHECK_REPLICAS`` ask. Register
    them after ``LRScheduler`` and before ``PeriodicCheckpointer``/``EvalHook``, so that evaluations
    and checkpoints see the recomputed statistics. ``build_loader()`` gives PreciseBN's batches
    (default: :func:`train_loader_factory`)."""
    view = check_config(cfg)
    c = view.cfg
    with view.errors():
        want_precise = bool(c.TEST.PRECISE_BN.ENABLED)
        want_frozen = frozen_bn_enabled(c) and c.BNSTATS.FROZEN_BN.START_ITER < c.SOLVER.MAX_ITER
        runner = None
        if want_precise or (want_frozen and c.BNSTATS.FROZEN_BN.PRECISE_BN):
            runner = _runner(cfg, view, model, build_loader)
        hooks: List[HookBase] = [StepGuardHook(model)]
        if want_frozen:
            hooks.append(FrozenBNHook(c.BNSTATS.FROZEN_BN.START_ITER, runner if c.BNSTATS.FROZEN_BN.PRECISE_BN else None))
        if want_precise:
            hooks.append(PreciseBNHook(runner, int(c.TEST.get("EVAL_PERIOD", 0))))
        if c.BNSTATS.CHECK_REPLICAS:
            hooks.append(ReplicaCheck(c.get("OUTPUT_DIR", "")))
    return hooks


def after_loading_weights(cfg, model: nn.Module, resumed: bool) -> None:
    """``bnstats.INIT`` once ``train.init_checkpoint`` is loaded for a new run (``resumed``: the
    weights came from the run's own last checkpoint; nothing is reset then)."""
    view = check_config(cfg)
    view.cfg.MODEL.setdefault("WEIGHTS", "")
    weights.after_loading_weights(view.cfg, model, resumed)


def prepare_for_evaluation(cfg, model: nn.Module, checkpoint: Optional[dict] = None, build_loader=None):
    """Before evaluating loaded weights (``--eval-only``): FrozenBN again if the checkpoint was trained
    past ``bnstats.FROZEN_BN.START_ITER`` (its ``iteration``), then PreciseBN if
    ``bnstats.PRECISE_BN.ENABLED``. Returns the PreciseBN report (None if it did not run)."""
    view = check_config(cfg)
    c = view.cfg
    iteration = (checkpoint or {}).get("iteration")
    if frozen_bn_enabled(c) and iteration is not None and iteration >= c.BNSTATS.FROZEN_BN.START_ITER:
        names = freeze_batch_statistics(model)
        logger.info("FrozenBN: the checkpoint (iteration %d) was trained with %d frozen layers", iteration, len(names))
    if not c.TEST.PRECISE_BN.ENABLED:
        return None
    with view.errors():
        return _runner(cfg, view, model, build_loader).run("PreciseBN (before evaluation)")


def test_loader(cfg):
    """``cfg.dataloader.test``, with ``bnstats.TEST_BATCH_STATS.IMS_PER_BATCH`` images per batch when
    ``bnstats.TEST_BATCH_STATS.ENABLED``."""
    view = check_config(cfg)
    loader = instantiate(cfg.dataloader.test)
    if test_batch_stats_enabled(view.cfg):
        return batched_loader(loader, view.cfg.BNSTATS.TEST_BATCH_STATS.IMS_PER_BATCH)
    return loader


def build_evaluator(cfg):
    """``cfg.dataloader.evaluator`` instantiated, where detectron2's ``COCOEvaluator`` is the plug-in's
    :class:`~d2_bnstats.d2.evaluation.DetectionCountingCOCOEvaluator` (same arguments): a model without
    detections scores AP 0, as on the yacs path, not detectron2's NaN."""
    node = cfg.dataloader.evaluator
    target = node.get("_target_") if hasattr(node, "get") else None
    if isinstance(target, str):
        target = locate(target)
    if target is not COCOEvaluator:
        return instantiate(node)
    original = node._target_
    node._target_ = DetectionCountingCOCOEvaluator  # in place: the node's relative interpolations need its parents
    try:
        return instantiate(node)
    finally:
        node._target_ = original


def evaluate(cfg, model: nn.Module):
    """detectron2's ``do_test`` of ``lazyconfig_train_net.py`` with the plug-in's evaluation
    statistics (batch statistics at test with ``bnstats.TEST_BATCH_STATS``). None without
    ``cfg.dataloader.evaluator``."""
    if "evaluator" not in cfg.dataloader:
        return None
    view = check_config(cfg)
    with evaluation_statistics(view.cfg, model):
        results = inference_on_dataset(model, test_loader(cfg), build_evaluator(cfg))
    print_csv_format(results)
    return results
