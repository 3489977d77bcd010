"""Describing any config file from its contents: model, setting, norms, batch, schedule, weights.

What the table of ``configs/README.md`` shows for every config, generated or hand-written
(:func:`describe_file`), read with detectron2's own YAML loading but without the plug-in's checks
(:func:`load_config_unchecked`), so a config naming a norm that is not registered can still be
described. The training setting (:func:`derive_setting`) and the processes a file is written for
(:func:`gpus_for`) are read from the file and its directory, not from the matrix.
"""
import copy
import dataclasses
import os
from typing import Dict, Optional, Tuple

from .config_matrix import EXTERNAL, FAMILIES, FINETUNE, FROZEN, REINIT, SCRATCH, SETTING_BY_KEY, Family


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

    from d2_bnstats import add_bnstats_config

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
