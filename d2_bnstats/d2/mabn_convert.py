"""Convert a model with ordinary BN/FrozenBN weights into an MABN model that starts close to it.

Fine-tuning MABN from ordinary weights without this gave the authors' users 19.6 AP (MABN issue #2):
MABN drops mean centring and expects weight-centralised convs. The conversion, per MABN layer fed by
a conv (see :func:`d2_bnstats.layers.mabn.bn_to_mabn_parameters` for the algebra):

1. copy every parameter and buffer that is not MABN state from the source model (same names);
2. centralise the conv's weight W' = W − mean(W) per output filter (if the MABN model centralises
   that conv from step 0; not with ``BNSTATS.MABN.WEIGHT_CENTRALIZATION`` off or with a
   ``WC_RAMP_ITERS`` ramp, and then the mapping below is exact);
3. map the BN layer's (γ, β, μ, σ²) to MABN's (γ', b', R) so that inference is unchanged up to the
   input-dependent part of what centralisation removes; with ``calibration`` inputs the mean removed
   by centralisation and the second moment of the centralised conv's output are measured on data in
   the *source* model (which the converted model is meant to reproduce), otherwise they are derived
   from the BN statistics alone (removed mean 0, R = σ² + μ²);
4. start the MABN schedule afresh (t = 0, empty ring buffers), as fine-tuning begins.

``tools/convert_to_mabn.py`` is the command-line front end (detectron2 configs and checkpoints).
"""
import logging
from collections import defaultdict
from typing import Dict, Iterable, Optional, Set

import torch
from torch import nn

from ..layers.mabn import MABN2d, WeightCentralizedConv2d, bn_to_mabn_parameters, centralize_weight, centralize_weight_
from .norms_mabn import convs_feeding_mabn

logger = logging.getLogger(__name__)

_BN_ATTRS = ("weight", "bias", "running_mean", "running_var")


def mabn_layer_inputs(model: nn.Module) -> Dict[str, Optional[str]]:
    """Every MABN layer's name → the name of the conv that feeds it (None if there is none)."""
    feeding = {norm: conv for conv, _, norm in convs_feeding_mabn(model)}
    return {name: feeding.get(name) for name, m in model.named_modules() if isinstance(m, MABN2d)}


def _channel_sum(t: torch.Tensor, power: int = 1) -> torch.Tensor:
    dims = [0] + list(range(2, t.dim()))
    return t.double().pow(power).sum(dims)


@torch.no_grad()
def measure_conversion_statistics(
    source_model: nn.Module, layers: Dict[str, Optional[str]], inputs: Iterable
) -> Dict[str, Dict[str, torch.Tensor]]:
    """Run ``source_model`` in eval mode on ``inputs`` (each item is one model input, e.g. a list of
    detectron2 dicts) and measure, per norm layer name in ``layers``, the mean removed by centralising
    its conv (``removed_mean`` = E[u] − E[u']) and the second moment of the centralised output
    (``second_moment`` = E[u'²]), u being the norm's input in the source model."""
    sums = defaultdict(lambda: defaultdict(float))
    handles = []

    def conv_hook(name, conv):
        def hook(module, args):
            x = args[0]
            if x.numel() == 0:
                return
            u = module._conv_forward(x, centralize_weight(module.weight), module.bias)
            s = sums[name]
            s["u_c"] = s["u_c"] + _channel_sum(u)
            s["u_c2"] = s["u_c2"] + _channel_sum(u, 2)
            s["n_c"] += u.numel() // u.shape[1]

        return conv.register_forward_pre_hook(hook)

    def norm_hook(name):
        def hook(module, args):
            u = args[0]
            if u.numel() == 0:
                return
            s = sums[name]
            s["u"] = s["u"] + _channel_sum(u)
            s["u2"] = s["u2"] + _channel_sum(u, 2)
            s["n"] += u.numel() // u.shape[1]

        return source_model.get_submodule(name).register_forward_pre_hook(hook)

    was_training = source_model.training
    source_model.eval()
    try:
        for name, conv_name in layers.items():
            handles.append(norm_hook(name))
            if conv_name is not None:
                handles.append(conv_hook(name, source_model.get_submodule(conv_name)))
        for batch in inputs:
            source_model(batch)
    finally:
        for h in handles:
            h.remove()
        source_model.train(was_training)
    stats = {}
    for name, conv_name in layers.items():
        s = sums.get(name)
        if not s or not s["n"]:
            continue  # the layer saw no data (e.g. a mask head without detections)
        mean_u = s["u"] / s["n"]
        if conv_name is not None and s["n_c"]:
            mean_c, second = s["u_c"] / s["n_c"], s["u_c2"] / s["n_c"]
        else:
            mean_c, second = mean_u, s["u2"] / s["n"]
        stats[name] = {"removed_mean": (mean_u - mean_c).float(), "second_moment": second.float(), "count": s["n"]}
    return stats


@torch.no_grad()
def convert_to_mabn(
    mabn_model: nn.Module,
    source_model: nn.Module,
    calibration: Optional[Iterable] = None,
    loaded_keys: Optional[Set[str]] = None,
) -> dict:
    """Fill ``mabn_model`` (in place) from ``source_model`` (same architecture, BN-type norms where
    ``mabn_model`` has MABN2d; weights loaded). See the module docstring.

    Args:
        calibration: optional iterable of ``source_model`` inputs for the measured conversion.
        loaded_keys: names in ``source_model.state_dict()`` that hold real weights (e.g. all but the
            missing keys of loading an ImageNet backbone into a detector); only those are copied and
            only MABN layers whose norm weight is among them are converted, the rest keeps the fresh
            initialisation of ``mabn_model``. Default: everything.

    Returns a report: ``converted`` / ``skipped`` layer names (with reasons), ``copied`` keys,
    ``centralized`` convs, ``calibrated`` (bool), and ``state_keys``: the keys of
    ``mabn_model.state_dict()`` that now hold converted weights (what a converted checkpoint needs).
    """
    layers = mabn_layer_inputs(mabn_model)
    src_state = source_model.state_dict()
    loaded = set(src_state) if loaded_keys is None else set(loaded_keys)
    dst_state = mabn_model.state_dict()
    mabn_prefixes = tuple(name + "." for name in layers)

    copied = []
    for key, value in dst_state.items():
        if key.startswith(mabn_prefixes) or key not in src_state or key not in loaded:
            continue
        if src_state[key].shape != value.shape:
            logger.warning("convert_to_mabn: %s has shape %s in the source, %s here; not copied",
                           key, tuple(src_state[key].shape), tuple(value.shape))
            continue
        value.copy_(src_state[key])
        copied.append(key)

    convertible, skipped = {}, {}
    for name, conv_name in layers.items():
        try:
            src = source_model.get_submodule(name)
        except AttributeError:
            skipped[name] = "no module of that name in the source model"
            continue
        if not all(isinstance(getattr(src, a, None), torch.Tensor) for a in _BN_ATTRS):
            skipped[name] = f"source is a {type(src).__name__}, not a BN-type layer"
            continue
        if name + ".weight" not in loaded:
            skipped[name] = "not in the loaded weights (keeps its fresh initialisation)"
            continue
        if conv_name is not None and conv_name + ".weight" not in copied:
            skipped[name] = f"its conv {conv_name} was not copied from the source"
            continue
        convertible[name] = conv_name

    # only convs that the MABN model centralises (WEIGHT_CENTRALIZATION may be off) are centralised
    # here; for the others the mapping is exact (removed mean 0) and only R is measured
    # (nor convs with a centralisation ramp: at t = 0 they are the original convs)
    def centralises(conv):
        return isinstance(conv, WeightCentralizedConv2d) and conv.wc_ramp_iters <= 0

    centralised = {
        name: conv_name
        for name, conv_name in convertible.items()
        if conv_name is not None and centralises(mabn_model.get_submodule(conv_name))
    }
    stats = {}
    if calibration is not None:
        stats = measure_conversion_statistics(
            source_model, {name: centralised.get(name) for name in convertible}, calibration
        )

    state_keys = set(copied)
    centralized = []
    for name in convertible:
        conv_name = centralised.get(name)
        src, dst = source_model.get_submodule(name), mabn_model.get_submodule(name)
        s = stats.get(name, {})
        weight, bias, r = bn_to_mabn_parameters(
            src.weight, src.bias, src.running_mean, src.running_var, eps=getattr(src, "eps", dst.eps),
            removed_mean=s.get("removed_mean"), second_moment=s.get("second_moment"),
        )
        dst.reset_running_stats()
        dst.weight.copy_(weight)
        dst.bias.copy_(bias)
        dst.running_var.copy_(r)
        state_keys.update(name + "." + k for k in dst.state_dict())
        if conv_name is not None:
            centralize_weight_(mabn_model.get_submodule(conv_name))
            centralized.append(conv_name)
    report = {
        "converted": sorted(convertible),
        "skipped": skipped,
        "copied": copied,
        "centralized": centralized,
        "calibrated": sorted(stats),
        "state_keys": sorted(k for k in dst_state if k in state_keys),
    }
    logger.info(
        "convert_to_mabn: %d MABN layers converted (%d calibrated on data), %d skipped, %d tensors copied",
        len(convertible), len(stats), len(skipped), len(copied),
    )
    return report


@torch.no_grad()
def backbone_distance(reference: nn.Module, model: nn.Module, inputs: Iterable, model_training: bool = False) -> dict:
    """Relative L2 distance ‖f' − f‖ / ‖f‖ of the backbone features of two detectron2 meta-arch
    models on the same inputs, averaged over images per feature map. ``reference`` runs in eval
    mode; ``model`` in eval mode, or in training mode if ``model_training`` (its MABN layers then
    normalise with batch statistics; no state is recorded without a backward)."""
    totals, count = defaultdict(float), 0
    ref_mode, mode = reference.training, model.training
    reference.eval()
    model.train(model_training)
    try:
        for batch in inputs:
            images = reference.preprocess_image(batch)
            f_ref = reference.backbone(images.tensor)
            f = model.backbone(model.preprocess_image(batch).tensor)
            for key in f_ref:
                totals[key] += float((f[key] - f_ref[key]).norm() / f_ref[key].norm().clamp(min=1e-12))
            count += 1
    finally:
        reference.train(ref_mode)
        model.train(mode)
    return {key: value / max(count, 1) for key, value in totals.items()}
