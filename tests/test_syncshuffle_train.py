"""End to end: tools/train_net.py --num-gpus 2 (gloo on CPU) trains Mask R-CNN with SyncBN in the backbone
and FPN and RoI-shuffled BN in the box and mask heads, evaluates, and both processes end with
identical parameters and buffers (compared tensor by tensor by the replica check)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import REPO, tiny_opts

MRCNN_SYNC_SHUFFLE = os.path.join(REPO, "configs", "cpu", "mrcnn_r18_syncbn_roishuffle_2img.yaml")
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")


@pytest.mark.slow
def test_two_process_training_with_syncbn_and_roi_shuffle_keeps_replicas_identical(datasets_root, tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root, PYTHONWARNINGS="ignore", PYTHONPATH=REPO)
    args = ["--config", MRCNN_SYNC_SHUFFLE, "--num-gpus", "2"] + tiny_opts(tmp_path, max_iter=3)
    proc = subprocess.run([sys.executable, TRAIN_NET] + args, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert "World size: 2" in log
    # COCO evaluation of boxes and masks ran
    assert log.count("copypaste: AP,AP50,AP75,APs,APm,APl") == 2

    metrics = [json.loads(line) for line in open(tmp_path / "metrics.json") if line.strip()]
    assert [m["iteration"] for m in metrics if "total_loss" in m][-1] == 2
    assert all(torch.isfinite(torch.tensor(m["total_loss"])) for m in metrics if "total_loss" in m)

    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    # the norms are the plug-in's and were trained: 3 updates of the running statistics each
    for key in (
        "backbone.bottom_up.stem.conv1.norm.num_batches_tracked",
        "backbone.fpn_output2.norm.num_batches_tracked",
        "roi_heads.box_head.conv2.norm.num_batches_tracked",
        "roi_heads.mask_head.mask_fcn2.norm.num_batches_tracked",
    ):
        assert state[key].item() == 3, key
    assert "SyncBatchNorm2d" in log and "RoIShuffleBatchNorm2d" in log  # detectron2 logs the model

    replicas = json.load(open(tmp_path / "replica_check.json"))
    assert replicas["world_size"] == 2
    norm_buffers = [k for k in state if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(norm_buffers) > 3 * 20  # backbone, FPN, box and mask head norms
    assert replicas["parameters"] > 100 and replicas["buffers"] >= len(norm_buffers)
    assert replicas["mismatched_parameters"] == []
    # SyncBN and RoIShuffleBN keep their running statistics identical on both processes
    assert replicas["mismatched_buffers"] == []


@pytest.mark.slow
def test_training_iteration_benchmark_runs_variants_in_one_run(datasets_root, tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root, PYTHONWARNINGS="ignore", PYTHONPATH=REPO)
    out = tmp_path / "bench.json"
    config = os.path.join(REPO, "configs", "cpu", "frcnn_r18_syncbn_roishuffle_2img.yaml")
    cmd = [sys.executable, "tools/benchmark_sync.py", "--train-config", config, "--iters", "1", "--warmup", "0", "--json", str(out),
           "--variant", "MODEL.ROI_BOX_HEAD.NORM=BN", "--variant", "MODEL.ROI_BOX_HEAD.NORM=RoIShuffleBN,BNSTATS.ROI_SHUFFLE.NUM_GROUPS=3",
           "DATASETS.TRAIN", "('fashion_scenes_tiny_train',)", "DATALOADER.NUM_WORKERS", "0",
           "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.CONV_DIM", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.load(open(out))["rows"]
    assert [r["variant"] for r in rows] == ["MODEL.ROI_BOX_HEAD.NORM BN", "MODEL.ROI_BOX_HEAD.NORM RoIShuffleBN BNSTATS.ROI_SHUFFLE.NUM_GROUPS 3"]
    # one median per process; "vs first" is each process's difference to the first variant
    assert all(len(r["iteration_ms"]) == 2 for r in rows)
    expected = [b - a for a, b in zip(rows[0]["iteration_ms"], rows[1]["iteration_ms"])]
    assert rows[1]["delta_ms"] == pytest.approx(expected)
