"""Inputs the offline tools must refuse, with a message that names what is wrong.

- EvalNorm's offline estimation accepts only layers whose running statistics are the moving average
  of the batch mean and variance (BN, SyncBN of torch, detectron2 and the plug-in, FrozenBN on request)
  and refuses MABN, GhostBN, RoIShuffleBN by type, before anything changes; it refuses a conversion whose
  evaluation config would rebuild converted layers as something else (the estimate dropped at load);
- a MODEL.WEIGHTS file that is empty, truncated or not a checkpoint stops the config checks naming
  the file; real checkpoints of every format detectron2 reads pass;
- ``convert_to_mabn.py --calibration-images -1`` is an argument error naming the flag.
"""
import importlib.util
import os
import pickle

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from torch import nn

from d2_bnstats.d2.evalnorm_offline import convert_to_evalnorm, run_offline_estimation
from d2_bnstats.d2.train import load_config
from d2_bnstats.layers.evalnorm import EvalNorm2d
from d2_bnstats.layers.ghost_bn import GhostBatchNorm2d
from d2_bnstats.layers.mabn import MABN2d
from d2_bnstats.layers.roi_shuffle import RoIShuffleBatchNorm2d
from d2_bnstats.layers.sync_bn import SyncBatchNorm2d

from .conftest import REPO, tiny_opts

BN_CPU = os.path.join(REPO, "configs", "cpu", "frcnn_r18_bn_2img.yaml")
MABN_CPU = os.path.join(REPO, "configs", "cpu", "frcnn_r18_mabn_2img.yaml")
SMALL = {"MODEL.FPN.OUT_CHANNELS": 32, "MODEL.ROI_BOX_HEAD.FC_DIM": 64, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32}


def small_opts(output_dir, **extra):
    return tiny_opts(output_dir, **{**SMALL, **extra})


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def net(norm):
    return nn.Sequential(nn.Conv2d(3, 8, 1), norm(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))


# ------------------------------------------------------------------------------ EvalNorm's inputs
@pytest.mark.parametrize("norm", [GhostBatchNorm2d, RoIShuffleBatchNorm2d, MABN2d])
def test_layers_with_other_statistics_are_refused_by_type_and_nothing_is_converted(norm):
    model = net(norm)
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=f"{norm.__name__} \\(1 layer, e.g. 1\\)"):
        convert_to_evalnorm(model)
    assert [type(m) for m in model.modules()] == before  # not even the plain BN at index 4


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, nn.SyncBatchNorm, NaiveSyncBatchNorm, SyncBatchNorm2d])
def test_batch_norms_of_batch_statistics_are_converted(norm):
    model = net(norm)
    assert convert_to_evalnorm(model) == ["1", "4"]
    assert isinstance(model[1], EvalNorm2d) and isinstance(model[4], EvalNorm2d)
    frozen = net(FrozenBatchNorm2d)
    assert convert_to_evalnorm(frozen) == ["4"] and isinstance(frozen[1], FrozenBatchNorm2d)
    assert convert_to_evalnorm(net(FrozenBatchNorm2d), include_frozen=True) == ["1", "4"]


def test_estimate_evalnorm_refuses_an_mabn_model_and_writes_nothing(datasets_root, tmp_path):
    opts = small_opts(tmp_path)
    model = DefaultTrainer.build_model(load_config(MABN_CPU, opts))
    weights = str(tmp_path / "mabn.pth")
    torch.save({"model": model.state_dict()}, weights)
    out = tmp_path / "estimated" / "model_evalnorm.pth"
    tool = load_tool("estimate_evalnorm")
    with pytest.raises(ValueError, match="MABN2d \\(32 layers") as info:
        tool.main(["--config-file", MABN_CPU, "--images", "2", "--ims-per-batch", "2", "--output", str(out)]
                  + opts + ["MODEL.WEIGHTS", weights])
    assert "e.g. backbone." in str(info.value)  # a layer's name
    assert not out.exists() and not out.with_suffix(".yaml").exists()


def test_estimation_whose_config_would_drop_the_estimate_is_refused_before_it_runs(datasets_root, tmp_path):
    # frozen stages converted on request, but the config rebuilds them as FrozenBN from FREEZE_AT
    opts = small_opts(tmp_path, **{"MODEL.BACKBONE.FREEZE_AT": 2})
    weights = str(tmp_path / "bn.pth")
    torch.save({"model": DefaultTrainer.build_model(load_config(BN_CPU, opts)).state_dict()}, weights)
    cfg = load_config(BN_CPU, opts + ["MODEL.WEIGHTS", weights])
    out = tmp_path / "en.pth"
    with pytest.raises(ValueError, match="would not build 5 converted layers as EvalNorm") as info:
        run_offline_estimation(cfg, num_images=2, ims_per_batch=2, include_frozen=True, output=str(out))
    assert "backbone.bottom_up.stem.conv1.norm (FrozenBatchNorm2d)" in str(info.value)
    assert "FREEZE_AT" in str(info.value) and not out.exists()


# ------------------------------------------------------------------------------ MODEL.WEIGHTS
def _torch_zip(path):
    torch.save({"model": {"w": torch.ones(4096)}}, path)


def _bad_files(tmp_path):
    good = tmp_path / "good.pth"
    _torch_zip(good)
    pkl = pickle.dumps({"model": {"w": list(range(2000))}}, protocol=2)
    files = {
        "empty.pth": (b"", "empty"),
        "garbage.pth": (b"\x00\x01 not a checkpoint at all" * 10, "starts with"),
        "config.pth": (open(BN_CPU, "rb").read(), "starts with b'# BN"),
        "lfs.pth": (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 12\n", "Git LFS pointer"),
        "truncated.pth": (good.read_bytes()[: good.stat().st_size // 2], "truncated zip archive"),
        "truncated.pkl": (pkl[: len(pkl) // 2], "ends early"),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    return {str(tmp_path / name): why for name, (_, why) in files.items()}


def test_weights_that_are_not_a_checkpoint_are_named_at_config_load(tmp_path):
    for path, why in _bad_files(tmp_path).items():
        with pytest.raises(ValueError) as info:
            load_config(BN_CPU, tiny_opts(tmp_path, **{"MODEL.WEIGHTS": path}))
        message = str(info.value)
        assert f"MODEL.WEIGHTS = {path!r} is not a checkpoint" in message and why in message, message


def test_checkpoints_of_every_format_detectron2_reads_pass_the_check(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    paths = {"zip.pth": lambda p: torch.save({"model": model.state_dict()}, p),
             "legacy.pth": lambda p: torch.save({"model": model.state_dict()}, p, _use_new_zipfile_serialization=False),
             "checkpointer": lambda p: DetectionCheckpointer(model, save_dir=str(tmp_path)).save("checkpointer")}
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):  # model-zoo .pkl files: numpy arrays in pickles
        paths[f"zoo{protocol}.pkl"] = lambda p, protocol=protocol: open(p, "wb").write(pickle.dumps(
            {"model": {k: v.numpy() for k, v in model.state_dict().items()}, "__author__": "x"}, protocol=protocol))
    for name, write in paths.items():
        path = str(tmp_path / name) if name != "checkpointer" else str(tmp_path / "checkpointer.pth")
        write(path)
        load_config(BN_CPU, tiny_opts(tmp_path, **{"MODEL.WEIGHTS": path}))  # no error
        DetectionCheckpointer(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).load(path)  # and it loads


# ------------------------------------------------------------------------------ convert_to_mabn's counts
@pytest.mark.parametrize("flag", ["--calibration-images", "--compare-images"])
def test_a_negative_number_of_images_is_an_argument_error_naming_the_flag(flag, datasets_root, tmp_path, capsys):
    weights = str(tmp_path / "w.pth")
    torch.save({"model": {}}, weights)  # a checkpoint: the images are what is wrong
    tool = load_tool("convert_to_mabn")
    with pytest.raises(SystemExit) as info:
        tool.main(["--config", MABN_CPU, "--weights", weights, "--output", str(tmp_path / "o.pth"),
                   "--calibration-images", "0", "--compare-images", "0", flag, "-1"] + tiny_opts(tmp_path))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and ">= 0" in err


@pytest.mark.parametrize("argv, message", [
    (["--config", "no/such.yaml"], "train_net: config file no/such.yaml does not exist"),
    (["--config", "configs/cpu/frcnn_r18_bn_2img.yaml", "SOLVER.NOPE", "3"], "train_net: Non-existent key: SOLVER.NOPE"),
    (["--config", "configs/cpu/frcnn_r18_bn_2img.yaml", "BNSTATS.EVALNORM.MODE", "bogus"],
     "train_net: BNSTATS.EVALNORM.MODE = 'bogus' is not an EvalNorm mode"),
])
def test_train_net_bad_config_is_one_line_before_launch(argv, message, monkeypatch):
    from d2_bnstats.d2 import train

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(train, "launch_from_args", lambda *a, **k: pytest.fail("launched despite a bad config"))
    with pytest.raises(SystemExit) as info:
        train.run(train.argument_parser().parse_args(argv))
    assert str(info.value).startswith(message)


# ------------------------------------------------------------------------------ checked before any work
def _broken_dataset(tmp_path, name):
    """A COCO data set whose second image's box lies entirely outside the image, registered as ``name``."""
    from .test_data_checks import SIZE, register, write_coco

    json_file, root = write_coco(str(tmp_path / name), name=name, annotations=[
        {"image_id": 1, "bbox": [4, 4, 10, 10], "category_id": 1}, {"image_id": 2, "bbox": [SIZE + 3, 5, 10, 10], "category_id": 1}])
    register(name, json_file, root)
    return json_file


def _one_line(stop, tool, *words):
    message = str(stop.value)
    assert message.startswith(f"{tool}: ") and "\n" not in message, message
    assert all(word in message for word in words), message


def test_the_comparison_checks_its_inputs_and_output_before_it_starts(datasets_root, tmp_path, monkeypatch, capsys):
    from d2_bnstats.compare import cli

    monkeypatch.setattr(cli, "launch_from_args", lambda *a, **k: pytest.fail("launched despite a bad input"))
    weights = tmp_path / "model_final.pth"
    _torch_zip(weights)
    broken = _broken_dataset(tmp_path, "broken_compare_val")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    base = ["--config-file", BN_CPU, *small_opts(tmp_path / "run"), "MODEL.WEIGHTS", str(weights)]
    cases = [
        (["--output", str(weights)], ["--output", str(weights), "is a file"]),  # an existing .pth
        (["--output", str(a_file / "compare")], ["--output", f"{a_file} is a file"]),
        (["--strategies", "nope"], ["unknown strategy 'nope'"]),
        (["--max-images", "-3"], ["--max-images = -3"]),
        (["MODEL.WEIGHTS", str(tmp_path / "none.pth")], ["none.pth", "no such file"]),
        (["DATASETS.TEST", "('broken_compare_val',)"], [broken, "entirely outside"]),
    ]
    for extra, words in cases:
        with pytest.raises(SystemExit) as stop:
            cli.run(cli.parse_args(base + extra))
        _one_line(stop, "compare_bn_stats", *words)
    assert capsys.readouterr().out == ""
    assert sorted(os.listdir(tmp_path)) == ["a_file", "broken_compare_val", "model_final.pth"]


def test_estimation_conversion_and_deployment_check_their_inputs_before_any_work(datasets_root, tmp_path, capsys):
    weights = tmp_path / "w.pth"
    _torch_zip(weights)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    broken = _broken_dataset(tmp_path, "broken_tools_train")
    opts = small_opts(tmp_path / "run")
    estimate, convert, deploy = load_tool("estimate_evalnorm"), load_tool("convert_to_mabn"), load_tool("deploy_model")
    cases = [
        (estimate, ["--config-file", BN_CPU, "--output", str(a_file / "en.pth"), *opts, "MODEL.WEIGHTS", str(weights)],
         [str(a_file), "is a file"]),
        (estimate, ["--config-file", BN_CPU, *opts, "MODEL.WEIGHTS", str(weights), "DATASETS.TRAIN", "('broken_tools_train',)"],
         [broken, "entirely outside"]),
        (estimate, ["--config-file", BN_CPU, "--images", "0", *opts, "MODEL.WEIGHTS", str(weights)], ["images must be >= 1"]),
        (convert, ["--config-file", MABN_CPU, "--weights", str(weights), "--output", str(a_file / "m.pth"), *opts],
         ["--output", str(a_file), "is a file"]),
        (convert, ["--config-file", MABN_CPU, "--weights", str(tmp_path / "none.pkl"), "--output", str(tmp_path / "m.pth"), *opts],
         ["--weights", "none.pkl", "no such file"]),
        (convert, ["--config-file", MABN_CPU, "--weights", str(weights), "--output", str(tmp_path / "m.pth"),
                   "--dataset", "broken_tools_train", *opts], [broken, "entirely outside"]),
        (deploy, ["--config-file", BN_CPU, "--output", str(tmp_path / "d"), "--sample-image", str(tmp_path / "no.png"), *opts],
         ["--sample-image", "no.png"]),
    ]
    for tool, argv, words in cases:
        name = os.path.basename(tool.__file__)[:-3]
        with pytest.raises(SystemExit) as stop:
            tool.main(argv)
        _one_line(stop, name, *words)
    assert capsys.readouterr().out == ""
    assert sorted(os.listdir(tmp_path)) == ["a_file", "broken_tools_train", "w.pth"]  # nothing written
