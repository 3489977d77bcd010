#!/usr/bin/env python
"""COCO-evaluate one checkpoint under every inference-statistics strategy, side by side.

    python tools/compare_bn_stats.py --config-file C MODEL.WEIGHTS output/demo/model_final.pth --output output/demo/compare
    python tools/compare_bn_stats.py --list-strategies

The same command as ``d2-bnstats-compare`` (module :mod:`d2_bnstats.cli.compare`), with the lab's data sets registered
(fashion-scenes, for the CPU configs): ``d2-bnstats-compare --help`` and this script's ``--help`` list the same flags.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a clone's script: the lab (bnstats_lab) and the plug-in of this clone
    sys.path.insert(0, ROOT)

import bnstats_lab  # noqa: E402,F401  (registers the fashion-scenes data sets; pre-trained backbone hints)
from d2_bnstats.cli.compare import command, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(command())
