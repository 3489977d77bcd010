"""fashion-scenes: COCO validity, exact boxes and masks, determinism, and clear errors."""
import dataclasses
import gzip
import json
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from bnstats_lab.data import SceneSpec, SceneSplitSpec, build_fashion_scenes, fashion_scenes_root, register_fashion_scenes
from bnstats_lab.data.fashion_mnist import CLASS_NAMES, FashionMNISTError, load_fashion_mnist, read_idx
from bnstats_lab.data.fashion_scenes import MASK_THRESHOLD, PRESETS, compose_scene
from d2_bnstats.d2.datasets import DatasetError, register_checked_coco_instances

SMALL = SceneSpec(
    splits={"train": SceneSplitSpec(6, "train", 5), "val": SceneSplitSpec(3, "test", 6)}, image_size=64,
    min_item_size=16, max_item_size=32,
)


def tree_bytes(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def test_fashion_mnist_files_are_the_originals():
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
    test_images, _ = load_fashion_mnist("test")
    assert test_images.shape == (10000, 28, 28)
    # each class has exactly 6000 training images in the original data set
    assert np.all(np.bincount(labels) == 6000)


def test_json_loads_in_pycocotools_with_exact_boxes_and_masks(datasets_root):
    folder = os.path.join(fashion_scenes_root(datasets_root), "fashion_scenes_tiny")
    for split in ("train", "val"):
        coco = COCO(os.path.join(folder, f"{split}.json"))
        assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == sorted(CLASS_NAMES)
        assert len(coco.getImgIds()) == PRESETS["fashion_scenes_tiny"].splits[split].num_images
        assert len(coco.getAnnIds()) > 0
        for ann in coco.loadAnns(coco.getAnnIds()):
            info = coco.loadImgs(ann["image_id"])[0]
            with Image.open(os.path.join(folder, split, info["file_name"])) as im:
                assert im.size == (info["width"], info["height"])
            mask = mask_util.decode(ann["segmentation"])
            assert mask.shape == (info["height"], info["width"])
            assert mask.sum() == ann["area"] > 0
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= info["width"] and y + h <= info["height"]
            ys, xs = np.nonzero(mask)
            assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == [x, y, w, h]
            assert 1 <= ann["category_id"] <= 10 and ann["iscrowd"] == 0
            # pycocotools' own box of the mask agrees
            assert np.allclose(mask_util.toBbox(ann["segmentation"]), [x, y, w, h])


def test_mask_and_pixels_are_the_pasted_item():
    images, labels = load_fashion_mnist("test")
    rng = np.random.default_rng(0)
    for _ in range(5):
        pixels, objects = compose_scene(rng, images, labels, SMALL)
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8 and objects
        union = np.zeros((64, 64), bool)
        for obj in objects:
            assert obj["label"] == labels[obj["item"]]
            x, y, side = obj["x"], obj["y"], obj["side"]
            alpha = np.asarray(Image.fromarray(images[obj["item"]]).resize((side, side), Image.BILINEAR)) / 255.0
            expected = np.zeros((64, 64), bool)
            expected[y : y + side, x : x + side] = alpha > MASK_THRESHOLD
            assert np.array_equal(obj["mask"], expected)
            # where the item is opaque, the pixel is the item's colour
            full = alpha >= 0.999
            if full.any():
                patch = pixels[y : y + side, x : x + side][full].astype(float)
                assert np.abs(patch - obj["colour"]).max() <= 0.5 + 255 * 0.001
            assert not (union & obj["mask"]).any(), "items never overlap"
            union |= obj["mask"]


def test_same_seed_same_bytes_and_other_seed_other_bytes(tmp_path):
    a = build_fashion_scenes(str(tmp_path / "a"), "scenes", SMALL)
    b = build_fashion_scenes(str(tmp_path / "b"), "scenes", SMALL)
    assert tree_bytes(a) == tree_bytes(b)
    other = dataclasses.replace(SMALL, splits={"train": SceneSplitSpec(6, "train", 99), "val": SMALL.splits["val"]})
    c = build_fashion_scenes(str(tmp_path / "c"), "scenes", other)
    ta, tc = tree_bytes(a), tree_bytes(c)
    assert ta["train.json"] != tc["train.json"] and ta["val.json"] == tc["val.json"]
    # a larger split begins with the images of the smaller one
    bigger = dataclasses.replace(SMALL, splits={"train": SceneSplitSpec(8, "train", 5), "val": SMALL.splits["val"]})
    d = tree_bytes(build_fashion_scenes(str(tmp_path / "d"), "scenes", bigger))
    assert all(d[f"train/{i:06d}.png"] == ta[f"train/{i:06d}.png"] for i in range(6))


def test_rebuild_is_skipped_when_up_to_date(tmp_path):
    """A marker file survives only if the folder is left alone (a build replaces the whole folder), and
    the files keep their inodes (a rebuild writes new files while the old ones still exist)."""
    folder = build_fashion_scenes(str(tmp_path), "scenes", SMALL)
    marker = os.path.join(folder, "marker")
    open(marker, "w").close()
    inode = os.stat(os.path.join(folder, "train.json")).st_ino
    before = tree_bytes(folder)
    assert build_fashion_scenes(str(tmp_path), "scenes", SMALL) == folder
    assert os.path.exists(marker)
    assert os.stat(os.path.join(folder, "train.json")).st_ino == inode
    assert tree_bytes(folder) == before
    # the checks above do see a rebuild: forced, the folder is replaced
    build_fashion_scenes(str(tmp_path), "scenes", SMALL, force=True)
    assert not os.path.exists(marker)
    assert os.stat(os.path.join(folder, "train.json")).st_ino != inode


def test_detectron2_loads_registered_split(datasets_root):
    dicts = DatasetCatalog.get("fashion_scenes_tiny_train")
    assert len(dicts) == 16
    assert all(d["annotations"] for d in dicts)
    assert MetadataCatalog.get("fashion_scenes_tiny_train").thing_classes == list(CLASS_NAMES)
    assert all(isinstance(a["segmentation"], dict) for d in dicts for a in d["annotations"])


# --- bad data stops with a message naming the file ----------------------------------------------


def _register(name, json_file, image_root):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_checked_coco_instances(name, str(json_file), str(image_root))


def test_missing_json_names_the_file(tmp_path):
    _register("bad_missing", tmp_path / "nope.json", tmp_path)
    with pytest.raises(DatasetError, match=str(tmp_path / "nope.json")):
        DatasetCatalog.get("bad_missing")


def test_missing_preset_says_how_to_build_it(tmp_path, monkeypatch):
    register_fashion_scenes(str(tmp_path), overwrite=True)
    try:
        with pytest.raises(DatasetError, match="prepare_fashion_scenes.py --name fashion_scenes_256"):
            DatasetCatalog.get("fashion_scenes_256_val")
    finally:
        register_fashion_scenes(os.environ.get("DETECTRON2_DATASETS"), overwrite=True)


def test_malformed_json_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    _register("bad_malformed", bad, tmp_path)
    with pytest.raises(DatasetError, match=f"{bad} is not valid JSON"):
        DatasetCatalog.get("bad_malformed")
    bad.write_text('{"images": []}')
    with pytest.raises(DatasetError, match="has no 'annotations' list"):
        DatasetCatalog.get("bad_malformed")


def test_empty_split_names_the_file(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    _register("bad_empty", empty, tmp_path)
    with pytest.raises(DatasetError, match=f"{empty} is an empty split"):
        DatasetCatalog.get("bad_empty")


def test_missing_image_names_the_image(tmp_path):
    data = {"images": [{"id": 1, "file_name": "gone.png", "height": 8, "width": 8}], "annotations": [],
            "categories": [{"id": 1, "name": "x"}]}
    js = tmp_path / "one.json"
    js.write_text(json.dumps(data))
    _register("bad_image", js, tmp_path)
    with pytest.raises(DatasetError, match="gone.png"):
        DatasetCatalog.get("bad_image")


def test_missing_fashion_mnist_names_the_file_and_leaves_nothing(tmp_path):
    with pytest.raises(FashionMNISTError, match=str(tmp_path / "nothing" / "train-images-idx3-ubyte")):
        build_fashion_scenes(str(tmp_path / "out"), "scenes", SMALL, fashion_mnist_dir=str(tmp_path / "nothing"))
    assert os.listdir(tmp_path / "out") == []


def test_corrupt_idx_is_reported(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28]) + bytes(100))
    with pytest.raises(FashionMNISTError, match="truncated"):
        read_idx(str(path))
    path.write_bytes(b"not gzip at all")
    with pytest.raises(FashionMNISTError, match="cannot read"):
        read_idx(str(path))


def test_invalid_specs_are_rejected():
    with pytest.raises(ValueError, match="min_objects"):
        dataclasses.replace(SMALL, min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="at least one image"):
        SceneSpec(splits={"train": SceneSplitSpec(0, "train", 0)})
    with pytest.raises(ValueError, match="source"):
        SceneSpec(splits={"train": SceneSplitSpec(1, "validation", 0)})
