"""Checked COCO registration: detectron2's ``register_coco_instances`` with data checked up front and
errors that name the file.

detectron2 registers a COCO-format data set lazily and trusts its contents: a missing annotation
file or image fails deep inside ``load_coco_json`` or the first batch (or, for the test split, only
after training has finished), a category id missing from ``categories`` is a bare ``KeyError``, an
undecodable image crashes the data loader without its file name, and a box entirely outside its
image is silently dropped (training then runs with ``loss_box_reg: 0``).

:func:`register_checked_coco_instances` registers the same loader, but :func:`check_coco_json` runs
first, and :func:`check_datasets` runs it for every split a config names before the model is built.
Every problem is a :class:`DatasetError` naming the data set, the annotation file, and for a
problem of one image its image id and file, plus an optional hint (e.g. the command that builds
the data set). What is checked:

- the file is COCO instances JSON with a non-empty ``images`` list and ``categories``;
- each image has a unique id, a file name and a positive width and height; its file exists
  (every image, always: a stat is cheap);
- each annotation has a box ``[x, y, w, h]`` of finite numbers with ``w, h >= 0`` and a
  ``category_id`` defined in ``categories``;
- boxes partly outside their image are clipped to it when the data set is loaded (as detectron2's
  mapper would do anyway after augmentation), counted and reported in one warning; a box *entirely*
  outside its image is an error. Such a box cannot describe anything in that image: it means the
  annotation and the image disagree (boxes written as ``[x0, y0, x1, y1]``, coordinates for another
  image size, an annotation attached to the wrong image id), usually for the whole file. Dropping it
  with a warning would train on wrong targets, as detectron2's silent drop does, and evaluating on
  the split would count ground truth no detection can match;
- image headers: each image is opened with PIL, its size compared with the JSON's (EXIF rotations
  allowed, as detectron2 applies them) and ``Image.verify()`` run, which checks the structure and
  checksums (e.g. a truncated PNG) without decoding pixels. At most :data:`IMAGE_CHECK_LIMIT`
  images are checked; a larger split is checked on a fixed sample of :data:`IMAGE_SAMPLE` of them
  unless ``check_all_images`` (an option of the registration and of the checks).

What ``verify()`` cannot see (e.g. a JPEG cut off after its header) fails when the image is
decoded; :class:`FileNamingMapper` around detectron2's ``DatasetMapper`` re-raises that error with
the image id and file.

Data sets live under ``$DETECTRON2_DATASETS`` (default ``./datasets``), detectron2's convention:
:func:`datasets_root`.
"""
import difflib
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_CHECK_LIMIT = 10000  # splits up to this size get every image header checked (~0.2 ms each)
IMAGE_SAMPLE = 1000  # images checked in larger splits, unless check_all_images
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class DatasetError(RuntimeError):
    """A registered data set whose files are missing or malformed."""


@dataclass
class CocoCheck:
    """What :func:`check_coco_json` looked at."""

    json_file: str
    num_images: int
    num_annotations: int
    clipped_boxes: int  # boxes partly outside their image (clipped when loaded)
    images_verified: int  # image headers opened and verified (all, or a sample)


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS``, else ``datasets`` (relative to the current directory), as detectron2 reads it."""
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_id(v) -> bool:
    """COCO ids are integers; strings work with pycocotools and detectron2 too."""
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v != "")


def _is_size(v) -> bool:
    return _is_number(v) and v > 0 and float(v).is_integer()


def clip_box(bbox, width: float, height: float) -> Tuple[str, List[float]]:
    """``("inside" | "partly" | "outside", box clipped to the image)`` for an XYWH box in a
    ``width`` x ``height`` image. A box of positive area that only touches the image's edge is outside."""
    x, y, w, h = bbox
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    if x1 < x0 or y1 < y0 or (w > 0 and h > 0 and (x1 == x0 or y1 == y0)):
        return "outside", list(bbox)
    clipped = [x0, y0, x1 - x0, y1 - y0]
    return ("inside" if [x0, y0, x1, y1] == [x, y, x + w, y + h] else "partly"), clipped


def _read_coco_json(json_file: str, where: str, hint: str) -> dict:
    if not os.path.isfile(json_file):
        raise DatasetError(f"{where}: annotation file {json_file} does not exist.{hint}")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{where}: {json_file} is not valid JSON ({e}).{hint}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: {json_file} must hold a JSON object, not {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{where}: {json_file} has no {key!r} list (not COCO format)")
    if not data["images"]:
        raise DatasetError(f"{where}: {json_file} is an empty split (0 images).{hint}")
    if not data["categories"]:
        raise DatasetError(f"{where}: {json_file} defines no categories")
    for cat in data["categories"]:
        if not isinstance(cat, dict) or not _is_id(cat.get("id")) or "name" not in cat:
            raise DatasetError(f"{where}: {json_file}: category {cat!r} needs an 'id' and a 'name'")
    return data


def _check_images(data: dict, json_file: str, image_root: str, where: str, hint: str) -> Dict[int, dict]:
    """Image entries well-formed and their files present; returns them by id, each with its ``path``."""
    images = {}
    for image in data["images"]:
        image_id = image.get("id") if isinstance(image, dict) else None
        if not _is_id(image_id):
            raise DatasetError(f"{where}: {json_file}: image entry {image!r} has no 'id'")
        at = f"{where}: {json_file}, image id {image_id}"
        if image_id in images:
            raise DatasetError(f"{at}: the id is used by more than one image")
        if not isinstance(image.get("file_name"), str) or not image["file_name"]:
            raise DatasetError(f"{at}: no 'file_name'")
        path = os.path.join(image_root, image["file_name"])
        for key in ("width", "height"):
            if not _is_size(image.get(key)):
                raise DatasetError(f"{at} ({path}): {key!r} must be a positive integer, got {image.get(key)!r}")
        if not os.path.isfile(path):
            raise DatasetError(f"{at}: image {path} listed in {json_file} does not exist.{hint}")
        images[image_id] = dict(image, path=path)
    return images


def _check_annotations(data: dict, images: Dict[int, dict], json_file: str, where: str) -> int:
    """Boxes and category ids of every annotation; returns the number of boxes partly outside."""
    category_ids = {c["id"] for c in data["categories"]}
    clipped, first = 0, ""
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            raise DatasetError(f"{where}: {json_file}: annotation {ann!r} is not a JSON object")
        image = images.get(ann.get("image_id")) if _is_id(ann.get("image_id")) else None
        if image is None:
            continue  # detectron2 ignores (and counts) annotations of images not in the file
        at = f"{where}: {json_file}, image id {image['id']} ({image['path']}), annotation id {ann.get('id')}"
        if not _is_id(ann.get("category_id")) or ann["category_id"] not in category_ids:
            raise DatasetError(
                f"{at}: category_id {ann.get('category_id')!r} is not defined in 'categories' "
                f"(defined: {sorted(category_ids, key=str)})"
            )
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(map(_is_number, bbox)) or min(bbox[2:]) < 0:
            raise DatasetError(
                f"{at}: 'bbox' must be [x, y, width, height] of finite numbers with width, height >= 0; got {bbox!r}"
            )
        status, _ = clip_box(bbox, image["width"], image["height"])
        if status == "outside":
            raise DatasetError(
                f"{at}: box {bbox} (x, y, width, height) lies entirely outside the {image['width']}x{image['height']} "
                "image; the annotation and the image disagree (box format, image size or image id)"
            )
        if status == "partly":
            clipped += 1
            first = first or f"{at}: box {bbox} in a {image['width']}x{image['height']} image"
    if clipped:
        logger.warning(
            f"{where}: {clipped} of {len(data['annotations'])} boxes in {json_file} extend past their image and "
            f"are clipped to it when loaded (the first: {first})"
        )
    return clipped


def _verify_image(image: dict, where: str, json_file: str) -> None:
    at = f"{where}: {json_file}, image id {image['id']} ({image['path']})"
    expected = (image["width"], image["height"])
    try:
        with Image.open(image["path"]) as im:
            size = im.size
            im.verify()
        if size != expected and size[::-1] == expected:
            with Image.open(image["path"]) as im:  # detectron2 applies EXIF rotations when reading
                if im.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
                    size = expected
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) for bad files
        raise DatasetError(f"{at}: the image file cannot be read ({type(e).__name__}: {e})") from e
    if size != expected:
        raise DatasetError(f"{at}: the image is {size[0]}x{size[1]}, the JSON says {expected[0]}x{expected[1]}")


def check_coco_json(
    json_file: str, image_root: str, dataset_name: str, build_hint: str = "", check_all_images: bool = False
) -> CocoCheck:
    """Check a COCO instances file and its images (see the module docstring for what is checked);
    every error is a :class:`DatasetError` naming the json, and the image id and file where one is
    at fault. Boxes partly outside their image are counted and reported in one warning."""
    where, hint = f"data set {dataset_name!r}", (f" {build_hint}" if build_hint else "")
    data = _read_coco_json(json_file, where, hint)
    images = _check_images(data, json_file, image_root, where, hint)
    clipped = _check_annotations(data, images, json_file, where)
    to_verify = list(images.values())
    if len(to_verify) > IMAGE_CHECK_LIMIT and not check_all_images:
        to_verify = random.Random(0).sample(to_verify, IMAGE_SAMPLE)
        logger.info(f"{where}: verifying a sample of {IMAGE_SAMPLE} of {len(images)} image headers "
                    "(check_all_images=True: all)")
    for image in to_verify:
        _verify_image(image, where, json_file)
    return CocoCheck(json_file, len(images), len(data["annotations"]), clipped, len(to_verify))


def clip_boxes(dataset_dicts: List[dict]) -> int:
    """Clip the XYWH_ABS boxes of detectron2 dataset dicts to their image, in place; returns how many changed."""
    changed = 0
    for record in dataset_dicts:
        for obj in record.get("annotations", ()):
            if obj.get("bbox_mode", BoxMode.XYWH_ABS) != BoxMode.XYWH_ABS or "bbox" not in obj:
                continue
            status, clipped = clip_box(obj["bbox"], record["width"], record["height"])
            if status == "partly":
                obj["bbox"] = clipped
                changed += 1
    return changed


class CheckedCocoLoader:
    """The loader :func:`register_checked_coco_instances` puts in ``DatasetCatalog``: checks, loads
    with detectron2, clips boxes. :meth:`check` always checks; loading skips the check when one
    passed in this process for the annotation file as it is now (a run loads a split several times:
    training, PreciseBN, each evaluation, after :func:`check_datasets` checked it)."""

    def __init__(
        self, name: str, json_file: str, image_root: str, build_hint: str = "", check_all_images: bool = False
    ):
        self.name, self.json_file, self.image_root = name, json_file, image_root
        self.build_hint, self.check_all_images = build_hint, check_all_images
        self._passed = None  # the annotation file's stat when a check last passed

    def _stat(self):
        try:
            stat = os.stat(self.json_file)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def check(self, check_all_images: Optional[bool] = None) -> CocoCheck:
        """:func:`check_coco_json` with this data set's files and options (``check_all_images`` overrides)."""
        all_images = self.check_all_images if check_all_images is None else check_all_images
        self._passed = None
        result = check_coco_json(self.json_file, self.image_root, self.name, self.build_hint, all_images)
        self._passed = self._stat()
        return result

    def __call__(self) -> List[dict]:
        if self._passed is None or self._passed != self._stat():
            self.check()
        dicts = load_coco_json(self.json_file, self.image_root, self.name)
        clip_boxes(dicts)
        return dicts


def register_checked_coco_instances(
    name: str, json_file: str, image_root: str, metadata: Optional[dict] = None, build_hint: str = "",
    check_all_images: bool = False,
) -> None:
    """Like ``detectron2.data.datasets.register_coco_instances``, but the data set is checked
    (:func:`check_coco_json`) by :func:`check_datasets` and when first loaded, and boxes partly
    outside their image are clipped. ``check_all_images`` verifies every image header of a split
    larger than :data:`IMAGE_CHECK_LIMIT` instead of a sample."""
    DatasetCatalog.register(name, CheckedCocoLoader(name, json_file, image_root, build_hint, check_all_images))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco", **(metadata or {}))


def check_datasets(cfg, check_all_images: Optional[bool] = None, names: Optional[Dict[str, Sequence[str]]] = None) -> None:
    """Check every split ``DATASETS.TRAIN`` and ``DATASETS.TEST`` name, before anything is built
    (``names``: other splits instead, by the flag or key that names them, e.g. ``{"--dataset": [...]}``).

    A name that is not registered is an error naming the key; data sets registered through
    :func:`register_checked_coco_instances` are checked (:func:`check_coco_json`); others (e.g.
    detectron2's builtin catalog, whose loaders read the files only when called) are skipped.
    ``check_all_images`` overrides the registration's option."""
    registered = DatasetCatalog.list()
    if names is None:
        names = {"DATASETS.TRAIN": cfg.DATASETS.TRAIN, "DATASETS.TEST": cfg.DATASETS.TEST}
    for key, split in names.items():
        for name in split:
            if name not in registered:
                close = difflib.get_close_matches(name, registered, n=3)
                raise DatasetError(
                    f"{key} names {name!r}, which is not a registered data set"
                    + (f"; did you mean {', '.join(map(repr, close))}?" if close else "")
                )
            loader = DatasetCatalog[name]  # the registered function (DatasetCatalog.get would call it)
            if isinstance(loader, CheckedCocoLoader):
                loader.check(check_all_images)
            else:
                check_files_exist(key, name)


# Said after a missing data set's files (set by an experiment package for the data sets it builds).
MISSING_DATA_HINTS: List[str] = []


def check_files_exist(key: str, name: str) -> None:
    """For data sets registered otherwise (detectron2's builtin catalog: COCO, LVIS, ...), whose loaders
    read their files only when called: the annotation file and image folder named in their metadata
    exist, or a :class:`DatasetError` says which, where detectron2 looked and how to get them."""
    metadata = MetadataCatalog.get(name)
    missing = [
        (what, path) for what, path in (("annotations", metadata.get("json_file", None)),
                                        ("images", metadata.get("image_root", None)))
        if path and not os.path.exists(path)
    ]
    if not missing:
        logger.debug(f"{key}: {name!r} is not a checked COCO registration; its files exist, not checked ahead")
        return
    root = os.environ.get("DETECTRON2_DATASETS")
    looked = (f"$DETECTRON2_DATASETS = {root}" if root else
              f"$DETECTRON2_DATASETS is not set, so detectron2 looked under ./datasets (from {os.getcwd()})")
    raise DatasetError(
        f"{key} names {name!r}, whose files are missing: "
        + ", ".join(f"{what} {path}" for what, path in missing)
        + f". {looked}. Point DETECTRON2_DATASETS at a folder with detectron2's layout (coco/annotations/,"
        " coco/train2017/, coco/val2017/: see detectron2's datasets/README.md), or register your own COCO-format"
        " data with --register-coco NAME JSON IMAGE_ROOT and name it in DATASETS.TRAIN/TEST."
        + "".join(" " + hint for hint in MISSING_DATA_HINTS)
    )


def add_register_coco_argument(parser) -> None:
    """``--register-coco NAME JSON IMAGE_ROOT`` (repeatable) on a tool's argument parser."""
    parser.add_argument(
        "--register-coco", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format data set (checked before it is used) under NAME, for DATASETS.TRAIN/TEST; "
             "repeatable",
    )


def register_coco_from_args(specs: Sequence[Sequence[str]]) -> List[str]:
    """Register each ``(name, json_file, image_root)`` of ``--register-coco`` with the checked
    registration (a name registered again with the same files is left as it is); returns the names."""
    names = []
    for name, json_file, image_root in specs or ():
        for what, path, exists in (("JSON", json_file, os.path.isfile), ("IMAGE_ROOT", image_root, os.path.isdir)):
            if not exists(path):
                raise DatasetError(f"--register-coco {name}: {what} {path} does not exist")
        if name in DatasetCatalog.list():
            known = MetadataCatalog.get(name)
            if (known.get("json_file", None), known.get("image_root", None)) == (json_file, image_root):
                names.append(name)
                continue
            raise DatasetError(
                f"--register-coco {name}: the name is taken by another data set; choose another NAME"
            )
        register_checked_coco_instances(name, json_file, image_root)
        names.append(name)
    return names


class FileNamingMapper:
    """Wraps a dataset mapper (e.g. detectron2's ``DatasetMapper``) so that an error while mapping one
    dataset dict is re-raised as a :class:`DatasetError` naming its ``image_id`` and ``file_name``,
    chained to the original (which stays in the traceback, also from data-loader workers)."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, dataset_dict):
        try:
            return self.mapper(dataset_dict)
        except Exception as e:
            raise DatasetError(
                f"cannot load image id {dataset_dict.get('image_id')} ({dataset_dict.get('file_name')}): "
                f"{type(e).__name__}: {e}"
            ) from e

    def __repr__(self):
        return f"FileNamingMapper({self.mapper!r})"
