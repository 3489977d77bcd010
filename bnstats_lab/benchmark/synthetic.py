"""Synthetic detectron2 training batches: what the end-to-end benchmark feeds a model whose data set
is not on the machine (the R-50-FPN models at 800 px are COCO-sized; the GPU machine has no COCO).

A batch is what detectron2's ``DatasetMapper`` hands a model: per image a CHW ``uint8`` tensor
already at network size, its ``height``/``width`` and ground-truth ``Instances`` (boxes, classes and,
for Mask R-CNN, bitmasks filling the boxes). Pixels are uniform noise and boxes are placed at random
(a fixed seed), ``boxes_per_image`` of them with sides between 5% and 50% of the image, about a COCO
image's count. Speed does not depend on what the pixels show: the number of proposals, sampled RoIs
and detections is fixed by the config (``POST_NMS_TOPK_*``, ``BATCH_SIZE_PER_IMAGE``,
``DETECTIONS_PER_IMAGE`` with ``SCORE_THRESH_TEST`` 0 at inference), not by the content.
"""
from typing import List, Tuple

import torch


def image_size(cfg) -> Tuple[int, int]:
    """(height, width) of a 4:3 landscape image as the config's training resize leaves it: the shorter
    side ``INPUT.MIN_SIZE_TRAIN[-1]``, the longer one 4/3 of it (at most ``INPUT.MAX_SIZE_TRAIN``)."""
    short = int(cfg.INPUT.MIN_SIZE_TRAIN[-1])
    long = min(int(cfg.INPUT.MAX_SIZE_TRAIN), int(round(short * 4 / 3)))
    return short, long


def synthetic_image(cfg, index: int, boxes_per_image: int = 7) -> dict:
    """One mapped training image (see the module docstring); deterministic in ``index``."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(1000 + index)
    h, w = image_size(cfg)
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    side = torch.rand(boxes_per_image, 2, generator=g) * 0.45 + 0.05
    sizes = side * torch.tensor([w, h], dtype=torch.float32)
    corner = torch.rand(boxes_per_image, 2, generator=g) * (torch.tensor([w, h], dtype=torch.float32) - sizes)
    boxes = torch.cat([corner, corner + sizes], dim=1)
    instances = Instances((h, w))
    instances.gt_boxes = Boxes(boxes)
    instances.gt_classes = torch.randint(0, int(cfg.MODEL.ROI_HEADS.NUM_CLASSES), (boxes_per_image,), generator=g)
    if cfg.MODEL.MASK_ON:
        masks = torch.zeros(boxes_per_image, h, w, dtype=torch.bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[k, y0:y1, x0:x1] = True
        instances.gt_masks = BitMasks(masks)
    return {"image": image, "height": h, "width": w, "instances": instances, "image_id": index,
            "file_name": f"synthetic-{index}"}


def synthetic_batches(cfg, num_batches: int) -> List[list]:
    """``num_batches`` batches of ``SOLVER.IMS_PER_BATCH`` synthetic images (distinct images)."""
    per_batch = int(cfg.SOLVER.IMS_PER_BATCH)
    return [[synthetic_image(cfg, b * per_batch + i) for i in range(per_batch)] for b in range(num_batches)]
