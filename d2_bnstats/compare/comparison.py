"""The comparison itself: load one checkpoint, COCO-evaluate a fresh copy of it under each strategy,
measure the train–test discrepancy per layer, and write the tables, JSON and figures.

A strategy that cannot run on this model or build says why (``available: false``, ``reason``)
instead of a row of numbers.
"""
import contextlib
import copy
import logging
import os
import time
from typing import Optional, Sequence

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from detectron2.utils import comm

from ..d2.evaluation import build_coco_evaluator, coco_tasks
from ..d2.population import batched_loader
from ..d2.trainer import Trainer
from .discrepancy import discrepancy_report
from .plots import write_plots
from .recommend import intervals_against_reference
from .registry import build_strategy, default_strategy_specs
from .report import slug, write_text_and_json
from .strategies import CompareContext, Strategy

logger = logging.getLogger("d2_bnstats.compare")


class SubsetEvaluator(DatasetEvaluator):
    """Evaluate only the images that were run (COCOEvaluator scores the whole json otherwise)."""

    def __init__(self, inner, img_ids):
        self.inner, self.img_ids = inner, img_ids

    def reset(self):
        self.inner.reset()

    def process(self, inputs, outputs):
        self.inner.process(inputs, outputs)

    def evaluate(self):
        return self.inner.evaluate(img_ids=self.img_ids)


def evaluate_model(cfg, model, output_dir, *, test_batch_size=1, max_images=0, trainer_cls=None, inference=None):
    """COCO results per test data set: {dataset: {task: {metric: value}}}."""
    results = {}
    for dataset_name in cfg.DATASETS.TEST:
        if trainer_cls:
            base = trainer_cls.build_test_loader(cfg, dataset_name)
        else:
            base = build_detection_test_loader(cfg, dataset_name)
        loader = batched_loader(base, test_batch_size, max_images)
        evaluator = build_coco_evaluator(cfg, dataset_name, os.path.join(output_dir, dataset_name))
        if max_images:
            ids = [d["image_id"] for d in DatasetCatalog.get(dataset_name)[:max_images]]
            evaluator = SubsetEvaluator(evaluator, ids)
        with (inference or contextlib.nullcontext()):
            res = inference_on_dataset(model, loader, evaluator)
        results[dataset_name] = {task: dict(res.get(task, {})) for task in coco_tasks(cfg)} if res else {}
    return results


def load_model(cfg, trainer_cls):
    model = trainer_cls.build_model(cfg)
    checkpoint = DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS, checkpointables=[])
    return model, checkpoint


def check_inputs(cfg) -> None:
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("MODEL.WEIGHTS is empty: give the checkpoint to compare "
                         "(MODEL.WEIGHTS path/to/model_final.pth)")
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: name the test set(s) to evaluate on, "
                         "e.g. DATASETS.TEST \"('fashion_scenes_val',)\"")


def strategy_options(precise_bn_samples: int, batch_sizes: Sequence[int], max_images: int,
                     training_images_seed: int = 0) -> dict:
    """The options the strategy factories and strategies read (registry.py, strategies.py)."""
    return {"precise_bn_samples": precise_bn_samples, "training_images_seed": training_images_seed,
            "test_batch_size": batch_sizes[0] if batch_sizes else 2,
            "batch_sizes": list(batch_sizes) or [2], "max_images": max_images}


def build_strategies(specs: Optional[Sequence[str]], options: dict) -> list:
    """The strategies of ``specs`` (default: every registered one); their names must differ."""
    specs = list(specs) if specs else default_strategy_specs(options)
    built = [build_strategy(spec, options) for spec in specs]
    names = [s.name for s in built]
    if len(set(names)) != len(names):
        raise ValueError(f"strategies given twice: {names}")
    folders = [slug(name) for name in names]  # each strategy's evaluator writes into its own folder
    if len(set(folders)) != len(folders):
        raise ValueError(f"strategies whose names give the same output folder: {names} -> {folders}")
    return built


def evaluate_strategy(ctx: CompareContext, strategy: Strategy, output_dir: str, max_images: int):
    """The strategy's summary entry, and the model copy in its state (None if unavailable)."""
    entry = {"name": strategy.name, "description": strategy.description,
             "test_batch_size": strategy.test_batch_size, "available": True, "reason": None}
    why = strategy.unavailable(ctx)
    if why is not None:
        entry.update(available=False, reason=why)
        logger.info("strategy %s unavailable: %s", strategy.name, why)
        return entry, None
    logger.info("strategy %s: %s", strategy.name, strategy.description)
    start = time.perf_counter()
    candidate = copy.deepcopy(ctx.model)
    entry["prepare"] = strategy.prepare(ctx, candidate)
    entry["results"] = evaluate_model(
        ctx.cfg, candidate, os.path.join(output_dir, "inference", slug(strategy.name)),
        test_batch_size=strategy.test_batch_size, max_images=max_images, trainer_cls=ctx.trainer_cls,
        inference=strategy.inference(candidate),
    )
    entry["seconds"] = round(time.perf_counter() - start, 1)
    return entry, candidate


def _summary_header(cfg, checkpoint: dict, max_images: int) -> dict:
    return {
        "weights": cfg.MODEL.WEIGHTS,
        "checkpoint_iteration": checkpoint.get("iteration"),
        "datasets": list(cfg.DATASETS.TEST),
        "tasks": list(coco_tasks(cfg)),
        "max_images": max_images,
        "world_size": comm.get_world_size(),
        "strategies": [],
    }


def compare(
    cfg,
    output_dir: str,
    *,
    strategies: Optional[Sequence[str]] = None,
    max_images: int = 0,
    precise_bn_samples: int = 1000,
    training_images_seed: int = 0,
    bootstrap_rounds: int = 1000,
    batch_sizes: Sequence[int] = (2,),
    discrepancy_images: int = 8,
    hist_layers: Sequence[str] = (),
    trainer_cls=None,
    plots: bool = True,
) -> dict:
    """Evaluate ``cfg.MODEL.WEIGHTS`` under every strategy and write ``compare.json``, ``compare.md``,
    ``ap.png``, ``discrepancy_layers.png`` and ``discrepancy_hist_<layer>.png`` into ``output_dir``.
    Returns the summary (the JSON content; on the main process also ``"text"``, the tables).

    Every strategy that draws training images (PreciseBN, EvalNorm offline, EvalNorm with PreciseBN's
    statistics) seeds the random generators with ``training_images_seed`` right before its draw, so
    the strategies of one comparison see the same images and a comparison run again sees them too.

    With ``bootstrap_rounds`` > 0 and EMA among the strategies, each strategy's box AP difference to
    EMA gets a 95% paired bootstrap interval over the test images and the summary a recommendation
    (``versus_ema``, :mod:`.recommend`)."""
    trainer_cls = Trainer if trainer_cls is None else trainer_cls
    check_inputs(cfg)
    options = strategy_options(precise_bn_samples, batch_sizes, max_images, training_images_seed)
    built = build_strategies(strategies, options)
    os.makedirs(output_dir, exist_ok=True)
    model, checkpoint = load_model(cfg, trainer_cls)
    ctx = CompareContext(cfg, model, trainer_cls, options)
    summary = _summary_header(cfg, checkpoint, max_images)
    prepared = {}
    for strategy in built:
        entry, candidate = evaluate_strategy(ctx, strategy, output_dir, max_images)
        summary["strategies"].append(entry)
        if candidate is not None:
            prepared[strategy.name] = candidate
    if comm.is_main_process():  # the evaluators wrote the detections there
        summary["versus_ema"] = intervals_against_reference(summary, built, output_dir, bootstrap_rounds,
                                                            max_images=max_images)
    report = {"layers": [], "note": "skipped (--discrepancy-images 0)"}
    if discrepancy_images > 0:
        report = discrepancy_report(ctx, [s for s in built if s.name in prepared], prepared,
                                    discrepancy_images, hist_layers)
    hist_values = report.pop("_hist_values", {})
    summary["discrepancy"] = report
    summary["plots"] = {}
    if comm.is_main_process():
        if plots:
            summary["plots"] = write_plots(summary, hist_values, output_dir)
        summary["text"] = write_text_and_json(summary, output_dir)
    return summary
