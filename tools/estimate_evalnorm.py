#!/usr/bin/env python
"""Offline EvalNorm: estimate alpha_hat, beta_hat for a model trained with BatchNorm.

    python tools/estimate_evalnorm.py --config-file configs/cpu/frcnn_r18_bn_2img.yaml \\
        MODEL.WEIGHTS output/cpu/frcnn_r18_bn_2img/model_final.pth
    python tools/estimate_evalnorm.py --config-file C --images 1000 --ims-per-batch 2 --output out/en.pth MODEL.WEIGHTS W

Converts the model's BN layers to EvalNorm, estimates alpha_hat, beta_hat on training images with
everything else frozen, writes the checkpoint (default OUTPUT_DIR/model_evalnorm.pth) and a config
next to it that evaluates it, and prints the per-layer table. Models whose norms keep other
statistics (MABN, GhostBN, RoIShuffleBN, ...) are refused; so is an --output that would overwrite
MODEL.WEIGHTS or the config file. Both files are written atomically. Then:

    python tools/train_net.py --eval-only --config-file OUTPUT_DIR/model_evalnorm.yaml

The logic is in d2_bnstats.d2.evalnorm_offline.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a clone's script: the lab (bnstats_lab) and the plug-in of this clone
    sys.path.insert(0, ROOT)

import argparse

import bnstats_lab  # noqa: F401  (registers the norms and data sets)
from detectron2.utils.logger import setup_logger

from d2_bnstats.d2.evalnorm_offline import check_estimation_inputs, format_evalnorm_table, run_offline_estimation
from d2_bnstats.d2.datasets import add_register_coco_argument, check_datasets, register_coco_from_args
from d2_bnstats.d2.train import input_errors, load_config
from d2_bnstats.outputs import OutputIsInputError, OutputWriteError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", "--config", dest="config_file", required=True, metavar="FILE",
                   help="the config the model was trained with")
    p.add_argument("--images", type=int, default=500, help="training images to estimate on (default 500)")
    p.add_argument("--ims-per-batch", type=int, default=None,
                   help="images per batch = the images per process in training (default SOLVER.IMS_PER_BATCH)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate, decayed linearly to 0 (default 0.01)")
    p.add_argument("--include-frozen", action="store_true",
                   help="also convert FrozenBatchNorm2d layers (only for BN folded into FrozenBN after training)")
    p.add_argument("--output", default=None, help="checkpoint to write (default OUTPUT_DIR/model_evalnorm.pth)")
    add_register_coco_argument(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides, e.g. MODEL.WEIGHTS path")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with input_errors("estimate_evalnorm"):  # everything read and written, before any work
        register_coco_from_args(args.register_coco)
        cfg = load_config(args.config_file, args.opts)
        check_datasets(cfg)
        check_estimation_inputs(cfg, args.images, args.ims_per_batch, args.output, args.config_file)
    setup_logger(name="d2_bnstats")
    setup_logger(name="detectron2", abbrev_name="d2")
    try:
        result = run_offline_estimation(
            cfg,
            num_images=args.images,
            lr=args.lr,
            ims_per_batch=args.ims_per_batch,
            include_frozen=args.include_frozen,
            output=args.output,
            config_file=args.config_file,
        )
    except (OutputIsInputError, OutputWriteError) as e:
        raise SystemExit(f"estimate_evalnorm: {e}")
    print(f"# EvalNorm offline estimation: {len(result['layers'])} layers, {result['iterations']} iterations")
    print(format_evalnorm_table(result["rows"]))
    first, last = result["history"][0], result["history"][-1]
    print(f"# mean L_aux per layer: first iteration {first:.4f}, last iteration {last:.4f}")
    print(f"# checkpoint: {result['checkpoint']}")
    print(f"# evaluate:   python tools/train_net.py --eval-only --config-file {result['config']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
