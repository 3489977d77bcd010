"""End to end: tools/train_net.py trains and COCO-evaluates real detectron2 models on CPU."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from d2_bnstats.d2.config import check_batch_config
from d2_bnstats.d2.evaluation import fast_coco_eval_available
from d2_bnstats.d2.train import argument_parser, load_config, main

from .conftest import CPU_BASE, REPO, tiny_opts

FRCNN_BN = os.path.join(REPO, "configs", "cpu", "frcnn_r18_bn_2img.yaml")
MRCNN_BN = os.path.join(REPO, "configs", "cpu", "mrcnn_r18_bn_2img.yaml")
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")


def run_cli(args, env_root, timeout=600):
    env = dict(os.environ, DETECTRON2_DATASETS=env_root, PYTHONWARNINGS="ignore", PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, TRAIN_NET] + args, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout
    )


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_train_net_cli_trains_evaluates_and_eval_only_reproduces(datasets_root, tmp_path):
    out = tmp_path / "frcnn"
    proc = run_cli(["--config", FRCNN_BN] + tiny_opts(out, max_iter=3), datasets_root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    metrics = read_metrics(out)
    assert [m["iteration"] for m in metrics if "total_loss" in m][-1] == 2
    assert any("bbox/AP" in m for m in metrics)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
    assert os.path.isfile(out / "model_final.pth")
    trained_ap = [m for m in metrics if "bbox/AP" in m][-1]["bbox/AP"]

    # --eval-only reloads the checkpoint and gives the same COCO numbers
    args = argument_parser().parse_args(
        ["--config-file", FRCNN_BN, "--eval-only"]
        + tiny_opts(tmp_path / "eval", **{"MODEL.WEIGHTS": out / "model_final.pth"})
    )
    results = main(args)
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert results["bbox"]["AP"] == pytest.approx(trained_ap, abs=1e-9, nan_ok=True)


def test_mask_rcnn_trains_and_evaluates_bbox_and_segm(datasets_root, tmp_path):
    args = argument_parser().parse_args(["--config", MRCNN_BN] + tiny_opts(tmp_path))
    main(args)
    metrics = read_metrics(tmp_path)
    losses = [m for m in metrics if "loss_mask" in m]
    assert losses and all(torch.isfinite(torch.tensor(m["loss_mask"])) for m in losses)
    assert any("bbox/AP" in m for m in metrics) and any("segm/AP" in m for m in metrics)


def test_resume_continues_from_the_last_checkpoint(datasets_root, tmp_path):
    from d2_bnstats.d2.trainer import Trainer

    main(argument_parser().parse_args(["--config", FRCNN_BN] + tiny_opts(tmp_path, max_iter=2)))
    saved = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert saved["iteration"] == 1
    cfg = load_config(FRCNN_BN, tiny_opts(tmp_path, max_iter=4))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved["model"][name]), name
    trainer.train()
    assert [m["iteration"] for m in read_metrics(tmp_path) if "total_loss" in m][-1] == 3


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.RESNETS.NORM", "EvalNrom"], "MODEL.RESNETS.NORM = 'EvalNrom'"),
        (["MODEL.WEIGHTS", "/no/such/weights.pkl"], "no such file"),
        (["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH = 0"),
        (["SOLVER.MAX_ITER"], "KEY VALUE pairs"),
    ],
)
def test_bad_configs_fail_with_clear_messages(opts, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(")):
        load_config(CPU_BASE, opts)


def test_bad_config_via_cli_exits_with_the_message(datasets_root, tmp_path):
    proc = run_cli(["--config", FRCNN_BN, "MODEL.FPN.NORM", "BatchNorm", "OUTPUT_DIR", str(tmp_path)], datasets_root)
    assert proc.returncode != 0
    assert "MODEL.FPN.NORM = 'BatchNorm'" in proc.stderr and "Did you mean 'BN'" in proc.stderr
    assert "KeyError" not in proc.stderr


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")


def test_total_batch_must_split_over_processes():
    cfg = load_config(CPU_BASE)
    check_batch_config(cfg, 2)
    cfg.SOLVER.IMS_PER_BATCH = 3
    with pytest.raises(ValueError, match="multiple of the number of processes \\(2\\)"):
        check_batch_config(cfg, 2)


def test_cuda_config_falls_back_to_cpu_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert load_config(CPU_BASE, ["MODEL.DEVICE", "cuda"]).MODEL.DEVICE == "cpu"
    with pytest.raises(RuntimeError, match="no GPU"):
        load_config(CPU_BASE, ["MODEL.DEVICE", "cuda", "BNSTATS.CPU_FALLBACK", "False"])


def test_compiled_op_placeholder_names_the_operation_and_remedy():
    from detectron2 import _C

    if not getattr(_C, "IS_PLACEHOLDER", False):
        pytest.skip("detectron2 has its real compiled extension")
    assert not fast_coco_eval_available()
    with pytest.raises(AttributeError, match="deformable convolution.*build detectron2 from source"):
        _C.deform_conv_forward
    with pytest.raises(AttributeError, match="rotated boxes"):
        _C.box_iou_rotated
    with pytest.raises(AttributeError, match="fast C\\+\\+ COCO evaluator"):
        _C.COCOevalEvaluateImages
    assert not hasattr(_C, "COCOevalAccumulate")
    from detectron2.utils.collect_env import collect_env_info

    assert "placeholder" in collect_env_info()


def test_setup_env_second_run_is_quick():
    # --check changes nothing; without an up-to-date .venv the run below would build one (5-6 GB)
    check = subprocess.run(["bash", "scripts/setup_env.sh", "--check"], capture_output=True, text=True, cwd=REPO, timeout=300)
    if check.returncode != 0:
        pytest.skip(f"{check.stderr.strip()}; run `make env` first (this test only times a run on an up-to-date .venv)")
    start = time.time()
    proc = subprocess.run(["bash", "scripts/setup_env.sh"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "environment up to date" in proc.stderr
    assert time.time() - start < 60


@pytest.mark.slow
def test_two_processes_on_cpu_train_and_evaluate(datasets_root, tmp_path):
    proc = run_cli(
        ["--config", FRCNN_BN, "--num-gpus", "2"] + tiny_opts(tmp_path, max_iter=3, **{"SOLVER.IMS_PER_BATCH": 4}),
        datasets_root,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in proc.stdout + proc.stderr
    assert [m["iteration"] for m in read_metrics(tmp_path) if "total_loss" in m][-1] == 2
