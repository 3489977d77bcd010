#!/usr/bin/env python
"""Export a model trained with the plug-in's norms for deployment (TorchScript or ONNX).

    python tools/deploy_model.py --config-file configs/cpu/frcnn_r18_mabn_2img.yaml \\
        MODEL.WEIGHTS output/cpu/frcnn_r18_mabn_2img/model_final.pth --output deploy/ --fold

The same command as ``d2-bnstats-deploy`` (module :mod:`d2_bnstats.cli.deploy`), with the lab's data sets registered
(fashion-scenes, for the CPU configs): ``d2-bnstats-deploy --help`` and this script's ``--help`` list the same flags.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a clone's script: the lab (bnstats_lab) and the plug-in of this clone
    sys.path.insert(0, ROOT)

import bnstats_lab  # noqa: E402,F401  (registers the fashion-scenes data sets; pre-trained backbone hints)
from d2_bnstats.cli.deploy import argument_parser, command, main, parse_args  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(command())
