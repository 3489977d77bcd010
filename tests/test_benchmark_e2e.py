"""Smoke run of the end-to-end benchmark (tools/benchmark.py --tiny): it runs real detectron2
training steps, inference and memory subprocesses on the tiny split, and its output has the
structure docs/benchmarks.md and the plot rely on. Not a timed test: no speed is asserted."""
import json
import math
import os

import d2_bnstats
from d2_bnstats.benchmark.e2e import linear_fit, norm_overrides

from .conftest import REPO

TINY_DATA = ["DATASETS.TRAIN", "('fashion_scenes_tiny_train',)", "DATASETS.TEST", "('fashion_scenes_tiny_val',)"]


def _load_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_tool", os.path.join(REPO, "tools", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_linear_fit_against_plain_formula():
    xs, ys = [100, 1000, 10000], [1.0 + 0.002 * x for x in (100, 1000, 10000)]
    fit = linear_fit(xs, ys)
    assert math.isclose(fit.slope_s_per_image, 0.002, rel_tol=1e-9)
    assert math.isclose(fit.intercept_s, 1.0, rel_tol=1e-9)
    assert math.isclose(fit.r2, 1.0, rel_tol=1e-12)
    noisy = linear_fit([1, 2, 3], [1.0, 3.0, 2.0])  # slope 0.5, mean 2: ss_res 1.5 of ss_tot 2
    assert math.isclose(noisy.r2, 0.25, rel_tol=1e-9)
    assert linear_fit([5, 5], [1.0, 2.0]) is None


def test_norm_placement():
    # FrozenBN trains in the backbone only (detectron2's default); as the inference reference it is everywhere
    assert norm_overrides("FrozenBN", mask=True) == [
        "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.FPN.NORM", "", "MODEL.ROI_BOX_HEAD.NORM", "",
        "MODEL.ROI_MASK_HEAD.NORM", ""]
    assert norm_overrides("FrozenBN", mask=False, placement="inference")[1::2] == ["FrozenBN"] * 3
    assert norm_overrides("GN", mask=False)[1::2] == ["GN"] * 3


def test_tiny_benchmark_structure(datasets_root, tmp_path):
    tool = _load_tool()
    out = tmp_path / "bench"
    second = "EvalNorm" if "EvalNorm" in d2_bnstats.available_norms() else "GhostBN"
    # "NoSuchNorm" stands for a branch not merged yet: reported, not an error
    assert tool.main(["--tiny", "--norms", "BN", second, "FrozenBN", "NoSuchNorm", "--memory-norms", "BN", "NoSuchNorm",
                      "--output", str(out)] + TINY_DATA) == 0
    result = json.loads((out / "results.json").read_text())
    assert (out / "ratios.png").stat().st_size > 0

    train = {r["norm"]: r for r in result["train"]}
    assert list(train) == ["BN", second, "FrozenBN", "NoSuchNorm"]
    assert train["BN"]["ratio"] == 1.0  # BN / BN in every round
    for name in (second, "FrozenBN"):
        r = train[name]
        assert r["skipped"] is None and r["rounds"] == 2
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["median_s"] > 0
    assert train["NoSuchNorm"]["skipped"].startswith("not available")
    assert train["NoSuchNorm"]["ratio"] is None

    memory = {r["norm"]: r for r in result["memory"]}
    assert set(memory) == {"BN", "NoSuchNorm"}
    assert memory["BN"]["training_mib"] > 0 and memory["BN"]["ratio"] == 1.0
    assert memory["NoSuchNorm"]["skipped"].startswith("not available")

    inference = {r["norm"]: r for r in result["inference"]}
    assert inference["FrozenBN"]["ratio"] == 1.0
    assert math.isfinite(inference["BN"]["ratio"]) and inference["BN"]["ratio"] > 0
    assert inference["NoSuchNorm"]["skipped"].startswith("not available")
    if second == "EvalNorm":  # one row per evaluation mode, all measured against the same FrozenBN
        for mode in ("learned", "rule", "exact", "fixed", "ema"):
            r = inference[f"EvalNorm/{mode}"]
            assert r["skipped"] is None and math.isfinite(r["ratio"]) and r["ratio"] > 0

    pb = result["precise_bn"]
    ns = [r["images"] for r in pb["rows"]]
    assert ns == sorted(ns) and len(set(ns)) == len(ns) == 3
    if pb["available"]:
        for r in pb["rows"]:
            assert r["skipped"] is None and r["ratio"] > 0 and math.isfinite(r["ratio"])
            assert r["batches"] == math.ceil(r["images"] / pb["ims_per_batch"])
        assert 0.0 <= pb["fit_precise_bn"]["r2"] <= 1.0
    else:
        assert all(r["skipped"].startswith("not available") for r in pb["rows"])
