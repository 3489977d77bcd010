"""d2_bnstats: BatchNorm statistics that work at 1-2 images per GPU, as a detectron2 plug-in.

``import d2_bnstats`` makes every registered norm name usable from detectron2 config keys that take
a norm (MODEL.RESNETS.NORM, MODEL.FPN.NORM, MODEL.ROI_BOX_HEAD.NORM, MODEL.ROI_MASK_HEAD.NORM,
MODEL.RETINANET.NORM, MODEL.SEM_SEG_HEAD.NORM) and registers the fashion-scenes data sets.
"""
from .d2 import patch as _patch
from .d2.build import current_config, register_model_transform
from .d2.config import NORM_KEYS, add_bnstats_config, check_norm_keys
from .data import register_fashion_scenes
from .layers.population import (
    batch_statistics,
    freeze_batch_statistics,
    population_layers,
    precise_bn,
    unfreeze_batch_statistics,
)
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
    "NORM_KEYS",
    "UnknownNormError",
    "add_bnstats_config",
    "available_norms",
    "batch_statistics",
    "check_norm_keys",
    "current_config",
    "freeze_batch_statistics",
    "get_norm",
    "population_layers",
    "precise_bn",
    "register_fashion_scenes",
    "register_model_transform",
    "register_norm",
    "registered_norms",
    "unfreeze_batch_statistics",
    "unregister_norm",
]
