"""Smoke run of the per-layer benchmark so it cannot rot; its ratios are recomputed from the rounds'
times it reports."""
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

import torch
import torch.nn.functional as F

from bnstats_lab.benchmark.layers import (
    BN_REFERENCE,
    CONV_COUPLED,
    FROZEN_REFERENCE,
    QUICK_SHAPES,
    _builders,
    benchmark_norms,
)

from .conftest import REPO


def test_benchmark_rows_and_reference_ratios():
    rows = benchmark_norms(["BN", "GN"], QUICK_SHAPES[:1], repeats=3, iters=1, warmup=1)
    by_name = {r.norm: r for r in rows}
    assert set(by_name) == {BN_REFERENCE, FROZEN_REFERENCE, "BN", "GN"}
    # each ratio is the median over rounds of the row's time / the reference's time in that round, its
    # interval exp(mean ± t(2)·se) of the log-ratios; recomputed from the rows' per-round times
    for r in rows:
        pairs = [(r.eval_round_ms, by_name[FROZEN_REFERENCE].eval_round_ms, r.eval_ratio, r.eval_interval)]
        if r.train_ms is not None:
            pairs.append((r.train_round_ms, by_name[BN_REFERENCE].train_round_ms, r.train_ratio, r.train_interval))
        for times, reference, ratio, interval in pairs:
            assert len(times) == len(reference) == 3
            ratios = [a / b for a, b in zip(times, reference)]
            assert math.isclose(ratio, statistics.median(ratios), rel_tol=1e-12)
            logs = [math.log(q) for q in ratios]
            half = 4.302653 * statistics.stdev(logs) / math.sqrt(3)
            assert interval[0] == pytest.approx(math.exp(statistics.mean(logs) - half), rel=1e-6)
            assert interval[1] == pytest.approx(math.exp(statistics.mean(logs) + half), rel=1e-6)
    assert by_name[BN_REFERENCE].train_ratio == 1.0 and by_name[FROZEN_REFERENCE].eval_ratio == 1.0
    assert by_name["GN"].train_ms is not None
    assert by_name[FROZEN_REFERENCE].train_ms is None
    assert all(r.eval_ms > 0 and r.skipped is None for r in rows)


def test_benchmark_cli_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "tools/benchmark_norms.py", "--quick", "--norms", "BN", "--json", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300, env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train / BN" in proc.stdout
    rows = json.load(open(out))["rows"]
    assert {r["norm"] for r in rows} == {BN_REFERENCE, FROZEN_REFERENCE, "BN"}


def test_benchmark_cli_rejects_unknown_norm():
    proc = subprocess.run(
        [sys.executable, "tools/benchmark_norms.py", "--quick", "--norms", "NoSuch"],
        capture_output=True, text=True, cwd=REPO, timeout=300, env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert proc.returncode != 0 and "--norms = 'NoSuch'" in proc.stderr


def test_evalnorm_layer_is_timed_on_its_per_sample_path():
    """A new EvalNorm layer (learned alpha, beta = 0) infers exactly as BN; the benchmark's layer must
    not: its output is EvalNorm's formula with alpha = beta = 0.25, not BN inference."""
    layer = _builders(["EvalNorm"])["EvalNorm"](4).eval()
    x = torch.randn(2, 4, 5, 5) * 3 + 1
    with torch.no_grad():
        out = layer(x)
        bn = F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps)
        mean_i = x.mean((2, 3), keepdim=True)
        var_i = x.var((2, 3), unbiased=False, keepdim=True)
        mean_e, var_e = layer.running_mean.view(1, -1, 1, 1), layer.running_var.view(1, -1, 1, 1)
        a = b = 0.25
        mu = a * mean_i + (1 - a) * mean_e
        var = b * var_i + (1 - b) * var_e + b * (1 - b) * (mean_i - mean_e) ** 2
        expected = (x - mu) / torch.sqrt(var + layer.eps) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    assert not torch.allclose(out, bn, atol=1e-3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_conv_coupled_norms_are_reported_not_timed_alone():
    rows = benchmark_norms(["BN", "CrossIterBN", "GN+WS"], QUICK_SHAPES[:1], repeats=2, iters=1, warmup=1)
    by_name = {r.norm: r for r in rows}
    for name in ("CrossIterBN", "GN+WS"):
        assert by_name[name].skipped == CONV_COUPLED[name] and by_name[name].eval_ms is None
    assert by_name["BN"].skipped is None and by_name["BN"].train_ms > 0
