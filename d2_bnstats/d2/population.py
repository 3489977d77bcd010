"""detectron2 glue for population statistics (the maths: :mod:`d2_bnstats.layers.population`,
:mod:`~d2_bnstats.layers.frozen_bn`, :mod:`~d2_bnstats.layers.test_batch_stats`).

- :class:`PreciseBNHook` recomputes population statistics right before every COCO evaluation of
  training (every ``TEST.EVAL_PERIOD`` and at the last iteration, before the checkpointer so that
  ``model_final.pth`` holds them) when ``TEST.PRECISE_BN.ENABLED``; the ``--eval-only`` path calls
  :func:`prepare_for_evaluation`, which does the same. It replaces detectron2's ``hooks.PreciseBN``
  in :class:`d2_bnstats.d2.trainer.Trainer` at the same place in the hook list.
- :class:`FrozenBNHook`: from ``BNSTATS.FROZEN_BN.START_ITER`` on, batch-statistic layers normalise
  with population statistics (after a PreciseBN pass if ``BNSTATS.FROZEN_BN.PRECISE_BN``); re-applied
  on ``--resume``.
- :func:`build_batched_test_loader` / :func:`evaluation_statistics`: batch statistics at test with
  ``BNSTATS.TEST_BATCH_STATS.IMS_PER_BATCH`` images per test batch.
"""
import contextlib
import datetime
import logging
import math
import time
from typing import Callable, List, Optional

import torch
from detectron2.data.samplers import InferenceSampler
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from torch.utils.data import DataLoader, IterableDataset

from ..layers.frozen_bn import freeze_batch_statistics
from ..layers.population import PreciseBNReport, default_forward, precise_bn
from ..layers.population_protocol import population_layers, unwrap
from ..layers.test_batch_stats import batch_statistics

logger = logging.getLogger("d2_bnstats.population")


# --------------------------------------------------------------------------------------------------
# config


def precise_bn_num_batches(cfg) -> int:
    """Batches (per process) of one PreciseBN pass: ``BNSTATS.PRECISE_BN.NUM_SAMPLES`` images in
    total over all processes if set, else ``TEST.PRECISE_BN.NUM_ITER`` batches."""
    node = cfg.get("BNSTATS", None)
    samples = int(node.PRECISE_BN.NUM_SAMPLES) if node is not None and "PRECISE_BN" in node else 0
    if samples > 0:
        return max(1, math.ceil(samples / cfg.SOLVER.IMS_PER_BATCH))
    return int(cfg.TEST.PRECISE_BN.NUM_ITER)


def check_population_config(cfg) -> None:
    """Errors that say what was wrong and what is accepted."""
    node = cfg.BNSTATS
    if node.PRECISE_BN.NUM_SAMPLES < 0:
        raise ValueError(
            f"BNSTATS.PRECISE_BN.NUM_SAMPLES = {node.PRECISE_BN.NUM_SAMPLES}: use a number of images > 0, "
            "or 0 for TEST.PRECISE_BN.NUM_ITER batches"
        )
    if node.PRECISE_BN.NUM_SAMPLES == 0 and cfg.TEST.PRECISE_BN.NUM_ITER < 1 and cfg.TEST.PRECISE_BN.ENABLED:
        raise ValueError(
            f"TEST.PRECISE_BN.NUM_ITER = {cfg.TEST.PRECISE_BN.NUM_ITER}: PreciseBN needs >= 1 batch "
            "(or set BNSTATS.PRECISE_BN.NUM_SAMPLES)"
        )
    if node.PRECISE_BN.LOG_PERIOD < 1:
        raise ValueError(f"BNSTATS.PRECISE_BN.LOG_PERIOD = {node.PRECISE_BN.LOG_PERIOD}: must be >= 1")
    if node.TEST_BATCH_STATS.IMS_PER_BATCH < 1:
        raise ValueError(
            f"BNSTATS.TEST_BATCH_STATS.IMS_PER_BATCH = {node.TEST_BATCH_STATS.IMS_PER_BATCH}: "
            "the test batch needs >= 1 image"
        )
    start = node.FROZEN_BN.START_ITER
    if start >= 0 and start >= cfg.SOLVER.MAX_ITER:
        logger.warning(
            "BNSTATS.FROZEN_BN.START_ITER = %d >= SOLVER.MAX_ITER = %d: FrozenBN never starts",
            start, cfg.SOLVER.MAX_ITER,
        )


def frozen_bn_enabled(cfg) -> bool:
    node = cfg.get("BNSTATS", None)
    node = node.get("FROZEN_BN", None) if node is not None else None
    return node is not None and node.START_ITER >= 0


# --------------------------------------------------------------------------------------------------
# PreciseBN with detectron2 data and logging


def _progress_logger(total: int, period: int, label: str) -> Callable[[int, int], None]:
    start = time.perf_counter()

    def progress(done: int, total_: int) -> None:
        if done % period and done != total_:
            return
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (total_ - done)
        logger.info(
            "%s: %d/%d batches, %.1f s, ETA %s", label, done, total_, elapsed,
            str(datetime.timedelta(seconds=int(eta))),
        )

    return progress


def backbone_only_forward(model, layers) -> Optional[Callable]:
    """When every layer to update lives in the backbone of a detectron2 meta-architecture
    (``preprocess_image`` + ``backbone``: GeneralizedRCNN, RetinaNet, ...), a forward of the
    backbone alone gives those layers exactly the inputs of the full training-mode forward, without
    the heads, proposal matching and losses. Returns that forward, or None."""
    inner = unwrap(model)
    backbone = getattr(inner, "backbone", None)
    preprocess = getattr(inner, "preprocess_image", None)
    if not isinstance(backbone, torch.nn.Module) or not callable(preprocess) or not layers:
        return None
    inside = {id(m) for m in backbone.modules()}
    if not all(id(m) in inside for _, m in layers):
        return None

    def forward(_model, batch):
        return backbone(preprocess(batch).tensor)

    return forward


class PreciseBNRunner:
    """Runs PreciseBN on a model with batches from a (lazily built) training data loader, reusing
    the loader's iterator across runs as detectron2's hook does; logs progress and a summary."""

    def __init__(self, cfg, model, build_loader: Callable[[], object], num_batches: Optional[int] = None):
        self.model = model
        self.num_batches = precise_bn_num_batches(cfg) if num_batches is None else num_batches
        self.images_per_batch = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        node = cfg.get("BNSTATS", None)
        self.log_period = node.PRECISE_BN.LOG_PERIOD if node is not None and "PRECISE_BN" in node else 20
        self._build_loader = build_loader
        self._iter = None
        self.reports: List[PreciseBNReport] = []
        self._warned_empty = False

    def run(self, label: str = "PreciseBN") -> Optional[PreciseBNReport]:
        layers = population_layers(unwrap(self.model))
        if not layers:
            if not self._warned_empty:
                logger.info("%s: the model has no layer with population statistics to update; skipped", label)
                self._warned_empty = True
            return None
        if self._iter is None:
            self._iter = iter(self._build_loader())
        logger.info(
            "%s: recomputing the population statistics of %d layers from %d batches (%d images per process, "
            "%d processes)", label, len(layers), self.num_batches, self.images_per_batch, comm.get_world_size(),
        )
        forward = backbone_only_forward(self.model, layers)
        if forward is not None:
            logger.info("%s: every layer to update is in the backbone; running the backbone alone", label)
        with EventStorage():  # the model logs training-mode scalars; discard them
            report = precise_bn(
                self.model, self._iter, self.num_batches, layers=layers,
                forward=forward or default_forward,
                progress=_progress_logger(self.num_batches, self.log_period, label),
            )
        skipped = report.skipped
        logger.info(
            "%s: updated %d layers in %.1f s%s", label, len(report.updated), report.seconds,
            f"; {len(skipped)} layers saw no data and kept their statistics: {', '.join(skipped)}" if skipped else "",
        )
        nonfinite = getattr(report, "nonfinite", None)
        if nonfinite:
            logger.warning(
                "%s: left out %d layer calls with non-finite statistics (%s)", label, sum(nonfinite.values()),
                ", ".join(f"{name}: {n}" for name, n in sorted(nonfinite.items())),
            )
        self.reports.append(report)
        return report


def default_precise_bn_loader_factory(cfg, trainer_cls=None) -> Callable[[], object]:
    """The training data loader (``trainer_cls.build_train_loader``) with ``DATALOADER.NUM_WORKERS 0``,
    as detectron2's PreciseBN hook uses."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATALOADER.NUM_WORKERS = 0

    def build():
        if trainer_cls is not None:
            return trainer_cls.build_train_loader(cfg)
        from detectron2.data import build_detection_train_loader

        return build_detection_train_loader(cfg)

    return build


# --------------------------------------------------------------------------------------------------
# hooks


class PreciseBNHook(HookBase):
    """PreciseBN right before every evaluation of detectron2's ``EvalHook``: every ``period``
    iterations (0: never periodically) and after the last iteration. Put it before
    ``PeriodicCheckpointer`` (as detectron2 does) so the final checkpoint holds the statistics.

    If training resumes from a finished run (no step left), the evaluation detectron2 still runs in
    ``after_train`` gets a PreciseBN pass first, and ``model_final`` is saved again with it.
    """

    def __init__(self, runner: PreciseBNRunner, period: int):
        self.runner = runner
        self._period = period
        self._ran_final = False
        self.history = []  # (iteration, report) of every run

    def _run(self, label):
        report = self.runner.run(label)
        self.history.append((self.trainer.iter, report))

    def after_step(self):
        next_iter = self.trainer.iter + 1
        is_final = next_iter == self.trainer.max_iter
        if is_final or (self._period > 0 and next_iter % self._period == 0):
            self._run(f"PreciseBN (iteration {next_iter})")
            self._ran_final = self._ran_final or is_final

    def after_train(self):
        if self.trainer.iter + 1 >= self.trainer.max_iter and not self._ran_final:
            self._run("PreciseBN (resumed after the last iteration)")
            checkpointer = getattr(self.trainer, "checkpointer", None)
            if checkpointer is not None and comm.is_main_process():
                checkpointer.save("model_final", iteration=self.trainer.max_iter - 1)
            comm.synchronize()


class FrozenBNHook(HookBase):
    """From iteration ``start_iter`` on, every batch-statistic layer normalises with population
    statistics for the rest of training (optionally computed by ``runner`` right before)."""

    def __init__(self, start_iter: int, runner: Optional[PreciseBNRunner] = None):
        self.start_iter = start_iter
        self.runner = runner
        self.frozen: List[str] = []
        self._applied = False

    def before_step(self):
        if self._applied or self.trainer.iter < self.start_iter:
            return
        model = self.trainer.model
        if self.trainer.iter == self.start_iter and self.runner is not None:
            self.runner.run(f"PreciseBN before FrozenBN (iteration {self.start_iter})")
        elif self.trainer.iter > self.start_iter:
            logger.info(
                "FrozenBN: resumed at iteration %d > BNSTATS.FROZEN_BN.START_ITER = %d; the checkpoint's "
                "statistics are the frozen ones", self.trainer.iter, self.start_iter,
            )
        self.frozen = freeze_batch_statistics(model)
        self._applied = True
        logger.info(
            "FrozenBN: from iteration %d, %d layers normalise with population statistics in training",
            self.trainer.iter, len(self.frozen),
        )


def build_population_hooks(cfg, model, trainer_cls=None) -> List[HookBase]:
    """[FrozenBNHook][, PreciseBNHook] for the config, sharing one PreciseBN data loader."""
    want_precise = bool(cfg.TEST.PRECISE_BN.ENABLED)
    want_frozen = frozen_bn_enabled(cfg) and cfg.BNSTATS.FROZEN_BN.START_ITER < cfg.SOLVER.MAX_ITER
    runner = None
    if want_precise or (want_frozen and cfg.BNSTATS.FROZEN_BN.PRECISE_BN):
        runner = PreciseBNRunner(cfg, model, default_precise_bn_loader_factory(cfg, trainer_cls))
    result = []
    if want_frozen:
        result.append(FrozenBNHook(cfg.BNSTATS.FROZEN_BN.START_ITER, runner if cfg.BNSTATS.FROZEN_BN.PRECISE_BN else None))
    if want_precise:
        result.append(PreciseBNHook(runner, cfg.TEST.EVAL_PERIOD))
    return result


def prepare_for_evaluation(cfg, model, checkpoint: Optional[dict] = None, trainer_cls=None) -> Optional[PreciseBNReport]:
    """The ``--eval-only`` counterpart of the hooks: re-apply FrozenBN if the checkpoint was trained
    past ``BNSTATS.FROZEN_BN.START_ITER`` (its ``iteration``), then PreciseBN if
    ``TEST.PRECISE_BN.ENABLED``. Returns the PreciseBN report (None if it did not run)."""
    iteration = (checkpoint or {}).get("iteration")
    if frozen_bn_enabled(cfg) and iteration is not None and iteration >= cfg.BNSTATS.FROZEN_BN.START_ITER:
        names = freeze_batch_statistics(model)
        logger.info("FrozenBN: the checkpoint (iteration %d) was trained with %d frozen layers; PreciseBN "
                    "leaves them as they are", iteration, len(names))
    if not cfg.TEST.PRECISE_BN.ENABLED:
        return None
    runner = PreciseBNRunner(cfg, model, default_precise_bn_loader_factory(cfg, trainer_cls))
    return runner.run("PreciseBN (before evaluation)")


# --------------------------------------------------------------------------------------------------
# batch statistics at test


def batched_loader(loader, batch_size: int, max_images: int = 0) -> DataLoader:
    """A copy of a detectron2 test loader (1 image per batch) that yields ``batch_size`` images per
    batch (per process), over the first ``max_images`` images if > 0. The sampler is detectron2's
    ``InferenceSampler``, so processes share the images as in ordinary evaluation; the last batch of a
    process may be smaller."""
    if batch_size < 1:
        raise ValueError(f"a test batch needs >= 1 image, got {batch_size}")
    dataset = loader.dataset
    common = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn)
    if isinstance(dataset, IterableDataset):
        if max_images:
            raise ValueError("max_images needs a map-style test data set; this test loader is iterable")
        return DataLoader(dataset, batch_size=batch_size, **common)
    size = len(dataset) if not max_images else min(len(dataset), max_images)
    return DataLoader(dataset, batch_size=batch_size, sampler=InferenceSampler(size), **common)


def build_batched_test_loader(cfg, dataset_name: str, batch_size: int, max_images: int = 0, trainer_cls=None):
    if trainer_cls is None:
        from detectron2.data import build_detection_test_loader

        base = build_detection_test_loader(cfg, dataset_name)
    else:
        base = trainer_cls.build_test_loader(cfg, dataset_name)
    return batched_loader(base, batch_size, max_images)


def test_batch_stats_enabled(cfg) -> bool:
    node = cfg.get("BNSTATS", None)
    node = node.get("TEST_BATCH_STATS", None) if node is not None else None
    return bool(node is not None and node.ENABLED)


def evaluation_statistics(cfg, model):
    """Context for evaluating ``model`` as the config asks: batch statistics at test if
    ``BNSTATS.TEST_BATCH_STATS.ENABLED``, else the population statistics as they are."""
    if test_batch_stats_enabled(cfg):
        return batch_statistics(model)
    return contextlib.nullcontext()
