#!/usr/bin/env python
"""Cost of a PreciseBN pass as a ratio to plain training-mode forwards over the same images.

    python tools/benchmark_precise_bn.py --config-file configs/cpu/frcnn_r18_bn_2img.yaml --batches 10
    python tools/benchmark_precise_bn.py --config-file C --batches 20 --repeats 7 MODEL.WEIGHTS W

Target: ratio <= 1.2. The logic is in bnstats_lab.benchmark.precise_bn.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a clone's script: the lab (bnstats_lab) and the plug-in of this clone
    sys.path.insert(0, ROOT)

import dataclasses
import platform

import torch

import bnstats_lab  # noqa: F401  (registers the norms and data sets)
from bnstats_lab.benchmark.precise_bn import benchmark_precise_bn, load_batches
from d2_bnstats.cli.args import ToolArgumentParser
from d2_bnstats.d2.train import load_config
from d2_bnstats.d2.trainer import Trainer
from d2_bnstats.outputs import write_json


def main(argv=None):
    p = ToolArgumentParser(description=__doc__, config_required=True, register_coco=False)
    p.add_argument("--batches", type=int, default=10, help="training batches per pass (SOLVER.IMS_PER_BATCH images each)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes of each method (default 5)")
    p.add_argument("--no-fvcore", action="store_true", help="do not time fvcore's update_bn_stats")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable CPU times on a shared machine)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="CPU time of this process (default) or wall time")
    p.add_argument("--json", help="write the result as JSON here")
    args = p.parse_args(argv)
    if args.batches < 1 or args.repeats < 1:
        p.error("--batches and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config_file, args.opts)
    model = Trainer.build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        from detectron2.checkpoint import DetectionCheckpointer

        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    batches = load_batches(cfg, args.batches)
    result = benchmark_precise_bn(model, batches, repeats=args.repeats, fvcore=not args.no_fvcore,
                                  progress=lambda m: print(m, file=sys.stderr), clock=args.clock)
    print(f"# PreciseBN benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {args.clock} time, {args.config_file}")
    print(f"{result.images} images in {result.batches} batches, {result.layers} layers with population statistics")
    print(f"plain training-mode forwards (no grad): {result.forward_s:.3f} s")
    print(f"PreciseBN:                              {result.precise_bn_s:.3f} s  -> {result.ratio:.3f}x "
          f"(spread {result.spread:.0%}; target <= 1.2x)")
    if result.backbone_only_s is not None:
        print(f"PreciseBN, backbone only (the hooks):   {result.backbone_only_s:.3f} s  -> {result.backbone_only_ratio:.3f}x")
    if result.fvcore_s is not None:
        print(f"fvcore update_bn_stats (stock hook):    {result.fvcore_s:.3f} s  -> {result.fvcore_ratio:.3f}x")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)) or ".", exist_ok=True)
        write_json(args.json, dataclasses.asdict(result), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
