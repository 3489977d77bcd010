"""The models of the end-to-end benchmark: which configs, where each norm goes, the shared batches.

Every norm gets its own model, built from the same CPU config (R-18-FPN, 128 px, fashion-scenes)
with the norm set the way a user sets it (config keys, :func:`norm_overrides`), the box head
switched to detectron2's 4conv1fc so that a norm there is measured too, and a small constant
learning rate. The training loader's batches are read into memory once (:func:`load_batches`) and
cycled, so every norm sees the same images and data loading is never timed.

The GPU model, ``frcnn_r50``: Faster R-CNN R-50-FPN from the random-init config (4conv1fc box head of
its own), at 800 px with synthetic images (:mod:`.synthetic`: no COCO on the machine), the norm placed
the same way; its targets are the GPU ones (:data:`GPU_TRAIN_TARGETS`, ...).
"""
import itertools
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from d2_bnstats.registry import available_norms

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCH_CONFIGS = {
    "frcnn": os.path.join("configs", "cpu", "frcnn_r18_bn_2img.yaml"),
    "mrcnn": os.path.join("configs", "cpu", "mrcnn_r18_bn_2img.yaml"),
    "frcnn_r50": os.path.join("configs", "frcnn_r50_bn_2img_scratch.yaml"),
}
# Architectures trained on synthetic batches (their data set is not on the machine), with the input
# size fixed to 800 px (no multi-scale training: every iteration does the same work).
SYNTHETIC_ARCHS: Dict[str, Tuple[str, ...]] = {
    "frcnn_r50": ("INPUT.MIN_SIZE_TRAIN", "(800,)", "INPUT.MAX_SIZE_TRAIN", "1333",
                  "INPUT.MIN_SIZE_TEST", "800", "INPUT.MAX_SIZE_TEST", "1333"),
}
TRAIN_NORMS: Tuple[str, ...] = ("BN", "EvalNorm", "MABN", "SyncBN", "GhostBN", "RoIShuffleBN", "GN", "FrozenBN",
                                "BatchRenorm", "CrossIterBN", "GN+WS", "BN+WS", "BCN")
INFERENCE_NORMS: Tuple[str, ...] = ("FrozenBN", "BN", "EvalNorm", "MABN", "SyncBN", "GhostBN", "GN",
                                    "BatchRenorm", "CrossIterBN", "GN+WS", "BN+WS", "BCN")
# Norms made for the RoI heads, timed there (the norm of the backbone and FPN in their models);
# at inference they are BN.
HEAD_NORMS: Dict[str, str] = {"RoIShuffleBN": "BN"}
EVALNORM_MODES: Tuple[str, ...] = ("learned", "rule", "exact", "fixed", "ema")
EVALNORM_FIXED_ALPHA = 0.25  # the "fixed" mode needs a value: 1/B^2 at B = 2
TRAIN_REFERENCE = "BN"
INFERENCE_REFERENCE = "FrozenBN"
# The box head of the CPU configs is 2fc, where ROI_BOX_HEAD.NORM is unused; the benchmark uses
# detectron2's 4conv1fc head (the GN/SyncBN papers' head, as the MABN configs) so that a norm in the
# box head is measured too. The same head for every norm, BN included.
BOX_HEAD_OPTS: Tuple[str, ...] = (
    "MODEL.ROI_BOX_HEAD.NUM_CONV", "4", "MODEL.ROI_BOX_HEAD.CONV_DIM", "128",
    "MODEL.ROI_BOX_HEAD.NUM_FC", "1", "MODEL.ROI_BOX_HEAD.FC_DIM", "512",
)
# Timing needs no learning: a small constant LR (no schedule) so that no norm diverges (FrozenBN and
# no norm in FPN/heads from random init would at 0.02 without warm-up); speed does not depend on it.
BENCH_OPTS: Tuple[str, ...] = ("SOLVER.BASE_LR", "0.001", "DATALOADER.NUM_WORKERS", "0")
# The project's cost targets (docs/benchmarks.md), drawn on the plot and checked in the tables.
TRAIN_TARGETS: Dict[str, float] = {"EvalNorm": 1.10, "MABN": 1.15, "SyncBN": 1.02, "BatchRenorm": 1.05,
                                   "CrossIterBN": 1.30, "GN+WS": 1.10, "BN+WS": 1.10}
# Batch Renormalization and Cross-Iteration BN infer with population statistics as BN does; a WS
# model deploys with the standardized weights folded into its convs (rows "... (folded)").
INFERENCE_TARGETS: Dict[str, float] = {"EvalNorm": 1.10, "MABN": 1.02, "BatchRenorm": 1.02, "CrossIterBN": 1.02,
                                       "GN+WS (folded)": 1.02, "BN+WS (folded)": 1.02}
# Rows whose ratio is to another row than the table's reference: Weight Standardization's cost is
# what it adds to the norm it goes with (GN+WS folded infers as a GN model, BN+WS folded as BN).
TRAIN_RELATIVE_TO: Dict[str, str] = {"GN+WS": "GN", "BN+WS": "BN"}
INFERENCE_RELATIVE_TO: Dict[str, str] = {"GN+WS": "GN", "GN+WS (folded)": "GN", "BN+WS": "BN",
                                         "BN+WS (folded)": "BN"}
PRECISE_BN_TARGET = 1.2
# On a GPU (one run of frcnn_r50, ratios in that run): training to BN, inference to FrozenBN, and
# the training peak memory of every norm to BN's.
GPU_NORMS: Tuple[str, ...] = ("BN", "FrozenBN", "EvalNorm", "MABN", "GN", "GhostBN")
GPU_TRAIN_TARGETS: Dict[str, float] = {"EvalNorm": 1.05, "MABN": 1.10, "GhostBN": 1.10, "RoIShuffleBN": 1.10}
GPU_INFERENCE_TARGETS: Dict[str, float] = {"EvalNorm": 1.05, "MABN": 1.02}
GPU_MEMORY_TARGET = 1.10


def with_references(norms: Sequence[str], reference: str, relative_to: Dict[str, str]) -> List[str]:
    """``norms`` in their order, preceded by the rows their ratios need and the list lacks:
    ``reference``, and any row a norm (or its folded row) is measured against
    (:data:`TRAIN_RELATIVE_TO`, ...)."""
    needed = [reference] + [relative_to[k] for n in norms for k in (n, f"{n} (folded)") if k in relative_to]
    return list(dict.fromkeys([r for r in needed if r not in norms] + list(norms)))


def norm_overrides(norm: str, mask: bool, placement: str = "train") -> List[str]:
    """The config keys a user sets for ``norm``: backbone, FPN, box head (and mask head).

    A head norm (:data:`HEAD_NORMS`: RoIShuffleBN) goes in the heads with BN in the backbone and FPN,
    where users put it. FrozenBN in training is detectron2's default placement: the backbone only, FPN
    and heads with no norm (FrozenBN there would be a fixed affine map of random init). For inference (``placement =
    "inference"``) FrozenBN is the reference at EVERY norm position: what a BN model folds to, so
    the ratios isolate the cost of the norm's inference path.
    """
    if placement not in ("train", "inference"):
        raise ValueError(f"placement must be 'train' or 'inference', got {placement!r}")
    head = "" if (norm == "FrozenBN" and placement == "train") else norm
    body = HEAD_NORMS.get(norm, norm)
    opts = ["MODEL.RESNETS.NORM", body, "MODEL.FPN.NORM", HEAD_NORMS.get(norm, head), "MODEL.ROI_BOX_HEAD.NORM", head]
    if mask:
        opts += ["MODEL.ROI_MASK_HEAD.NORM", head]
    return opts


def load_bench_config(arch: str, ims_per_batch: int, norm: str, placement: str = "train",
                      opts: Sequence[str] = (), config_file: Optional[str] = None):
    """The checked detectron2 config of ``arch`` with ``norm`` placed for ``placement``; for inference
    ``SCORE_THRESH_TEST`` is 0 so that every model returns ``DETECTIONS_PER_IMAGE`` boxes."""
    from d2_bnstats.d2.train import load_config

    if config_file is None:
        if arch not in ARCH_CONFIGS:
            raise ValueError(f"unknown architecture {arch!r}; accepted: {', '.join(ARCH_CONFIGS)}")
        config_file = os.path.join(REPO, ARCH_CONFIGS[arch])
    # the R-50 random-init config has the 4conv1fc head already, at its standard width
    head = list(SYNTHETIC_ARCHS[arch]) if arch in SYNTHETIC_ARCHS else list(BOX_HEAD_OPTS)
    all_opts = head + list(BENCH_OPTS) + ["SOLVER.IMS_PER_BATCH", str(ims_per_batch)]
    all_opts += list(opts) + norm_overrides(norm, arch == "mrcnn", placement)
    if placement == "inference":
        all_opts += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    return load_config(config_file, all_opts)


def unavailable_reason(norm: str) -> Optional[str]:
    """Why ``norm`` cannot be measured in this installation (not registered), or None."""
    if norm not in available_norms():
        return f"not available: norm {norm!r} is not registered in this installation"
    return None


def load_batches(cfg, num_batches: int, synthetic: bool = False) -> List[list]:
    """``num_batches`` batches of the config's training loader, read into memory once (with
    ``synthetic``: :func:`.synthetic.synthetic_batches`, no data set read)."""
    from detectron2.data import build_detection_train_loader

    if synthetic:
        from .synthetic import synthetic_batches

        return synthetic_batches(cfg, num_batches)
    iterator = iter(build_detection_train_loader(cfg))
    return [next(iterator) for _ in range(num_batches)]


def build_trainer(cfg, batches: Sequence[list]):
    """A detectron2 SimpleTrainer for ``cfg``'s model over ``batches`` cycled (seeded model init)."""
    from detectron2.engine import SimpleTrainer
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer

    torch.manual_seed(0)
    model = build_model(cfg)  # routed through d2_bnstats (factories see cfg, model transforms run)
    model.train()
    return SimpleTrainer(model, itertools.cycle(batches), build_optimizer(cfg, model))
