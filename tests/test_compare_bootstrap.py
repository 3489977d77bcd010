"""The paired bootstrap over test images: its AP against pycocotools' own, a drawn image counted as
often as drawn (against pycocotools on a ground truth where the copies are real images), and the
interval's behaviour."""
import contextlib
import io
import json
import random

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from d2_bnstats.compare.bootstrap import coco_ap, match_detections, paired_ap_interval

CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "c"}]


def synthetic(num_images=12, seed=0, noise=6.0):
    """A ground truth and detections: boxes jittered by ``noise`` pixels, false positives, misses."""
    rng = random.Random(seed)
    images, annotations, detections = [], [], []
    for i in range(1, num_images + 1):
        images.append({"id": i, "width": 128, "height": 128, "file_name": f"{i}.png"})
        for _ in range(rng.randint(0, 4)):
            x, y, w, h = rng.uniform(0, 80), rng.uniform(0, 80), rng.uniform(10, 40), rng.uniform(10, 40)
            cat = rng.choice(CATEGORIES)["id"]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": cat, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0})
            if rng.random() < 0.85:  # detected, with a jitter
                jitter = [rng.gauss(0, noise) for _ in range(4)]
                detections.append({"image_id": i, "category_id": cat, "score": rng.random(),
                                   "bbox": [x + jitter[0], y + jitter[1], max(1, w + jitter[2]), max(1, h + jitter[3])]})
        for _ in range(rng.randint(0, 2)):  # false positives
            detections.append({"image_id": i, "category_id": rng.choice(CATEGORIES)["id"], "score": rng.random() * 0.6,
                               "bbox": [rng.uniform(0, 90), rng.uniform(0, 90), 20, 20]})
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}, detections


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(json.dumps(content))
    return str(path)


def pycocotools_ap(gt, detections, tmp_path, name):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(write(tmp_path, f"{name}_gt.json", gt))
        e = COCOeval(coco, coco.loadRes(detections), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats[0] * 100.0


def test_ap_on_every_image_equals_pycocotools(tmp_path):
    for seed in range(3):
        gt, detections = synthetic(seed=seed)
        matches = match_detections(write(tmp_path, "gt.json", gt), detections)
        assert coco_ap(matches) == pytest.approx(pycocotools_ap(gt, detections, tmp_path, "ref"), abs=1e-9)


def test_a_drawn_image_counts_as_often_as_drawn(tmp_path):
    gt, detections = synthetic(seed=4)
    matches = match_detections(write(tmp_path, "gt.json", gt), detections)
    draw = [0, 0, 2, 3, 3, 3, 7, 9, 11, 11, 11, 11]
    # the reference: a ground truth where every drawn copy is a real image of its own
    copies = {"images": [], "annotations": [], "categories": CATEGORIES}
    copied_detections = []
    for new_id, index in enumerate(draw, start=1):
        old_id = matches.image_ids[index]
        copies["images"].append({"id": new_id, "width": 128, "height": 128, "file_name": f"{new_id}.png"})
        for a in gt["annotations"]:
            if a["image_id"] == old_id:
                copies["annotations"].append(dict(a, id=len(copies["annotations"]) + 1, image_id=new_id))
        copied_detections += [dict(d, image_id=new_id) for d in detections if d["image_id"] == old_id]
    expected = pycocotools_ap(copies, copied_detections, tmp_path, "copies")
    assert coco_ap(matches, draw) == pytest.approx(expected, abs=1e-9)


def test_paired_interval_is_tight_for_a_constant_per_image_change_and_contains_the_difference(tmp_path):
    gt, detections = synthetic(num_images=40, seed=5)
    gt_path = write(tmp_path, "gt.json", gt)
    good = match_detections(gt_path, detections)
    same = paired_ap_interval(good, good, rounds=50)
    assert same["difference"] == same["low"] == same["high"] == 0.0  # the same strategy: no spread at all
    rng = random.Random(7)
    worse = [dict(d, bbox=[v + rng.gauss(0, 4) for v in d["bbox"][:2]] + d["bbox"][2:]) for d in detections]
    bad = match_detections(gt_path, worse)
    result = paired_ap_interval(good, bad, rounds=300, seed=1)
    assert result["low"] <= result["difference"] <= result["high"] and result["low"] < result["high"]
    assert result["difference"] == pytest.approx(coco_ap(good) - coco_ap(bad))
    again = paired_ap_interval(good, bad, rounds=300, seed=1)
    assert again == result  # the draw is seeded
    with pytest.raises(ValueError, match="same"):
        paired_ap_interval(good, match_detections(gt_path, detections, image_ids=[1, 2]))


def test_no_detection_at_all_scores_zero(tmp_path):
    gt, _ = synthetic(seed=6)
    matches = match_detections(write(tmp_path, "gt.json", gt), [])
    assert coco_ap(matches) == 0.0
