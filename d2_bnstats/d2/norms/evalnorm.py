"""EvalNorm in detectron2: the norm names, the ``BNSTATS.EVALNORM`` config node, and the model
transform that makes detectron2's own training loop learn alpha_hat, beta_hat (docs/evalnorm.md).

- "EvalNorm" and "SyncEvalNorm" (``sync=True``: training batches normalised over all processes) are
  usable in every norm config key. Their layer options come from ``cfg.BNSTATS.EVALNORM``
  (:func:`layer_options`); outside a build the layer's defaults apply.
- The transform attaches two hooks to every model that has EvalNorm layers:
  :func:`~d2_bnstats.layers.evalnorm_aux.attach_aux_loss_hook` -- in training the loss dict gets
  ``loss_evalnorm`` (AUX_LOSS_WEIGHT x the sum over layers of L_aux), which detectron2's
  SimpleTrainer back-propagates and logs with the other losses, and alpha_hat, beta_hat of every
  layer go to the EventStorage (metrics.json, TensorBoard) as ``evalnorm/<layer>/alpha|beta``
  (:func:`log_to_storage`) -- and
  :func:`~d2_bnstats.layers.evalnorm_projection.attach_projection_hook`, which keeps alpha_hat,
  beta_hat in [0, 1] after every optimiser step.
- ``MODEL.BACKBONE.FREEZE_AT`` turns EvalNorm layers of frozen stages into FrozenBatchNorm2d, as it
  does for BN: a frozen layer always normalises with its fixed statistics, so it has no train/test
  gap for EvalNorm to correct.
"""
import math
import torch
from detectron2.utils.events import get_event_storage
from torch import nn

from ...layers.evalnorm import MODES, EvalNorm2d, evalnorm_layers
from ...layers.evalnorm_aux import attach_aux_loss_hook
from ...layers.evalnorm_projection import attach_projection_hook
from ...registry import Norm
from ..config import bnstats_node

KEY = "BNSTATS.EVALNORM"


def build_evalnorm(out_channels: int, **options) -> EvalNorm2d:
    return EvalNorm2d(out_channels, **options)


def build_sync_evalnorm(out_channels: int, **options) -> EvalNorm2d:
    return EvalNorm2d(out_channels, sync=True, **options)


def defaults(node) -> None:
    """``BNSTATS.EVALNORM`` with its documented defaults."""
    # EvalNorm ("EvalNorm" / "SyncEvalNorm" norms; docs/evalnorm.md). Checked when the config is
    # loaded, read when the model is built.
    # Evaluation statistics: "learned" (default; alpha_hat, beta_hat learned online by the auxiliary
    # loss), "rule" (alpha = beta = 1/B^2), "exact" (1/B), "fixed" (ALPHA, BETA), "ema" (BN inference).
    node.MODE = "learned"
    # alpha and beta for MODE "fixed", in [0, 1]; -1 = unset (BETA unset means BETA = ALPHA).
    node.ALPHA = -1.0
    node.BETA = -1.0
    # B (an integer) for MODE "rule"/"exact"; 0 = the normalization batch each layer recorded in training.
    node.BATCH_SIZE = 0
    # Learn alpha_hat, beta_hat during training (the auxiliary loss "loss_evalnorm"); False = they
    # stay at their initial value 0 and training costs exactly what BN costs.
    node.LEARN = True
    # loss_evalnorm = AUX_LOSS_WEIGHT * sum over EvalNorm layers of that layer's mean |mismatch|;
    # each layer's alpha_hat, beta_hat see only their own term: effective step BASE_LR * weight.
    node.AUX_LOSS_WEIGHT = 1.0
    # Values per channel used for the auxiliary loss per training forward (strided subset; 0 = all).
    node.AUX_SAMPLES = 256
    # Write alpha_hat, beta_hat of every layer to the EventStorage (metrics.json, TensorBoard) as
    # "evalnorm/<layer>/alpha" and ".../beta", plus their means over layers.
    node.LOG = True


def _unit_or_unset(node, key: str, what: str) -> float:
    value = float(node.get(key, -1.0))
    if value != -1.0 and not 0.0 <= value <= 1.0:
        raise ValueError(f"{KEY}.{key} = {node.get(key)} must be in [0, 1] (or -1: {what})")
    return value


def _options(node) -> dict:
    """The checked EvalNorm2d keyword arguments that ``node`` (``cfg.BNSTATS.EVALNORM``) gives."""
    mode = node.get("MODE", "learned")
    if mode not in MODES:
        raise ValueError(f"{KEY}.MODE = {mode!r} is not an EvalNorm mode; accepted: {', '.join(MODES)}")
    options = {"mode": mode, "learn": bool(node.get("LEARN", True)), "aux_samples": int(node.get("AUX_SAMPLES", 256))}
    if options["aux_samples"] < 0:
        raise ValueError(f"{KEY}.AUX_SAMPLES = {node.AUX_SAMPLES} must be >= 0 (0 = every value)")
    alpha = _unit_or_unset(node, "ALPHA", "unset")
    beta = _unit_or_unset(node, "BETA", "same as ALPHA")
    if mode == "fixed":
        if alpha == -1.0:
            raise ValueError(
                f"{KEY}.MODE = 'fixed' needs {KEY}.ALPHA in [0, 1] (and optionally BETA), got ALPHA = {node.get('ALPHA')}"
            )
        options["alpha"] = alpha
        options["beta"] = alpha if beta == -1.0 else beta
    batch_size = node.get("BATCH_SIZE", 0)
    if batch_size != 0:
        if batch_size < 1:
            raise ValueError(
                f"{KEY}.BATCH_SIZE = {batch_size} must be >= 1, or 0 for the batch size each layer recorded"
            )
        options["batch_size"] = float(batch_size)
    return options


def layer_options(cfg, name: str) -> dict:
    """EvalNorm2d keyword arguments from ``cfg.BNSTATS.EVALNORM`` (checked; the same for both names);
    {} without that node."""
    node = bnstats_node(cfg, "EVALNORM")
    return {} if node is None else _options(node)


def check_config(cfg) -> None:
    """Validate every ``BNSTATS.EVALNORM`` value (also when no norm key uses EvalNorm)."""
    node = bnstats_node(cfg, "EVALNORM")
    if node is None:
        return
    _options(node)
    weight = node.get("AUX_LOSS_WEIGHT", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{KEY}.AUX_LOSS_WEIGHT = {weight!r} must be a number >= 0")
    for key in ("LEARN", "LOG"):
        if not isinstance(node.get(key, True), bool):
            raise ValueError(f"{KEY}.{key} = {node.get(key)!r} must be True or False")


def log_to_storage(layers) -> None:
    """Write alpha_hat, beta_hat of each layer to detectron2's current EventStorage, if any."""
    if not layers:
        return
    try:
        storage = get_event_storage()
    except AssertionError:  # no storage outside detectron2's training loop
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


def transform(model: nn.Module, cfg) -> None:
    """For a model with EvalNorm layers: the auxiliary-loss hook (with the alpha/beta logging) when a
    layer learns, and the [0, 1] projection of alpha_hat, beta_hat after optimiser steps. Each is
    attached once per model."""
    if not evalnorm_layers(model):
        return None
    node = bnstats_node(cfg, "EVALNORM")
    weight = float(node.get("AUX_LOSS_WEIGHT", 1.0)) if node is not None else 1.0
    log = bool(node.get("LOG", True)) if node is not None else True
    attach_aux_loss_hook(model, weight=weight, callback=log_to_storage if log else None)
    attach_projection_hook(model)
    return None


def keep_reason(module: nn.Module):
    """At deployment an EvalNorm layer is not a fixed affine (its statistics mix in each sample's own,
    eqs. 5-8 of Singh & Shrivastava 2019) unless its mode is "ema" (BN inference)."""
    if isinstance(module, EvalNorm2d) and module.mode != "ema":
        return f"EvalNorm (mode {module.mode!r}): inference mixes in each sample's own statistics"
    return None


NORM = Norm(
    name="evalnorm",
    factories={"EvalNorm": build_evalnorm, "SyncEvalNorm": build_sync_evalnorm},
    config_key="EVALNORM",
    defaults=defaults,
    check=check_config,
    options=layer_options,
    transform=transform,
    keep_reason=keep_reason,
    statistics="population",  # BN's running statistics, mixed with the sample's at inference
    layer_types=(EvalNorm2d,),
)
