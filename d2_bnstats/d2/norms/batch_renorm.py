"""Batch Renormalization in detectron2: the norm "BatchRenorm" →
:class:`d2_bnstats.layers.batch_renorm.BatchRenorm2d`, and its ``BNSTATS.BATCH_RENORM`` config node.

Options (keys → layer arguments): ``R_MAX`` → ``r_max``, ``D_MAX`` → ``d_max``, ``RAMP_START_ITER`` →
``ramp_start``, ``R_MAX_END_ITER`` → ``r_max_end``, ``D_MAX_END_ITER`` → ``d_max_end``; the layer's
defaults without a config. No model transform; at deployment the layer is a BN with population
statistics, so the generic conversion makes it a ``FrozenBatchNorm2d`` (its inference, exactly).
"""
import inspect

from ...layers.batch_renorm import BatchRenorm2d, check_options
from ...registry import Norm
from ..config import bnstats_node

KEY = "BNSTATS.BATCH_RENORM"


def defaults(node) -> None:
    """``BNSTATS.BATCH_RENORM``: the clipping bounds of "BatchRenorm" and their schedule (Ioffe 2017, §3-4)."""
    # r = sigma_B / sigma is clipped to [1 / R_MAX(t), R_MAX(t)]; R_MAX(t) rises linearly from 1 to
    # R_MAX between RAMP_START_ITER and R_MAX_END_ITER (the layer's training steps). Default 3.0 (paper §4).
    node.R_MAX = 3.0
    # d = (mu_B - mu) / sigma is clipped to [-D_MAX(t), D_MAX(t)]; D_MAX(t) rises linearly from 0 to
    # D_MAX between RAMP_START_ITER and D_MAX_END_ITER. Default 5.0 (paper §4).
    node.D_MAX = 5.0
    # Steps of plain BN (r = 1, d = 0) before the bounds are relaxed. Default 5000 (paper §4).
    node.RAMP_START_ITER = 5000
    # Step at which R_MAX is reached. Default 40000 (paper §4).
    node.R_MAX_END_ITER = 40000
    # Step at which D_MAX is reached. Default 25000 (paper §4).
    node.D_MAX_END_ITER = 25000


_KEYS = (  # (key, layer argument, kind)
    ("R_MAX", "r_max", float),
    ("D_MAX", "d_max", float),
    ("RAMP_START_ITER", "ramp_start", int),
    ("R_MAX_END_ITER", "r_max_end", int),
    ("D_MAX_END_ITER", "d_max_end", int),
)


def layer_options(cfg, name: str) -> dict:
    """Checked ``BatchRenorm2d`` keyword arguments from ``cfg.BNSTATS.BATCH_RENORM`` ({} without it)."""
    node = bnstats_node(cfg, "BATCH_RENORM")
    if node is None:
        return {}
    options = {}
    for key, argument, kind in _KEYS:
        if key not in node:
            continue
        value = node[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (kind is int and not float(value).is_integer()):
            raise ValueError(f"{KEY}.{key} = {value!r}: expected {'an integer' if kind is int else 'a number'}")
        options[argument] = kind(value)
    layer_defaults = inspect.signature(BatchRenorm2d).parameters
    try:
        check_options(**{argument: options.get(argument, layer_defaults[argument].default) for _, argument, _ in _KEYS})
    except ValueError as error:
        for key, argument, _ in _KEYS:  # name the config key, not the layer argument
            if str(error).startswith(f"{argument} ="):
                raise ValueError(f"{KEY}.{key}{str(error)[len(argument):]}") from None
        raise
    return options


def check_config(cfg) -> None:
    layer_options(cfg, "BatchRenorm")


NORM = Norm(
    name="batch_renorm",
    factories={"BatchRenorm": BatchRenorm2d},
    config_key="BATCH_RENORM",
    defaults=defaults,
    check=check_config,
    options=layer_options,
    statistics="population",  # BN's moving averages, used in training too (not BN's batch-only use)
    layer_types=(BatchRenorm2d,),
)
