"""The linear scaling rule, for the config matrix and for any config.

Linear scaling rule (Goyal et al. 2017; detectron2's baselines): from a reference total batch B0
with learning rate LR0 and a schedule of I0 iterations (steps S0), a total batch B trains with
LR = LR0 * B / B0 and I = I0 * B0 / B iterations (steps scaled alike), i.e. the same number of
epochs. Warm-up iterations stay as in the base (detectron2's practice for its large-batch configs).
:func:`linear_scaling` gives a matrix cell's schedule from its family's :class:`Reference`;
:func:`rescale_overrides` moves any loaded config to another number of processes.
"""
import dataclasses
from typing import Dict, List, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class Reference:
    """The schedule the linear scaling rule scales from."""

    total_batch: int
    base_lr: float
    schedules: Dict[str, Tuple[int, Tuple[int, ...]]]  # "1x" -> (MAX_ITER, STEPS)
    source: str


def linear_scaling(reference: Reference, total_batch: int, schedule: str = "1x") -> Tuple[float, int, Tuple[int, ...]]:
    """(BASE_LR, MAX_ITER, STEPS) for ``total_batch`` images per iteration by the linear scaling rule."""
    if total_batch < 1:
        raise ValueError(f"total batch must be >= 1, got {total_batch}")
    if schedule not in reference.schedules:
        raise ValueError(f"unknown schedule {schedule!r}; known: {sorted(reference.schedules)}")
    max_iter, steps = reference.schedules[schedule]
    factor = reference.total_batch / total_batch
    lr = float(f"{reference.base_lr * total_batch / reference.total_batch:.6g}")
    return lr, int(round(max_iter * factor)), tuple(int(round(s * factor)) for s in steps)


def rescale_overrides(cfg, gpus: int, images_per_gpu: Optional[int] = None, reference: Optional[Reference] = None,
                      config_gpus: Optional[int] = None) -> List[str]:
    """``KEY VALUE`` overrides that run ``cfg`` on ``gpus`` processes by the linear scaling rule.

    The images per GPU stay as the config has them (``IMS_PER_BATCH / config_gpus``) unless given.
    LR, MAX_ITER and STEPS scale from the config's own values, so any config can be rescaled."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    total = cfg.SOLVER.IMS_PER_BATCH
    if images_per_gpu is None:
        config_gpus = config_gpus or 1
        if total % config_gpus:
            raise ValueError(f"SOLVER.IMS_PER_BATCH = {total} does not split over {config_gpus} GPUs")
        images_per_gpu = total // config_gpus
    new_total = gpus * images_per_gpu
    factor = total / new_total
    lr = float(f"{cfg.SOLVER.BASE_LR * new_total / total:.6g}")
    steps = tuple(int(round(s * factor)) for s in cfg.SOLVER.STEPS)
    return [
        "SOLVER.IMS_PER_BATCH", str(new_total),
        "SOLVER.BASE_LR", repr(lr),
        "SOLVER.MAX_ITER", str(int(round(cfg.SOLVER.MAX_ITER * factor))),
        "SOLVER.STEPS", "(" + ", ".join(str(s) for s in steps) + ("," if len(steps) == 1 else "") + ")",
    ]
