"""Smoke run of the per-layer benchmark so it cannot rot; its ratios are the reported times' ratios."""
import json
import math
import os
import subprocess
import sys

from bnstats_lab.benchmark.layers import BN_REFERENCE, FROZEN_REFERENCE, QUICK_SHAPES, benchmark_norms

from .conftest import REPO


def test_benchmark_rows_and_reference_ratios():
    rows = benchmark_norms(["BN", "GN"], QUICK_SHAPES[:1], repeats=2, iters=1, warmup=1)
    by_name = {r.norm: r for r in rows}
    assert set(by_name) == {BN_REFERENCE, FROZEN_REFERENCE, "BN", "GN"}
    # each ratio is the row's median time over the reference's median time, recomputed from the rows
    for r in rows:
        if r.train_ms is not None:
            assert math.isclose(r.train_ratio, r.train_ms / by_name[BN_REFERENCE].train_ms, rel_tol=1e-12)
        assert math.isclose(r.eval_ratio, r.eval_ms / by_name[FROZEN_REFERENCE].eval_ms, rel_tol=1e-12)
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
