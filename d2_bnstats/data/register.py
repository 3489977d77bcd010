"""Register fashion-scenes (and checked COCO-format data sets) with detectron2's catalogs.

Data sets live under ``$DETECTRON2_DATASETS`` (default ``./datasets``), detectron2's convention:
``fashion_scenes/<name>/<split>.json``. Every preset is registered as ``<name>_<split>`` whether or
not it is built yet; using one that is missing stops with the command that builds it. Custom data
sets built under the same root are registered too.
"""
import json
import os
from typing import List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .fashion_scenes import PRESETS, SceneSpec, class_names, iter_built

FOLDER = "fashion_scenes"


class DatasetError(RuntimeError):
    """A registered data set whose files are missing or malformed."""


def datasets_root() -> str:
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def fashion_scenes_root(root: Optional[str] = None) -> str:
    return os.path.join(root or datasets_root(), FOLDER)


def check_coco_json(json_file: str, image_root: str, dataset_name: str, build_hint: str = "") -> dict:
    """Parse and sanity-check a COCO instances file; errors name the file and what is wrong."""
    hint = f" {build_hint}" if build_hint else ""
    if not os.path.isfile(json_file):
        raise DatasetError(f"data set {dataset_name!r}: annotation file {json_file} does not exist.{hint}")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"data set {dataset_name!r}: {json_file} is not valid JSON ({e}).{hint}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"data set {dataset_name!r}: {json_file} must hold a JSON object, not {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"data set {dataset_name!r}: {json_file} has no {key!r} list (not COCO format)")
    if not data["images"]:
        raise DatasetError(f"data set {dataset_name!r}: {json_file} is an empty split (0 images).{hint}")
    if not data["categories"]:
        raise DatasetError(f"data set {dataset_name!r}: {json_file} defines no categories")
    for image in data["images"]:
        path = os.path.join(image_root, str(image.get("file_name", "")))
        if not os.path.isfile(path):
            raise DatasetError(
                f"data set {dataset_name!r}: image {path} listed in {json_file} does not exist.{hint}"
            )
    return data


def register_checked_coco_instances(
    name: str, json_file: str, image_root: str, metadata: Optional[dict] = None, build_hint: str = ""
) -> None:
    """Like ``detectron2.data.datasets.register_coco_instances``, but the files are checked when the
    data set is first loaded, with errors that name the file (see :func:`check_coco_json`)."""

    def load():
        check_coco_json(json_file, image_root, name, build_hint)
        return load_coco_json(json_file, image_root, name)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco", **(metadata or {}))


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
