#!/usr/bin/env python
"""Convert ordinary BN/FrozenBN weights into weights for an MABN config (see docs/mabn.md).

    python tools/convert_to_mabn.py --config-file configs/frcnn_r50_mabn_2img_finetune.yaml \\
        --weights detectron2://ImageNetPretrained/MSRA/R-50.pkl --output models/R-50-MSRA-MABN.pth

The same command as ``d2-bnstats-convert-mabn`` (module :mod:`d2_bnstats.cli.convert_mabn`), with the lab's data sets registered
(fashion-scenes, for the CPU configs): ``d2-bnstats-convert-mabn --help`` and this script's ``--help`` list the same flags.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a clone's script: the lab (bnstats_lab) and the plug-in of this clone
    sys.path.insert(0, ROOT)

import bnstats_lab  # noqa: E402,F401  (registers the fashion-scenes data sets; pre-trained backbone hints)
from d2_bnstats.cli.convert_mabn import command, main, parse_args  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(command())
