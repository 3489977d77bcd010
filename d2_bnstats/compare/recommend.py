"""Which inference strategy to use for this model and data: each strategy's box AP difference to EMA
on the same checkpoint, with a 95% paired bootstrap interval over the test images
(:mod:`.bootstrap`), and one recommendation.

The rule: among the strategies whose interval lies entirely above 0, the one with the largest
difference; when none does, "no strategy beats EMA here" (EMA is what a model uses without any
plug-in setting). A strategy that beats EMA on these test images only by chance has an interval that
reaches 0 or below, so it is not recommended.
"""
import json
import logging
import os
from typing import Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from .bootstrap import match_detections, paired_ap_interval
from .report import slug

logger = logging.getLogger(__name__)

REFERENCE = "EMA"
RESULTS_FILE = "coco_instances_results.json"

__all__ = ["REFERENCE", "intervals_against_reference", "recommendation"]


def results_path(output_dir: str, strategy_name: str, dataset: str) -> str:
    """Where :func:`~.comparison.evaluate_strategy`'s evaluator wrote a strategy's detections."""
    return os.path.join(output_dir, "inference", slug(strategy_name), dataset, RESULTS_FILE)


def read_detections(output_dir: str, strategy_name: str, dataset: str) -> List[dict]:
    """A strategy's detections; none when its evaluator wrote no file (a model without detections)."""
    path = results_path(output_dir, strategy_name, dataset)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def intervals_against_reference(summary: dict, strategies: Sequence, output_dir: str, rounds: int = 1000,
                                seed: int = 0, max_images: int = 0) -> Optional[dict]:
    """Per available strategy (``summary["strategies"]`` entries, with ``strategies`` the objects in
    the same order), on the first test set: ``difference`` (its box AP minus EMA's), ``low``, ``high``
    (the 95% paired bootstrap interval over ``rounds`` draws of the test images) and ``how_to_apply``;
    then the ``recommendation``. None (with the reason logged) when EMA was not evaluated or
    ``rounds`` is 0."""
    if rounds <= 0:
        return None
    names = [s["name"] for s in summary["strategies"]]
    if REFERENCE not in names or not summary["strategies"][names.index(REFERENCE)]["available"]:
        logger.info("no interval against EMA: EMA is not among the strategies evaluated")
        return None
    dataset = summary["datasets"][0]
    gt_json = MetadataCatalog.get(dataset).get("json_file", None)
    if not gt_json or not os.path.isfile(gt_json):
        logger.info("no interval against EMA: %s has no COCO json file", dataset)
        return None
    image_ids = [d["image_id"] for d in DatasetCatalog.get(dataset)[:max_images]] if max_images else None
    reference = match_detections(gt_json, read_detections(output_dir, REFERENCE, dataset), image_ids)
    out: Dict[str, dict] = {}
    for entry, strategy in zip(summary["strategies"], strategies):
        if entry["name"] == REFERENCE or not entry["available"]:
            continue
        detections = read_detections(output_dir, entry["name"], dataset)
        result = paired_ap_interval(match_detections(gt_json, detections, image_ids), reference, rounds=rounds, seed=seed)
        out[entry["name"]] = dict(result, how_to_apply=strategy.how_to_apply())
    return {"reference": REFERENCE, "dataset": dataset, "metric": "bbox AP", "rounds": rounds, "seed": seed,
            "strategies": out, "recommendation": recommendation(out)}


def recommendation(intervals: Dict[str, dict]) -> dict:
    """The strategy to use: among those whose interval lies above 0, the largest ``difference``;
    ``strategy`` None when none does. ``text`` says it in one line, with how to apply it."""
    winners: List[str] = [name for name, r in intervals.items() if r["low"] > 0]
    if not winners:
        return {"strategy": None,
                "text": "no strategy beats EMA here: every interval of a difference to EMA reaches 0 or below; "
                        "keep the checkpoint's own statistics"}
    best = max(winners, key=lambda name: intervals[name]["difference"])
    r = intervals[best]
    return {"strategy": best,
            "text": (f"use {best}: {r['difference']:+.2f} box AP over EMA, 95% interval [{r['low']:+.2f}, "
                     f"{r['high']:+.2f}] over the test images; apply it with {r['how_to_apply']}")}
