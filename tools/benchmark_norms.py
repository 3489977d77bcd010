#!/usr/bin/env python
"""Per-layer speed of every registered norm as ratios to nn.BatchNorm2d (train) and FrozenBatchNorm2d (eval).

    python tools/benchmark_norms.py                        # all norms, backbone and head shapes
    python tools/benchmark_norms.py --norms BN EvalNorm --repeats 9 --json out.json
    python tools/benchmark_norms.py --quick                # tiny shapes (smoke run)
    python tools/benchmark_norms.py --device cuda --r50    # on the GPU, R-50-FPN shapes at 800 px, 2 images

The logic is in bnstats_lab.benchmark.layers.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a clone's script: the lab (bnstats_lab) and the plug-in of this clone
    sys.path.insert(0, ROOT)

import argparse
import dataclasses
import platform

import torch

import d2_bnstats
from d2_bnstats.outputs import write_json
from bnstats_lab.benchmark.layers import BACKBONE_SHAPES, HEAD_SHAPES, QUICK_SHAPES, R50_SHAPES, benchmark_norms, format_table


def parse_shape(text):
    try:
        n, c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is NxCxHxW, e.g. 2x64x128x128; got {text!r}")
    return n, c, h, w


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--norms", nargs="+", help=f"norm names (default: all: {', '.join(d2_bnstats.available_norms())})")
    p.add_argument("--shapes", nargs="+", type=parse_shape, help="NxCxHxW shapes (default: backbone and head shapes)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions (smoke run)")
    p.add_argument("--r50", action="store_true", help="R-50-FPN shapes at 800 px, 2 images (the GPU models)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: layers and tensors on that device")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per norm and shape (default 5)")
    p.add_argument("--iters", type=int, default=10, help="calls timed per round: training forward+backward, or inference forward (default 10)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--guard", choices=("call", "step"), default="call",
                   help="call: each layer checks its own running-statistics update (default); step: the checks "
                        "off, as under the trainers' once-per-step guard (its cost: --step-guard)")
    p.add_argument("--step-guard", metavar="ARCH", choices=("frcnn", "mrcnn", "frcnn_r50"),
                   help="instead of the layers: a training step of ARCH (frcnn, mrcnn, frcnn_r50) with the "
                        "non-finite guard per call, per step and off")
    p.add_argument("--step-guard-norm", default="EvalNorm", help="the norm of --step-guard's model (default EvalNorm)")
    args = p.parse_args(argv)
    if args.norms:
        for name in args.norms:
            d2_bnstats.registry.check_norm_name(name, where="--norms")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step_guard:
        from bnstats_lab.benchmark.step_guard import benchmark_step_guard, format_report

        d2_bnstats.registry.check_norm_name(args.step_guard_norm, where="--step-guard-norm")
        result = benchmark_step_guard(args.step_guard, norm=args.step_guard_norm, repeats=args.repeats,
                                      iters=2 if args.quick else 3, progress=lambda m: print(m, file=sys.stderr))
        print(f"# non-finite guard in a training step: torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(format_report(result))
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            write_json(args.json, result, indent=1)
        return 0
    default_shapes = R50_SHAPES if args.r50 else BACKBONE_SHAPES + HEAD_SHAPES
    shapes = args.shapes or (QUICK_SHAPES if args.quick else default_shapes)
    repeats, iters = (2, 2) if args.quick else (args.repeats, args.iters)
    rows = benchmark_norms(args.norms, shapes, repeats=repeats, iters=iters, progress=lambda m: print(m, file=sys.stderr),
                           device=args.device, guard=args.guard)
    where = f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    if cuda:
        where = f"{torch.cuda.get_device_name(torch.device(args.device))}, CUDA {torch.version.cuda}, cuDNN benchmark on"
    print(f"# per-layer benchmark: torch {torch.__version__}, {where}")
    print(format_table(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        record = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                  "rows": [dataclasses.asdict(r) for r in rows]}
        if cuda:
            record.update(device=args.device, gpu=torch.cuda.get_device_name(torch.device(args.device)),
                          cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        write_json(args.json, record, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
