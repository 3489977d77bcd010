#!/usr/bin/env python
"""Train or evaluate a detectron2 LazyConfig (Python config) with d2_bnstats' checks, transforms and hooks.

    python tools/lazyconfig_train_net.py --config-file configs/lazy/cpu/faster_rcnn_R_18_FPN_fashion_evalnorm.py
    python tools/lazyconfig_train_net.py --config-file C --num-gpus 2 train.max_iter=100   # 2 processes (gloo on CPU)
    python tools/lazyconfig_train_net.py --config-file C --eval-only train.init_checkpoint=output/model_final.pth

The logic is in d2_bnstats.d2.lazy.train.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a clone's script: the lab (bnstats_lab) and the plug-in of this clone
    sys.path.insert(0, ROOT)

import bnstats_lab  # noqa: F401  (registers the norms and data sets; pre-trained backbone hints)
from d2_bnstats.d2.lazy.train import LazyConfigError, argument_parser, run

if __name__ == "__main__":
    try:
        run(argument_parser().parse_args())
    except LazyConfigError as e:  # a run that cannot start: one line naming the file, override or field
        raise SystemExit(f"lazyconfig_train_net: {e}")
