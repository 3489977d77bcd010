"""Offline EvalNorm: estimate alpha_hat, beta_hat for a model that was trained with BatchNorm.

EvalNorm paper, section 3.4 ("Offline estimation"): given a trained model, minimise the auxiliary
loss L_aux over training data with everything else frozen. Here:

1. :func:`convert_to_evalnorm` replaces the model's BatchNorm layers by
   :class:`~d2_bnstats.layers.evalnorm.EvalNorm2d` with the same affine parameters and running
   statistics. Only layers whose running statistics are what EvalNorm assumes -- the moving average
   of the mean and variance of the very batches the layer normalised with in training -- are
   accepted: ``nn.BatchNorm2d`` (detectron2's "BN"), ``nn.SyncBatchNorm``, detectron2's
   ``NaiveSyncBatchNorm`` and the layer types of every registered norm declared with
   ``statistics="batch"`` (the plug-in's ``SyncBatchNorm2d``) (:func:`batch_statistics_types`,
   exact types). Any other layer that keeps running statistics is refused, naming its type, even
   when it subclasses ``nn.BatchNorm2d``: MABN's ``running_var`` is a second moment R, GhostBN and
   RoIShuffleBN normalise with other groups than the batch the statistics describe.
   ``FrozenBatchNorm2d`` layers are left alone by default: a layer that was frozen in
   training always normalised with its fixed statistics, so it has no train/test gap and the
   batch-normalised target of L_aux is not what the network saw. ``include_frozen=True`` converts
   them too (for a model whose BN layers were folded into FrozenBN *after* training).
2. :func:`estimate_evalnorm` runs the model in training mode on training batches (each layer sees
   the input distribution it saw in training, batch statistics included) with every parameter but
   alpha_hat, beta_hat frozen and the running statistics untouched (``track_running_stats`` is off
   during the pass, the standard BN mechanism), and minimises ``loss_evalnorm`` with Adam and a
   linearly decaying learning rate; the model's projection hook
   (:func:`~d2_bnstats.layers.evalnorm_projection.attach_projection_hook`, attached if it has none,
   and kept) holds alpha_hat, beta_hat in [0, 1]. Afterwards each layer's ``norm_batch_size`` is the
   mean batch it saw (for modes "rule"/"exact"). Nothing else in the model changes (tested bit for
   bit).
3. :func:`run_offline_estimation` does both from a detectron2 config and writes a checkpoint and
   a config for evaluating it (norm keys BN -> EvalNorm); ``tools/estimate_evalnorm.py`` is its CLI.
   Before any work it refuses outputs that are its inputs (the weights, the config file) and checks
   that the written config builds every converted layer as EvalNorm (otherwise the estimate would be
   dropped when the checkpoint loads); both files are written atomically (:mod:`d2_bnstats.outputs`).
"""
import contextlib
import logging
import math
import os
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_train_loader
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from detectron2.utils.events import EventStorage
from tabulate import tabulate
from torch import nn

from ..layers.evalnorm import EvalNorm2d, evalnorm_layers, evalnorm_state
from ..layers.evalnorm_aux import EVALNORM_LOSS_KEY, AuxLossHook
from ..layers.evalnorm_projection import attach_projection_hook
from ..outputs import check_output_file, check_outputs, save_torch, write_yaml
from ..registry import declared_norms
from .build import build_model
from .config import NORM_KEYS, get_config_value

logger = logging.getLogger(__name__)

# norm names of layers that normalise with batch statistics in training -> their EvalNorm name
BN_TO_EVALNORM = {
    "BN": "EvalNorm",
    "SyncBN": "SyncEvalNorm",
    "nnSyncBN": "SyncEvalNorm",
    "naiveSyncBN": "SyncEvalNorm",
    "naiveSyncBN_N": "SyncEvalNorm",
}


# detectron2's and torch's layers whose running statistics are the moving average of the mean and
# variance of the batches they normalised with in training (exact types: a subclass may keep
# something else, as MABN does)
DETECTRON2_BATCH_STATISTICS_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, NaiveSyncBatchNorm)


def batch_statistics_types() -> Tuple[type, ...]:
    """Those, and the layer types of every registered norm declared with ``statistics="batch"``."""
    declared = tuple(t for norm in declared_norms() if norm.statistics == "batch" for t in norm.layer_types)
    return DETECTRON2_BATCH_STATISTICS_TYPES + declared


def _is_frozen_bn(module: nn.Module) -> bool:
    return isinstance(module, FrozenBatchNorm2d)


def _bn_with_statistics(module: nn.Module) -> bool:
    """A 2-d batch norm (any subclass) keeping running statistics, EvalNorm itself excluded."""
    return (
        isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm))
        and not isinstance(module, EvalNorm2d)
        and module.track_running_stats
        and module.running_mean is not None
    )


def _convertible(module: nn.Module, include_frozen: bool) -> bool:
    if type(module) in batch_statistics_types():
        return _bn_with_statistics(module)
    return include_frozen and _is_frozen_bn(module)


def _refused(module: nn.Module) -> bool:
    """A batch-norm subclass whose running statistics do not mean what EvalNorm assumes."""
    return _bn_with_statistics(module) and type(module) not in batch_statistics_types()


def refused_layers(model: nn.Module) -> Dict[str, List[str]]:
    """{layer type: names} of the batch-norm layers of ``model`` whose running statistics EvalNorm
    cannot start from (module docstring, step 1)."""
    refused: Dict[str, List[str]] = {}
    for name, module in model.named_modules():
        if _refused(module):
            refused.setdefault(type(module).__name__, []).append(name or "(the model itself)")
    return refused


def refusal_reason(model: nn.Module) -> Optional[str]:
    """Why offline estimation refuses ``model`` (its layers of other statistics, by type), or None."""
    refused = refused_layers(model)
    return _refusal_message(refused) if refused else None


def _refusal_message(refused: Dict[str, List[str]]) -> str:
    kinds = "; ".join(
        f"{kind} ({len(names)} layer{'s' if len(names) != 1 else ''}, e.g. {names[0]})" for kind, names in refused.items()
    )
    return (
        f"cannot estimate EvalNorm for layers of type {kinds}: their running statistics are not the "
        "moving average of the batch mean and variance they normalised with, which EvalNorm assumes. "
        "Offline estimation accepts BN, SyncBN (torch's, detectron2's naive and the plug-in's) and, with "
        "--include-frozen, FrozenBN; for other norms train with EvalNorm instead"
    )


def _to_evalnorm(module: nn.Module, layer_kwargs: dict) -> EvalNorm2d:
    frozen = _is_frozen_bn(module)
    affine = True if frozen else module.affine
    momentum = 0.1 if frozen else module.momentum
    ref = module.running_mean
    new = EvalNorm2d(module.num_features, eps=module.eps, momentum=momentum, affine=affine, **layer_kwargs)
    new.to(device=ref.device)
    with torch.no_grad():
        if affine:
            new.weight.copy_(module.weight)
            new.bias.copy_(module.bias)
        new.running_mean.copy_(module.running_mean)
        new.running_var.copy_(module.running_var)
        if not frozen and module.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(module.num_batches_tracked)
    if not frozen and affine:
        new.weight.requires_grad_(module.weight.requires_grad)
        new.bias.requires_grad_(module.bias.requires_grad)
    new.train(module.training)
    return new


def convert_to_evalnorm(model: nn.Module, include_frozen: bool = False, **layer_kwargs) -> List[str]:
    """Replace BN layers of ``model`` in place by EvalNorm2d (see module docstring); returns the
    names of the converted layers. ``layer_kwargs`` go to EvalNorm2d (e.g. ``mode``). ValueError,
    before anything is changed, if the model has layers whose statistics EvalNorm cannot use."""
    reason = refusal_reason(model)
    if reason:
        raise ValueError(reason)
    converted = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if _convertible(child, include_frozen):
                setattr(parent, child_name, _to_evalnorm(child, layer_kwargs))
                converted.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if _convertible(model, include_frozen):
        raise ValueError("the model itself is a BN layer; wrap it in a module to convert it")
    return converted


def estimate_evalnorm(
    model: nn.Module,
    data: Iterable,
    num_iters: int,
    lr: float = 0.01,
    forward: Optional[Callable[[nn.Module, object], object]] = None,
    log_period: int = 20,
) -> List[float]:
    """Learn alpha_hat, beta_hat of every EvalNorm2d in ``model`` on ``num_iters`` batches of
    ``data`` with everything else frozen (module docstring); returns L_aux per iteration.

    ``forward(model, batch)`` runs the model (default ``model(batch)``); its output is ignored
    except through the layers' auxiliary losses.
    """
    layers = evalnorm_layers(model)
    if not layers:
        raise ValueError("the model has no EvalNorm2d layer; convert it first (convert_to_evalnorm)")
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    forward = forward or (lambda m, batch: m(batch))
    attach_projection_hook(model)
    trainable = [p for _, layer in layers for p in (layer.alpha_hat, layer.beta_hat)]
    batch_sizes: Dict[str, List[int]] = {name: [] for name, _ in layers}
    history: List[float] = []
    with _only_alpha_beta_train(model, layers, trainable, batch_sizes):
        optimizer = torch.optim.Adam(trainable, lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 - it / num_iters)
        iterator: Iterator = iter(data)
        for it in range(num_iters):
            loss = _evalnorm_loss(forward(model, next(iterator)), layers)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            history.append(float(loss.detach()) / len(layers))
            if log_period and (it + 1) % log_period == 0:
                logger.info("EvalNorm offline estimation: iteration %d/%d, mean L_aux per layer %.4f", it + 1, num_iters, history[-1])
    with torch.no_grad():
        for name, layer in layers:
            if batch_sizes[name]:
                layer.norm_batch_size.fill_(sum(batch_sizes[name]) / len(batch_sizes[name]))
    return history


@contextlib.contextmanager
def _only_alpha_beta_train(model: nn.Module, layers, trainable, batch_sizes: Dict[str, List[int]]):
    """Inside: the model in training mode with only ``trainable`` requiring grad, the EvalNorm layers
    learning on batch statistics without touching their buffers (BN's own ``track_running_stats``
    switch), the auxiliary-loss hook attached, and each layer's batch sizes appended to
    ``batch_sizes``. Everything is restored on exit."""
    ids = {id(p) for p in trainable}
    saved_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    saved_tracking = {name: (layer.track_running_stats, layer.learn) for name, layer in layers}
    was_training = model.training
    handles = [
        layer.register_forward_pre_hook(lambda m, inp, name=name: batch_sizes[name].append(int(inp[0].shape[0])))
        for name, layer in layers
    ]
    hook = AuxLossHook(model, weight=1.0, key=EVALNORM_LOSS_KEY)
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
        for _, layer in layers:
            layer.track_running_stats = False
            layer.learn = True
        model.train()
        yield
    finally:
        hook.remove()
        for h in handles:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(saved_grad[name])
        for name, layer in layers:
            layer.track_running_stats, layer.learn = saved_tracking[name]
            layer.aux_loss = None
        model.train(was_training)


def _evalnorm_loss(output, layers) -> torch.Tensor:
    """``loss_evalnorm`` of a model's output, or the sum of the layers' L_aux if the model does not
    return a dict of losses."""
    if isinstance(output, dict) and EVALNORM_LOSS_KEY in output:
        return output[EVALNORM_LOSS_KEY]
    losses = [layer.aux_loss for _, layer in layers if layer.aux_loss is not None]
    if not losses:
        raise RuntimeError("no EvalNorm layer ran in training mode during the forward pass")
    return torch.stack([l.reshape(()) for l in losses]).sum()


def format_evalnorm_table(model_or_rows) -> str:
    """Per-layer table: alpha_hat, beta_hat, recorded B and the rule of thumb 1/B^2."""
    rows = evalnorm_state(model_or_rows) if isinstance(model_or_rows, nn.Module) else model_or_rows
    table = []
    for r in rows:
        b = r["batch_size"]
        table.append(
            [r["layer"], f"{r['alpha_hat']:.4f}", f"{r['beta_hat']:.4f}", "" if b is None else f"{b:g}", "" if b is None else f"{min(1.0, 1 / b ** 2):.4f}"]
        )
    return tabulate(table, headers=["layer", "alpha_hat", "beta_hat", "B", "1/B^2"], tablefmt="github")


def evalnorm_eval_config(cfg, weights: str, include_frozen: bool = False):
    """A copy of ``cfg`` that builds the converted model: BN-type norm keys -> EvalNorm names (and
    "FrozenBN" -> "EvalNorm" with ``include_frozen``), MODEL.WEIGHTS = ``weights``,
    BNSTATS.EVALNORM.MODE = "learned"."""
    names = dict(BN_TO_EVALNORM, **({"FrozenBN": "EvalNorm"} if include_frozen else {}))
    out = cfg.clone()
    out.defrost()
    for key in NORM_KEYS:
        value = get_config_value(out, key)
        if isinstance(value, str) and value in names:
            node = out
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = names[value]
    out.MODEL.WEIGHTS = weights
    out.BNSTATS.EVALNORM.MODE = "learned"
    return out


def check_eval_config_builds_evalnorm(eval_cfg, converted: List[str]) -> None:
    """ValueError if the model of ``eval_cfg`` does not have an EvalNorm2d at every ``converted``
    layer: loading the estimate into it would silently drop alpha_hat, beta_hat there."""
    built = dict(build_model(eval_cfg).named_modules())
    lost = [f"{name} ({type(built[name]).__name__ if name in built else 'absent'})"
            for name in converted if not isinstance(built.get(name), EvalNorm2d)]
    if lost:
        raise ValueError(
            f"the config written for evaluation would not build {len(lost)} converted layers as EvalNorm, "
            f"e.g. {', '.join(lost[:3])}, so their estimate would be dropped at load. A frozen stage "
            "(MODEL.BACKBONE.FREEZE_AT) is rebuilt as FrozenBN: leave its layers out (no --include-frozen) "
            "or pass MODEL.BACKBONE.FREEZE_AT 0"
        )


def _output_paths(cfg, output: Optional[str], config_file: Optional[str]) -> Tuple[str, str]:
    """(checkpoint, evaluation config) to write; refuses paths that are inputs or the same file."""
    output = output or os.path.join(cfg.OUTPUT_DIR, "model_evalnorm.pth")
    config_path = os.path.splitext(output)[0] + ".yaml"
    check_outputs(
        {"the output checkpoint": output, "the output config": config_path},
        {"MODEL.WEIGHTS": cfg.MODEL.WEIGHTS, "the config file": config_file},
    )
    return output, config_path


def _prepared_config(cfg, ims_per_batch: Optional[int], num_images: int):
    if num_images < 1:
        raise ValueError(f"the number of images must be >= 1, got {num_images}")
    cfg = cfg.clone()
    cfg.defrost()
    if ims_per_batch is not None:
        if ims_per_batch < 1:
            raise ValueError(f"images per batch must be >= 1, got {ims_per_batch}")
        cfg.SOLVER.IMS_PER_BATCH = int(ims_per_batch)
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("MODEL.WEIGHTS is empty: give the trained model to estimate EvalNorm for (MODEL.WEIGHTS path)")
    return cfg


def check_estimation_inputs(
    cfg, num_images: int, ims_per_batch: Optional[int] = None, output: Optional[str] = None, config_file: Optional[str] = None
) -> Tuple[str, str]:
    """What :func:`run_offline_estimation` refuses before it loads anything, checked without work:
    the numbers of images, ``MODEL.WEIGHTS``, the outputs (not an input, not each other, their
    folder writable). Returns (checkpoint, evaluation config) to write; raises ``ValueError``."""
    _prepared_config(cfg, ims_per_batch, num_images)
    output, config_path = _output_paths(cfg, output, config_file)
    check_output_file(output, "the output checkpoint")
    return output, config_path


def run_offline_estimation(
    cfg,
    num_images: int = 500,
    lr: float = 0.01,
    ims_per_batch: Optional[int] = None,
    include_frozen: bool = False,
    output: Optional[str] = None,
    config_file: Optional[str] = None,
) -> dict:
    """Load ``cfg.MODEL.WEIGHTS`` into ``cfg``'s model, convert its BN layers, estimate alpha_hat,
    beta_hat on ``num_images`` training images (batches of ``ims_per_batch``: the images per process
    used in training; default ``cfg.SOLVER.IMS_PER_BATCH``), and write ``output`` (default
    ``OUTPUT_DIR/model_evalnorm.pth``) plus ``<output>.yaml``, a config that evaluates it.
    ``config_file``: the file ``cfg`` was read from, never overwritten (neither is MODEL.WEIGHTS).

    Returns {"checkpoint", "config", "layers", "rows", "history", "iterations"}.
    """
    cfg = _prepared_config(cfg, ims_per_batch, num_images)
    batch = cfg.SOLVER.IMS_PER_BATCH
    output, config_path = _output_paths(cfg, output, config_file)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    converted = convert_to_evalnorm(model, include_frozen=include_frozen)
    if not converted:
        raise ValueError(
            "the model has no BatchNorm layer to convert (norm keys: FrozenBN/GN/...?); "
            "pass include_frozen=True (--include-frozen) to convert FrozenBatchNorm2d layers"
        )
    eval_cfg = evalnorm_eval_config(cfg, os.path.abspath(output), include_frozen=include_frozen)
    check_eval_config_builds_evalnorm(eval_cfg, converted)
    iters = math.ceil(num_images / batch)
    logger.info("EvalNorm offline estimation: %d layers, %d iterations of %d images", len(converted), iters, batch)
    with EventStorage(0):  # detectron2's heads log to the storage in training mode
        history = estimate_evalnorm(model, build_detection_train_loader(cfg), iters, lr=lr)
    meta = {"source": cfg.MODEL.WEIGHTS, "images": iters * batch, "ims_per_batch": batch, "lr": lr, "layers": converted}
    save_torch({"model": model.state_dict(), "evalnorm_offline": meta}, output)
    write_yaml(config_path, eval_cfg.dump())
    return {
        "checkpoint": output,
        "config": config_path,
        "layers": converted,
        "rows": evalnorm_state(model),
        "history": history,
        "iterations": iters,
    }
