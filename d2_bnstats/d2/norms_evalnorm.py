"""detectron2 glue of EvalNorm: the norm names, config keys -> layer options, and the model
transform that makes detectron2's own training loop learn alpha_hat, beta_hat.

- "EvalNorm" and "SyncEvalNorm" (sync=True: the global batch over processes) are usable in every
  norm config key. Options come from ``cfg.BNSTATS.EVALNORM`` (see d2/config.py); outside a build
  the layer's defaults apply.
- The model transform "evalnorm" attaches :class:`d2_bnstats.layers.evalnorm.AuxLossHook` to the
  top of every model that has EvalNorm layers: in training the loss dict gets
  ``loss_evalnorm`` (AUX_LOSS_WEIGHT x the sum over layers of L_aux), which detectron2's
  SimpleTrainer back-propagates and logs with the other losses, and alpha_hat, beta_hat of every
  layer go to the EventStorage (metrics.json, TensorBoard) as ``evalnorm/<layer>/alpha|beta``.
- ``MODEL.BACKBONE.FREEZE_AT`` turns EvalNorm layers of frozen stages into FrozenBatchNorm2d, as it
  does for BN: a frozen layer always normalises with its fixed statistics, so it has no train/test
  gap for EvalNorm to correct.
"""
import torch

from ..layers.evalnorm import DEFAULT_AUX_SAMPLES, MODES, EvalNorm2d, attach_aux_loss_hook, evalnorm_layers
from ..registry import register_norm
from .build import current_config, register_model_transform

NORM_NAMES = ("EvalNorm", "SyncEvalNorm")


def _node(cfg):
    if cfg is None or "BNSTATS" not in cfg or "EVALNORM" not in cfg.BNSTATS:
        return None
    return cfg.BNSTATS.EVALNORM


def evalnorm_kwargs(cfg) -> dict:
    """EvalNorm2d keyword arguments from ``cfg.BNSTATS.EVALNORM`` (checked); {} without that node."""
    node = _node(cfg)
    if node is None:
        return {}
    mode = node.MODE
    if mode not in MODES:
        raise ValueError(f"BNSTATS.EVALNORM.MODE = {mode!r} is not an EvalNorm mode; accepted: {', '.join(MODES)}")
    kwargs = {"mode": mode, "learn": bool(node.LEARN), "aux_samples": int(node.AUX_SAMPLES)}
    if kwargs["aux_samples"] < 0:
        raise ValueError(f"BNSTATS.EVALNORM.AUX_SAMPLES = {node.AUX_SAMPLES} must be >= 0 (0 = every value)")
    alpha, beta = float(node.ALPHA), float(node.BETA)
    if mode == "fixed":
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(
                f"BNSTATS.EVALNORM.MODE = 'fixed' needs BNSTATS.EVALNORM.ALPHA in [0, 1] (and optionally BETA), "
                f"got ALPHA = {node.ALPHA}"
            )
        if beta != -1.0 and not 0.0 <= beta <= 1.0:
            raise ValueError(f"BNSTATS.EVALNORM.BETA = {node.BETA} must be in [0, 1] (or -1: same as ALPHA)")
        kwargs["alpha"] = alpha
        kwargs["beta"] = alpha if beta == -1.0 else beta
    batch_size = node.BATCH_SIZE
    if batch_size != 0:
        if batch_size < 1:
            raise ValueError(
                f"BNSTATS.EVALNORM.BATCH_SIZE = {node.BATCH_SIZE} must be >= 1, or 0 for the batch size each layer recorded"
            )
        kwargs["batch_size"] = float(batch_size)
    return kwargs


def build_evalnorm(channels: int, sync: bool = False) -> EvalNorm2d:
    return EvalNorm2d(channels, sync=sync, **evalnorm_kwargs(current_config()))


def log_to_storage(layers) -> None:
    """Write alpha_hat, beta_hat of each layer to detectron2's current EventStorage, if any."""
    if not layers:
        return
    try:
        from detectron2.utils.events import get_event_storage

        storage = get_event_storage()
    except (AssertionError, ImportError):  # no storage outside detectron2's training loop
        return
    with torch.no_grad():
        values = torch.stack(
            [torch.stack([layer.alpha_hat.float(), layer.beta_hat.float()]) for _, layer in layers]
        ).clamp_(0.0, 1.0).cpu()
    for (name, _), (a, b) in zip(layers, values.tolist()):
        storage.put_scalar(f"evalnorm/{name}/alpha", a, smoothing_hint=False)
        storage.put_scalar(f"evalnorm/{name}/beta", b, smoothing_hint=False)
    means = values.mean(0).tolist()
    storage.put_scalar("evalnorm/alpha_mean", means[0], smoothing_hint=False)
    storage.put_scalar("evalnorm/beta_mean", means[1], smoothing_hint=False)


def evalnorm_transform(model, cfg):
    """Model transform: attach the auxiliary-loss hook (and the alpha/beta logging) when the model
    has EvalNorm layers that learn."""
    if not evalnorm_layers(model):
        return None
    node = _node(cfg)
    weight = float(node.AUX_LOSS_WEIGHT) if node is not None else 1.0
    log = bool(node.LOG) if node is not None else True
    attach_aux_loss_hook(model, weight=weight, callback=log_to_storage if log else None)
    return None


register_norm("EvalNorm", lambda channels: build_evalnorm(channels, sync=False))
register_norm("SyncEvalNorm", lambda channels: build_evalnorm(channels, sync=True))
register_model_transform("evalnorm", evalnorm_transform)

__all__ = ["NORM_NAMES", "DEFAULT_AUX_SAMPLES", "build_evalnorm", "evalnorm_kwargs", "evalnorm_transform", "log_to_storage"]
