#!/usr/bin/env python
"""Generate the config matrix (leaf YAMLs and the table in configs/README.md) from one table.

    python tools/make_configs.py            # write/refresh the generated leaves and the README table
    python tools/make_configs.py --check    # exit 1 and list what differs (what the tests check)
    python tools/make_configs.py --list     # print the cells: file, norm, setting, images per GPU
    python tools/make_configs.py --rescale configs/frcnn_r50_bn_2img_finetune.yaml --gpus 4
                                            # KEY VALUE overrides for 4 GPUs at the same images/GPU,
                                            # quoted for a shell: paste them after tools/train_net.py ...

The table is bnstats_lab/config_matrix.py (norms x settings x images per GPU x architecture); writing
and checking: bnstats_lab/config_generate.py.
Hand-written configs (config_matrix.EXTERNAL) are never overwritten.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a clone's script: the lab (bnstats_lab) and the plug-in of this clone
    sys.path.insert(0, ROOT)

import argparse
import shlex

import bnstats_lab  # noqa: F401  (the plug-in's norms, the fashion-scenes data sets)
from bnstats_lab import config_matrix as cm
from bnstats_lab.config_describe import gpus_for, load_config_unchecked
from bnstats_lab.config_generate import generate
from bnstats_lab.config_scaling import rescale_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=REPO, help="repository root (default: this checkout)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="compare only; exit 1 when anything is out of date")
    g.add_argument("--list", action="store_true", help="print the matrix cells")
    g.add_argument("--rescale", metavar="CONFIG", help="print the KEY VALUE overrides (quoted for a shell) that run "
                                                       "CONFIG on --gpus processes")
    p.add_argument("--gpus", type=int, default=None, help="with --rescale: number of processes")
    p.add_argument("--images-per-gpu", type=int, default=None, help="with --rescale: images per process")
    args = p.parse_args(argv)

    if args.rescale:
        if not args.gpus:
            p.error("--rescale needs --gpus")
        cfg = load_config_unchecked(args.rescale)
        opts = rescale_overrides(cfg, args.gpus, args.images_per_gpu,
                                 config_gpus=gpus_for(args.rescale, args.root))
        print(" ".join(shlex.quote(opt) for opt in opts))  # pasted into a shell: (120000, 160000) quoted
        return 0
    if args.list:
        for cell in cm.cells():
            owner = "" if cell.generated else "  (hand-written)"
            print(f"{cell.path}  {cell.norm.key}  {cell.setting.key}  {cell.images_per_gpu} img/GPU{owner}")
        return 0
    report = generate(args.root, write=not args.check)
    for rel in report.written:
        print("wrote", rel)
    for rel in report.removed:
        print("removed", rel)
    for problem in report.problems:
        print("PROBLEM:", problem, file=sys.stderr)
    if not args.check:
        print(f"{len([c for c in cm.cells() if c.generated])} generated leaves; "
              f"{len(report.written)} written, {len(report.removed)} removed")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
