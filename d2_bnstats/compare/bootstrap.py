"""A paired bootstrap interval over test images for the COCO AP difference of two strategies.

The seeds of a training tell how much a result depends on the training; on one checkpoint, the
question a user has is whether strategy A beats EMA *on this data* or only on these particular test
images. The answer is a bootstrap over images (Efron & Tibshirani, "An Introduction to the
Bootstrap", 1993, ch. 13, percentile interval): draw the test set's images with replacement, compute
both strategies' COCO AP on the same draw, keep the difference; the 2.5% and 97.5% quantiles of
those differences over many draws are the 95% interval. Pairing (one draw for both strategies)
removes the variation of the images' difficulty, which both strategies share.

COCO AP does not decompose per image, so each draw needs the accumulation step of COCO's evaluation
on the drawn images (an image drawn twice counts twice). The expensive part, matching detections to
ground truth per image, is done once by pycocotools (``COCOeval.evaluate``); :func:`coco_ap` then
repeats pycocotools' ``accumulate`` for the "all" area range and the largest detection count, in
numpy, per draw: per category the drawn images' detections sorted by score, cumulative true and
false positives per IoU threshold, the precision made monotone and read at the 101 recall
thresholds, AP the mean over thresholds and categories with ground truth. On every image once, in
the evaluator's image order, it equals pycocotools' AP (the test checks this).
"""
import contextlib
import io
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["ImageMatches", "match_detections", "coco_ap", "paired_ap_interval"]


class ImageMatches:
    """Per category, per test image: the detection scores, whether each detection is a true
    positive at each IoU threshold, whether it is ignored, and the number of non-ignored ground
    truths; from a finished ``COCOeval.evaluate()``."""

    def __init__(self, cocoeval):
        params = cocoeval.params
        self.image_ids: List[int] = list(params.imgIds)
        self.rec_thresholds = np.asarray(params.recThrs)
        self.num_iou = len(params.iouThrs)
        categories = list(params.catIds) if params.useCats else [-1]
        images, areas = len(self.image_ids), len(params.areaRng)
        max_det = params.maxDets[-1]
        all_area = list(params.areaRngLbl).index("all")
        self.categories = []  # per category: list over images of (scores, tp[T, D], ignore[T, D], npig) or None
        for k in range(len(categories)):
            per_image = []
            for i in range(images):
                e = cocoeval.evalImgs[k * areas * images + all_area * images + i]
                if e is None:
                    per_image.append(None)
                    continue
                matched = np.asarray(e["dtMatches"])[:, :max_det] > 0
                ignore = np.asarray(e["dtIgnore"])[:, :max_det].astype(bool)
                per_image.append((np.asarray(e["dtScores"][:max_det], dtype=float), matched, ignore,
                                  int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))))
            self.categories.append(per_image)


def match_detections(gt_json: str, results: List[dict], image_ids: Optional[Sequence[int]] = None,
                     iou_type: str = "bbox") -> ImageMatches:
    """pycocotools' per-image matching of ``results`` (COCO result dicts, e.g. the content of
    detectron2's ``coco_instances_results.json``) against ``gt_json``, over ``image_ids`` (default:
    every image of the ground truth)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO(gt_json)
        dt = gt.loadRes(list(results)) if results else COCO()
        if not results:  # no detection at all: an empty result set with the ground truth's images
            dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset.get("categories", []),
                          "annotations": []}
            dt.createIndex()
        cocoeval = COCOeval(gt, dt, iou_type)
        if image_ids is not None:
            cocoeval.params.imgIds = sorted(image_ids)
        cocoeval.evaluate()
    return ImageMatches(cocoeval)


def coco_ap(matches: ImageMatches, draw: Optional[Sequence[int]] = None) -> float:
    """COCO AP (%, IoU 0.50:0.95, area all, the largest detection count) over the images at the
    indices ``draw`` (repeats count repeatedly; default: every image once, in order); 0 when no
    category has ground truth in the draw."""
    draw = range(len(matches.image_ids)) if draw is None else draw
    recall_thresholds = matches.rec_thresholds
    precisions = []
    for per_image in matches.categories:
        drawn = [per_image[i] for i in draw if per_image[i] is not None]
        npig = sum(e[3] for e in drawn)
        if not drawn or npig == 0:
            continue
        scores = np.concatenate([e[0] for e in drawn])
        order = np.argsort(-scores, kind="mergesort")
        matched = np.concatenate([e[1] for e in drawn], axis=1)[:, order]
        ignore = np.concatenate([e[2] for e in drawn], axis=1)[:, order]
        tp = np.cumsum(matched & ~ignore, axis=1).astype(float)
        fp = np.cumsum(~matched & ~ignore, axis=1).astype(float)
        detections = tp.shape[1]
        for t in range(matches.num_iou):
            q = np.zeros(len(recall_thresholds))
            if detections:
                recall = tp[t] / npig
                precision = tp[t] / (fp[t] + tp[t] + np.spacing(1))
                precision = np.maximum.accumulate(precision[::-1])[::-1]  # monotone from the right
                index = np.searchsorted(recall, recall_thresholds, side="left")
                inside = index < detections
                q[inside] = precision[index[inside]]
            precisions.append(q)
    return float(np.mean(precisions) * 100.0) if precisions else 0.0


def paired_ap_interval(a: ImageMatches, b: ImageMatches, rounds: int = 1000, level: float = 0.95,
                       seed: int = 0) -> Dict[str, float]:
    """``difference`` = AP(a) − AP(b) on every image, and the percentile bootstrap interval
    (``low``, ``high``) of that difference over ``rounds`` draws of the images with replacement, the
    same draw for both. ``a`` and ``b`` must cover the same images."""
    if a.image_ids != b.image_ids:
        raise ValueError("the two strategies were evaluated on different images; a paired interval needs the same")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    n = len(a.image_ids)
    rng = np.random.default_rng(seed)
    differences = np.empty(rounds)
    for r in range(rounds):
        draw = np.sort(rng.integers(0, n, size=n))  # image order, as the evaluator's
        differences[r] = coco_ap(a, draw) - coco_ap(b, draw)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(differences, [tail, 1.0 - tail])
    return {"difference": coco_ap(a) - coco_ap(b), "low": float(low), "high": float(high), "rounds": rounds,
            "level": level, "images": n}
