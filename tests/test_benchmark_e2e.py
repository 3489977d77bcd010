"""Smoke run of the end-to-end benchmark (tools/benchmark.py --tiny): it runs real detectron2
training steps, inference and memory subprocesses on the tiny split, and its output has the
structure docs/benchmarks.md and the plot rely on. Not a timed test: no speed is asserted; the
ratio arithmetic is checked on hand-made times."""
import json
import math
import os
import statistics

import pytest

from bnstats_lab.benchmark import inference as inference_module
from bnstats_lab.benchmark.models import norm_overrides, with_references
from bnstats_lab.benchmark.precise_bn_scaling import linear_fit
from bnstats_lab.benchmark.report import format_report
from bnstats_lab.benchmark.timing import TimingRow, summarize

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


def test_ratio_is_the_median_of_same_round_ratios():
    """Per-round times written here; ratios, spreads and targets computed by hand."""
    names = ("BN", "EvalNorm/learned", "Fast", "Gone")
    rows = {n: TimingRow("train", "frcnn", 2, n) for n in names}
    rows["Gone"].skipped = "not available: norm 'Gone' is not registered in this installation"
    times = {"BN": [1.0, 2.0, 4.0], "EvalNorm/learned": [1.5, 2.0, 4.8], "Fast": [0.9, 1.8, 4.0]}
    summarize(rows, times, "BN", {"EvalNorm": 1.10, "Fast": 1.02})
    evalnorm = rows["EvalNorm/learned"]
    # same-round ratios 1.5, 1.0, 1.2: median 1.2 (the ratio of the medians would be 2.0 / 2.0 = 1.0)
    assert evalnorm.ratio == pytest.approx(1.2)
    assert evalnorm.median_s == 2.0 and evalnorm.rounds == 3 and evalnorm.round_s == [1.5, 2.0, 4.8]
    assert evalnorm.spread == pytest.approx((4.8 - 1.5) / 2.0)
    assert evalnorm.ratio_spread == pytest.approx((1.5 - 1.0) / 1.2)
    # ratios 1.5, 1.0, 1.2: the 95% interval exp(mean log ± t(2)·se) reaches both sides of 1.10
    logs = [math.log(r) for r in (1.5, 1.0, 1.2)]
    mean, se = statistics.mean(logs), statistics.stdev(logs) / math.sqrt(3)
    assert (evalnorm.ratio_low, evalnorm.ratio_high) == pytest.approx(
        (math.exp(mean - 4.302653 * se), math.exp(mean + 4.302653 * se)), rel=1e-6)
    assert evalnorm.target == 1.10 and evalnorm.status == "unresolved" and evalnorm.meets_target is None
    fast = rows["Fast"]  # ratios 0.9, 0.9, 1.0: interval [0.80, 1.07] still reaches over 1.02
    assert fast.ratio == pytest.approx(0.9) and fast.target == 1.02 and fast.status == "unresolved"
    assert rows["BN"].target is None and rows["BN"].meets_target is None
    gone = rows["Gone"]
    assert gone.ratio is None and gone.median_s is None and gone.rounds == 0


def test_a_row_measured_against_another_row_than_the_tables_reference():
    """GN+WS against GN (what Weight Standardization adds), in the same rounds; a target named by the
    row ("GN+WS (folded)") wins over one named by its norm."""
    names = ("FrozenBN", "GN", "GN+WS", "GN+WS (folded)")
    rows = {n: TimingRow("inference", "frcnn", 1, n) for n in names}
    times = {"FrozenBN": [1.0, 1.0, 1.0], "GN": [2.0, 3.0, 4.0], "GN+WS": [2.4, 3.3, 4.8],
             "GN+WS (folded)": [2.0, 3.03, 4.0]}
    summarize(rows, times, "FrozenBN", {"GN+WS": 9.0, "GN+WS (folded)": 1.02},
              {"GN+WS": "GN", "GN+WS (folded)": "GN"})
    assert rows["GN"].reference == "FrozenBN" and rows["GN"].ratio == pytest.approx(3.0)
    ws = rows["GN+WS"]  # same-round ratios to GN: 1.2, 1.1, 1.2
    assert ws.reference == "GN" and ws.ratio == pytest.approx(1.2) and ws.target == 9.0 and ws.status == "met"
    folded = rows["GN+WS (folded)"]  # 1.0, 1.01, 1.0
    assert folded.ratio == pytest.approx(1.0) and folded.target == 1.02
    logs = [0.0, math.log(1.01), 0.0]
    mean, se = statistics.mean(logs), statistics.stdev(logs) / math.sqrt(3)
    assert folded.ratio_high == pytest.approx(math.exp(mean + 4.302653 * se), rel=1e-6)
    assert folded.ratio_high < 1.02 and folded.status == "met"  # exp(mean + t·se) = 1.0177


def test_the_rows_a_ratio_needs_are_added_in_front_and_the_order_kept():
    relative = {"GN+WS": "GN", "GN+WS (folded)": "GN", "BN+WS": "BN"}
    assert with_references(["EvalNorm", "BN"], "BN", relative) == ["EvalNorm", "BN"]
    assert with_references(["GN+WS", "EvalNorm"], "BN", relative) == ["BN", "GN", "GN+WS", "EvalNorm"]
    assert with_references(["BN+WS", "GN", "GN+WS"], "FrozenBN", relative) == ["FrozenBN", "BN", "BN+WS", "GN",
                                                                               "GN+WS"]


def test_target_status_from_the_interval():
    from bnstats_lab.benchmark.timing import ratio_interval, target_status

    tight = ratio_interval([1.04, 1.05, 1.045, 1.05, 1.04, 1.047])
    assert tight[0] < 1.045 < tight[1] and tight[1] < 1.06
    assert target_status(tight, 1.10) == "met"
    assert target_status(tight, 1.02) == "missed"
    assert target_status(tight, 1.045) == "unresolved"
    assert target_status(None, 1.10) == "unresolved" and target_status(tight, None) is None
    assert ratio_interval([1.1]) is None


def test_rows_whose_models_detect_other_numbers_of_boxes_are_not_comparable():
    from bnstats_lab.benchmark.inference import DETECTIONS_TOLERANCE, mark_incomparable

    names = ("FrozenBN", "BN", "BN+WS", "BN+WS (folded)", "Gone")
    rows = {n: TimingRow("inference", "frcnn", 1, n) for n in names}
    rows["Gone"].skipped = "not available"
    times = {n: [1.0, 1.1, 1.0] for n in names[:4]}
    summarize(rows, times, "FrozenBN", {"BN+WS (folded)": 1.5, "BN": 1.5}, {"BN+WS": "BN", "BN+WS (folded)": "BN"})
    assert rows["BN+WS (folded)"].status == "met" and rows["BN"].status == "met"
    near = 100 * (1 - DETECTIONS_TOLERANCE / 2)
    detections = {"FrozenBN": [100, 100], "BN": [near, near], "BN+WS": [100, 100], "BN+WS (folded)": [0, 0]}
    mark_incomparable(rows, detections)
    folded = rows["BN+WS (folded)"]
    assert folded.note.startswith(f"not comparable: 0 detections per image against {near:.3g} of BN")
    assert folded.status is None and folded.meets_target is None and folded.ratio == pytest.approx(1.0)
    assert rows["BN"].note is None and rows["BN"].status == "met"  # within the tolerance
    assert rows["BN+WS"].note is None and rows["FrozenBN"].note is None and rows["Gone"].note is None


def test_switching_every_part_off_is_refused_before_anything_runs(tmp_path, capsys):
    tool = _load_tool()
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--no-training", "--no-memory", "--no-inference", "--no-precise-bn", "--output", str(out)])
    assert exit_info.value.code == 2
    assert "leave nothing to measure" in capsys.readouterr().err
    assert not out.exists()


def test_norm_placement():
    # FrozenBN trains in the backbone only (detectron2's default); as the inference reference it is everywhere
    assert norm_overrides("FrozenBN", mask=True) == [
        "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.FPN.NORM", "", "MODEL.ROI_BOX_HEAD.NORM", "",
        "MODEL.ROI_MASK_HEAD.NORM", ""]
    assert norm_overrides("FrozenBN", mask=False, placement="inference")[1::2] == ["FrozenBN"] * 3
    assert norm_overrides("GN", mask=False)[1::2] == ["GN"] * 3
    assert norm_overrides("RoIShuffleBN", mask=True)[1::2] == ["BN", "BN", "RoIShuffleBN", "RoIShuffleBN"]


def test_tiny_benchmark_structure(datasets_root, tmp_path, monkeypatch):
    tool = _load_tool()
    out = tmp_path / "bench"
    layers_changed = []

    def set_evalnorm_mode(model, mode, **kw):
        layers_changed.append(real(model, mode, **kw))

    real = inference_module.set_evalnorm_mode
    monkeypatch.setattr(inference_module, "set_evalnorm_mode", set_evalnorm_mode)
    # EvalNorm is not the last model built for inference: each mode must be set on the EvalNorm model.
    # "NoSuchNorm": a name no plug-in registers is reported, not an error.
    # GN+WS: measured against GN (added to the rows), and folded for inference. BN+WS: without
    # estimated population statistics its outputs overflow and it detects nothing (less work timed).
    assert tool.main(["--tiny", "--norms", "EvalNorm", "BN", "FrozenBN", "NoSuchNorm", "GN+WS", "BN+WS",
                      "--memory-norms", "BN", "FrozenBN", "NoSuchNorm", "--output", str(out)] + TINY_DATA) == 0
    result = json.loads((out / "results.json").read_text())
    assert (out / "ratios.png").stat().st_size > 0
    assert (out / "report.md").read_text() == format_report(result) + "\n"  # the markdown tables, as printed
    assert layers_changed and all(n > 0 for n in layers_changed)

    train = {r["norm"]: r for r in result["train"]}
    assert list(train) == ["GN", "EvalNorm", "BN", "FrozenBN", "NoSuchNorm", "GN+WS", "BN+WS"]
    assert train["GN+WS"]["reference"] == "GN" and train["EvalNorm"]["reference"] == "BN"
    # the JSON keeps every round's time: the ratio recomputes from it
    assert len(train["GN+WS"]["round_s"]) == train["GN+WS"]["rounds"] == 2
    assert train["GN+WS"]["ratio"] == pytest.approx(statistics.median(
        [a / b for a, b in zip(train["GN+WS"]["round_s"], train["GN"]["round_s"])]))
    for name in ("EvalNorm", "FrozenBN"):
        r = train[name]
        assert r["skipped"] is None and r["rounds"] == 2
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["median_s"] > 0
    assert train["NoSuchNorm"]["skipped"].startswith("not available")
    assert train["NoSuchNorm"]["ratio"] is None

    memory = {r["norm"]: r for r in result["memory"]}
    assert set(memory) == {"BN", "FrozenBN", "NoSuchNorm"}
    assert memory["BN"]["training_mib"] > 0 and memory["FrozenBN"]["training_mib"] > 0
    assert math.isclose(memory["FrozenBN"]["ratio"], memory["FrozenBN"]["training_mib"] / memory["BN"]["training_mib"])
    assert memory["NoSuchNorm"]["skipped"].startswith("not available")

    inference = {r["norm"]: r for r in result["inference"]}
    assert math.isfinite(inference["BN"]["ratio"]) and inference["BN"]["ratio"] > 0
    assert inference["NoSuchNorm"]["skipped"].startswith("not available")
    for name in ("GN+WS", "GN+WS (folded)"):
        assert inference[name]["reference"] == "GN" and math.isfinite(inference[name]["ratio"])
    assert inference["GN+WS (folded)"]["target"] == 1.02
    for name in ("BN+WS", "BN+WS (folded)"):  # the same detections as BN: the same work timed
        assert inference[name]["reference"] == "BN" and inference[name]["note"] is None
    for mode in ("learned", "rule", "exact", "fixed", "ema"):  # one row per mode, each against the same FrozenBN
        r = inference[f"EvalNorm/{mode}"]
        assert r["skipped"] is None and math.isfinite(r["ratio"]) and r["ratio"] > 0

    pb = result["precise_bn"]
    ns = [r["images"] for r in pb["rows"]]
    assert ns == sorted(ns) and len(set(ns)) == len(ns) == 3
    for r in pb["rows"]:
        assert r["ratio"] > 0 and math.isfinite(r["ratio"])
        assert r["batches"] == math.ceil(r["images"] / pb["ims_per_batch"])
    assert 0.0 <= pb["fit_precise_bn"]["r2"] <= 1.0
