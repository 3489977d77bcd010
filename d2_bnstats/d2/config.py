"""Config keys of the plug-in, and checks of the keys detectron2 already has.

Call :func:`add_bnstats_config` on a detectron2 config before merging a file that uses the
plug-in's keys (the usual ``add_*_config(cfg)`` convention). Every key lives under ``BNSTATS``;
the defaults below are the documented ones.
"""
import logging

import torch
from detectron2.config import CfgNode as CN

from ..registry import check_norm_name

logger = logging.getLogger(__name__)

# Every detectron2 config key that holds a norm string.
NORM_KEYS = (
    "MODEL.RESNETS.NORM",
    "MODEL.FPN.NORM",
    "MODEL.ROI_BOX_HEAD.NORM",
    "MODEL.ROI_MASK_HEAD.NORM",
    "MODEL.RETINANET.NORM",
    "MODEL.SEM_SEG_HEAD.NORM",
)


def add_bnstats_config(cfg) -> None:
    """Add the ``BNSTATS`` node to ``cfg`` (in place). Calling it twice is harmless."""
    if "BNSTATS" in cfg:
        return
    cfg.BNSTATS = CN()
    # MODEL.DEVICE "cuda" on a machine without a GPU: run on the CPU with a warning instead of
    # failing, so one config serves GPU users and CPU checks.
    cfg.BNSTATS.CPU_FALLBACK = True

    # Initialisation from pre-trained weights (config matrix issue; d2_bnstats/d2/weights.py).
    cfg.BNSTATS.INIT = CN()
    # Default False. True: after MODEL.WEIGHTS is loaded for a new training run (not on --resume),
    # reset the running statistics of every norm layer that has them (BN: mean 0, variance 1) -- the
    # "pre-trained weights, re-initialised BN statistics" setting. Applied by d2_bnstats' Trainer;
    # other training loops call d2_bnstats.d2.weights.after_loading_weights(cfg, model, resumed).
    cfg.BNSTATS.INIT.RESET_NORM_STATS = False


def get_config_value(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def check_norm_keys(cfg) -> None:
    """Every norm-carrying key names a known norm; else a ValueError naming key, value, choices."""
    for key in NORM_KEYS:
        check_norm_name(get_config_value(cfg, key), where=key)


def check_batch_config(cfg, world_size: int) -> None:
    """SOLVER.IMS_PER_BATCH is the total over processes and must split evenly."""
    total = cfg.SOLVER.IMS_PER_BATCH
    if total < 1 or total % world_size != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH = {total} is the total batch over all processes and must be a positive "
            f"multiple of the number of processes ({world_size}); e.g. {2 * world_size} for 2 images per process."
        )


def resolve_device(cfg) -> None:
    """Apply BNSTATS.CPU_FALLBACK (cfg must be mutable)."""
    if str(cfg.MODEL.DEVICE).startswith("cuda") and not torch.cuda.is_available():
        if not cfg.BNSTATS.CPU_FALLBACK:
            raise RuntimeError(
                f"MODEL.DEVICE = {cfg.MODEL.DEVICE!r} but torch sees no GPU; set MODEL.DEVICE cpu "
                "or BNSTATS.CPU_FALLBACK True"
            )
        logger.warning("MODEL.DEVICE = %r but no GPU is visible: running on the CPU", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
