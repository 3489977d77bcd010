"""The logic behind ``tools/lazyconfig_train_net.py``: detectron2's LazyConfig training script with the plug-in.

detectron2's ``tools/lazyconfig_train_net.py`` (``--config-file``, ``--num-gpus``, ``--eval-only``,
``--resume``, ``path.key=value`` overrides, here in any order with the flags), with the plug-in's calls where they belong:

- **Loading** (:func:`load_config`): ``LazyConfig.load`` + ``LazyConfig.apply_overrides``, then the
  plug-in's checks over the run's processes (:func:`~.model.check_config`, ``train.init_checkpoint``
  a checkpoint). A config file that is missing or cannot be loaded, an override that cannot be
  applied and a value the checks refuse are a :class:`LazyConfigError` naming the file, the override
  or the field. :func:`run` loads and checks once in the launching process, data sets included
  (:func:`check_lazy_datasets`), so that such errors come before any process starts.
- **Training** (:func:`do_train`): the model from :func:`~.model.build_lazy_model` (norm options,
  EvalNorm/MABN/per-level transforms); the plug-in's hooks (:func:`~.loop.build_hooks`: FrozenBN,
  PreciseBN before every evaluation, the replica check) after ``LRScheduler`` and before the
  checkpointer and ``EvalHook``, the statistics-health metrics before the writers;
  ``bnstats.INIT`` once ``train.init_checkpoint`` is loaded (:func:`~.loop.after_loading_weights`);
  checkpoints that hold the optimizer and grad-scaler state on every detectron2 version (as the
  yacs path's trainer, :func:`d2_bnstats.d2.trainer.checkpoint_training_state`); a CPU-compatible
  DistributedDataParallel for ``--num-gpus N`` on CPU (N processes over gloo,
  :func:`d2_bnstats.d2.launch.launch`); a training image that fails to load names its file
  (:class:`~d2_bnstats.d2.datasets.FileNamingMapper`).
- **Evaluation** (:func:`do_test`, ``--eval-only``): :func:`~.loop.evaluate` (batch statistics at test
  with ``bnstats.TEST_BATCH_STATS``); ``--eval-only`` loads ``train.init_checkpoint`` (or, with
  ``--resume``, the last checkpoint of ``train.output_dir``) and runs
  :func:`~.loop.prepare_for_evaluation` (FrozenBN again, PreciseBN) first.

Callable from Python::

    from d2_bnstats.d2.lazy.train import argument_parser, run
    run(argument_parser().parse_args(["--config-file", "configs/lazy/cpu/faster_rcnn_R_18_FPN_fashion.py",
                                      "train.max_iter=10"]))
"""
import logging
import os
from typing import List, Optional, Sequence

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    create_ddp_model,
    default_setup,
    default_writers,
    hooks,
)
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from omegaconf import DictConfig, ListConfig, OmegaConf

from ...outputs import OutputFolderError, check_output_folder
from ..checkpoint import AtomicCheckpointer, CheckpointError, resume_checkpoint
from ...model_zoo import resolve_config_path
from ...cli.args import LAZY, ToolArgumentParser
from ..datasets import DatasetError, FileNamingMapper, check_datasets, register_coco_from_args
from ..launch import launch_from_args
from ..losses import DetectionLossHook
from ..statistics_health import StatisticsHealthHook
from ..trainer import checkpoint_training_state
from ..weights import check_weights_file
from .loop import after_loading_weights, build_hooks, evaluate, prepare_for_evaluation
from .model import build_lazy_model, check_config
from .view import LazyView

logger = logging.getLogger("d2_bnstats")

# the fields this script reads besides ``model`` (detectron2's configs/common/train.py and its data
# loader configs define them)
TRAINING_FIELDS = (
    "dataloader.train", "optimizer", "lr_multiplier", "train.output_dir", "train.init_checkpoint",
    "train.max_iter", "train.amp.enabled", "train.checkpointer", "train.eval_period", "train.log_period",
    "train.device",
)
EVALUATION_FIELDS = ("dataloader.test", "train.output_dir", "train.init_checkpoint", "train.device")
# where a LazyConfig names its data sets (``L(get_detection_dataset_dicts)(names=...)``), by the
# yacs key that d2_bnstats.d2.datasets.check_datasets reads
DATASET_FIELDS = {"DATASETS.TRAIN": "dataloader.train.dataset.names", "DATASETS.TEST": "dataloader.test.dataset.names"}


class LazyConfigError(ValueError):
    """A run that cannot start: its config file is missing or cannot be loaded, an override cannot be
    applied, a value is refused by the checks or a data set it names is missing or malformed. The
    message is one line and names the file, the override or the field."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def argument_parser(epilog=None):
    """detectron2's ``default_argument_parser`` flags with ``--config`` (alias of ``--config-file``) and
    ``--register-coco NAME JSON IMAGE_ROOT``, as ``tools/train_net.py``'s; ``path.key=value`` overrides in
    any order with the flags (:mod:`d2_bnstats.cli.args`)."""
    return ToolArgumentParser(description="Train or evaluate a detectron2 LazyConfig (Python config) with "
                                          "d2_bnstats' checks, transforms and hooks.",
                              epilog=epilog, overrides=LAZY, launch=True, training_flags=True,
                              launch_help={"--resume": "continue from the last checkpoint in train.output_dir "
                                                       "(else start from train.init_checkpoint)",
                                           "--eval-only": "only evaluate train.init_checkpoint (or with --resume "
                                                          "the last checkpoint of train.output_dir)"})


# --------------------------------------------------------------------------------------------------
# loading and checking


def _load_file(config_file: str):
    if not config_file:
        raise LazyConfigError("no config file: pass --config-file FILE (a LazyConfig .py or .yaml)")
    try:
        config_file = resolve_config_path(config_file)  # bnstats://NAME: a packaged config
    except FileNotFoundError as e:
        raise LazyConfigError(str(e)) from None
    if not os.path.isfile(config_file):
        raise LazyConfigError(f"config file {config_file} does not exist")
    try:
        cfg = LazyConfig.load(config_file)
    except SyntaxError as e:
        cause = e.__cause__ if isinstance(e.__cause__, SyntaxError) else e
        where = f" (line {cause.lineno}: {cause.msg})" if cause.lineno else ""
        raise LazyConfigError(f"config file {config_file} has a syntax error{where}") from e
    except (ImportError, ValueError, OSError) as e:
        raise LazyConfigError(f"config file {config_file} cannot be loaded: {type(e).__name__}: {e}") from e
    if not isinstance(cfg, DictConfig) or "model" not in cfg:
        yacs = isinstance(cfg, DictConfig) and "MODEL" in cfg
        raise LazyConfigError(
            f"config file {config_file} is not a LazyConfig: it defines no `model`"
            + ("; it looks like a yacs config, which tools/train_net.py runs" if yacs else "")
        )
    return cfg


def apply_overrides(cfg, opts: Sequence[str], config_file: str = ""):
    """``LazyConfig.apply_overrides`` one ``path.key=value`` at a time; one that cannot be applied is a
    :class:`LazyConfigError` naming it."""
    for override in opts or ():
        if override.startswith("--"):
            raise LazyConfigError(
                f"{override} is a flag, not a path.key=value override"
            )
        if "=" not in override:
            raise LazyConfigError(
                f"override {override!r} is not path.key=value: a LazyConfig takes e.g. train.max_iter=100 "
                "(KEY VALUE pairs are for yacs configs)"
            )
        try:
            cfg = LazyConfig.apply_overrides(cfg, [override])
        except Exception as e:  # detectron2 versions raise KeyError, ValueError or hydra's parse errors
            reason = e.args[0] if isinstance(e, KeyError) and e.args else e  # str(KeyError) adds quotes
            raise LazyConfigError(
                f"override {override!r} cannot be applied to {config_file or 'the config'}: {reason}"
            ) from e
    return cfg


def _missing(cfg, fields: Sequence[str]) -> List[str]:
    return [field for field in fields if OmegaConf.select(cfg, field, default=None) is None]


def load_config(config_file: str, opts: Sequence[str] = (), world_size: Optional[int] = None, eval_only: bool = False):
    """Load a LazyConfig, apply ``path.key=value`` overrides and run the plug-in's checks for a run of
    ``world_size`` processes (default: this run's). Errors: :class:`LazyConfigError`."""
    cfg = apply_overrides(_load_file(config_file), opts, config_file)
    missing = _missing(cfg, EVALUATION_FIELDS if eval_only else TRAINING_FIELDS)
    if missing:
        raise LazyConfigError(
            f"config file {config_file} lacks {', '.join(missing)}, which "
            f"{'evaluation' if eval_only else 'training'} reads (detectron2's configs/common/train.py and "
            "configs/common/data/ define them)"
        )
    try:
        view = check_config(cfg, world_size)
        check_weights_file(view.cfg.MODEL.get("WEIGHTS", ""), label="train.init_checkpoint")
    except (ValueError, RuntimeError, OSError) as e:  # the checks' errors name LazyConfig fields
        raise LazyConfigError(f"{config_file}: {e}") from e
    return cfg


def _names(cfg, field: str) -> List[str]:
    names = OmegaConf.select(cfg, field, default=None)
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names) if isinstance(names, (list, tuple, ListConfig)) else []


def check_lazy_datasets(cfg, splits: Sequence[str] = ("DATASETS.TRAIN", "DATASETS.TEST")) -> None:
    """:func:`d2_bnstats.d2.datasets.check_datasets` for the data sets a LazyConfig names in
    ``dataloader.{train,test}.dataset.names`` (``splits``: which of the two), errors naming those
    fields. Data sets given otherwise (a custom ``dataset``) are not checked ahead."""
    view = LazyView(cfg)
    view.fields.update({key: DATASET_FIELDS[key] for key in splits})
    names = {key: _names(cfg, DATASET_FIELDS[key]) if key in splits else [] for key in DATASET_FIELDS}
    target = OmegaConf.create({"DATASETS": {key.split(".")[1]: value for key, value in names.items()}})
    with view.errors():
        check_datasets(target)


def _dataset_splits(cfg, eval_only: bool) -> List[str]:
    """Training reads both splits; evaluation the test split, and the training split for PreciseBN."""
    if not eval_only or LazyView(cfg).cfg.TEST.PRECISE_BN.ENABLED:
        return ["DATASETS.TRAIN", "DATASETS.TEST"]
    return ["DATASETS.TEST"]


def check_run(args):
    """Everything a run checks before it starts, in this process, for ``args.num_gpus`` x
    ``args.num_machines`` processes: ``--register-coco``, the config, its data sets,
    ``train.output_dir`` (a folder that can be created and written) and, with ``--resume``, the last
    checkpoint. Returns the config; errors: :class:`LazyConfigError`."""
    try:
        register_coco_from_args(getattr(args, "register_coco", ()))
    except DatasetError as e:
        raise LazyConfigError(str(e)) from e
    world_size = args.num_gpus * args.num_machines
    cfg = load_config(args.config_file, args.opts, world_size=world_size, eval_only=args.eval_only)
    try:
        check_lazy_datasets(cfg, _dataset_splits(cfg, args.eval_only))
    except DatasetError as e:
        raise LazyConfigError(f"{args.config_file}: {e}") from e
    try:
        check_output_folder(cfg.train.output_dir, "train.output_dir")
        if args.resume:
            resume_checkpoint(cfg.train.output_dir)
    except (OutputFolderError, CheckpointError) as e:
        raise LazyConfigError(f"{args.config_file}: {e}") from e
    return cfg


def setup(args):
    """In every process: ``--register-coco``, the config (:func:`load_config`), the data sets (checked
    once per process and file) and ``train.output_dir``, then detectron2's ``default_setup``
    (loggers, ``config.yaml`` in ``train.output_dir``, seed) and the plug-in's logger. Returns the
    config."""
    register_coco_from_args(getattr(args, "register_coco", ()))  # in every process: launch spawns them
    cfg = load_config(args.config_file, args.opts, eval_only=args.eval_only)
    # before default_setup, which prints the config and writes config.yaml into train.output_dir
    check_lazy_datasets(cfg, _dataset_splits(cfg, args.eval_only))
    check_output_folder(cfg.train.output_dir, "train.output_dir")
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="d2_bnstats", abbrev_name="bnstats")
    return cfg


# --------------------------------------------------------------------------------------------------
# training and evaluation


def build_train_loader(cfg, **changes):
    """``cfg.dataloader.train`` with ``changes`` to its arguments, its mapper wrapped in
    :class:`FileNamingMapper` (a mapping error names the image's file)."""
    node = cfg.dataloader.train
    call = {key: node[key] for key in node.keys()}  # keeps the config's interpolations
    call.update(changes)
    if call.get("mapper") is not None:
        call["mapper"] = FileNamingMapper(instantiate(call["mapper"]))
    return instantiate(call)


def precise_bn_loader_factory(cfg):
    """PreciseBN's batches: :func:`build_train_loader` with ``num_workers=0``, as detectron2's
    PreciseBN hook builds its loader."""
    changes = {"num_workers": 0} if "num_workers" in cfg.dataloader.train else {}
    return lambda: build_train_loader(cfg, **changes)


def do_test(cfg, model):
    """COCO evaluation of ``model`` on ``cfg.dataloader.test`` (:func:`~.loop.evaluate`); None
    without ``cfg.dataloader.evaluator``."""
    return evaluate(cfg, model)


def _ddp_options(cfg) -> dict:
    options = dict(OmegaConf.to_container(cfg.train.ddp) if "ddp" in cfg.train else {})
    # detectron2 gives DDP this process's GPU; a CPU module takes none
    if comm.get_world_size() > 1 and torch.device(cfg.train.device).type == "cpu":
        options.setdefault("device_ids", None)
    return options


def do_train(args, cfg):
    """detectron2's ``do_train`` of ``lazyconfig_train_net.py`` with the plug-in (module docstring).
    Returns the results of the last evaluation ({} if none ran)."""
    model = build_lazy_model(cfg)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = build_train_loader(cfg)

    model = create_ddp_model(model, **_ddp_options(cfg))
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = AtomicCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    added = checkpoint_training_state(
        checkpointer, trainer.state_dict(), {"optimizer": optimizer, "grad_scaler": getattr(trainer, "grad_scaler", None)}
    )
    if added:
        logger.info("checkpoints also hold: %s (this detectron2's trainer does not save them)", ", ".join(added))

    last_results = {}

    def evaluate_and_keep():
        results = do_test(cfg, model)
        last_results.clear()
        last_results.update(results or {})
        return results

    main_process = comm.is_main_process()
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            *build_hooks(cfg, model, precise_bn_loader_factory(cfg)),  # before the checkpointer and EvalHook
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main_process else None,
            hooks.EvalHook(cfg.train.eval_period, evaluate_and_keep),
            StatisticsHealthHook(),  # before the writers: its counts go out with the same step's metrics
            DetectionLossHook(),  # before the writers, as above
            hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
            if main_process
            else None,
        ]
    )

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    resumed = bool(args.resume and checkpointer.has_checkpoint())
    after_loading_weights(cfg, model, resumed=resumed)
    # a checkpoint stores the iteration that just finished
    start_iter = trainer.iter + 1 if resumed else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return dict(last_results)


def evaluate_checkpoint(cfg, resume: bool = False):
    """The ``--eval-only`` path: build the model, load ``train.init_checkpoint`` (or the last
    checkpoint of ``train.output_dir`` with ``resume``), FrozenBN/PreciseBN as the config asks
    (:func:`~.loop.prepare_for_evaluation`), evaluate (:func:`do_test`)."""
    model = build_lazy_model(cfg)
    model.to(cfg.train.device)
    checkpointer = AtomicCheckpointer(model, save_dir=cfg.train.output_dir)
    if not cfg.train.init_checkpoint and not (resume and checkpointer.has_checkpoint()):
        logger.warning("--eval-only without train.init_checkpoint: evaluating the model as initialized")
    checkpoint = checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    prepare_for_evaluation(cfg, model, checkpoint, build_loader=precise_bn_loader_factory(cfg))
    return do_test(cfg, model)


def main(args):
    """One process of the run: set up, then train or (``--eval-only``) evaluate. Returns the
    evaluation results."""
    cfg = setup(args)
    if args.eval_only:
        results = evaluate_checkpoint(cfg, resume=args.resume)
        if comm.is_main_process():
            print(results)
        return results
    return do_train(args, cfg)


def run(args):
    """Check the run in this process (:func:`check_run`; errors: :class:`LazyConfigError`), then
    launch :func:`main` in ``args.num_gpus`` processes per machine (gloo on CPU)."""
    check_run(args)
    print("Command Line Args:", args)  # after the checks: a run that cannot start says one line
    return launch_from_args(main, args)
