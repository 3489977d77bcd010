"""Reading the plug-in's config keys, the keys that belong to no single norm, and checks of the
keys detectron2 already has.

Every key of the plug-in lives under ``BNSTATS``; :func:`d2_bnstats.add_bnstats_config` declares
them (the usual ``add_*_config(cfg)`` convention): :func:`add_general_config` here, each norm's own
node in its module under :mod:`d2_bnstats.d2.norms`. Code that reads an option uses
:func:`bnstats_node`, which also serves configs built without the plug-in's keys (defaults then).
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


def add_general_config(bnstats) -> None:
    """The keys of ``cfg.BNSTATS`` that belong to no single norm (the norms' own nodes are added by
    their modules in :mod:`d2_bnstats.d2.norms`; :func:`d2_bnstats.add_bnstats_config` adds both)."""
    # MODEL.DEVICE "cuda" on a machine without a GPU: run on the CPU with a warning instead of
    # failing, so one config serves GPU users and CPU checks.
    bnstats.CPU_FALLBACK = True
    # True: at the end of training compare every parameter and buffer across processes and write
    # OUTPUT_DIR/replica_check.json (mismatches are logged as warnings); default False.
    bnstats.CHECK_REPLICAS = False
    # --- Population statistics (docs/population_statistics.md). detectron2's TEST.PRECISE_BN.ENABLED
    # switches PreciseBN on (before every evaluation, also --eval-only) and TEST.PRECISE_BN.NUM_ITER
    # sizes it in batches; these keys add to them.
    bnstats.PRECISE_BN = CN()
    # Training images per PreciseBN pass, in total over all processes (10^3-10^4 suffice); 0 (default)
    # = TEST.PRECISE_BN.NUM_ITER batches of SOLVER.IMS_PER_BATCH images.
    bnstats.PRECISE_BN.NUM_SAMPLES = 0
    # Log PreciseBN progress every this many batches (default 20).
    bnstats.PRECISE_BN.LOG_PERIOD = 20
    bnstats.FROZEN_BN = CN()
    # FrozenBN late in training: from this iteration on, every BN-type layer normalizes with its
    # population statistics for the rest of training (affine parameters keep training). -1 (default) = off.
    bnstats.FROZEN_BN.START_ITER = -1
    # Recompute the statistics with a PreciseBN pass right before freezing (default True); False
    # freezes the EMA statistics as they are.
    bnstats.FROZEN_BN.PRECISE_BN = True
    bnstats.TEST_BATCH_STATS = CN()
    # Batch statistics at test: evaluate with the statistics of each test batch instead of population
    # statistics (default False).
    bnstats.TEST_BATCH_STATS.ENABLED = False
    # Images per test batch and process when ENABLED (default 2; detectron2's test loader uses 1).
    bnstats.TEST_BATCH_STATS.IMS_PER_BATCH = 2
    # Initialization from pre-trained weights (d2_bnstats/d2/weights.py).
    bnstats.INIT = CN()
    # Default False. True: after MODEL.WEIGHTS is loaded for a new training run (not on --resume),
    # reset the running statistics of every norm layer that has them (BN: mean 0, variance 1) -- the
    # "pre-trained weights, re-initialized BN statistics" setting. Applied by d2_bnstats' Trainer;
    # other training loops call d2_bnstats.d2.weights.after_loading_weights(cfg, model, resumed).
    bnstats.INIT.RESET_NORM_STATS = False


def bnstats_node(cfg, *path: str):
    """``cfg.BNSTATS`` (or ``cfg.BNSTATS.<path...>``), or None when ``cfg`` is None or lacks it: the one
    way plug-in code reads its options from a config that may not have them (then: defaults)."""
    node = cfg
    for part in ("BNSTATS",) + path:
        if node is None or not hasattr(node, "get"):
            return None
        node = node.get(part, None)
    return node


def positive_int(node, key: str, where: str, default: int) -> int:
    """``node[key]`` as a positive int (``default`` when ``node`` is None or lacks the key); else a
    ValueError naming ``where`` (the full key) and the accepted values."""
    value = node.get(key, None) if node is not None else None
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} = {value!r}: expected a positive integer")
    return value


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
    """Apply BNSTATS.CPU_FALLBACK (cfg must be mutable; a config without the plug-in's keys falls back,
    as the key's default does)."""
    if str(cfg.MODEL.DEVICE).startswith("cuda") and not torch.cuda.is_available():
        if not cfg.get("BNSTATS", {}).get("CPU_FALLBACK", True):
            raise RuntimeError(
                f"MODEL.DEVICE = {cfg.MODEL.DEVICE!r} but torch sees no GPU; set MODEL.DEVICE cpu "
                "or BNSTATS.CPU_FALLBACK True"
            )
        logger.warning("MODEL.DEVICE = %r but no GPU is visible: running on the CPU", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
