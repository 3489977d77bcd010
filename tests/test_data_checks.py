"""Data checked before training: bad COCO files, boxes, categories and images stop with the json,
the image id and the file; training data errors from the loader name the file."""
import importlib.util
import json
import logging
import os
import re

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, build_detection_train_loader
from PIL import Image

from d2_bnstats.d2 import datasets as checked
from d2_bnstats.d2.datasets import (
    DatasetError,
    FileNamingMapper,
    check_coco_json,
    check_datasets,
    register_checked_coco_instances,
)
from d2_bnstats.d2.train import argument_parser, main

from .conftest import REPO, tiny_opts

FRCNN_BN = os.path.join(REPO, "configs", "cpu", "frcnn_r18_bn_2img.yaml")
SIZE = 32


def write_coco(folder, num_images=2, annotations=None, categories=None, image_format="png", name="split"):
    """A COCO file ``<folder>/<name>.json`` with ``num_images`` SIZE x SIZE images under ``<folder>/<name>/``;
    by default one 10x10 box of category 1 per image."""
    root = os.path.join(folder, name)
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for i in range(1, num_images + 1):
        file_name = f"{i:03d}.{image_format}"
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(os.path.join(root, file_name))
        images.append({"id": i, "file_name": file_name, "width": SIZE, "height": SIZE})
    if annotations is None:
        annotations = [{"image_id": i, "bbox": [4, 4, 10, 10], "category_id": 1} for i in range(1, num_images + 1)]
    annotations = [dict({"id": k + 1, "iscrowd": 0, "area": 100}, **a) for k, a in enumerate(annotations)]
    data = {"images": images, "annotations": annotations, "categories": categories or [{"id": 1, "name": "thing"}]}
    json_file = os.path.join(folder, f"{name}.json")
    with open(json_file, "w") as f:
        json.dump(data, f)
    return json_file, root


def register(name, json_file, image_root, **kwargs):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_checked_coco_instances(name, json_file, image_root, **kwargs)
    return name


def names_json_image_and_file(json_file, image_id, path):
    """A regex matching an error that names the json, the image id and the image file, in that order."""
    return re.escape(json_file) + f".*image id {image_id}\\b.*" + re.escape(path)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def records():
    handler = Records()
    log = logging.getLogger(checked.__name__)
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    yield handler.messages
    log.removeHandler(handler)
    log.setLevel(old_level)


# --- boxes ------------------------------------------------------------------------------------


def test_box_entirely_outside_its_image_is_an_error_naming_json_image_and_file(tmp_path):
    json_file, root = write_coco(str(tmp_path), annotations=[
        {"image_id": 1, "bbox": [4, 4, 10, 10], "category_id": 1},
        {"image_id": 2, "bbox": [SIZE + 3, 5, 10, 10], "category_id": 1},  # right of the image
    ])
    with pytest.raises(DatasetError, match=names_json_image_and_file(json_file, 2, os.path.join(root, "002.png"))):
        check_coco_json(json_file, root, "outside")
    # the loader runs the same check (detectron2 alone drops the box and trains without it)
    register("outside_train", json_file, root)
    with pytest.raises(DatasetError, match="entirely outside"):
        DatasetCatalog.get("outside_train")


def test_box_partly_outside_is_clipped_counted_and_warned(tmp_path, records):
    json_file, root = write_coco(str(tmp_path), annotations=[
        {"image_id": 1, "bbox": [-3, 20, 10, 20], "category_id": 1},  # left and bottom edges outside
        {"image_id": 2, "bbox": [4, 4, 10, 10], "category_id": 1},
    ])
    result = check_coco_json(json_file, root, "partly")
    assert (result.clipped_boxes, result.num_annotations, result.images_verified) == (1, 2, 2)
    assert any("1 of 2 boxes" in m and json_file in m and "image id 1" in m for m in records)
    register("partly_train", json_file, root)
    boxes = {d["image_id"]: [a["bbox"] for a in d["annotations"]] for d in DatasetCatalog.get("partly_train")}
    assert boxes == {1: [[0, 20, 7, SIZE - 20]], 2: [[4, 4, 10, 10]]}


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, -3, 4], [1, 2, float("nan"), 4], "1 2 3 4"])
def test_malformed_box_names_json_image_and_file(tmp_path, bbox):
    annotations = [{"image_id": 1, "bbox": bbox, "category_id": 1}]
    json_file, root = write_coco(str(tmp_path), num_images=1, annotations=annotations)
    with pytest.raises(DatasetError, match=names_json_image_and_file(json_file, 1, os.path.join(root, "001.png"))):
        check_coco_json(json_file, root, "bad_box")


# --- categories and image entries ------------------------------------------------------------


def test_undefined_category_names_json_image_and_file(tmp_path):
    json_file, root = write_coco(str(tmp_path), annotations=[
        {"image_id": 1, "bbox": [4, 4, 10, 10], "category_id": 1},
        {"image_id": 2, "bbox": [4, 4, 10, 10], "category_id": 7},
    ])
    register("undefined_category_train", json_file, root)
    with pytest.raises(DatasetError, match=names_json_image_and_file(json_file, 2, os.path.join(root, "002.png"))) as e:
        DatasetCatalog.get("undefined_category_train")
    assert "category_id 7 is not defined" in str(e.value)


def test_duplicate_image_id_and_missing_size_are_errors(tmp_path):
    json_file, root = write_coco(str(tmp_path))
    with open(json_file) as f:
        data = json.load(f)
    data["images"][1]["id"] = 1
    with open(json_file, "w") as f:
        json.dump(data, f)
    with pytest.raises(DatasetError, match=re.escape(json_file) + ".*image id 1: the id is used by more than one"):
        check_coco_json(json_file, root, "duplicate")
    data["images"][1]["id"] = 2
    del data["images"][1]["height"]
    with open(json_file, "w") as f:
        json.dump(data, f)
    with pytest.raises(DatasetError, match=names_json_image_and_file(json_file, 2, "002.png") + ".*'height'"):
        check_coco_json(json_file, root, "no_height")


# --- image files -----------------------------------------------------------------------------


def test_truncated_image_is_found_before_training(tmp_path):
    json_file, root = write_coco(str(tmp_path), num_images=3)
    path = os.path.join(root, "002.png")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=names_json_image_and_file(json_file, 2, path) + ".*cannot be read"):
        check_coco_json(json_file, root, "truncated")


def test_undecodable_image_and_wrong_size_name_the_file(tmp_path):
    json_file, root = write_coco(str(tmp_path), num_images=2)
    garbage = os.path.join(root, "001.png")
    with open(garbage, "wb") as f:
        f.write(b"this is not an image")
    with pytest.raises(DatasetError, match=names_json_image_and_file(json_file, 1, garbage) + ".*cannot be read"):
        check_coco_json(json_file, root, "garbage")
    Image.new("RGB", (SIZE, SIZE + 5)).save(garbage)
    wrong_size = names_json_image_and_file(json_file, 1, garbage) + f".*is {SIZE}x{SIZE + 5}, the JSON says"
    with pytest.raises(DatasetError, match=wrong_size):
        check_coco_json(json_file, root, "wrong_size")


def test_large_split_checks_a_sample_unless_all_are_asked_for(tmp_path, monkeypatch, records):
    json_file, root = write_coco(str(tmp_path), num_images=6)
    assert check_coco_json(json_file, root, "small").images_verified == 6
    monkeypatch.setattr(checked, "IMAGE_CHECK_LIMIT", 4)
    monkeypatch.setattr(checked, "IMAGE_SAMPLE", 3)
    assert check_coco_json(json_file, root, "large").images_verified == 3
    assert any("a sample of 3 of 6" in m for m in records)
    assert check_coco_json(json_file, root, "large", check_all_images=True).images_verified == 6
    # every file's existence is still checked on a sampled split
    os.remove(os.path.join(root, "005.png"))
    with pytest.raises(DatasetError, match=re.escape(os.path.join(root, "005.png")) + " listed in"):
        check_coco_json(json_file, root, "large")
    # the option of the registration reaches the check, which then verifies every header
    Image.new("RGB", (SIZE, SIZE)).save(os.path.join(root, "005.png"))
    register("large_all_train", json_file, root, check_all_images=True)
    assert DatasetCatalog["large_all_train"].check().images_verified == 6


# --- every split a config names, before the model is built -----------------------------------


def config_with(train=(), test=()):
    cfg = get_cfg()
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = tuple(train), tuple(test)
    return cfg


def test_check_datasets_checks_train_and_test_splits(tmp_path, datasets_root, records, monkeypatch):
    train_json, train_root = write_coco(str(tmp_path), name="train")
    val_json, val_root = write_coco(str(tmp_path), name="val")
    register("checked_train", train_json, train_root)
    register("checked_val", val_json, val_root)
    # detectron2's builtin paths are relative to the working directory: give coco_2017_val its files
    monkeypatch.chdir(tmp_path)
    meta = MetadataCatalog.get("coco_2017_val")
    os.makedirs(os.path.dirname(meta.json_file), exist_ok=True)
    open(meta.json_file, "w").close()
    os.makedirs(meta.image_root, exist_ok=True)
    check_datasets(config_with(["checked_train", "fashion_scenes_tiny_train"], ["checked_val", "coco_2017_val"]))
    # detectron2's builtin entries are lazy (contents not needed until loaded): only their files' presence
    # is checked, at debug level
    assert any("'coco_2017_val'" in m and "not a checked" in m for m in records)
    os.remove(os.path.join(val_root, "002.png"))
    with pytest.raises(DatasetError, match=re.escape(os.path.join(val_root, "002.png"))):
        check_datasets(config_with(["checked_train"], ["checked_val"]))
    with pytest.raises(DatasetError, match="DATASETS.TEST names 'checked_vall'.*did you mean 'checked_val'"):
        check_datasets(config_with(["checked_train"], ["checked_vall"]))


def test_train_net_stops_on_a_missing_val_image_before_training(tmp_path, datasets_root):
    """The missing image of the test split is reported before the model is built, not after training."""
    val_json, val_root = write_coco(str(tmp_path), name="val")
    os.remove(os.path.join(val_root, "001.png"))
    register("missing_image_val", val_json, val_root)
    out = tmp_path / "out"
    args = argument_parser().parse_args(
        ["--config", FRCNN_BN] + tiny_opts(out, max_iter=2, **{"DATASETS.TEST": "('missing_image_val',)"})
    )
    with pytest.raises(DatasetError) as e:
        main(args)
    assert not os.path.exists(out / "metrics.json") and not os.path.exists(out / "model_final.pth")
    assert re.search(names_json_image_and_file(val_json, 1, os.path.join(val_root, "001.png")), str(e.value))


def _bad_inputs(tmp_path):
    """(what, --register-coco triple or None, extra overrides, words the one line must hold): each
    input train_net reads or writes, broken as a user breaks it."""
    folder = str(tmp_path / "data")
    cases = []
    malformed, root = write_coco(folder, name="malformed")
    with open(malformed, "w") as f:
        f.write('{"images": [')
    cases.append(("malformed json", malformed, root, {}, [malformed]))
    missing, root = write_coco(folder, name="missing")
    os.remove(os.path.join(root, "002.png"))
    cases.append(("missing image", missing, root, {}, [missing, os.path.join(root, "002.png")]))
    outside, root = write_coco(folder, name="outside", annotations=[
        {"image_id": 1, "bbox": [4, 4, 10, 10], "category_id": 1}, {"image_id": 2, "bbox": [SIZE + 3, 5, 10, 10], "category_id": 1}])
    cases.append(("box outside", outside, root, {}, [outside, "entirely outside"]))
    unknown, root = write_coco(folder, name="unknown", annotations=[{"image_id": 1, "bbox": [4, 4, 10, 10], "category_id": 7}])
    cases.append(("unknown category", unknown, root, {}, [unknown, "7"]))
    good, root = write_coco(folder, name="good")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases.append(("OUTPUT_DIR under a file", good, root, {"OUTPUT_DIR": str(a_file / "out")}, ["OUTPUT_DIR", str(a_file)]))
    cases.append(("OUTPUT_DIR a file", good, root, {"OUTPUT_DIR": str(a_file)}, ["OUTPUT_DIR", "is a file"]))
    return cases


def test_train_net_checks_every_input_before_it_prints_or_writes_anything(tmp_path, datasets_root, capsys, monkeypatch):
    from d2_bnstats.d2 import train

    monkeypatch.setattr(train, "launch_from_args", lambda *a, **k: pytest.fail("launched despite a bad input"))
    for k, (what, json_file, root, extra, words) in enumerate(_bad_inputs(tmp_path)):
        out = tmp_path / f"out{k}"
        opts = tiny_opts(out, **{"DATASETS.TRAIN": f"('user_{k}',)", "DATASETS.TEST": "()", **extra})
        args = train.argument_parser().parse_args(
            ["--config", FRCNN_BN, "--register-coco", f"user_{k}", json_file, root] + opts)
        with pytest.raises(SystemExit) as stop:
            train.run(args)
        message = str(stop.value)
        assert message.startswith("train_net: ") and "\n" not in message, what
        assert all(word in message for word in words), f"{what}: {message}"
        printed = capsys.readouterr()
        assert printed.out == "", what  # no config listing, no argument echo
        assert not out.exists(), what  # nothing created, config.yaml included
        # the worker's own set-up refuses too, before detectron2's default_setup writes config.yaml
        if not what.startswith("OUTPUT_DIR"):
            with pytest.raises(DatasetError):
                train.setup(args)
            assert not out.exists(), what


def test_the_train_net_command_says_one_line_and_leaves_no_output_folder(tmp_path):
    import subprocess
    import sys

    json_file, root = write_coco(str(tmp_path), name="outside", annotations=[
        {"image_id": 1, "bbox": [SIZE + 3, 5, 10, 10], "category_id": 1}])
    out = tmp_path / "out"
    command = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config", FRCNN_BN,
               "--register-coco", "cli_outside", json_file, root,
               *tiny_opts(out, **{"DATASETS.TRAIN": "('cli_outside',)", "DATASETS.TEST": "()"})]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=REPO)
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("train_net: ") and json_file in lines[-1] and "entirely outside" in lines[-1]
    assert not any(line.startswith("Traceback") for line in lines), result.stderr
    assert not out.exists()


# --- errors while loading training data name the file ----------------------------------------


def truncated_jpeg_dict(tmp_path):
    """A JPEG cut after its header: PIL's verify() passes it, decoding fails."""
    json_file, root = write_coco(str(tmp_path), num_images=1, image_format="jpg")
    path = os.path.join(root, "001.jpg")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: data.index(b"\xff\xda") + 64])  # 64 bytes into the scan: pixel data cut short
    register("truncated_jpeg_train", json_file, root)
    return DatasetCatalog.get("truncated_jpeg_train"), path


def test_mapper_error_names_the_file_and_image_id(tmp_path):
    dicts, path = truncated_jpeg_dict(tmp_path)
    mapper = FileNamingMapper(DatasetMapper(get_cfg(), is_train=True))
    with pytest.raises(DatasetError, match=re.escape(f"image id 1 ({path})") + ".*truncated") as e:
        mapper(dicts[0])
    assert isinstance(e.value.__cause__, OSError)


def test_mapper_error_names_the_file_from_a_loader_worker(tmp_path):
    dicts, path = truncated_jpeg_dict(tmp_path)
    loader = build_detection_train_loader(
        dicts, mapper=FileNamingMapper(DatasetMapper(get_cfg(), is_train=True)), total_batch_size=1, num_workers=1
    )
    with pytest.raises(DatasetError, match=re.escape(path)):
        next(iter(loader))


def test_trainer_loaders_name_the_file(tmp_path):
    """The Trainer's own train and test loaders wrap detectron2's mapper: the error names the file."""
    from d2_bnstats import add_bnstats_config
    from d2_bnstats.d2.trainer import Trainer

    _, path = truncated_jpeg_dict(tmp_path)
    cfg = get_cfg()
    add_bnstats_config(cfg)
    cfg.merge_from_list(["DATASETS.TRAIN", "('truncated_jpeg_train',)", "DATALOADER.NUM_WORKERS", "0",
                         "SOLVER.IMS_PER_BATCH", "1", "INPUT.MIN_SIZE_TEST", "32", "INPUT.MIN_SIZE_TRAIN", "(32,)"])
    with pytest.raises(DatasetError, match=re.escape(path)):
        next(iter(Trainer.build_train_loader(cfg)))
    with pytest.raises(DatasetError, match=re.escape(path)):
        next(iter(Trainer.build_test_loader(cfg, "truncated_jpeg_train")))


# --- building fashion-scenes -----------------------------------------------------------------


def load_prepare_script():
    path = os.path.join(REPO, "datasets", "prepare_fashion_scenes.py")
    spec = importlib.util.spec_from_file_location("prepare_fashion_scenes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flag, value, message", [
    ("--num-train", "0", "--num-train: must be >= 1, got 0"),
    ("--num-val", "-2", "--num-val: must be >= 1, got -2"),
    ("--seed", "-1", "--seed: must be >= 0, got -1"),
])
def test_prepare_rejects_non_positive_counts(flag, value, message, capsys):
    prepare = load_prepare_script()
    with pytest.raises(SystemExit) as e:
        prepare.parse_args(["--name", "my_scenes", flag, value])
    assert e.value.code == 2 and message in capsys.readouterr().err
    # a positive count is taken as given
    spec = prepare.spec_from_args(prepare.parse_args(["--name", "my_scenes", "--num-train", "1", "--num-val", "2"]))
    assert (spec.splits["train"].num_images, spec.splits["val"].num_images) == (1, 2)


# --- data from the command line, and missing builtin data ------------------------------------


def test_register_coco_from_the_command_line_trains_on_own_data(tmp_path):
    """`--register-coco NAME JSON IMAGE_ROOT` registers a user's COCO-format set (checked) for training."""
    json_file, root = write_coco(str(tmp_path), num_images=2)
    name = "cli_coco_train"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    args = argument_parser().parse_args(
        ["--config", FRCNN_BN, "--register-coco", name, json_file, root]
        + tiny_opts(tmp_path / "out", max_iter=1, **{"DATASETS.TRAIN": f"('{name}',)", "DATASETS.TEST": "()",
                                                    "MODEL.ROI_HEADS.NUM_CLASSES": "1"})
    )
    main(args)
    assert name in DatasetCatalog.list() and [d["image_id"] for d in DatasetCatalog.get(name)] == [1, 2]
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")
    with pytest.raises(DatasetError, match="JSON .*does not exist"):
        main(argument_parser().parse_args(["--config", FRCNN_BN, "--register-coco", "other", str(tmp_path / "no.json"), root]))


def test_missing_builtin_data_names_the_files_and_where_detectron2_looked(tmp_path, monkeypatch):
    from d2_bnstats.d2.train import load_config

    monkeypatch.chdir(tmp_path)  # detectron2's builtin paths are relative: ./datasets/coco/... does not exist here
    cfg = load_config(FRCNN_BN, ["DATASETS.TRAIN", "('coco_2017_train',)", "DATASETS.TEST", "('coco_2017_val',)"])
    meta = MetadataCatalog.get("coco_2017_train")
    with pytest.raises(DatasetError) as e:
        check_datasets(cfg)
    message = str(e.value)
    assert "DATASETS.TRAIN" in message and "coco_2017_train" in message and meta.json_file in message
    assert "DETECTRON2_DATASETS" in message and "--register-coco" in message
    assert "make data" in message  # the lab's hint (tests import bnstats_lab)
