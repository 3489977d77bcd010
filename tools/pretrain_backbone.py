#!/usr/bin/env python
"""Pre-train the detectron2 ResNet backbone on Fashion-MNIST (the stand-in for ImageNet) and write a
checkpoint that MODEL.WEIGHTS loads like an ImageNet one.

    python tools/pretrain_backbone.py                                   # R-18, BN -> output/pretrain/r18_fashion_mnist.pkl
    python tools/pretrain_backbone.py --norm GN                         # -> output/pretrain/r18_gn_fashion_mnist.pkl
    python tools/pretrain_backbone.py --weight-centralization           # MABN variant -> r18_fashion_mnist_wc.pkl
    python tools/pretrain_backbone.py --depth 50 --config-file configs/Base-RCNN-FPN.yaml
    python tools/pretrain_backbone.py --max-iter 3 --train-subset 256 --test-subset 64 --output /tmp/x.pkl  # smoke run
    make pretrain                                                       # the three checkpoints the CPU configs use

The logic is in bnstats_lab.pretrain; docs/configs.md describes the recipe and the checkpoint format.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a clone's script: the lab (bnstats_lab) and the plug-in of this clone
    sys.path.insert(0, ROOT)

import argparse
import logging

import torch

import bnstats_lab  # noqa: F401  (registers the norms)
from d2_bnstats.cli.args import ToolArgumentParser
from d2_bnstats.outputs import write_json
from bnstats_lab.pretrain import DEFAULT_CONFIG, PretrainOptions, default_checkpoint_path, pretrain


def parse_sides(text):
    parts = text.split("-")
    if len(parts) == 1:
        return int(parts[0]), int(parts[0])
    if len(parts) == 2:
        return int(parts[0]), int(parts[1])
    raise argparse.ArgumentTypeError(f"expected SIDE or MIN-MAX, got {text!r}")


def argument_parser():
    defaults = PretrainOptions()
    p = ToolArgumentParser(description=__doc__, register_coco=False, config_default=DEFAULT_CONFIG,
                           config_help="detection config whose backbone is pre-trained (default: %(default)s)")
    p.add_argument("--depth", type=int, default=None, help="ResNet depth (18, 34, 50, ...); default: the config's")
    p.add_argument("--norm", default=defaults.norm, help="backbone norm during pre-training (default: %(default)s)")
    p.add_argument("--weight-centralization", action="store_true",
                   help="convs compute with centralised filters; the checkpoint holds centralised weights (MABN)")
    p.add_argument("--output", default=None,
                   help="checkpoint path (default: output/pretrain/r{depth}[_{norm}]_fashion_mnist[_wc].pkl)")
    p.add_argument("--epochs", type=float, default=defaults.epochs, help="passes over Fashion-MNIST (default %(default)s)")
    p.add_argument("--max-iter", type=int, default=None, help="iterations (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=defaults.base_lr, help="base learning rate (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="default %(default)s")
    p.add_argument("--warmup-iters", type=int, default=defaults.warmup_iters,
                   help="linear learning-rate warm-up iterations (default %(default)s)")
    p.add_argument("--image-size", type=int, default=defaults.image_size, help="canvas side in pixels")
    p.add_argument("--train-sides", type=parse_sides, default=defaults.train_sides, help="item side MIN-MAX in training")
    p.add_argument("--test-side", type=int, default=defaults.test_side, help="item side in pixels at test (default %(default)s)")
    p.add_argument("--train-subset", type=int, default=None, help="use the first N training images")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default %(default)s)")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-period", type=int, default=defaults.log_period, help="iterations between log lines (default %(default)s)")
    p.add_argument("--json", default=None, help="also write the summary as JSON here")
    return p


def main(argv=None):
    args = argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    options = PretrainOptions(
        config_file=args.config_file,
        opts=tuple(args.opts),
        depth=args.depth,
        norm=args.norm,
        weight_centralization=args.weight_centralization,
        image_size=args.image_size,
        train_sides=tuple(args.train_sides),
        test_side=args.test_side,
        batch_size=args.batch_size,
        epochs=args.epochs,
        max_iter=args.max_iter,
        base_lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_iters=args.warmup_iters,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        seed=args.seed,
        log_period=args.log_period,
    )
    output = args.output
    if output is None:
        from bnstats_lab.pretrain import backbone_config

        depth = int(backbone_config(options).MODEL.RESNETS.DEPTH)
        output = default_checkpoint_path(depth, args.norm, args.weight_centralization)
    summary = pretrain(options, output)
    print(f"Fashion-MNIST test accuracy: {summary['test_accuracy']:.4f}  ->  {output}")
    if args.json:
        write_json(args.json, summary, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
