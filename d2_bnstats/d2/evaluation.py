"""COCO evaluation that works whether or not detectron2's compiled fast evaluator exists, and that
scores a model without a single detection as the COCO API does (AP 0), not as NaN."""
import functools
import logging
import math
import os
from typing import Optional

from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

logger = logging.getLogger(__name__)

# The metrics that are defined whenever the data set has ground truth: with no detection at all the
# COCO API's precision is 0 at every recall threshold, so these are 0. The per-area metrics (APs,
# APm, APl) stay NaN: they are undefined where the data set has no object of that size.
ZERO_WITHOUT_DETECTIONS = ("AP", "AP50", "AP75")


@functools.lru_cache(maxsize=1)
def fast_coco_eval_available() -> bool:
    """True when detectron2 was built with its C++ COCO evaluator (absent in the PyPI snapshot)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return hasattr(_C, "COCOevalEvaluateImages") and hasattr(_C, "COCOevalAccumulate")


def coco_tasks(cfg):
    tasks = ["bbox"]
    if cfg.MODEL.MASK_ON:
        tasks.append("segm")
    return tuple(tasks)


class DetectionCountingCOCOEvaluator(COCOEvaluator):
    """detectron2's ``COCOEvaluator`` that counts the detections it is given (over all processes).

    With none at all, detectron2 skips the COCO API and reports every metric as NaN ("No predictions
    from the model!"), which reads as "not measured" and drops a failed model out of averages. The
    COCO API itself scores a model without detections 0: this evaluator reports AP, AP50 and AP75
    as 0.0 then, and logs that it did. Anything else is detectron2's result.
    """

    def __init__(self, dataset_name: str, *args, **kwargs):
        self.dataset_name = dataset_name
        self.detections = 0
        super().__init__(dataset_name, *args, **kwargs)

    def reset(self):
        super().reset()
        self.detections = 0

    def process(self, inputs, outputs):
        super().process(inputs, outputs)
        for output in outputs:
            instances = output.get("instances")
            self.detections += len(instances) if instances is not None else 0

    def evaluate(self, img_ids=None):
        results = super().evaluate(img_ids)
        detections = sum(comm.all_gather(self.detections)) if comm.get_world_size() > 1 else self.detections
        if detections or not results:
            return results
        for metrics in results.values():
            for name, value in metrics.items():
                if name in ZERO_WITHOUT_DETECTIONS and isinstance(value, float) and math.isnan(value):
                    metrics[name] = 0.0
        logger.warning("%s: the model made no detection on %s; AP, AP50, AP75 reported as 0 (the COCO API's "
                       "score for no detections)", type(self).__name__, self.dataset_name)
        return results


def build_coco_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None) -> COCOEvaluator:
    """COCO bbox (and segm with MASK_ON) evaluation; the pycocotools implementation when the fast
    one is unavailable; a model without detections scores 0 (:class:`DetectionCountingCOCOEvaluator`)."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    return DetectionCountingCOCOEvaluator(
        dataset_name,
        tasks=coco_tasks(cfg),
        distributed=True,
        output_dir=output_folder,
        use_fast_impl=fast_coco_eval_available(),
    )
