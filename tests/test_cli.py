"""One command-line convention for every command (d2_bnstats.cli.args), and the CPU fallback wherever a
model is built from a config that names CUDA on a machine without one."""
import argparse
import os

import pytest
import torch

from d2_bnstats import model_zoo
from d2_bnstats.cli import convert_mabn, deploy, estimate_evalnorm
from d2_bnstats.compare import argument_parser as compare_parser
from d2_bnstats.compare import parse_args as compare_args
from d2_bnstats.d2.lazy.train import argument_parser as lazy_parser
from d2_bnstats.d2.train import argument_parser as train_parser

from .conftest import REPO

EVALNORM = "bnstats://cpu/frcnn_r18_evalnorm_2img.yaml"
# (module's argument parser, the flags a command takes besides the config file, its override form)
PARSERS = {
    "train": (train_parser, ["--eval-only", "--num-gpus", "2"], "yacs"),
    "lazy-train": (lazy_parser, ["--resume", "--num-gpus", "2"], "lazy"),
    "compare": (compare_parser, ["--output", "o", "--max-images", "3"], "yacs"),
    "estimate-evalnorm": (estimate_evalnorm.argument_parser, ["--images", "4", "--output", "o.pth"], "yacs"),
    "convert-mabn": (convert_mabn.argument_parser, ["--weights", "w.pkl", "--output", "o.pth"], "yacs"),
    "deploy": (deploy.argument_parser, ["--output", "deploy/", "--fold"], "yacs"),
}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_command_takes_flags_and_overrides_in_any_order(name):
    make, flags, form = PARSERS[name]
    config = "bnstats://lazy/cpu/faster_rcnn_R_18_FPN_fashion.py" if form == "lazy" else EVALNORM
    overrides = ["train.max_iter=3", "model.backbone.norm=GN"] if form == "lazy" else ["MODEL.WEIGHTS", "w.pth",
                                                                                        "SEED", "-1"]
    orders = [
        ["--config-file", config, *flags, *overrides],
        ["--config-file", config, *overrides, *flags],  # the README's deploy order
        [*overrides[:len(overrides) // 2], "--config", config, *flags, *overrides[len(overrides) // 2:]],
    ]
    parsed = [make().parse_args(argv) for argv in orders]
    for args in parsed:
        assert args.opts == overrides
        assert args.config_file == model_zoo.get_config_file(config)  # bnstats:// resolved to the packaged file
        assert os.path.samefile(args.config_file, os.path.join(REPO, "configs", config[len("bnstats://"):]))
    assert len({repr(sorted(vars(a).items())) for a in parsed}) == 1


def test_a_list_flag_stops_at_the_first_override():
    args = compare_args(["--config-file", EVALNORM, "--strategies", "ema", "precise_bn:10", "MODEL.WEIGHTS",
                               "w.pth", "--hist-layers", "backbone.bottom_up.stem.conv1", "OUTPUT_DIR", "o"])
    assert args.strategies == ["ema", "precise_bn:10"] and args.hist_layers == ["backbone.bottom_up.stem.conv1"]
    assert sorted(args.opts) == sorted(["MODEL.WEIGHTS", "w.pth", "OUTPUT_DIR", "o"])


def test_an_unknown_packaged_config_is_a_usage_error_naming_it(capsys):
    with pytest.raises(SystemExit) as error:
        train_parser().parse_args(["--config-file", "bnstats://frcnn_r50_evalnorm_2imgs.yaml"])
    assert error.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is not a packaged d2_bnstats config; did you mean 'frcnn_r50_evalnorm_2img.yaml'" in message


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_flag_a_command_shows_is_explained(name):
    """--help: every option has a help text, and only launching commands show the launch flags."""
    parser = PARSERS[name][0]()
    parser.format_help()
    for action in parser._actions:
        if action.option_strings:
            assert action.help and action.help != argparse.SUPPRESS, f"{name}: {action.option_strings} has no help"
    shown = {flag for action in parser._actions for flag in action.option_strings}
    launches = name in ("train", "lazy-train", "compare")
    assert ("--num-gpus" in shown) == launches and ("--resume" in shown) == launches, sorted(shown)
    assert {"--config-file", "--config", "--register-coco"} <= shown


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without a GPU")
def test_building_a_model_from_a_cuda_config_falls_back_to_the_cpu_or_names_the_key():
    """detectron2's build_model (the plug-in's after import) on the model-zoo path of the README."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import d2_bnstats

    cfg = get_cfg()
    d2_bnstats.add_bnstats_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file("cpu/frcnn_r18_evalnorm_2img.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cuda", "MODEL.FPN.OUT_CHANNELS", "32"])
    cfg.freeze()
    model = build_model(cfg)
    assert all(p.device.type == "cpu" for p in model.parameters()) and cfg.MODEL.DEVICE == "cuda"
    plain = get_cfg()  # a config without the plug-in's keys falls back as the key's default does
    plain.merge_from_list(["MODEL.DEVICE", "cuda", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"])
    assert next(build_model(plain).parameters()).device.type == "cpu"
    cfg.defrost()
    cfg.BNSTATS.CPU_FALLBACK = False
    with pytest.raises(RuntimeError, match="MODEL.DEVICE = 'cuda' but torch sees no GPU; set MODEL.DEVICE cpu or "
                                           "BNSTATS.CPU_FALLBACK True"):
        build_model(cfg)


def test_library_noise_is_silenced_by_its_text_only():
    import logging
    import subprocess
    import sys
    import warnings

    from d2_bnstats.d2.library_noise import silence_library_noise

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_library_noise()
        torch.meshgrid(torch.arange(2), torch.arange(3))  # detectron2's anchor generator's call
        warnings.warn("a warning of the user's own", UserWarning)
    assert [str(w.message) for w in caught] == ["a warning of the user's own"]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("torch.utils.cpp_extension")
    logger.addHandler(handler)
    try:
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local/cuda")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["something else"]
    # importing the plug-in (and detectron2 through it) prints no torch.jit.script deprecation
    proc = subprocess.run([sys.executable, "-W", "default", "-c", "import d2_bnstats"], capture_output=True,
                          text=True, cwd=REPO, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0 and "torch.jit.script" not in proc.stderr, proc.stderr[-2000:]
