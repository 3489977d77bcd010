"""The logic behind ``tools/train_net.py``: config set-up, training and evaluation.

Follows detectron2's ``tools/train_net.py`` conventions (``--config-file``, ``--num-gpus``,
``--eval-only``, ``--resume``, ``KEY VALUE`` overrides, here in any order with the flags), callable from Python:

    from d2_bnstats.d2.train import argument_parser, run
    run(argument_parser().parse_args(["--config", "configs/cpu/frcnn_r18_bn_2img.yaml"]))
"""
import contextlib
import logging
import os

from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..outputs import check_output_folder
from .checkpoint import AtomicCheckpointer, CheckpointError, resume_checkpoint
from ..model_zoo import resolve_config_path
from .config import check_batch_config, check_norm_keys, resolve_device
from ..cli.args import ToolArgumentParser
from .datasets import DatasetError, check_datasets, register_coco_from_args
from .launch import launch_from_args
from .plugin import add_bnstats_config, check_bnstats_config
from .population import prepare_for_evaluation
from .trainer import Trainer
from .weights import check_weights_file

logger = logging.getLogger("d2_bnstats")


def argument_parser(epilog=None):
    """The training command's arguments: detectron2's ``tools/train_net.py`` flags, ``--register-coco``,
    flags and ``KEY VALUE`` overrides in any order (:mod:`d2_bnstats.cli.args`)."""
    return ToolArgumentParser(description="Train or evaluate a detectron2 model with d2_bnstats norms "
                                          "(train, then COCO-evaluate; --eval-only evaluates MODEL.WEIGHTS).",
                              epilog=epilog, launch=True, training_flags=True)


def load_config(config_file: str, opts=(), world_size: int = 1):
    """Build and check a config: detectron2 defaults + BNSTATS keys + file + ``KEY VALUE`` opts.
    ``config_file`` may name a packaged config as ``bnstats://NAME`` (:mod:`d2_bnstats.model_zoo`)."""
    cfg = get_cfg()
    add_bnstats_config(cfg)
    if config_file:
        config_file = resolve_config_path(config_file)
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file {config_file} does not exist")
        cfg.merge_from_file(config_file)
    if opts:
        if len(opts) % 2:
            raise ValueError(f"overrides must come as KEY VALUE pairs, got an odd list: {list(opts)}")
        cfg.merge_from_list(list(opts))
    check_config(cfg, world_size)
    return cfg


def check_config(cfg, world_size: int = 1) -> None:
    """The checks of :func:`load_config` on a built config (cfg must be mutable): device fallback,
    norm names, total batch over ``world_size`` processes, every BNSTATS value, MODEL.WEIGHTS file exists
    and is a checkpoint (its header: see :mod:`d2_bnstats.d2.weights`)."""
    resolve_device(cfg)
    check_norm_keys(cfg)
    check_batch_config(cfg, world_size)
    check_bnstats_config(cfg)
    check_weights_file(cfg.MODEL.WEIGHTS)


def setup(args):
    register_coco_from_args(getattr(args, "register_coco", ()))  # in every process: launch spawns them
    cfg = load_config(args.config_file, args.opts, world_size=comm.get_world_size())
    cfg.freeze()
    # here, not in check_config: loading a config must not need its data sets built; a run does.
    # Before default_setup, which prints the config and writes config.yaml into OUTPUT_DIR
    check_datasets(cfg)
    check_output_folder(cfg.OUTPUT_DIR, "OUTPUT_DIR")
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2_bnstats", abbrev_name="bnstats")
    return cfg


def evaluate_checkpoint(cfg, resume: bool = False, trainer_cls=Trainer):
    """The ``--eval-only`` path: build the model, load ``MODEL.WEIGHTS`` (or the last checkpoint of
    ``OUTPUT_DIR`` with ``resume``), apply FrozenBN/PreciseBN as the config asks, COCO-evaluate."""
    model = trainer_cls.build_model(cfg)
    checkpoint = AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    prepare_for_evaluation(cfg, model, checkpoint, trainer_cls=trainer_cls)
    results = trainer_cls.test(cfg, model)
    if comm.is_main_process():
        verify_results(cfg, results)
    return results


def main(args):
    cfg = setup(args)
    if args.eval_only:
        return evaluate_checkpoint(cfg, resume=args.resume)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def check_arguments(args) -> None:
    """Check everything a run reads and writes in the launching process, before anything is printed
    at length, written or started: ``--register-coco``, the config (file, overrides, values,
    ``MODEL.WEIGHTS``), every data set it names (json, boxes, categories, image files),
    ``OUTPUT_DIR`` (a folder that can be created and written) and, with ``--resume``, the last
    checkpoint. A failure ends in one line naming the file or key, not in a traceback from a
    worker. Raises ``SystemExit`` with that line."""
    with input_errors("train_net"):
        register_coco_from_args(getattr(args, "register_coco", ()))
        cfg = load_config(args.config_file, args.opts, world_size=args.num_gpus * args.num_machines)
        check_datasets(cfg)
        check_output_folder(cfg.OUTPUT_DIR, "OUTPUT_DIR")
        if args.resume:
            resume_checkpoint(cfg.OUTPUT_DIR)  # a damaged last checkpoint without a readable one to fall back on


@contextlib.contextmanager
def input_errors(tool: str):
    """Within the block, an error of the input checks (a file, key, value, data set, output folder or
    checkpoint refused: ``OSError``, ``ValueError``, ``KeyError``, yacs' ``AssertionError``,
    ``DatasetError``, ``CheckpointError``) ends the tool with one line, ``<tool>: <message>``
    (``SystemExit``), instead of a traceback."""
    try:
        yield
    except (OSError, ValueError, KeyError, AssertionError, DatasetError, CheckpointError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # str(KeyError) adds quotes
        raise SystemExit(f"{tool}: {' '.join(str(message).split())}") from None


def run(args):
    """Check the arguments, then launch ``main`` in ``args.num_gpus`` processes (gloo on CPU)."""
    check_arguments(args)
    print("Command Line Args:", args)  # after the checks: a run that cannot start says one line
    return launch_from_args(main, args)
