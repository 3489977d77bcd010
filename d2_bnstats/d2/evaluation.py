"""COCO evaluation that works whether or not detectron2's compiled fast evaluator exists."""
import functools
import os
from typing import Optional

from detectron2.evaluation import COCOEvaluator


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


def build_coco_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None) -> COCOEvaluator:
    """COCO bbox (and segm with MASK_ON) evaluation; the pycocotools implementation when the fast
    one is unavailable."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    return COCOEvaluator(
        dataset_name,
        tasks=coco_tasks(cfg),
        distributed=True,
        output_dir=output_folder,
        use_fast_impl=fast_coco_eval_available(),
    )
