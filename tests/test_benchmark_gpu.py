"""The GPU side of the benchmarks, as far as it runs on a CPU: the device option leaves CPU runs as
they were, the timing helpers, the synthetic batches of the R-50 model, the report of
scripts/gpu_check.sh (its JUnit reading and target checks on hand-made inputs), and the script
itself end to end in its CPU dry run (slow)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bnstats_lab.benchmark import gpu_check
from bnstats_lab.benchmark.e2e import TINY, BenchmarkSettings, _arch_opts
from bnstats_lab.benchmark.layers import R50_SHAPES, benchmark_norms
from bnstats_lab.benchmark.models import GPU_MEMORY_TARGET, load_bench_config
from bnstats_lab.benchmark.synthetic import image_size, synthetic_batches
from bnstats_lab.benchmark.timing import is_cuda, prepare_device, time_block

from .conftest import REPO


def test_time_block_on_cpu_is_seconds_per_call():
    calls = []
    seconds = time_block(lambda: calls.append(1), 5, "cpu")
    assert len(calls) == 5 and 0 <= seconds < 1
    assert is_cuda("cuda:1") and not is_cuda("cpu")
    before = torch.backends.cudnn.benchmark
    prepare_device("cpu")
    assert torch.backends.cudnn.benchmark == before


def test_layer_benchmark_with_an_explicit_cpu_device_gives_the_same_rows():
    rows = benchmark_norms(["BN"], [(2, 8, 4, 4)], repeats=1, iters=1, warmup=1, device="cpu")
    assert {r.norm for r in rows} == {"nn.BatchNorm2d", "FrozenBatchNorm2d", "BN"}
    assert all(r.eval_ms > 0 and r.skipped is None for r in rows)


def test_r50_shapes_are_the_padded_800_px_feature_maps():
    # 800 x 1067 padded to 800 x 1088 (divisible by 32): strides 4, 8, 16, 32
    spatial = {(h, w) for n, c, h, w in R50_SHAPES if n == 2}
    assert spatial == {(800 // s, 1088 // s) for s in (4, 8, 16, 32)}
    assert (1024, 256, 7, 7) in R50_SHAPES


def test_r50_config_and_synthetic_batches():
    cfg = load_bench_config("frcnn_r50", 2, "GN", "train", ["MODEL.DEVICE", "cpu"])
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.DEVICE == "cpu" and cfg.MODEL.WEIGHTS == ""
    assert cfg.MODEL.ROI_BOX_HEAD.NUM_CONV == 4 and cfg.MODEL.ROI_BOX_HEAD.CONV_DIM == 256
    assert cfg.INPUT.MIN_SIZE_TRAIN == (800,) and image_size(cfg) == (800, 1067)
    assert [cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM] == ["GN"] * 3
    small = load_bench_config("frcnn_r50", 2, "BN", "train", ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TRAIN", "(64,)",
                                                              "INPUT.MAX_SIZE_TRAIN", "96"])
    batches = synthetic_batches(small, 2)
    images = [d for b in batches for d in b]
    assert [len(b) for b in batches] == [2, 2] and len({d["image_id"] for d in images}) == 4
    for d in images:
        assert d["image"].shape == (3, 64, 85) and d["image"].dtype == torch.uint8
        boxes = d["instances"].gt_boxes.tensor
        assert len(boxes) == 7 and (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 85).all() and (boxes[:, 3] <= 64).all()
    again = synthetic_batches(small, 1)[0][0]
    assert torch.equal(again["image"], images[0]["image"])  # deterministic


def test_device_overrides_only_where_needed():
    cpu = BenchmarkSettings(**TINY)
    assert _arch_opts(cpu, "frcnn") == list(cpu.opts)  # the CPU configs say "cpu" already: unchanged
    assert _arch_opts(cpu, "frcnn_r50")[-2:] == ["MODEL.DEVICE", "cpu"]
    gpu = BenchmarkSettings(device="cuda", clock="wall")
    assert _arch_opts(gpu, "frcnn")[-2:] == ["MODEL.DEVICE", "cuda"]


def test_benchmark_tool_rejects_cpu_clock_and_missing_gpu():
    proc = subprocess.run([sys.executable, "tools/benchmark.py", "--device", "cuda", "--tiny"], capture_output=True,
                          text=True, cwd=REPO, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert proc.returncode == 2 and "torch sees no CUDA device" in proc.stderr


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_cuda" name="test_a"/>
<testcase classname="tests.test_cuda" name="test_b"><failure message="AssertionError: off">trace</failure></testcase>
<testcase classname="tests.test_cuda" name="test_c"><skipped type="pytest.skip" message="needs a CUDA device"/></testcase>
<testcase classname="tests.test_cuda" name="test_d"><skipped type="pytest.xfail" message="known"/></testcase>
<testcase classname="tests.test_cuda" name="test_e"><error message="fixture broke">trace</error></testcase>
</testsuite></testsuites>"""


def test_report_reads_junit_and_judges_the_tests(tmp_path):
    path = tmp_path / "cuda_tests.xml"
    path.write_text(JUNIT)
    tests = gpu_check.read_junit(str(path))
    assert tests["counts"] == dict(passed=1, failed=1, errors=1, skipped=1, xfailed=1)
    assert [f["test"] for f in tests["failures"]] == ["tests.test_cuda::test_b", "tests.test_cuda::test_e"]
    assert not gpu_check.tests_ok(tests, dry_run=False) and not gpu_check.tests_ok(tests, dry_run=True)
    only_skipped = {"counts": dict(passed=0, failed=0, errors=0, skipped=3, xfailed=0), "failures": []}
    assert gpu_check.tests_ok(only_skipped, dry_run=True) and not gpu_check.tests_ok(only_skipped, dry_run=False)
    assert not gpu_check.tests_ok(None, dry_run=True)


def test_report_checks_every_gpu_target():
    e2e = {
        "train": [{"norm": "BN", "ratio": 1.0, "target": None, "meets_target": None},
                  {"norm": "EvalNorm", "ratio": 1.04, "target": 1.05, "meets_target": True}],
        "inference": [{"norm": "MABN (folded)", "ratio": 1.03, "target": 1.02, "meets_target": False}],
        "memory": [{"norm": "BN", "ratio": 1.0, "skipped": None}, {"norm": "GN", "ratio": 1.2, "skipped": None},
                   {"norm": "MABN", "ratio": None, "skipped": "failed: x"}],
    }
    checks = gpu_check.target_checks(e2e)
    assert [(c["what"], c["met"]) for c in checks] == [
        ("train EvalNorm / BN", True), ("inference MABN (folded) / FrozenBN", False), ("peak memory GN / BN", False)]
    assert checks[-1]["target"] == GPU_MEMORY_TARGET
    summary = gpu_check.layer_summary({"rows": [
        {"norm": "EvalNorm", "train_ratio": 1.0, "eval_ratio": 2.0, "skipped": None},
        {"norm": "EvalNorm", "train_ratio": 3.0, "eval_ratio": 4.0, "skipped": None}]})
    assert summary[0]["train_ratio_median"] == 2.0 and summary[0]["eval_ratio_max"] == 4.0


@pytest.mark.slow
def test_gpu_check_script_cpu_dry_run(tmp_path):
    """scripts/gpu_check.sh --cpu-dry-run with this environment's packages: every step runs, the cuda
    tests are all skipped (none passed), the report and its files are written."""
    out = tmp_path / "out"
    # one thread: the suite runs in one process on 2 shared cores (more threads spin there)
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "--cpu-dry-run", "--no-install"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert sorted(os.listdir(out)) == ["cuda_tests.xml", "e2e_ratios.png", "gpu_check.json", "gpu_check.log", "gpu_check.md"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and report["targets"] == []
    counts = report["cuda_tests"]["counts"]
    assert counts["skipped"] > 0 and counts["passed"] == counts["failed"] == counts["errors"] == 0
    assert all(s["status"] == 0 for s in report["steps"].values()) and set(report["steps"]) == {
        "environment", "cuda_tests", "layers", "e2e"}
    train = {r["norm"]: r for r in report["e2e"]["train"]}
    assert set(train) == {"BN", "FrozenBN", "EvalNorm", "MABN", "GN", "GhostBN"}
    assert all(r["skipped"] is None and math.isfinite(r["ratio"]) for r in train.values())
    assert report["e2e"]["settings"]["device"] == "cpu" and report["e2e"]["train"][0]["arch"] == "frcnn_r50"
    assert {r["norm"] for r in report["layer_summary"]} >= {"BN", "EvalNorm", "MABN", "GhostBN"}
