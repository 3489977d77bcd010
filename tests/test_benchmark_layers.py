"""Smoke run of the per-layer benchmark so it cannot rot; its ratios are recomputed from the rounds'
times it reports."""
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from bnstats_lab.benchmark.layers import BN_REFERENCE, FROZEN_REFERENCE, QUICK_SHAPES, benchmark_norms

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
