#!/usr/bin/env python
"""End-to-end benchmark of every norm: training s/iter and peak memory (ratio to BN), inference
s/image (ratio to FrozenBN, every EvalNorm mode), PreciseBN cost over n images (ratio to plain
forwards, linear fit). Prints markdown tables and writes them (report.md), JSON (results.json) and a
PNG plot (ratios.png) into --output. KEY VALUE overrides (anywhere on the line) apply to every model.

    python tools/benchmark.py                          # full run (see docs/benchmarks.md), output/bench/
    python tools/benchmark.py --tiny                   # smoke run: tiny sizes, < 60 s
    python tools/benchmark.py --archs frcnn --ims-per-batch 2 --norms BN GN --no-memory --no-precise-bn
    python tools/benchmark.py --precise-bn-images 100 1000 10000   # the full PreciseBN sizes (~1 h more)
    python tools/benchmark.py --device cuda --archs frcnn_r50 --ims-per-batch 2 \
        --norms BN FrozenBN EvalNorm MABN GN GhostBN --no-precise-bn   # on a GPU (synthetic 800 px images)

Norms that are not registered in this installation are reported as "not available". The logic is
in the package bnstats_lab.benchmark (method: the docstring of its module e2e).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a clone's script: the lab (bnstats_lab) and the plug-in of this clone
    sys.path.insert(0, ROOT)

import dataclasses

import bnstats_lab  # noqa: F401  (registers the norms and data sets)
from bnstats_lab.benchmark.e2e import TINY, BenchmarkSettings, run_benchmark
from bnstats_lab.benchmark.models import ARCH_CONFIGS, TRAIN_NORMS
from bnstats_lab.benchmark.report import format_report, plot_report
from d2_bnstats.cli.args import ToolArgumentParser
from d2_bnstats.outputs import write_json, write_text


def build_settings(args) -> BenchmarkSettings:
    s = BenchmarkSettings(**TINY) if args.tiny else BenchmarkSettings()
    for field in ("archs", "ims_per_batch", "norms", "memory_norms", "precise_bn_images"):
        v = getattr(args, field)
        if v:
            s = dataclasses.replace(s, **{field: tuple(v)})
    for field in ("repeats", "iters", "warmup", "num_batches", "memory_iters", "inference_images",
                  "precise_bn_repeats", "threads"):
        v = getattr(args, field)
        if v is not None:
            s = dataclasses.replace(s, **{field: v})
    if args.opts:
        if len(args.opts) % 2:
            raise SystemExit(f"config overrides must come as KEY VALUE pairs, got {args.opts}")
        s = dataclasses.replace(s, opts=tuple(s.opts) + tuple(args.opts))
    clock = args.clock or ("wall" if args.device.startswith("cuda") else "cpu")
    return dataclasses.replace(s, clock=clock, training=not args.no_training, memory=not args.no_memory,
                               inference=not args.no_inference,
                               precise_bn=not args.no_precise_bn, device=args.device)


def main(argv=None):
    p = ToolArgumentParser(description=__doc__, config=False, register_coco=False)
    p.add_argument("--tiny", "--smoke", dest="tiny", action="store_true", help="tiny sizes (smoke run, < 60 s)")
    p.add_argument("--archs", nargs="+", choices=sorted(ARCH_CONFIGS), help="default: frcnn mrcnn")
    p.add_argument("--ims-per-batch", nargs="+", type=int, help="default: 2 8")
    p.add_argument("--norms", nargs="+", help="default: " + " ".join(TRAIN_NORMS))
    p.add_argument("--repeats", type=int, help="interleaved rounds (default 5)")
    p.add_argument("--iters", type=int, help="training iterations per norm per round (default 2)")
    p.add_argument("--warmup", type=int, help="untimed training iterations per norm first (default 2)")
    p.add_argument("--num-batches", type=int, help="training batches read into memory and cycled (default 4)")
    p.add_argument("--memory-norms", nargs="+", help="norms whose memory is measured (default: --norms)")
    p.add_argument("--memory-iters", type=int, help="training iterations of each memory process (default 3)")
    p.add_argument("--inference-images", type=int, help="images per inference round, the same for every model (default 32)")
    p.add_argument("--precise-bn-images", nargs="+", type=int, help="n values (default 100 300 1000; the full sizes: 100 1000 10000)")
    p.add_argument("--precise-bn-repeats", type=int, help="repetitions at the smallest n (default 3; fewer at larger n)")
    p.add_argument("--no-training", action="store_true", help="skip the training timing")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-inference", action="store_true", help="skip the inference timing")
    p.add_argument("--no-precise-bn", action="store_true", help="skip the PreciseBN cost measurement")
    p.add_argument("--clock", choices=("wall", "cpu"), default=None,
                   help="this process's CPU time (default on CPU; steady on a shared machine) or wall time "
                        "(default and required on CUDA)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda[:N]: MODEL.DEVICE of every model (see docs/benchmarks.md, GPU)")
    p.add_argument("--threads", type=int, help="torch threads (default 1)")
    p.add_argument("--output", default="output/bench", help="folder for results.json, report.md and ratios.png")
    args = p.parse_args(argv)
    if args.no_training and args.no_memory and args.no_inference and args.no_precise_bn:
        p.error("--no-training, --no-memory, --no-inference and --no-precise-bn together leave nothing to "
                "measure: keep at least one of the four parts")
    for name in args.norms or ():
        if not isinstance(name, str) or not name:
            p.error(f"--norms: bad norm name {name!r}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: torch sees no CUDA device")
        if args.clock == "cpu":
            p.error("--clock cpu cannot time GPU work; on CUDA the wall clock is used")
    settings = build_settings(args)
    result = run_benchmark(settings, progress=lambda m: print(m, file=sys.stderr, flush=True))
    os.makedirs(args.output, exist_ok=True)
    json_path = os.path.join(args.output, "results.json")
    write_json(json_path, result, indent=1)
    report = format_report(result)
    md_path = write_text(os.path.join(args.output, "report.md"), report + "\n")
    png = plot_report(result, os.path.join(args.output, "ratios.png"))
    print(report)
    print(f"\nwrote {json_path}, {md_path}" + (f" and {png}" if png else " (no plot: matplotlib missing)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
