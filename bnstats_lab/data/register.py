"""Register fashion-scenes with detectron2's catalogs (through the plug-in's checked COCO registration).

Data sets live under ``$DETECTRON2_DATASETS`` (default ``./datasets``), detectron2's convention:
``fashion_scenes/<name>/<split>.json``. Every preset is registered as ``<name>_<split>`` whether or
not it is built yet; using one that is missing stops with the command that builds it. Custom data
sets built under the same root are registered too.
"""
import os
from typing import List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

from d2_bnstats.d2.datasets import datasets_root, register_checked_coco_instances

from .fashion_scenes import PRESETS, SceneSpec, class_names, iter_built

FOLDER = "fashion_scenes"


def fashion_scenes_root(root: Optional[str] = None) -> str:
    return os.path.join(root or datasets_root(), FOLDER)


def _register_fashion_scenes_dataset(root: str, name: str, spec: SceneSpec, overwrite: bool) -> List[str]:
    registered = []
    for split in spec.splits:
        dataset_name = f"{name}_{split}"
        if dataset_name in DatasetCatalog.list():
            if not overwrite:
                continue
            DatasetCatalog.remove(dataset_name)
            MetadataCatalog.remove(dataset_name)
        folder = os.path.join(root, name)
        hint = (
            f"Build it with `python datasets/prepare_fashion_scenes.py --name {name}`"
            + (f" (DETECTRON2_DATASETS={os.path.dirname(root)})" if os.path.dirname(root) != "datasets" else "")
            + "."
        )
        register_checked_coco_instances(
            dataset_name,
            os.path.join(folder, f"{split}.json"),
            os.path.join(folder, split),
            metadata={"thing_classes": class_names()},
            build_hint=hint,
        )
        registered.append(dataset_name)
    return registered


def register_fashion_scenes(root: Optional[str] = None, overwrite: bool = False) -> List[str]:
    """Register every preset and every custom data set built under ``root`` (default:
    ``$DETECTRON2_DATASETS``). Names already registered are kept unless ``overwrite``, which points
    them at ``root`` instead. Returns the names registered by this call.
    """
    root = fashion_scenes_root(root)
    names = []
    for name, spec in PRESETS.items():
        names += _register_fashion_scenes_dataset(root, name, spec, overwrite)
    for name, spec in iter_built(root):
        if name not in PRESETS:
            names += _register_fashion_scenes_dataset(root, name, spec, overwrite)
    return names
