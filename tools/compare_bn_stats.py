#!/usr/bin/env python
"""COCO-evaluate one checkpoint under every inference-statistics strategy, side by side.

    python tools/compare_bn_stats.py --config-file C MODEL.WEIGHTS output/demo/model_final.pth \\
        --output output/demo/compare
    python tools/compare_bn_stats.py --config-file C MODEL.WEIGHTS W --strategies ema precise_bn:2000 \\
        batch_stats:1 batch_stats:4 --max-images 100
    python tools/compare_bn_stats.py --list-strategies

Strategies: EMA, PreciseBN over N training images, batch statistics at test with k images per test
batch, and EvalNorm learned / 1/B² / 1/B / offline when the model has EvalNorm layers. Writes a table
(stdout and compare.md), compare.json, ap.png, and a per-layer train–test discrepancy report with
histograms (discrepancy_*.png). The logic is in the package d2_bnstats.compare.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a clone's script: the lab (bnstats_lab) and the plug-in of this clone
    sys.path.insert(0, ROOT)


import bnstats_lab  # noqa: F401  (registers the fashion-scenes data sets)
import d2_bnstats  # noqa: F401  (the plug-in: norms registered, detectron2 patched)
from d2_bnstats.compare import parse_args, run

if __name__ == "__main__":
    sys.exit(run(parse_args()))
