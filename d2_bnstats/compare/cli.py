"""The command line of ``tools/compare_bn_stats.py``: arguments, set-up, launch.

The parser is every command's (:class:`d2_bnstats.cli.args.ToolArgumentParser`: detectron2's launch and
config flags as ``tools/train_net.py`` takes them, ``KEY VALUE`` overrides and flags in any order, e.g.
``--config-file C MODEL.WEIGHTS W --output O``), with the comparison's own flags (:data:`TOOL_OPTIONS`).

The comparison's folder may be a training run's own (``--output output/run``): :func:`setup` saves
its config as ``compare_config.yaml`` and logs to ``compare_log.txt``, never to the run's
``config.yaml`` or ``log.txt`` as detectron2's ``default_setup`` would.
"""
import argparse
import copy
import logging
import os

import torch
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from ..cli.args import ToolArgumentParser
from ..d2.datasets import check_datasets
from ..d2.launch import launch_from_args
from ..d2.datasets import register_coco_from_args
from ..d2.train import input_errors, load_config
from ..outputs import check_output_folder, write_yaml
from .comparison import build_strategies, check_inputs, compare, strategy_options
from .plots import plot_paths
from .registry import registered_strategies

# --resume and --eval-only as tools/train_net.py has them (the same arguments run either tool)
LAUNCH_HELP = {
    "--resume": "accepted as in tools/train_net.py; the comparison loads MODEL.WEIGHTS",
    "--eval-only": "accepted as in tools/train_net.py (the comparison only evaluates)",
}

TOOL_OPTIONS = (
    (("--output",), dict(default=None, help="output folder (default: OUTPUT_DIR/compare_bn_stats)")),
    (("--strategies",), dict(nargs="+", metavar="SPEC",
                             help="strategies to run (default: all): ema, precise_bn[:N], batch_stats[:K], "
                                  "evalnorm_learned, evalnorm_rule, evalnorm_exact, evalnorm_precise_bn[:N], "
                                  "evalnorm_offline[:N]")),
    (("--max-images",), dict(type=int, default=0, help="evaluate only the first N test images (0: all)")),
    (("--precise-bn-samples",), dict(type=int, default=1000,
                                     help="training images for the PreciseBN strategy (default 1000)")),
    (("--training-images-seed",), dict(type=int, default=0, metavar="S",
                                       help="seed of the training images PreciseBN and offline EvalNorm draw: the "
                                            "same images for every such strategy and every rerun (default 0)")),
    (("--bootstrap-rounds",), dict(type=int, default=1000, metavar="R",
                                   help="draws of the test images for each strategy's 95%% interval of its box AP "
                                        "difference to EMA, and the recommendation (0: skip; default 1000)")),
    (("--batch-sizes",), dict(nargs="+", default=None, metavar="K",
                              help="k for batch statistics at test (default: BNSTATS.TEST_BATCH_STATS.IMS_PER_BATCH)")),
    (("--discrepancy-images",), dict(type=int, default=8,
                                     help="test images for the train–test discrepancy report (0: skip; default 8)")),
    (("--hist-layers",), dict(nargs="+", default=(), metavar="LAYER",
                              help="layers (module names) to draw histograms for (default: first, middle, last)")),
    (("--no-plots",), dict(action="store_true", help="write no PNG")),
    (("--list-strategies",), dict(action="store_true", help="print the registered strategies and exit")),
)


def argument_parser() -> argparse.ArgumentParser:
    parser = ToolArgumentParser(description="COCO-evaluate one checkpoint under every inference-statistics strategy.",
                                epilog="Strategies: " + ", ".join(registered_strategies()),
                                launch=True, training_flags=True, launch_help=LAUNCH_HELP)
    for flags, kwargs in TOOL_OPTIONS:
        parser.add_argument(*flags, **kwargs)
    return parser


def parse_args(argv=None):
    """The tool's arguments; config overrides and flags may be intermixed, e.g.
    ``--config-file C MODEL.WEIGHTS W --output DIR`` (:mod:`d2_bnstats.cli.args`)."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.batch_sizes is not None:
        try:
            args.batch_sizes = [int(v) for v in args.batch_sizes]
        except ValueError:
            parser.error(f"--batch-sizes takes integers (images per test batch), got {args.batch_sizes}")
    return args


CONFIG_NAME = "compare_config.yaml"
LOG_NAME = "compare_log.txt"
LOGGERS = (("fvcore", None), ("detectron2", "d2"), ("d2_bnstats", "bnstats"))


def setup(args):
    """The set-up of ``tools/train_net.py`` (config loaded and checked, loggers, seed, data sets
    checked) for a comparison writing into ``OUTPUT_DIR``, with files of its own names: the config
    in ``compare_config.yaml``, the log in ``compare_log.txt`` (module docstring)."""
    register_coco_from_args(args.register_coco)
    cfg = load_config(args.config_file, args.opts, world_size=comm.get_world_size())
    cfg.freeze()
    check_datasets(cfg)  # before the folder, the log and the config file are made
    rank = comm.get_rank()
    if comm.is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    for name, abbrev in LOGGERS:
        setup_logger(os.path.join(cfg.OUTPUT_DIR, LOG_NAME), distributed_rank=rank, name=name, abbrev_name=abbrev)
    logger = logging.getLogger("d2_bnstats.compare")
    logger.info("Rank of current process: %d. World size: %d", rank, comm.get_world_size())
    logger.info("Command line arguments: %s", args)
    if comm.is_main_process():
        path = write_yaml(os.path.join(cfg.OUTPUT_DIR, CONFIG_NAME), cfg.dump())
        logger.info("Full config saved to %s", path)
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    if not args.eval_only:  # as detectron2's default_setup
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
    return cfg


def check_arguments(args) -> None:
    """Everything the comparison reads and writes, checked in the launching process before anything
    is written or started: ``--register-coco``, the config and ``MODEL.WEIGHTS``, the numbers of
    images, the strategies, the data sets, the output folder (not a file, creatable, writable). A failure ends the
    tool with one line naming the file, flag or key (``SystemExit``)."""
    with input_errors("compare_bn_stats"):
        register_coco_from_args(args.register_coco)
        cfg = load_config(args.config_file, args.opts, world_size=args.num_gpus * args.num_machines)
        for value, flag in ((args.max_images, "--max-images"), (args.discrepancy_images, "--discrepancy-images"),
                            (args.precise_bn_samples, "--precise-bn-samples"),
                            (args.bootstrap_rounds, "--bootstrap-rounds")):
            if value < 0:
                raise ValueError(f"{flag} = {value}: give a number >= 0 (0 = all images / skip)")
        check_inputs(cfg)
        batch_sizes = args.batch_sizes or [cfg.BNSTATS.TEST_BATCH_STATS.IMS_PER_BATCH]
        build_strategies(args.strategies, strategy_options(args.precise_bn_samples, batch_sizes, args.max_images,
                                                           args.training_images_seed))
        if args.output:
            check_output_folder(args.output, "--output")
        else:
            check_output_folder(os.path.join(cfg.OUTPUT_DIR, "compare_bn_stats"), "OUTPUT_DIR/compare_bn_stats")
        check_datasets(cfg)


def main(args) -> dict:
    """One process's comparison (under :func:`run`'s launch); prints the tables on the main process."""
    output = args.output or os.path.join(load_config(args.config_file, args.opts).OUTPUT_DIR, "compare_bn_stats")
    # OUTPUT_DIR = the comparison's folder: detectron2's evaluators write there
    args = copy.copy(args)
    args.opts = list(args.opts) + ["OUTPUT_DIR", output]
    cfg = setup(args)
    batch_sizes = args.batch_sizes or [cfg.BNSTATS.TEST_BATCH_STATS.IMS_PER_BATCH]
    summary = compare(
        cfg, output, strategies=args.strategies, max_images=args.max_images,
        precise_bn_samples=args.precise_bn_samples, training_images_seed=args.training_images_seed,
        bootstrap_rounds=args.bootstrap_rounds,
        batch_sizes=batch_sizes,
        discrepancy_images=args.discrepancy_images, hist_layers=args.hist_layers, plots=not args.no_plots,
    )
    if comm.is_main_process():
        print(summary["text"])
        print(f"\nwritten to {output}: compare.md, compare.json" + (", " + ", ".join(
            os.path.basename(p) for p in plot_paths(summary)) if summary["plots"] else ""))
    return summary


def run(args) -> int:
    """``--list-strategies``, or :func:`main` in ``args.num_gpus`` processes (gloo on CPU)."""
    if args.list_strategies:
        for kind in registered_strategies():
            print(kind)
        return 0
    check_arguments(args)
    launch_from_args(main, args)
    return 0
