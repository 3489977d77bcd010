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

    # MABN: the norms "MABN" and "SyncMABN" (d2_bnstats.layers.mabn, docs/mabn.md). Defaults are
    # the authors' detection settings (2 images per GPU, a simulated batch of 32).
    cfg.BNSTATS.MABN = CN()
    # m: number of optimiser steps whose batch statistics (chi^2 forward, Psi backward) are averaged
    # (simple moving average). Default 16 = 32 / 2 images per step. Ignored if SIMULATED_BATCH > 0.
    cfg.BNSTATS.MABN.BUFFER_SIZE = 16
    # If > 0: m = SIMULATED_BATCH / images normalised together per step (SOLVER.IMS_PER_BATCH per
    # process for "MABN", the whole SOLVER.IMS_PER_BATCH for "SyncMABN"); must divide. Default 0 (off).
    cfg.BNSTATS.MABN.SIMULATED_BATCH = 0
    # Current-step statistics instead of their average for the first max(m, WARMUP_ITERS) steps. Default 100.
    cfg.BNSTATS.MABN.WARMUP_ITERS = 100
    # Renormalisation factor r = 1 for the first max(RENORM_START, WARMUP_ITERS) steps. Default 1000.
    cfg.BNSTATS.MABN.RENORM_START = 1000
    # Afterwards r is clipped to [1 / RENORM_CLIP, RENORM_CLIP]. Default 5.0.
    cfg.BNSTATS.MABN.RENORM_CLIP = 5.0
    # Running second moment R <- DECAY * R + (1 - DECAY) * average; DECAY weights the OLD value
    # (PyTorch's momentum = 1 - DECAY). Default 0.98.
    cfg.BNSTATS.MABN.DECAY = 0.98
    # epsilon added to the second moment. Default 1e-5.
    cfg.BNSTATS.MABN.EPS = 1e-5
    # Centralise the weights of every conv that feeds an MABN layer (each output filter minus its
    # mean; checkpoint keys unchanged). MABN drops mean centring and relies on it. Default True.
    cfg.BNSTATS.MABN.WEIGHT_CENTRALIZATION = True
    # If > 0: centralisation ramps in over this many steps of each MABN layer (the conv subtracts
    # min(1, t / WC_RAMP_ITERS) x its filter mean), so weights trained WITHOUT centralisation (converted
    # BN/FrozenBN weights) start as the original model. Default 0: fully centralised from step 0.
    cfg.BNSTATS.MABN.WC_RAMP_ITERS = 0


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
