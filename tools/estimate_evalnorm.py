#!/usr/bin/env python
"""Offline EvalNorm: estimate alpha_hat, beta_hat for a model trained with BatchNorm.

    python tools/estimate_evalnorm.py --config-file configs/cpu/frcnn_r18_bn_2img.yaml \\
        MODEL.WEIGHTS output/cpu/frcnn_r18_bn_2img/model_final.pth

The same command as ``d2-bnstats-estimate-evalnorm`` (module :mod:`d2_bnstats.cli.estimate_evalnorm`), with the lab's data sets registered
(fashion-scenes, for the CPU configs): ``d2-bnstats-estimate-evalnorm --help`` and this script's ``--help`` list the same flags.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a clone's script: the lab (bnstats_lab) and the plug-in of this clone
    sys.path.insert(0, ROOT)

import bnstats_lab  # noqa: E402,F401  (registers the fashion-scenes data sets; pre-trained backbone hints)
from d2_bnstats.cli.estimate_evalnorm import command, main, parse_args  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(command())
