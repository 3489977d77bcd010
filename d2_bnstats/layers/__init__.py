"""Normalization layers: the maths, in plain torch (and fvcore's differentiable all-gather).

Nothing here imports detectron2, names a config key or a tool; ``d2_bnstats.d2`` is the glue. One
concept per module: :mod:`.moments` is the one home of batch statistics shared by every layer.
"""
from .evalnorm import EvalNorm2d
from .evalnorm_projection import attach_projection_hook
from .ghost_bn import GhostBatchNorm2d
from .mabn import MABN2d
from .mabn_step import attach_step_hook, end_step
from .per_level import PerLevelNorm
from .roi_shuffle import RoIShuffleBatchNorm2d
from .step_guard import StepStatisticsGuard
from .sync_bn import SyncBatchNorm2d
from .weight_centralization import WeightCentralizedConv2d, fold_weight_centralization

__all__ = [
    "attach_projection_hook",
    "attach_step_hook",
    "end_step",
    "EvalNorm2d",
    "fold_weight_centralization",
    "GhostBatchNorm2d",
    "MABN2d",
    "PerLevelNorm",
    "RoIShuffleBatchNorm2d",
    "StepStatisticsGuard",
    "SyncBatchNorm2d",
    "WeightCentralizedConv2d",
]
