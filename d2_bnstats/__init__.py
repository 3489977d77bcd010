"""d2_bnstats: BatchNorm statistics that work at 1-2 images per GPU, as a detectron2 plug-in.

``import d2_bnstats`` makes every registered norm name usable from detectron2 config keys that take
a norm (MODEL.RESNETS.NORM, MODEL.FPN.NORM, MODEL.ROI_BOX_HEAD.NORM, MODEL.ROI_MASK_HEAD.NORM,
MODEL.RETINANET.NORM, MODEL.SEM_SEG_HEAD.NORM) and registers the fashion-scenes data sets.
"""
from .d2 import norms_mabn as _norms_mabn  # noqa: F401  (registers MABN, SyncMABN)
from .d2 import patch as _patch
from .d2.build import current_config, register_model_transform
from .d2.config import NORM_KEYS, add_bnstats_config, check_norm_keys
from .d2.mabn_convert import convert_to_mabn
from .data import register_fashion_scenes
from .layers.mabn import MABN2d
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
    "MABN2d",
    "NORM_KEYS",
    "UnknownNormError",
    "add_bnstats_config",
    "available_norms",
    "check_norm_keys",
    "convert_to_mabn",
    "current_config",
    "get_norm",
    "register_fashion_scenes",
    "register_model_transform",
    "register_norm",
    "registered_norms",
    "unregister_norm",
]
