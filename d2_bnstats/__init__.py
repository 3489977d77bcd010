"""d2_bnstats: BatchNorm statistics that work at 1-2 images per GPU, as a detectron2 plug-in.

``import d2_bnstats`` makes every registered norm name usable from detectron2 config keys that take
a norm (MODEL.RESNETS.NORM, MODEL.FPN.NORM, MODEL.ROI_BOX_HEAD.NORM, MODEL.ROI_MASK_HEAD.NORM,
MODEL.RETINANET.NORM, MODEL.SEM_SEG_HEAD.NORM) and registers the fashion-scenes data sets.
"""
from .d2 import patch as _patch
from .d2 import norms_evalnorm as _norms_evalnorm  # noqa: F401  ("EvalNorm", "SyncEvalNorm"; model transform "evalnorm")
from .d2 import norms_ghost as _norms_ghost  # noqa: F401  ("GhostBN")
from .d2 import norms_mabn as _norms_mabn  # noqa: F401  ("MABN", "SyncMABN"; weight-centralisation transform)
from .d2 import norms_roi_shuffle as _norms_roi_shuffle  # noqa: F401  ("RoIShuffleBN")
from .d2 import norms_sync as _norms_sync  # noqa: F401  ("SyncBN": the exact global-batch layer)
from .d2 import per_level as _per_level  # noqa: F401  (model transform "per_level_norms")
from .d2.build import current_config, register_model_transform
from .d2.config import NORM_KEYS, add_bnstats_config, check_norm_keys
from .d2.mabn_convert import convert_to_mabn
from .data import register_fashion_scenes
from .layers.evalnorm import EvalNorm2d, set_evalnorm_mode
from .layers.ghost_bn import GhostBatchNorm2d
from .layers.mabn import MABN2d
from .layers.per_level import PerLevelNorm, wrap_per_level
from .layers.population import (
    batch_statistics,
    freeze_batch_statistics,
    population_layers,
    precise_bn,
    unfreeze_batch_statistics,
)
from .layers.roi_shuffle import RoIShuffleBatchNorm2d
from .layers.sync_bn import SyncBatchNorm2d
from .registry import (
    UnknownNormError,
    available_norms,
    get_norm,
    register_norm,
    registered_norms,
    unregister_norm,
)

__version__ = "0.1.0"

_patch.install()
register_fashion_scenes()

__all__ = [
    "add_bnstats_config",
    "available_norms",
    "batch_statistics",
    "check_norm_keys",
    "convert_to_mabn",
    "current_config",
    "EvalNorm2d",
    "freeze_batch_statistics",
    "get_norm",
    "GhostBatchNorm2d",
    "MABN2d",
    "NORM_KEYS",
    "PerLevelNorm",
    "population_layers",
    "precise_bn",
    "register_fashion_scenes",
    "register_model_transform",
    "register_norm",
    "registered_norms",
    "RoIShuffleBatchNorm2d",
    "set_evalnorm_mode",
    "SyncBatchNorm2d",
    "unfreeze_batch_statistics",
    "UnknownNormError",
    "unregister_norm",
    "wrap_per_level",
]
