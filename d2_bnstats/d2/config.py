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

    # --- synchronised and shuffled statistics (issue 5; docs/sync_and_shuffle.md) ---------------
    cfg.BNSTATS.SYNC_BN = CN()
    # True (default): the norm name "SyncBN" builds d2_bnstats' SyncBatchNorm2d: exact statistics of
    # the global batch on CUDA/NCCL and CPU/gloo, plain BN in one process, empty inputs allowed.
    # False: detectron2's own "SyncBN" (torch nn.SyncBatchNorm, CUDA only). "nnSyncBN" is always torch's.
    cfg.BNSTATS.SYNC_BN.REPLACE_D2 = True
    cfg.BNSTATS.GHOST_BN = CN()
    # "GhostBN": samples (images or RoIs) per sub-batch; default 32. A batch of N is cut into
    # ceil(N / VIRTUAL_BATCH_SIZE) sub-batches whose sizes differ by at most one.
    cfg.BNSTATS.GHOST_BN.VIRTUAL_BATCH_SIZE = 32
    cfg.BNSTATS.ROI_SHUFFLE = CN()
    # "RoIShuffleBN", training in ONE process: the shuffled RoIs are normalised in this many groups
    # (default 2; 1 = plain BN). With several processes each normalises one split; this is unused.
    cfg.BNSTATS.ROI_SHUFFLE.NUM_GROUPS = 2
    cfg.BNSTATS.PER_LEVEL = CN()
    # False (default): heads keep what detectron2 builds (RetinaNet: per-level BN only for "BN"/"SyncBN").
    # True: every statistics-keeping norm in the heads below gets one copy per FPN level sharing the
    # parameters (any registered norm: BN, GhostBN, EvalNorm, MABN, third-party).
    cfg.BNSTATS.PER_LEVEL.ENABLED = False
    # Class names of the heads whose norms are applied once per FPN level; default ["RetinaNetHead"].
    cfg.BNSTATS.PER_LEVEL.HEADS = ["RetinaNetHead"]
    # Levels per head; default 0 = infer (RetinaNetHead: len(MODEL.RETINANET.IN_FEATURES)).
    cfg.BNSTATS.PER_LEVEL.NUM_LEVELS = 0
    # True: at the end of training compare every parameter and buffer across processes and write
    # OUTPUT_DIR/replica_check.json (mismatches are logged as warnings); default False.
    cfg.BNSTATS.CHECK_REPLICAS = False
    # --- end of issue 5 keys ----------------------------------------------------------------------
    # EvalNorm ("EvalNorm" / "SyncEvalNorm" norms; docs/evalnorm.md). Read when the model is built.
    cfg.BNSTATS.EVALNORM = CN()
    # Evaluation statistics: "learned" (default; alpha_hat, beta_hat learned online by the auxiliary
    # loss), "rule" (alpha = beta = 1/B^2), "exact" (1/B), "fixed" (ALPHA, BETA), "ema" (BN inference).
    cfg.BNSTATS.EVALNORM.MODE = "learned"
    # alpha and beta for MODE "fixed", in [0, 1]; -1 = unset (BETA unset means BETA = ALPHA).
    cfg.BNSTATS.EVALNORM.ALPHA = -1.0
    cfg.BNSTATS.EVALNORM.BETA = -1.0
    # B (an integer) for MODE "rule"/"exact"; 0 = the normalisation batch each layer recorded in training.
    cfg.BNSTATS.EVALNORM.BATCH_SIZE = 0
    # Learn alpha_hat, beta_hat during training (the auxiliary loss "loss_evalnorm"); False = they
    # stay at their initial value 0 and training costs exactly what BN costs.
    cfg.BNSTATS.EVALNORM.LEARN = True
    # loss_evalnorm = AUX_LOSS_WEIGHT * sum over EvalNorm layers of that layer's mean |mismatch|;
    # each layer's alpha_hat, beta_hat see only their own term: effective step BASE_LR * weight.
    cfg.BNSTATS.EVALNORM.AUX_LOSS_WEIGHT = 1.0
    # Values per channel used for the auxiliary loss per training forward (strided subset; 0 = all).
    cfg.BNSTATS.EVALNORM.AUX_SAMPLES = 256
    # Write alpha_hat, beta_hat of every layer to the EventStorage (metrics.json, TensorBoard) as
    # "evalnorm/<layer>/alpha" and ".../beta", plus their means over layers.
    cfg.BNSTATS.EVALNORM.LOG = True
    # --- Population statistics (docs/population_statistics.md). detectron2's TEST.PRECISE_BN.ENABLED
    # switches PreciseBN on (before every evaluation, also --eval-only) and TEST.PRECISE_BN.NUM_ITER
    # sizes it in batches; these keys add to them.
    cfg.BNSTATS.PRECISE_BN = CN()
    # Training images per PreciseBN pass, in total over all processes (10^3-10^4 suffice); 0 (default)
    # = TEST.PRECISE_BN.NUM_ITER batches of SOLVER.IMS_PER_BATCH images.
    cfg.BNSTATS.PRECISE_BN.NUM_SAMPLES = 0
    # Log PreciseBN progress every this many batches (default 20).
    cfg.BNSTATS.PRECISE_BN.LOG_PERIOD = 20
    cfg.BNSTATS.FROZEN_BN = CN()
    # FrozenBN late in training: from this iteration on, every BN-type layer normalises with its
    # population statistics for the rest of training (affine parameters keep training). -1 (default) = off.
    cfg.BNSTATS.FROZEN_BN.START_ITER = -1
    # Recompute the statistics with a PreciseBN pass right before freezing (default True); False
    # freezes the EMA statistics as they are.
    cfg.BNSTATS.FROZEN_BN.PRECISE_BN = True
    cfg.BNSTATS.TEST_BATCH_STATS = CN()
    # Batch statistics at test: evaluate with the statistics of each test batch instead of population
    # statistics (default False).
    cfg.BNSTATS.TEST_BATCH_STATS.ENABLED = False
    # Images per test batch and process when ENABLED (default 2; detectron2's test loader uses 1).
    cfg.BNSTATS.TEST_BATCH_STATS.IMS_PER_BATCH = 2
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
