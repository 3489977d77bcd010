"""The COCO evaluator of the plug-in against detectron2's own and against detections with known AP."""
import math

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

from d2_bnstats.d2.evaluation import DetectionCountingCOCOEvaluator

VAL = "fashion_scenes_tiny_val"


def _outputs(record, boxes_xyxy, classes):
    instances = Instances((record["height"], record["width"]))
    instances.pred_boxes = Boxes(torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4))
    instances.scores = torch.ones(len(classes))
    instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
    return [{"instances": instances}]


def _ground_truth(record):
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in record["annotations"]]
    return boxes, [a["category_id"] for a in record["annotations"]]


def _evaluate(evaluator, detections):
    evaluator.reset()
    for record in DatasetCatalog.get(VAL):
        boxes, classes = detections(record)
        evaluator.process([{"image_id": record["image_id"]}], _outputs(record, boxes, classes))
    return evaluator.evaluate()["bbox"]


def test_no_detection_scores_zero_where_detectron2_says_nan(datasets_root, tmp_path):
    ours = DetectionCountingCOCOEvaluator(VAL, tasks=("bbox",), distributed=False, output_dir=str(tmp_path / "a"),
                                         use_fast_impl=False)
    theirs = COCOEvaluator(VAL, tasks=("bbox",), distributed=False, output_dir=str(tmp_path / "b"),
                           use_fast_impl=False)
    nothing = lambda record: ([], [])  # noqa: E731
    detectron2_result = _evaluate(theirs, nothing)
    assert all(math.isnan(detectron2_result[m]) for m in ("AP", "AP50", "AP75"))
    result = _evaluate(ours, nothing)
    assert ours.detections == 0
    assert (result["AP"], result["AP50"], result["AP75"]) == (0.0, 0.0, 0.0)
    assert all(math.isnan(result[m]) for m in ("APs", "APm", "APl"))  # undefined per area: left alone


def test_detections_are_scored_as_by_detectron2(datasets_root, tmp_path):
    """With detections the result is detectron2's: the ground truth itself scores 100, and half of
    each image's objects (the other half missed) the same as with detectron2's evaluator."""
    ours = DetectionCountingCOCOEvaluator(VAL, tasks=("bbox",), distributed=False, output_dir=str(tmp_path / "a"),
                                         use_fast_impl=False)
    theirs = COCOEvaluator(VAL, tasks=("bbox",), distributed=False, output_dir=str(tmp_path / "b"),
                           use_fast_impl=False)
    assert _evaluate(ours, _ground_truth)["AP"] == pytest.approx(100.0)
    assert ours.detections == sum(len(r["annotations"]) for r in DatasetCatalog.get(VAL))

    def half(record):
        boxes, classes = _ground_truth(record)
        return boxes[::2], classes[::2]

    mine, reference = _evaluate(ours, half), _evaluate(theirs, half)
    assert 0.0 < mine["AP"] < 100.0
    assert {k: v for k, v in mine.items() if not math.isnan(v)} == \
        {k: v for k, v in reference.items() if not math.isnan(v)}


def test_the_lazyconfig_path_scores_a_model_without_detections_zero(datasets_root, tmp_path):
    """d2_bnstats.lazy.evaluate on a LazyConfig naming detectron2's COCOEvaluator: 0, as the yacs path."""
    from d2_bnstats import build_lazy_model, lazy, model_zoo
    from d2_bnstats.d2.lazy.loop import build_evaluator
    from d2_bnstats.d2.lazy.train import load_config

    cfg = load_config(model_zoo.get_config_file("lazy/cpu/faster_rcnn_R_18_FPN_fashion.py"), [
        f"dataloader.test.dataset.names={VAL}", f"train.output_dir={tmp_path}", "train.device=cpu",
        "model.roi_heads.box_predictor.test_score_thresh=1.0"], world_size=1)  # no score is above 1: no detection
    assert cfg.dataloader.evaluator._target_ is COCOEvaluator
    evaluator = build_evaluator(cfg)
    assert isinstance(evaluator, DetectionCountingCOCOEvaluator) and evaluator.dataset_name == VAL
    assert cfg.dataloader.evaluator._target_ is COCOEvaluator  # the config is left as it was
    results = lazy.evaluate(cfg, build_lazy_model(cfg).eval())
    assert (results["bbox"]["AP"], results["bbox"]["AP50"], results["bbox"]["AP75"]) == (0.0, 0.0, 0.0)
