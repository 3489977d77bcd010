#!/usr/bin/env python
"""Train or evaluate a detectron2 model with d2_bnstats norms.

    python tools/train_net.py --config configs/cpu/frcnn_r18_bn_2img.yaml
    python tools/train_net.py --config-file C --num-gpus 2 SOLVER.MAX_ITER 100   # 2 processes (gloo on CPU)
    python tools/train_net.py --config-file C --eval-only MODEL.WEIGHTS output/model_final.pth

The logic is in d2_bnstats.d2.train.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a clone's script: the lab (bnstats_lab) and the plug-in of this clone
    sys.path.insert(0, ROOT)

import bnstats_lab  # noqa: F401  (registers the norms and data sets; pre-trained backbone hints)
from d2_bnstats.d2.train import argument_parser, run

if __name__ == "__main__":
    run(argument_parser().parse_args())
