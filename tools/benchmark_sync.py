#!/usr/bin/env python
"""Per-layer cost of synchronised/shuffled norms in a multi-process run, as ratios to nn.BatchNorm2d.

    python tools/benchmark_sync.py                                   # 2 processes (gloo on CPU): SyncBN, RoIShuffleBN
    python tools/benchmark_sync.py --num-procs 2 --norms SyncBN RoIShuffleBN GhostBN --json out.json
    python tools/benchmark_sync.py --shapes 256x128x7x7,200x128x7x7   # one NxCxHxW per process
    # whole training iterations of config variants, interleaved on the same batches:
    python tools/benchmark_sync.py --train-config configs/cpu/frcnn_r18_syncbn_roishuffle_2img.yaml \
        --variant MODEL.ROI_BOX_HEAD.NORM=BN --variant MODEL.ROI_BOX_HEAD.NORM=RoIShuffleBN --iters 20

The logic is in bnstats_lab.benchmark.distributed (the single-process benchmark is tools/benchmark_norms.py).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a clone's script: the lab (bnstats_lab) and the plug-in of this clone
    sys.path.insert(0, ROOT)

import argparse
import dataclasses

import torch

import bnstats_lab  # noqa: F401  (registers the fashion-scenes data sets)
import d2_bnstats
from bnstats_lab.benchmark.distributed import (
    DEFAULT_SHAPES,
    benchmark_in_process,
    benchmark_training_in_process,
    format_table,
    format_training_table,
)
from d2_bnstats.d2.launch import launch
from d2_bnstats.cli.args import ToolArgumentParser
from d2_bnstats.outputs import write_json


def parse_shapes(text):
    try:
        return tuple(tuple(int(v) for v in part.lower().split("x")) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes are NxCxHxW per process, comma-separated, e.g. 256x128x7x7,200x128x7x7; got {text!r}")


def _worker(args):
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    if args.train_config:
        variants = [[kv for item in v.split(",") for kv in item.split("=", 1)] for v in args.variants]
        rows = benchmark_training_in_process(args.train_config, variants, iters=args.iters, warmup=args.warmup, opts=args.opts)
        table = format_training_table(rows)
    else:
        rows = benchmark_in_process(args.norms, args.shapes or DEFAULT_SHAPES, repeats=args.repeats, iters=args.iters)
        table = format_table(rows)
    if dist.get_rank() == 0:
        print(f"# {dist.get_world_size()} processes ({dist.get_backend()}), torch {torch.__version__}, {args.threads} thread(s) each")
        print(table)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            write_json(args.json, {"world_size": dist.get_world_size(), "rows": [dataclasses.asdict(r) for r in rows]}, indent=1)


def main(argv=None):
    p = ToolArgumentParser(description=__doc__, config=False, register_coco=False)
    p.add_argument("--num-procs", type=int, default=2, help="processes (gloo on CPU; default 2)")
    p.add_argument("--norms", nargs="+", default=["SyncBN", "RoIShuffleBN"],
                   help="norms timed layer by layer (default SyncBN RoIShuffleBN)")
    p.add_argument("--shapes", nargs="+", type=parse_shapes, help="per shape set: NxCxHxW for each process, comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per norm and shape (default 5)")
    p.add_argument("--iters", type=int, default=10, help="iterations per round (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="with --train-config: untimed iterations first")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--train-config", help="time whole training iterations of this config's --variants instead")
    p.add_argument("--variant", dest="variants", action="append",
                   help="with --train-config, repeatable: one variant as KEY=VALUE[,KEY=VALUE...]; times are compared "
                   "to the first (default: MODEL.ROI_BOX_HEAD.NORM=BN, then =RoIShuffleBN)")
    args = p.parse_args(argv)
    if not args.variants:
        args.variants = ["MODEL.ROI_BOX_HEAD.NORM=BN", "MODEL.ROI_BOX_HEAD.NORM=RoIShuffleBN"]
    for v in args.variants:
        if any("=" not in item for item in v.split(",")):
            p.error(f"--variant {v!r}: expected KEY=VALUE[,KEY=VALUE...]")
    for name in args.norms:
        d2_bnstats.registry.check_norm_name(name, where="--norms")
    if args.num_procs < 2:
        p.error("--num-procs must be at least 2 (one process: tools/benchmark_norms.py)")
    launch(_worker, args.num_procs, args=(args,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
