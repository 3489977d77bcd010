"""The config matrix: one declarative table of which leaf configs exist and what goes in them.

Every leaf config ``configs/{frcnn,mrcnn}_r50_{norm}_{N}img_{setting}.yaml`` (GPU, COCO, R-50-FPN)
and ``configs/cpu/{frcnn,mrcnn}_r18_{norm}_{N}img_{setting}.yaml`` (CPU-sized, fashion-scenes,
R-18-FPN) is a few lines on top of a hand-written per-setting base (``_BASE_``); this module says
which leaves exist (:data:`NORMS` x :data:`SETTINGS` x images per GPU x architecture, per
:data:`FAMILIES`) and what goes in them (:class:`Cell`: norm keys, overrides, the schedule by the
linear scaling rule of :mod:`bnstats_lab.config_scaling`). ``python tools/make_configs.py`` writes
them (:mod:`bnstats_lab.config_leaves`) and the table of ``configs/README.md``
(:mod:`bnstats_lab.config_describe`, :mod:`bnstats_lab.config_generate`); ``--check`` (and
tests/test_configs.py) verifies that files and table match this module.

Configs written by hand (:data:`EXTERNAL`) are never written by the generator: where such a file is
a cell of the matrix (the R-50 EvalNorm and MABN configs) the cell is left to it; the table lists
them all, described from their contents.

Why one file of ~300 lines: the table is one declaration (norms, settings, families, hand-written
files) and a :class:`Cell` is one entry of it; splitting them would scatter what a reader edits
together. The leaves' generated header points here for the same reason.
"""
import dataclasses
import os
import re
from typing import Dict, List, Optional, Tuple

from .config_scaling import Reference, linear_scaling

# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------
# The norm name of the exact global-batch SyncBN (the plug-in registers it under detectron2's name);
# the one constant to change, then re-run tools/make_configs.py, should it get a name of its own.
SYNC_BN = "SyncBN"

SCRATCH, FROZEN, FINETUNE, REINIT = "scratch", "frozen", "finetune", "reinit"
ALL_SETTINGS = (SCRATCH, FROZEN, FINETUNE, REINIT)


@dataclasses.dataclass(frozen=True)
class SettingSpec:
    key: str  # in file names
    label: str  # in the table
    schedule: str  # "1x" or "3x" of the family's reference
    description: str


SETTINGS: Tuple[SettingSpec, ...] = (
    SettingSpec(SCRATCH, "random init", "3x",
                "every weight and statistic from scratch; the norm in backbone, FPN and a 4conv1fc box head "
                "(and the mask head), FREEZE_AT 0, a 3x schedule"),
    SettingSpec(FROZEN, "frozen BN", "1x",
                "pre-trained weights; backbone BN frozen with the pre-trained statistics (FrozenBN, FREEZE_AT 2: "
                "detectron2's usual practice); the norm in FPN and heads"),
    SettingSpec(FINETUNE, "fine-tuned BN", "1x",
                "pre-trained weights; every backbone norm trained, starting from the pre-trained statistics "
                "(FREEZE_AT 0); the norm in FPN and heads"),
    SettingSpec(REINIT, "re-initialised BN statistics", "1x",
                "pre-trained weights, running statistics reset (mean 0, variance 1) after loading, then trained "
                "as fine-tuned BN (BNSTATS.INIT.RESET_NORM_STATS)"),
)
SETTING_BY_KEY = {s.key: s for s in SETTINGS}


@dataclasses.dataclass(frozen=True)
class NormSpec:
    key: str  # in file names
    label: str  # in the table
    backbone: str  # MODEL.RESNETS.NORM where the backbone is trained (FrozenBN in the frozen setting)
    fpn: str  # MODEL.FPN.NORM
    heads: str  # MODEL.ROI_BOX_HEAD.NORM (4conv1fc) and MODEL.ROI_MASK_HEAD.NORM
    settings: Tuple[str, ...] = ALL_SETTINGS
    conv_box_head: bool = True  # 4conv1fc box head (False: detectron2's default 2fc head, no norm)
    # (config key, fraction): keys counted in training steps, set to round(fraction x the leaf's MAX_ITER)
    iteration_fractions: Tuple[Tuple[str, float], ...] = ()


NORMS: Tuple[NormSpec, ...] = (
    NormSpec("bn", "BN (EMA statistics)", "BN", "BN", "BN"),
    NormSpec("evalnorm", "EvalNorm", "EvalNorm", "EvalNorm", "EvalNorm"),
    NormSpec("mabn", "MABN", "MABN", "MABN", "MABN"),
    # Batch Renormalization's r_max/d_max schedule: the paper's steps (plain BN for 5k steps, d_max
    # reached at 25k, r_max at 40k; Ioffe 2017 §4) as fractions of detectron2's 90k-step 1x schedule
    NormSpec("brn", "Batch Renormalization", "BatchRenorm", "BatchRenorm", "BatchRenorm",
             iteration_fractions=(("BNSTATS.BATCH_RENORM.RAMP_START_ITER", 5000 / 90000),
                                  ("BNSTATS.BATCH_RENORM.D_MAX_END_ITER", 25000 / 90000),
                                  ("BNSTATS.BATCH_RENORM.R_MAX_END_ITER", 40000 / 90000))),
    NormSpec("syncbn", "SyncBN", SYNC_BN, SYNC_BN, SYNC_BN),
    # RoI-shuffled BN applies to the RoI heads only; backbone and FPN use SyncBN
    NormSpec("syncbn_roishuffle", "SyncBN + RoI-shuffled BN in heads", SYNC_BN, SYNC_BN, "RoIShuffleBN"),
    # Cross-Iteration BN; its paper's detection setting is the frozen one (CBN in FPN and heads)
    NormSpec("cbn", "Cross-Iteration BN", "CrossIterBN", "CrossIterBN", "CrossIterBN",
             settings=(SCRATCH, FROZEN, FINETUNE)),
    # Weight Standardization (Qiao et al. 2019) before GN and before BN: random init only (fine-tuning
    # needs weights pre-trained with standardized convs, which the lab does not make)
    NormSpec("gnws", "GN + WS", "GN+WS", "GN+WS", "GN+WS", settings=(SCRATCH,)),
    NormSpec("bnws", "BN + WS", "BN+WS", "BN+WS", "BN+WS", settings=(SCRATCH,)),
    # Batch-Channel Normalization (Qiao et al. 2019, §4): random init, and the frozen setting (the BN
    # pre-trained backbone frozen, BCN in FPN and heads, which start from random weights anyway); a
    # fine-tuned BCN backbone needs weights pre-trained with BCN, which the lab does not make
    NormSpec("bcn", "Batch-Channel Normalization", "BCN", "BCN", "BCN", settings=(SCRATCH, FROZEN)),
    # GN has no statistics: no re-initialised-statistics setting
    NormSpec("gn", "GN (baseline)", "GN", "GN", "GN", settings=(SCRATCH, FROZEN, FINETUNE)),
    # detectron2's standard recipe: FrozenBN backbone, no norm in FPN and the 2fc box head
    NormSpec("frozenbn", "FrozenBN (baseline)", "FrozenBN", "", "", settings=(FROZEN,), conv_box_head=False),
)
NORM_BY_KEY = {n.key: n for n in NORMS}

ARCHS = {"frcnn": "Faster R-CNN", "mrcnn": "Mask R-CNN"}


@dataclasses.dataclass(frozen=True)
class Family:
    key: str  # "r50" / "r18" in file names
    label: str  # section title in the README table
    backbone: str  # in leaf comments
    directory: str  # relative to the repository root
    depth: int
    gpus: int  # processes the leaves are written for: SOLVER.IMS_PER_BATCH = gpus x images per GPU
    images_per_gpu: Tuple[int, ...]
    reference: Reference
    bases: Dict[str, str]  # setting -> base file (in ``directory``)
    output_dir: str
    # extra config entries (dotted key -> value) per (norm key, setting), e.g. other weights
    overrides: Dict[Tuple[str, str], Dict[str, object]]


R50_GN_WEIGHTS = "catalog://ImageNetPretrained/FAIR/R-50-GN"
FASHION_BN = "output/pretrain/r18_fashion_mnist.pkl"
FASHION_GN = "output/pretrain/r18_gn_fashion_mnist.pkl"
FASHION_BN_WC = "output/pretrain/r18_fashion_mnist_wc.pkl"

FAMILIES: Tuple[Family, ...] = (
    Family(
        key="r50",
        label="R-50-FPN on COCO (GPU)",
        backbone="R-50-FPN, COCO",
        directory="configs",
        depth=50,
        gpus=8,
        images_per_gpu=(2, 4, 8),
        reference=Reference(16, 0.02, {"1x": (90000, (60000, 80000)), "3x": (270000, (210000, 250000))},
                            "detectron2's R-50-FPN baselines: 16 images (8 GPUs x 2), LR 0.02, 1x = 90k iterations"),
        bases={s: f"Base-R50-FPN-{s}.yaml" for s in ALL_SETTINGS},
        output_dir="output",
        overrides={
            # GN fine-tunes from GN-pretrained ImageNet weights (detectron2's GN baselines), MSRA-style input
            ("gn", FINETUNE): {
                "MODEL.WEIGHTS": R50_GN_WEIGHTS,
                "MODEL.PIXEL_MEAN": [103.530, 116.280, 123.675],
                "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
                "INPUT.FORMAT": "BGR",
            },
        },
    ),
    Family(
        key="r18",
        label="CPU-sized: R-18-FPN on fashion-scenes, 128 px",
        backbone="R-18-FPN, fashion-scenes 128 px",
        directory="configs/cpu",
        depth=18,
        gpus=1,
        images_per_gpu=(2, 4, 8),
        reference=Reference(2, 0.02, {"1x": (1500, (1100, 1400)), "3x": (4500, (3500, 4200))},
                            "the CPU demo recipe (configs/cpu/Base-R18-FPN-fashion.yaml): 2 images, LR 0.02, "
                            "1x = 1500 iterations"),
        bases={s: f"Base-R18-FPN-fashion-{s}.yaml" for s in ALL_SETTINGS},
        output_dir="output/cpu",
        overrides={
            ("gn", FINETUNE): {"MODEL.WEIGHTS": FASHION_GN},
            # MABN centralises the convs that feed it: start from weight-centralised pre-training
            ("mabn", FINETUNE): {"MODEL.WEIGHTS": FASHION_BN_WC},
            ("mabn", REINIT): {"MODEL.WEIGHTS": FASHION_BN_WC},
        },
    ),
)
FAMILY_BY_KEY = {f.key: f for f in FAMILIES}


@dataclasses.dataclass(frozen=True)
class External:
    """A config written by hand; never written by the generator, and it must exist."""

    path: str  # relative to the repository root
    cell: Optional[Tuple[str, str, str, int, str]] = None  # (family, arch, norm, N, setting) it stands for
    gpus: Optional[int] = None  # processes it is written for, when not its directory's convention


EXTERNAL: Tuple[External, ...] = (
    # the demo's Faster R-CNN and its Mask R-CNN twin: BN in backbone and FPN, random init, 2fc head
    External("configs/cpu/frcnn_r18_bn_2img.yaml"),
    External("configs/cpu/mrcnn_r18_bn_2img.yaml"),
    # EvalNorm in backbone, FPN and 4conv1fc head, fine-tuned BN from ImageNet; and its CPU demo variant
    External("configs/frcnn_r50_evalnorm_2img.yaml", ("r50", "frcnn", "evalnorm", 2, FINETUNE)),
    External("configs/cpu/frcnn_r18_evalnorm_2img.yaml"),
    # MABN everywhere: random init, or fine-tuned from converted weights; and the CPU variants
    External("configs/frcnn_r50_mabn_2img_scratch.yaml", ("r50", "frcnn", "mabn", 2, SCRATCH)),
    External("configs/frcnn_r50_mabn_2img_finetune.yaml", ("r50", "frcnn", "mabn", 2, FINETUNE)),
    External("configs/mrcnn_r50_mabn_2img_scratch.yaml", ("r50", "mrcnn", "mabn", 2, SCRATCH)),
    External("configs/mrcnn_r50_mabn_2img_finetune.yaml", ("r50", "mrcnn", "mabn", 2, FINETUNE)),
    External("configs/cpu/frcnn_r18_mabn_2img.yaml"),
    External("configs/cpu/mrcnn_r18_mabn_2img.yaml"),
    # SyncBN in backbone and FPN, RoI-shuffled BN in the heads, CPU in 2 processes
    External("configs/cpu/frcnn_r18_syncbn_roishuffle_2img.yaml", gpus=2),
    External("configs/cpu/mrcnn_r18_syncbn_roishuffle_2img.yaml", gpus=2),
)


# ---------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cell:
    family: Family
    arch: str
    norm: NormSpec
    images_per_gpu: int
    setting: SettingSpec

    @property
    def key(self) -> Tuple[str, str, str, int, str]:
        return (self.family.key, self.arch, self.norm.key, self.images_per_gpu, self.setting.key)

    @property
    def name(self) -> str:
        return f"{self.arch}_{self.family.key}_{self.norm.key}_{self.images_per_gpu}img_{self.setting.key}"

    @property
    def path(self) -> str:
        """Where the cell's config lives (the EXTERNAL file that stands for the cell, if any)."""
        external = external_for_cell(self.key)
        return external.path if external else f"{self.family.directory}/{self.name}.yaml"

    @property
    def generated(self) -> bool:
        return external_for_cell(self.key) is None

    @property
    def total_batch(self) -> int:
        return self.family.gpus * self.images_per_gpu

    def norms(self) -> Dict[str, str]:
        """Norm config keys of the leaf (the backbone's is FrozenBN in the frozen setting)."""
        keys = {
            "MODEL.RESNETS.NORM": "FrozenBN" if self.setting.key == FROZEN else self.norm.backbone,
            "MODEL.FPN.NORM": self.norm.fpn,
        }
        if self.norm.conv_box_head:
            keys["MODEL.ROI_BOX_HEAD.NORM"] = self.norm.heads
        if self.arch == "mrcnn":
            keys["MODEL.ROI_MASK_HEAD.NORM"] = self.norm.heads
        return keys

    def schedule(self) -> Tuple[float, int, Tuple[int, ...]]:
        return linear_scaling(self.family.reference, self.total_batch, self.setting.schedule)

    def entries(self) -> Dict[str, object]:
        """Every dotted config key the leaf sets, in file order."""
        out: Dict[str, object] = {}
        if self.arch == "mrcnn":
            out["MODEL.MASK_ON"] = True
        out.update(self.family.overrides.get((self.norm.key, self.setting.key), {}))
        out.update(self.norms())
        if not self.norm.conv_box_head:
            out["MODEL.ROI_BOX_HEAD.NUM_CONV"] = 0
            out["MODEL.ROI_BOX_HEAD.NUM_FC"] = 2
        lr, max_iter, steps = self.schedule()
        for key, fraction in self.norm.iteration_fractions:
            out[key] = int(round(fraction * max_iter))
        out["SOLVER.IMS_PER_BATCH"] = self.total_batch
        out["SOLVER.BASE_LR"] = lr
        out["SOLVER.MAX_ITER"] = max_iter
        out["SOLVER.STEPS"] = tuple(steps)
        out["OUTPUT_DIR"] = f"{self.family.output_dir}/{self.name}"
        return out


def external_for_cell(key) -> Optional[External]:
    for e in EXTERNAL:
        if e.cell == tuple(key):
            return e
    return None


def cells() -> List[Cell]:
    """Every cell of the matrix, in table order."""
    out = []
    for family in FAMILIES:
        for arch in ARCHS:
            for norm in NORMS:
                for n in family.images_per_gpu:
                    for setting in SETTINGS:
                        if setting.key in norm.settings:
                            out.append(Cell(family, arch, norm, n, setting))
    return out


_LEAF_NAME = re.compile(r"^(?P<arch>[a-z]+)_(?P<backbone>r\d+)_(?P<norm>.+?)_(?P<n>\d+)img(?:_(?P<setting>[a-z]+))?$")


def parse_leaf_name(path: str) -> Optional[Dict[str, str]]:
    """``{arch, backbone, norm, n, setting}`` of a name following the scheme, else None."""
    match = _LEAF_NAME.match(os.path.splitext(os.path.basename(path))[0])
    return match.groupdict() if match else None
