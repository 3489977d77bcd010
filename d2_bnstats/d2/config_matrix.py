"""The config matrix: one declarative table that generates the leaf configs and configs/README.md.

Every leaf config ``configs/{frcnn,mrcnn}_r50_{norm}_{N}img_{setting}.yaml`` (GPU, COCO, R-50-FPN)
and ``configs/cpu/{frcnn,mrcnn}_r18_{norm}_{N}img_{setting}.yaml`` (CPU-sized, fashion-scenes,
R-18-FPN) is a few lines on top of a hand-written per-setting base (``_BASE_``); this module says
which leaves exist (:data:`NORMS` x :data:`SETTINGS` x images per GPU x architecture, per
:data:`FAMILIES`), what goes in them, and the schedule by the linear scaling rule. ``python
tools/make_configs.py`` writes them and the table of ``configs/README.md``; ``--check`` (and
tests/test_configs.py) verifies that files and table match this module.

Files that other issues write by hand (:data:`EXTERNAL`) are never written here: where such a file is
a cell of the matrix (the EvalNorm and MABN issues' R-50 configs) the cell is left to it; the table
lists them all, described from their contents once they exist. Norm names whose layers other issues
provide are in :data:`NORM_PROVIDERS`; :func:`pending_merge` says, from the norm registry at run time,
which of them are not registered in this checkout (their branch is not merged yet).

Linear scaling rule (Goyal et al. 2017; detectron2's baselines): from a reference total batch B0
with learning rate LR0 and a schedule of I0 iterations (steps S0), a total batch B trains with
LR = LR0 * B / B0 and I = I0 * B0 / B iterations (steps scaled alike), i.e. the same number of
epochs. Warm-up iterations stay as in the base (detectron2's practice for its large-batch configs).
"""
import copy
import dataclasses
import os
import re
from typing import Dict, List, Optional, Tuple

# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------
# The exact global SyncBN of the sync issue (5) either overrides detectron2's "SyncBN" or gets a
# name of its own; in the second case change this one constant and re-run tools/make_configs.py.
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


NORMS: Tuple[NormSpec, ...] = (
    NormSpec("bn", "BN (EMA statistics)", "BN", "BN", "BN"),
    NormSpec("evalnorm", "EvalNorm", "EvalNorm", "EvalNorm", "EvalNorm"),
    NormSpec("mabn", "MABN", "MABN", "MABN", "MABN"),
    NormSpec("syncbn", "SyncBN", SYNC_BN, SYNC_BN, SYNC_BN),
    # RoI-shuffled BN applies to the RoI heads only; backbone and FPN use SyncBN (as in the sync issue)
    NormSpec("syncbn_roishuffle", "SyncBN + RoI-shuffled BN in heads", SYNC_BN, SYNC_BN, "RoIShuffleBN"),
    # GN has no statistics: no re-initialised-statistics setting
    NormSpec("gn", "GN (baseline)", "GN", "GN", "GN", settings=(SCRATCH, FROZEN, FINETUNE)),
    # detectron2's standard recipe: FrozenBN backbone, no norm in FPN and the 2fc box head
    NormSpec("frozenbn", "FrozenBN (baseline)", "FrozenBN", "", "", settings=(FROZEN,), conv_box_head=False),
)
NORM_BY_KEY = {n.key: n for n in NORMS}

ARCHS = {"frcnn": "Faster R-CNN", "mrcnn": "Mask R-CNN"}


@dataclasses.dataclass(frozen=True)
class Reference:
    """The schedule the linear scaling rule scales from."""

    total_batch: int
    base_lr: float
    schedules: Dict[str, Tuple[int, Tuple[int, ...]]]  # "1x" -> (MAX_ITER, STEPS)
    source: str


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
    """A config another issue writes by hand; never written by the generator."""

    path: str  # relative to the repository root
    issue: int
    cell: Optional[Tuple[str, str, str, int, str]] = None  # (family, arch, norm, N, setting) it stands for
    declared: str = ""  # what the issue says it is (shown while the file is not merged yet)
    gpus: Optional[int] = None  # processes it is written for, when not its directory's convention


EXTERNAL: Tuple[External, ...] = (
    External("configs/cpu/frcnn_r18_bn_2img.yaml", 2, declared="Faster R-CNN, BN in backbone and FPN, random init, 2fc head (the demo)"),
    External("configs/cpu/mrcnn_r18_bn_2img.yaml", 2, declared="Mask R-CNN, BN in backbone and FPN, random init, 2fc head"),
    External("configs/frcnn_r50_evalnorm_2img.yaml", 3, ("r50", "frcnn", "evalnorm", 2, FINETUNE),
             "Faster R-CNN, EvalNorm in backbone, FPN and 4conv1fc head, fine-tuned BN from ImageNet"),
    External("configs/cpu/frcnn_r18_evalnorm_2img.yaml", 3, declared="Faster R-CNN, EvalNorm, CPU demo variant"),
    External("configs/frcnn_r50_mabn_2img_scratch.yaml", 4, ("r50", "frcnn", "mabn", 2, SCRATCH),
             "Faster R-CNN, MABN everywhere, random init"),
    External("configs/frcnn_r50_mabn_2img_finetune.yaml", 4, ("r50", "frcnn", "mabn", 2, FINETUNE),
             "Faster R-CNN, MABN, fine-tuned from converted weights"),
    External("configs/mrcnn_r50_mabn_2img_scratch.yaml", 4, ("r50", "mrcnn", "mabn", 2, SCRATCH),
             "Mask R-CNN, MABN everywhere, random init"),
    External("configs/mrcnn_r50_mabn_2img_finetune.yaml", 4, ("r50", "mrcnn", "mabn", 2, FINETUNE),
             "Mask R-CNN, MABN, fine-tuned from converted weights"),
    External("configs/cpu/frcnn_r18_mabn_2img.yaml", 4, declared="Faster R-CNN, MABN everywhere, CPU variant"),
    External("configs/cpu/mrcnn_r18_mabn_2img.yaml", 4, declared="Mask R-CNN, MABN everywhere, CPU variant"),
    External("configs/cpu/frcnn_r18_syncbn_roishuffle_2img.yaml", 5,
             declared="Faster R-CNN, SyncBN in backbone, RoI-shuffled BN in heads, CPU (2 processes)", gpus=2),
    External("configs/cpu/mrcnn_r18_syncbn_roishuffle_2img.yaml", 5,
             declared="Mask R-CNN, SyncBN in backbone, RoI-shuffled BN in heads, CPU (2 processes)", gpus=2),
)

ISSUES = {
    2: "foundation",
    3: "EvalNorm issue 3 (branch evalnorm)",
    4: "MABN issue 4 (branch mabn)",
    5: "SyncBN / shuffle issue 5 (branch syncshuffle)",
}

# Norm names (used by the matrix or by other issues' configs) whose layers other issues provide: name ->
# issue. Which of them are missing is computed from the norm registry at run time (pending_merge()), so
# nothing here changes when a branch is merged: configs naming an unregistered provided norm are skipped
# (not failed) by the config test, and that issue's EXTERNAL files may be missing, only while the name is
# not registered. A name that is neither registered nor listed here fails the tests.
NORM_PROVIDERS: Dict[str, int] = {
    "EvalNorm": 3,
    "SyncEvalNorm": 3,
    "MABN": 4,
    "SyncMABN": 4,
    "RoIShuffleBN": 5,
    "GhostBN": 5,
}


def unregistered_norms(names) -> List[str]:
    """The names among ``names`` (None/"" ignored) that the norm registry does not know, sorted."""
    from ..registry import available_norms

    available = set(available_norms())
    return sorted({n for n in names if n and isinstance(n, str) and n not in available})


def pending_merge() -> Dict[str, int]:
    """{norm name: issue} for the provided norms (:data:`NORM_PROVIDERS`) not registered here, now."""
    missing = set(unregistered_norms(NORM_PROVIDERS))
    return {n: i for n, i in NORM_PROVIDERS.items() if n in missing}


GENERATED_MARK = "# GENERATED by tools/make_configs.py"
TABLE_BEGIN = "<!-- BEGIN GENERATED by tools/make_configs.py: do not edit by hand -->"
TABLE_END = "<!-- END GENERATED -->"


# ---------------------------------------------------------------------------------------------
# Cells and leaves
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
        """Where the cell's config lives (an EXTERNAL file where another issue owns the cell)."""
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


def linear_scaling(reference: Reference, total_batch: int, schedule: str = "1x") -> Tuple[float, int, Tuple[int, ...]]:
    """(BASE_LR, MAX_ITER, STEPS) for ``total_batch`` images per iteration by the linear scaling rule."""
    if total_batch < 1:
        raise ValueError(f"total batch must be >= 1, got {total_batch}")
    if schedule not in reference.schedules:
        raise ValueError(f"unknown schedule {schedule!r}; known: {sorted(reference.schedules)}")
    max_iter, steps = reference.schedules[schedule]
    factor = reference.total_batch / total_batch
    lr = float(f"{reference.base_lr * total_batch / reference.total_batch:.6g}")
    return lr, int(round(max_iter * factor)), tuple(int(round(s * factor)) for s in steps)


def _yaml_value(value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, tuple):  # yacs reads "(a, b)" as a tuple
        return "(" + ", ".join(_yaml_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to a config")


def _nest(entries: Dict[str, object]) -> Dict:
    tree: Dict = {}
    for dotted, value in entries.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _emit(tree: Dict, indent: int = 0) -> List[str]:
    lines = []
    for key, value in tree.items():
        if isinstance(value, dict):
            lines.append(" " * indent + f"{key}:")
            lines.extend(_emit(value, indent + 2))
        else:
            lines.append(" " * indent + f"{key}: {_yaml_value(value)}")
    return lines


def describe_cell(cell: Cell) -> str:
    norms = cell.norms()
    parts = [f"{k.split('.')[-2]} {v or 'none'}" for k, v in norms.items()]
    lr, max_iter, _ = cell.schedule()
    return (
        f"{ARCHS[cell.arch]} {cell.family.backbone}, "
        f"{cell.setting.label}, {cell.norm.label}: {', '.join(parts)}.\n"
        f"# {cell.images_per_gpu} images/GPU x {cell.family.gpus} GPU{'s' if cell.family.gpus > 1 else ''} = "
        f"{cell.total_batch}; {cell.setting.schedule} schedule by the linear scaling rule "
        f"(LR {lr}, {max_iter} iterations)."
    )


def render_leaf(cell: Cell) -> str:
    header = [
        f"{GENERATED_MARK} from d2_bnstats/d2/config_matrix.py; edit the table there, not this file.",
        f"# {describe_cell(cell)}",
        f'_BASE_: "{cell.family.bases[cell.setting.key]}"',
    ]
    return "\n".join(header + _emit(_nest(cell.entries()))) + "\n"


# ---------------------------------------------------------------------------------------------
# Describing any config file from its contents (the README table)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Description:
    path: str
    model: str
    setting: str
    norms: str
    images_per_gpu: str
    total_batch: int
    base_lr: float
    schedule: str
    weights: str
    origin: str


_YAML_CACHE: Dict[Tuple[str, int], dict] = {}


def _cached_yaml_loader():
    from detectron2.config import CfgNode

    class CachingCfgNode(CfgNode):
        """detectron2's YAML + ``_BASE_`` loading, each file parsed once (the bases are shared by
        hundreds of leaves)."""

        @classmethod
        def load_yaml_with_base(cls, filename, allow_unsafe=False):
            key = (os.path.abspath(filename), os.stat(filename).st_mtime_ns)
            if key not in _YAML_CACHE:
                _YAML_CACHE[key] = super().load_yaml_with_base(filename, allow_unsafe=allow_unsafe)
            return copy.deepcopy(_YAML_CACHE[key])

    return CachingCfgNode


def load_config_unchecked(path: str):
    """detectron2 defaults + BNSTATS keys + the file; no norm/batch/weights checks (for describing)."""
    from detectron2.config import get_cfg

    from .config import add_bnstats_config

    cfg = get_cfg()
    add_bnstats_config(cfg)
    loaded = _cached_yaml_loader().load_yaml_with_base(path, allow_unsafe=True)
    if loaded.get("VERSION", cfg.VERSION) != cfg.VERSION:
        cfg.merge_from_file(path)  # detectron2 upgrades old config versions
    else:
        cfg.merge_from_other_cfg(type(cfg)(loaded))
    return cfg


def config_norms(cfg) -> Dict[str, str]:
    """The norm config keys that are in effect for the model the config builds (non-empty values)."""
    keys = {}
    meta = cfg.MODEL.META_ARCHITECTURE
    if "resnet" in cfg.MODEL.BACKBONE.NAME:
        keys["MODEL.RESNETS.NORM"] = cfg.MODEL.RESNETS.NORM
    if "fpn" in cfg.MODEL.BACKBONE.NAME:
        keys["MODEL.FPN.NORM"] = cfg.MODEL.FPN.NORM
    if meta == "RetinaNet":
        keys["MODEL.RETINANET.NORM"] = cfg.MODEL.RETINANET.NORM
    elif meta == "GeneralizedRCNN":
        if cfg.MODEL.ROI_BOX_HEAD.NUM_CONV > 0:
            keys["MODEL.ROI_BOX_HEAD.NORM"] = cfg.MODEL.ROI_BOX_HEAD.NORM
        if cfg.MODEL.MASK_ON:
            keys["MODEL.ROI_MASK_HEAD.NORM"] = cfg.MODEL.ROI_MASK_HEAD.NORM
    return {k: v for k, v in keys.items() if v}


def derive_setting(cfg) -> str:
    """The training setting a config is in, read from its keys."""
    if not cfg.MODEL.WEIGHTS:
        return SCRATCH
    if cfg.MODEL.RESNETS.NORM == "FrozenBN":
        return FROZEN
    if cfg.BNSTATS.INIT.RESET_NORM_STATS:
        return REINIT
    return FINETUNE


def gpus_for(path: str, root: str) -> int:
    """Processes a config is written for: its EXTERNAL declaration, else its directory's convention
    (8 GPUs in configs/, 1 process in configs/cpu/)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root)).replace(os.sep, "/")
    for e in EXTERNAL:
        if e.path == rel and e.gpus:
            return e.gpus
    directory = os.path.dirname(rel)
    for family in FAMILIES:
        if directory == family.directory:
            return family.gpus
    return 1 if directory.startswith("configs/cpu") else FAMILIES[0].gpus


def _short_weights(weights: str) -> str:
    if not weights:
        return "none"
    return weights.replace("detectron2://ImageNetPretrained/", "").replace("catalog://ImageNetPretrained/", "")


def _iterations(n: int) -> str:
    return f"{n / 1000:g}k" if n >= 10000 and n % 100 == 0 else str(n)


def _schedule_label(cfg, family: Optional[Family]) -> str:
    steps = ", ".join(_iterations(s) for s in cfg.SOLVER.STEPS)
    label = f"{_iterations(cfg.SOLVER.MAX_ITER)} it (steps {steps or '-'})"
    if family is not None:
        ref_iters = family.reference.schedules["1x"][0]
        multiple = cfg.SOLVER.MAX_ITER * cfg.SOLVER.IMS_PER_BATCH / (ref_iters * family.reference.total_batch)
        label += f", {multiple:g}x"
    return label


def family_for(path: str, root: str) -> Optional[Family]:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root)).replace(os.sep, "/")
    for family in FAMILIES:
        if os.path.dirname(rel) == family.directory:
            return family
    return None


def describe_file(path: str, root: str, origin: str) -> Description:
    cfg = load_config_unchecked(path)
    meta = cfg.MODEL.META_ARCHITECTURE
    if meta == "GeneralizedRCNN":
        model = "Mask R-CNN" if cfg.MODEL.MASK_ON else "Faster R-CNN"
    else:
        model = meta
    if "resnet" in cfg.MODEL.BACKBONE.NAME:
        model += f" R-{cfg.MODEL.RESNETS.DEPTH}" + ("-FPN" if "fpn" in cfg.MODEL.BACKBONE.NAME else "")
    norms = config_norms(cfg)
    short = {"MODEL.RESNETS.NORM": "backbone", "MODEL.FPN.NORM": "FPN", "MODEL.ROI_BOX_HEAD.NORM": "box",
             "MODEL.ROI_MASK_HEAD.NORM": "mask", "MODEL.RETINANET.NORM": "head"}
    norm_text = ", ".join(f"{short.get(k, k)} {v}" for k, v in norms.items()) or "none"
    if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and cfg.MODEL.ROI_BOX_HEAD.NUM_CONV == 0:
        norm_text += " (2fc box head)"
    gpus = gpus_for(path, root)
    ims = cfg.SOLVER.IMS_PER_BATCH
    per_gpu = f"{ims // gpus}" if ims % gpus == 0 else f"{ims}/{gpus}"
    setting = SETTING_BY_KEY[derive_setting(cfg)].label
    return Description(
        path=os.path.relpath(os.path.abspath(path), os.path.abspath(root)).replace(os.sep, "/"),
        model=model,
        setting=setting,
        norms=norm_text,
        images_per_gpu=f"{per_gpu} x {gpus}",
        total_batch=ims,
        base_lr=float(cfg.SOLVER.BASE_LR),
        schedule=_schedule_label(cfg, family_for(path, root)),
        weights=_short_weights(cfg.MODEL.WEIGHTS),
        origin=origin,
    )


_LEAF_NAME = re.compile(r"^(?P<arch>[a-z]+)_(?P<backbone>r\d+)_(?P<norm>.+?)_(?P<n>\d+)img(?:_(?P<setting>[a-z]+))?$")


def parse_leaf_name(path: str) -> Optional[Dict[str, str]]:
    """``{arch, backbone, norm, n, setting}`` of a name following the scheme, else None."""
    match = _LEAF_NAME.match(os.path.splitext(os.path.basename(path))[0])
    return match.groupdict() if match else None


def leaf_files(root: str) -> List[str]:
    """Every leaf config (not Base-*) under the families' directories, relative to ``root``."""
    out = []
    for family in FAMILIES:
        directory = os.path.join(root, family.directory)
        if not os.path.isdir(directory):
            continue
        for name in sorted(os.listdir(directory)):
            if name.endswith(".yaml") and not name.startswith("Base"):
                out.append(f"{family.directory}/{name}")
    return out


def is_generated_file(path: str) -> bool:
    try:
        with open(path) as f:
            return f.readline().startswith(GENERATED_MARK)
    except OSError:
        return False


def _origin(rel: str) -> str:
    for e in EXTERNAL:
        if e.path == rel:
            return f"issue {e.issue}"
    return "generated" if rel in {c.path for c in cells() if c.generated} else "hand-written"


def render_table(root: str) -> str:
    """The generated block of configs/README.md: norms from other issues and one row per config file.

    Independent of the norm registry (the file must not change when a branch is merged); the rows of
    EXTERNAL files that are not present say so."""
    present = set(leaf_files(root))
    lines = [TABLE_BEGIN, ""]
    lines.append("**Norms from other issues** (a config naming one is skipped, not failed, by the config test "
                 "while the name is not registered, i.e. until that issue's branch is merged):")
    lines.append("")
    by_issue: Dict[int, List[str]] = {}
    for name, issue in NORM_PROVIDERS.items():
        by_issue.setdefault(issue, []).append(f"`{name}`")
    for issue, names in by_issue.items():
        lines.append(f"- {', '.join(names)}: {ISSUES.get(issue, f'issue {issue}')}")
    lines.append("")
    header = ("| config | model | setting | norms | img/GPU x GPUs | LR | schedule | weights | from |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    external_paths = {e.path: e for e in EXTERNAL}
    for family in FAMILIES:
        lines.append(f"### {family.label} (`{family.directory}/`)")
        lines.append("")
        lines.append(header)
        listed = []
        for cell in cells():
            if cell.family is family:
                listed.append(cell.path)
        others = sorted(p for p in present if os.path.dirname(p) == family.directory and p not in listed)
        others += sorted(e.path for e in EXTERNAL if os.path.dirname(e.path) == family.directory
                         and e.path not in present and e.path not in listed)
        for rel in listed + others:
            link = os.path.relpath(rel, "configs")
            if rel in present:
                try:
                    d = describe_file(os.path.join(root, rel), root, _origin(rel))
                except Exception as e:  # a broken file is reported by generate(); keep the table readable
                    lines.append(f"| {os.path.basename(rel)} | cannot be loaded: {type(e).__name__} | | | | | | | |")
                    continue
                lines.append(
                    f"| [{os.path.basename(rel)}]({link}) | {d.model} | {d.setting} | {d.norms} | {d.images_per_gpu} "
                    f"| {d.base_lr:g} | {d.schedule} | {d.weights} | {d.origin} |"
                )
            else:
                e = external_paths.get(rel)
                what = e.declared if e else "missing"
                lines.append(f"| {os.path.basename(rel)} | {what} | | | | | | | issue {e.issue if e else '?'}, "
                             f"not merged yet |")
        lines.append("")
    lines.append(TABLE_END)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Writing and checking
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
    written: List[str] = dataclasses.field(default_factory=list)
    removed: List[str] = dataclasses.field(default_factory=list)
    problems: List[str] = dataclasses.field(default_factory=list)


def _readme_with_table(readme_text: str, table: str, readme_path: str) -> str:
    if TABLE_BEGIN not in readme_text or TABLE_END not in readme_text:
        raise ValueError(f"{readme_path} lacks the markers {TABLE_BEGIN!r} ... {TABLE_END!r} around the table")
    head, rest = readme_text.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    return head + table + tail


def generate(root: str, write: bool = True) -> Report:
    """Write (or, with ``write=False``, only compare) every generated leaf and the README table.

    Never overwrites a file that lacks the generated marker (an EXTERNAL or hand-written config):
    such a collision is reported as a problem. Generated files that the table no longer lists are
    removed (reported when not writing)."""
    report = Report()
    wanted = {}
    for cell in cells():
        if cell.generated:
            wanted[cell.path] = render_leaf(cell)
    for rel, text in wanted.items():
        path = os.path.join(root, rel)
        if os.path.exists(path) and not is_generated_file(path):
            report.problems.append(
                f"{rel} exists but was not generated: another issue owns this name. Declare it in "
                f"config_matrix.EXTERNAL (with its cell) or remove it."
            )
            continue
        current = open(path).read() if os.path.exists(path) else None
        if current != text:
            if write:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
                report.written.append(rel)
            else:
                report.problems.append(f"{rel} is {'missing' if current is None else 'out of date'}")
    for rel in leaf_files(root):
        if rel not in wanted and is_generated_file(os.path.join(root, rel)):
            if write:
                os.remove(os.path.join(root, rel))
                report.removed.append(rel)
            else:
                report.problems.append(f"{rel} was generated but the table no longer lists it")
    pending_issues = set(pending_merge().values())
    for e in EXTERNAL:
        if not os.path.exists(os.path.join(root, e.path)) and e.issue not in pending_issues:
            report.problems.append(f"{e.path} (issue {e.issue}) is missing although that issue's norms are registered")
    for rel in leaf_files(root):
        try:
            load_config_unchecked(os.path.join(root, rel))
        except Exception as e:
            report.problems.append(f"{rel} cannot be loaded: {type(e).__name__}: {e}")
    readme = os.path.join(root, "configs", "README.md")
    text = open(readme).read() if os.path.exists(readme) else ""
    try:
        new_text = _readme_with_table(text, render_table(root), readme)
    except ValueError as e:
        report.problems.append(str(e))
    else:
        if new_text != text:
            if write:
                with open(readme, "w") as f:
                    f.write(new_text)
                report.written.append("configs/README.md")
            else:
                report.problems.append("configs/README.md: the table is out of date")
    return report


def rescale_overrides(cfg, gpus: int, images_per_gpu: Optional[int] = None, reference: Optional[Reference] = None,
                      config_gpus: Optional[int] = None) -> List[str]:
    """``KEY VALUE`` overrides that run ``cfg`` on ``gpus`` processes by the linear scaling rule.

    The images per GPU stay as the config has them (``IMS_PER_BATCH / config_gpus``) unless given.
    LR, MAX_ITER and STEPS scale from the config's own values, so any config can be rescaled."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    total = cfg.SOLVER.IMS_PER_BATCH
    if images_per_gpu is None:
        config_gpus = config_gpus or 1
        if total % config_gpus:
            raise ValueError(f"SOLVER.IMS_PER_BATCH = {total} does not split over {config_gpus} GPUs")
        images_per_gpu = total // config_gpus
    new_total = gpus * images_per_gpu
    factor = total / new_total
    lr = float(f"{cfg.SOLVER.BASE_LR * new_total / total:.6g}")
    steps = tuple(int(round(s * factor)) for s in cfg.SOLVER.STEPS)
    return [
        "SOLVER.IMS_PER_BATCH", str(new_total),
        "SOLVER.BASE_LR", repr(lr),
        "SOLVER.MAX_ITER", str(int(round(cfg.SOLVER.MAX_ITER * factor))),
        "SOLVER.STEPS", "(" + ", ".join(str(s) for s in steps) + ("," if len(steps) == 1 else "") + ")",
    ]
