#!/usr/bin/env python
"""Train or evaluate a detectron2 LazyConfig (Python config) with d2_bnstats' checks, transforms and hooks.

    python tools/lazyconfig_train_net.py --config-file configs/lazy/cpu/faster_rcnn_R_18_FPN_fashion_evalnorm.py
    python tools/lazyconfig_train_net.py --config-file C train.max_iter=100 --num-gpus 2   # 2 processes (gloo on CPU)
    python tools/lazyconfig_train_net.py --config-file C --eval-only train.init_checkpoint=output/model_final.pth

The same command as ``d2-bnstats-lazy-train`` (module :mod:`d2_bnstats.cli.lazy_train`), with the lab's data sets registered
(fashion-scenes, for the CPU configs): ``d2-bnstats-lazy-train --help`` and this script's ``--help`` list the same flags.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a clone's script: the lab (bnstats_lab) and the plug-in of this clone
    sys.path.insert(0, ROOT)

import bnstats_lab  # noqa: E402,F401  (registers the fashion-scenes data sets; pre-trained backbone hints)
from d2_bnstats.cli.lazy_train import command, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(command())
