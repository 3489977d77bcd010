"""tools/lazyconfig_train_net.py: detectron2's LazyConfig training script with the plug-in, run as a user runs it.

The EvalNorm CPU LazyConfig (configs/lazy/cpu/) trains 3 iterations on the tiny fashion-scenes split
at 64 px in a subprocess, with PreciseBN, then resumes for a 4th, then ``--eval-only`` evaluates the
checkpoint. The reference is the model the test builds from the same config and overrides, and the
training run's own final evaluation: the checkpoint has that model's parameters and buffers, with
EvalNorm's alpha_hat/beta_hat moved from their initial values (they only learn when the plug-in's
transforms ran); metrics.json logs every iteration with ``loss_evalnorm`` and, at iteration 0, the
initial alpha_hat/beta_hat; PreciseBN updated every population layer of that model after the last
step, before the checkpoint was written and before the final evaluation; and ``--eval-only`` on the
checkpoint (PreciseBN off) gives exactly the detections of that final evaluation. Config errors are
one line naming the file, the override or the field, before anything is built.
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from detectron2.config import LazyConfig

import d2_bnstats
from d2_bnstats.d2.lazy.train import LazyConfigError, argument_parser, check_run, load_config
from d2_bnstats.layers.evalnorm import evalnorm_layers
from d2_bnstats.layers.population_protocol import population_layers

from .conftest import REPO, assert_detection_loss_logged

TOOL = os.path.join(REPO, "tools", "lazyconfig_train_net.py")
CONFIG = os.path.join(REPO, "configs", "lazy", "cpu", "faster_rcnn_R_18_FPN_fashion{}.py")
EVALNORM = CONFIG.format("_evalnorm")
SIZE = 64  # px: half the configs' canvas


def tiny_overrides(output_dir, max_iter=3, **extra):
    """``key=value`` overrides: the tiny split at 64 px, no loader workers, a few iterations at a
    constant LR (the overrides of tests/test_lazyconfig.py's ``cpu_config``, on the command line)."""
    resize = "mapper.augmentations.0"
    values = {
        "dataloader.train.dataset.names": "fashion_scenes_tiny_train",
        "dataloader.test.dataset.names": "fashion_scenes_tiny_val",
        f"dataloader.train.{resize}.short_edge_length": f"[{SIZE}]",
        f"dataloader.train.{resize}.max_size": SIZE,
        f"dataloader.test.{resize}.short_edge_length": SIZE,
        f"dataloader.test.{resize}.max_size": SIZE,
        "dataloader.train.num_workers": 0,
        "dataloader.test.num_workers": 0,
        "optimizer.lr": 0.001,
        "lr_multiplier.warmup_length": 0.0,
        "train.max_iter": max_iter,
        "train.log_period": 1,
        "train.output_dir": str(output_dir),
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def run_tool(args, datasets_root):
    # PYTHONPATH: this checkout's plug-in, not an installed copy
    env = dict(os.environ, OMP_NUM_THREADS="1", DETECTRON2_DATASETS=datasets_root, PYTHONWARNINGS="ignore", PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, TOOL, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def succeeded(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def detections(path):
    with open(path) as f:
        return sorted(
            (d["image_id"], d["category_id"], round(d["score"], 5), [round(v, 3) for v in d["bbox"]])
            for d in json.load(f)
        )


def log_lines(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        return f.read().splitlines()


def first(lines, words, start=0):
    return next(i for i in range(start, len(lines)) if words in lines[i])


@pytest.mark.slow
def test_train_resume_and_eval_only(datasets_root, tmp_path):
    out = tmp_path / "train"
    precise = {"bnstats.PRECISE_BN.ENABLED": True, "bnstats.PRECISE_BN.NUM_ITER": 2}
    overrides = tiny_overrides(out, **precise)
    succeeded(run_tool(["--config-file", EVALNORM, *overrides], datasets_root))

    # the reference: the model the plug-in builds from the same config, before any step
    cfg = LazyConfig.apply_overrides(LazyConfig.load(EVALNORM), overrides)
    reference = d2_bnstats.build_lazy_model(cfg)
    initial = reference.state_dict()
    layers = [name for name, _ in evalnorm_layers(reference)]
    assert len(layers) > 20

    checkpoint = load_checkpoint(out / "model_final.pth")
    weights = checkpoint["model"]
    assert checkpoint["iteration"] == 2  # the last of iterations 0, 1, 2
    assert sorted(weights) == sorted(initial)
    hats = [f"{name}.{p}_hat" for name in layers for p in ("alpha", "beta")]
    assert all(0 <= weights[k].item() <= 1 for k in hats)
    assert any(abs(weights[k].item() - initial[k].item()) > 1e-4 for k in hats)  # learned: moved

    with open(out / "metrics.json") as f:
        rows = [json.loads(line) for line in f]
    steps = [r for r in rows if "total_loss" in r]
    assert [r["iteration"] for r in steps] == [0, 1, 2]
    assert all(math.isfinite(r["loss_evalnorm"]) and r["loss_evalnorm"] > 0 for r in steps)
    assert_detection_loss_logged(rows)
    for name in layers:  # logged before each step: iteration 0 holds the initial values
        for p in ("alpha", "beta"):
            assert steps[0][f"evalnorm/{name}/{p}"] == pytest.approx(initial[f"{name}.{p}_hat"].item(), abs=1e-6)

    # PreciseBN after the last step, before the checkpoint and the evaluation; every population layer
    lines = log_lines(out)
    assert any("detection_loss:" in line for line in lines)  # detectron2's console line shows it
    precise_bn = first(lines, "PreciseBN (iteration 3): updated")
    assert f"updated {len(population_layers(reference))} layers" in lines[precise_bn]
    assert precise_bn < first(lines, "Saving checkpoint to") and precise_bn < first(lines, "Start inference")

    # --resume: continues at iteration 3 from the run's own checkpoint
    succeeded(run_tool(["--config-file", EVALNORM, "--resume", *tiny_overrides(out, max_iter=4, **precise)], datasets_root))
    assert load_checkpoint(out / "model_final.pth")["iteration"] == 3
    with open(out / "metrics.json") as f:
        steps = [json.loads(line) for line in f if "total_loss" in line]
    assert [r["iteration"] for r in steps] == [0, 1, 2, 3]

    # --eval-only on the checkpoint, which holds the statistics the final evaluation used
    evaluation = tmp_path / "eval"
    result = succeeded(run_tool(
        ["--config-file", EVALNORM, "--eval-only",
         *tiny_overrides(evaluation, **{"train.init_checkpoint": out / "model_final.pth"})],
        datasets_root,
    ))
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in result.stdout + result.stderr
    assert re.search(r"'bbox'[,:] \{'AP': ", result.stdout)  # the results, printed
    ours = detections(evaluation / "coco_instances_results.json")
    assert len(ours) > 0 and ours == detections(out / "coco_instances_results.json")


def test_a_missing_config_file_is_one_line_naming_it(datasets_root, tmp_path):
    missing = str(tmp_path / "no_such_config.py")
    result = run_tool(["--config-file", missing, "train.max_iter=1"], datasets_root)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"lazyconfig_train_net: config file {missing} does not exist"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "config, opts, words",
    [
        ("", [], "no config file: pass --config-file"),
        (os.path.join(REPO, "configs", "cpu", "Base-R18-FPN-fashion.yaml"), [], "defines no `model`; it looks like a yacs config"),
        (CONFIG.format(""), ["train.max_iter", "3"], "override 'train.max_iter' is not path.key=value"),
        (CONFIG.format(""), ["train.max_iter.x=3"], "override 'train.max_iter.x=3' cannot be applied"),
        (CONFIG.format(""), ["bnstats.MABN.DECAY=2.0"], "bnstats.MABN.DECAY = 2.0: expected a number in [0, 1]"),
        (CONFIG.format(""), ["train.init_checkpoint=/nonexistent/model.pth"], "train.init_checkpoint = '/nonexistent/model.pth': no such file"),
    ],
)
def test_config_errors_name_the_file_override_or_field(config, opts, words):
    with pytest.raises(LazyConfigError) as error:
        load_config(config, opts, world_size=1)
    message = str(error.value)
    assert words in message and "\n" not in message, message
    if config and not message.startswith("override"):  # an override's error names the override
        assert config in message, message


def test_a_run_checks_the_whole_run_before_it_starts(datasets_root):
    base = ["--config-file", CONFIG.format(""), "dataloader.train.dataset.names=fashion_scenes_tiny_train"]
    with pytest.raises(LazyConfigError, match=r"total_batch_size = 2 is the total batch .* processes \(3\)"):
        check_run(argument_parser().parse_args(["--num-gpus", "3", *base]))
    with pytest.raises(LazyConfigError, match=r"total_batch_size = 2 is the total batch .* processes \(3\)"):
        check_run(argument_parser().parse_args([*base, "--num-gpus", "3"]))  # a flag after the overrides
    with pytest.raises(LazyConfigError, match=r"dataloader\.test\.dataset\.names names 'fashion_scenes_tiny_vall', "
                                              r"which is not a registered data set; did you mean 'fashion_scenes_tiny_val'"):
        check_run(argument_parser().parse_args([*base, "dataloader.test.dataset.names=fashion_scenes_tiny_vall"]))
    with pytest.raises(LazyConfigError, match=r"--register-coco extra: JSON /nonexistent\.json does not exist"):
        check_run(argument_parser().parse_args(["--register-coco", "extra", "/nonexistent.json", "/tmp", *base]))
    cfg = check_run(argument_parser().parse_args([*base, "dataloader.test.dataset.names=fashion_scenes_tiny_val"]))
    assert cfg.dataloader.train.dataset.names == "fashion_scenes_tiny_train"


def test_an_output_folder_that_is_a_file_is_refused_before_the_run(datasets_root, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    base = ["--config-file", CONFIG.format(""), "dataloader.train.dataset.names=fashion_scenes_tiny_train",
            "dataloader.test.dataset.names=fashion_scenes_tiny_val"]
    for output, words in ((a_file, "is a file, not a folder"), (a_file / "run", f"{a_file} is a file")):
        with pytest.raises(LazyConfigError, match="train.output_dir") as error:
            check_run(argument_parser().parse_args([*base, f"train.output_dir={output}"]))
        assert words in str(error.value) and "\n" not in str(error.value)
    result = run_tool([*base, f"train.output_dir={a_file / 'run'}"], datasets_root)
    assert result.returncode == 1 and result.stdout == ""  # nothing printed before the line
    assert result.stderr.strip().splitlines()[-1].startswith("lazyconfig_train_net: ")
