#!/usr/bin/env python
"""Train or evaluate a detectron2 model with d2_bnstats norms (detectron2's tools/train_net.py).

    python tools/train_net.py --config configs/cpu/frcnn_r18_bn_2img.yaml
    python tools/train_net.py --config-file C --num-gpus 2 SOLVER.MAX_ITER 100   # 2 processes (gloo on CPU)
    python tools/train_net.py --config-file C MODEL.WEIGHTS output/model_final.pth --eval-only

The same command as ``d2-bnstats-train`` (module :mod:`d2_bnstats.cli.train`), with the lab's data sets registered
(fashion-scenes, for the CPU configs): ``d2-bnstats-train --help`` and this script's ``--help`` list the same flags.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a clone's script: the lab (bnstats_lab) and the plug-in of this clone
    sys.path.insert(0, ROOT)

import bnstats_lab  # noqa: E402,F401  (registers the fashion-scenes data sets; pre-trained backbone hints)
from d2_bnstats.cli.train import command, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(command())
