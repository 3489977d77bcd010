"""d2_bnstats: BatchNorm statistics that work at 1-2 images per GPU, as a detectron2 plug-in.

``import d2_bnstats`` makes every registered norm name usable from detectron2 config keys that take
a norm (MODEL.RESNETS.NORM, MODEL.FPN.NORM, MODEL.ROI_BOX_HEAD.NORM, MODEL.ROI_MASK_HEAD.NORM,
MODEL.RETINANET.NORM, MODEL.SEM_SEG_HEAD.NORM) and nothing else: :func:`d2_bnstats.d2.plugin.install`
says what that takes.
"""
import warnings as _warnings

with _warnings.catch_warnings():
    # importing detectron2 imports fvcore's losses, which use torch.jit.script: torch deprecates it with a
    # FutureWarning that says nothing to a user of the plug-in; silenced here only, by its text
    _warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from .d2 import plugin as _plugin

    _plugin.install()  # before anything below imports a module that registers names

    from .d2.build import configure_norm, model_transforms, register_model_transform, unregister_model_transform
    from .d2.config import NORM_KEYS, check_norm_keys
    from .d2 import deploy
    from .d2.deploy import convert_for_deployment, fold_norms_into_convs, to_frozen
    from .d2 import lazy
    from .d2.lazy import build_lazy_model, configure_lazy_norms, prepare_model
    from .d2.mabn_convert import convert_to_mabn
    from . import model_zoo
    from .d2.plugin import add_bnstats_config, check_bnstats_config
    from .layers.batch_channel_norm import BatchChannelNorm2d
    from .layers.batch_renorm import BatchRenorm2d
    from .layers.cross_iteration_bn import CrossIterationBatchNorm2d
    from .layers.evalnorm import EvalNorm2d, set_evalnorm_mode
    from .layers.evalnorm_projection import attach_projection_hook
    from .layers.ghost_bn import GhostBatchNorm2d
    from .layers.mabn import MABN2d
    from .layers.mabn_step import attach_step_hook
    from .layers.per_level import PerLevelNorm, wrap_per_level
    from .layers.frozen_bn import freeze_batch_statistics, unfreeze_batch_statistics
    from .layers.population import precise_bn
    from .layers.population_protocol import population_layers
    from .layers.roi_shuffle import RoIShuffleBatchNorm2d
    from .layers.step_guard import StepStatisticsGuard
    from .layers.sync_bn import SyncBatchNorm2d
    from .layers.test_batch_stats import batch_statistics
    from .layers.weight_standardization import fold_weight_standardization, make_weight_standardized
    from .registry import (
        ConfiguredNorm,
        Norm,
        UnknownNormError,
        available_norms,
        declared_norms,
        get_norm,
        register_norm,
        registered_norms,
        unregister_norm,
    )

__version__ = "0.1.0"  # the one definition: setup.py reads it

__all__ = [
    "add_bnstats_config",
    "attach_projection_hook",
    "attach_step_hook",
    "available_norms",
    "batch_statistics",
    "BatchChannelNorm2d",
    "BatchRenorm2d",
    "build_lazy_model",
    "check_bnstats_config",
    "check_norm_keys",
    "configure_lazy_norms",
    "configure_norm",
    "ConfiguredNorm",
    "convert_for_deployment",
    "convert_to_mabn",
    "CrossIterationBatchNorm2d",
    "declared_norms",
    "deploy",
    "EvalNorm2d",
    "fold_norms_into_convs",
    "fold_weight_standardization",
    "freeze_batch_statistics",
    "get_norm",
    "GhostBatchNorm2d",
    "lazy",
    "MABN2d",
    "make_weight_standardized",
    "model_transforms",
    "Norm",
    "model_zoo",
    "NORM_KEYS",
    "PerLevelNorm",
    "population_layers",
    "precise_bn",
    "prepare_model",
    "register_model_transform",
    "register_norm",
    "registered_norms",
    "RoIShuffleBatchNorm2d",
    "StepStatisticsGuard",
    "set_evalnorm_mode",
    "SyncBatchNorm2d",
    "to_frozen",
    "unfreeze_batch_statistics",
    "UnknownNormError",
    "unregister_model_transform",
    "unregister_norm",
    "wrap_per_level",
]
