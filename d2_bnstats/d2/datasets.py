"""Checked COCO registration: detectron2's ``register_coco_instances`` with errors that name the file.

detectron2 registers a COCO-format data set lazily and, when its files are missing or malformed,
fails deep inside ``load_coco_json`` (a ``FileNotFoundError`` or ``KeyError`` far from the config
that named the data set). :func:`register_checked_coco_instances` registers the same loader, but the
annotation file and the images it lists are checked first, on the first load, and every problem is a
:class:`DatasetError` naming the data set, the file and what is wrong, plus an optional hint (e.g. the
command that builds the data set).

Data sets live under ``$DETECTRON2_DATASETS`` (default ``./datasets``), detectron2's convention:
:func:`datasets_root`.
"""
import json
import os
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json


class DatasetError(RuntimeError):
    """A registered data set whose files are missing or malformed."""


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS``, else ``datasets`` (relative to the current directory), as detectron2 reads it."""
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


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
