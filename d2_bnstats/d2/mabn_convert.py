"""Convert a model with ordinary BN/FrozenBN weights into an MABN model that starts close to it.

Fine-tuning MABN from ordinary weights without this gave the authors' users 19.6 AP (reported at
github.com/megvii-model/MABN/issues/2): MABN drops mean centring and expects weight-centralised convs. The conversion, per MABN layer fed by
a conv (see :mod:`d2_bnstats.layers.mabn_from_bn` for the algebra):

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

:func:`convert_checkpoint` does it for a detectron2 config and checkpoint (the MABN config defines
the target model; the source is the same config with every MABN norm key set to a BN-type norm) and
writes the converted weights atomically (:mod:`d2_bnstats.outputs`), refusing an output that is the
source weights file; ``tools/convert_to_mabn.py`` is its command line.
"""
import itertools
import json
import logging
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch
from torch import nn

from ..layers.mabn import MABN2d
from ..layers.mabn_from_bn import bn_to_mabn_parameters
from ..layers.weight_centralization import WeightCentralizedConv2d, centralize, centralize_conv_weight_
from ..outputs import check_outputs, save_torch
from .norms.mabn import NAMES as MABN_NORMS
from .norms.mabn import convs_feeding_mabn

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
            u = module._conv_forward(x, centralize(module.weight), module.bias)
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


def _copy_weights(mabn_model, source_model, loaded: Set[str], mabn_prefixes: Tuple[str, ...]) -> List[str]:
    """Copy every loaded source tensor that is not MABN state into ``mabn_model`` (same names and
    shapes); returns the keys copied."""
    src_state = source_model.state_dict()
    copied = []
    for key, value in mabn_model.state_dict().items():
        if key.startswith(mabn_prefixes) or key not in src_state or key not in loaded:
            continue
        if src_state[key].shape != value.shape:
            logger.warning("convert_to_mabn: %s has shape %s in the source, %s here; not copied",
                           key, tuple(src_state[key].shape), tuple(value.shape))
            continue
        value.copy_(src_state[key])
        copied.append(key)
    return copied


def _convertible_layers(layers, source_model, loaded: Set[str], copied: List[str]):
    """({MABN layer: its conv} that can be converted, {layer: why not} for the others)."""
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
            skipped[name] = "not in the loaded weights (keeps its fresh initialization)"
            continue
        if conv_name is not None and conv_name + ".weight" not in copied:
            skipped[name] = f"its conv {conv_name} was not copied from the source"
            continue
        convertible[name] = conv_name
    return convertible, skipped


def _centralizes_from_start(conv: nn.Module) -> bool:
    # a conv the MABN model does not centralize (WEIGHT_CENTRALIZATION off) or centralizes with a
    # ramp (at t = 0 the original conv) is mapped exactly (removed mean 0): only R is measured
    return isinstance(conv, WeightCentralizedConv2d) and conv.wc_ramp_iters <= 0


def _map_layer(name: str, conv_name: Optional[str], mabn_model, source_model, stats: dict) -> List[str]:
    """Map one BN layer to its MABN layer (and centralize its conv's stored weight); returns the
    MABN layer's state keys."""
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
    if conv_name is not None:
        centralize_conv_weight_(mabn_model.get_submodule(conv_name))
    return [name + "." + k for k in dst.state_dict()]


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
            initialization of ``mabn_model``. Default: everything.

    Returns a report: ``converted`` / ``skipped`` layer names (with reasons), ``copied`` keys,
    ``centralized`` convs, ``calibrated`` (bool), and ``state_keys``: the keys of
    ``mabn_model.state_dict()`` that now hold converted weights (what a converted checkpoint needs).
    """
    layers = mabn_layer_inputs(mabn_model)
    loaded = set(source_model.state_dict()) if loaded_keys is None else set(loaded_keys)
    copied = _copy_weights(mabn_model, source_model, loaded, tuple(name + "." for name in layers))
    convertible, skipped = _convertible_layers(layers, source_model, loaded, copied)
    centralized_conv = {
        name: conv_name
        for name, conv_name in convertible.items()
        if conv_name is not None and _centralizes_from_start(mabn_model.get_submodule(conv_name))
    }
    stats = {}
    if calibration is not None:
        stats = measure_conversion_statistics(
            source_model, {name: centralized_conv.get(name) for name in convertible}, calibration
        )
    state_keys = set(copied)
    for name in convertible:
        state_keys.update(_map_layer(name, centralized_conv.get(name), mabn_model, source_model, stats))
    report = {
        "converted": sorted(convertible),
        "skipped": skipped,
        "copied": copied,
        "centralized": [centralized_conv[name] for name in convertible if name in centralized_conv],
        "calibrated": sorted(stats),
        "state_keys": sorted(k for k in mabn_model.state_dict() if k in state_keys),
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


# ---------------------------------------------------------------------------------------------
# detectron2 configs and checkpoints


def source_config(cfg, source_norm: str = "FrozenBN"):
    """(``cfg`` with every norm key that holds an MABN norm set to ``source_norm``, those keys): the
    config of the model whose BN-type weights are converted. ValueError if ``cfg`` uses no MABN norm."""
    from .config import NORM_KEYS, get_config_value

    keys = [k for k in NORM_KEYS if get_config_value(cfg, k) in MABN_NORMS]
    if not keys:
        raise ValueError(f"the config uses no MABN norm (keys {', '.join(NORM_KEYS)}); nothing to convert to")
    source = cfg.clone()
    source.merge_from_list([x for k in keys for x in (k, source_norm)])
    return source, keys


def load_weights(model: nn.Module, weights: str) -> Set[str]:
    """Load a checkpoint of any detectron2 format (path or URL) into ``model``; returns the keys of
    ``model.state_dict()`` that it filled."""
    from detectron2.checkpoint import DetectionCheckpointer

    if not weights:
        return set()
    missing: List[List[str]] = []
    handle = model.register_load_state_dict_post_hook(
        lambda module, incompatible: missing.append(list(incompatible.missing_keys))
    )
    try:
        DetectionCheckpointer(model).load(weights, checkpointables=[])
    finally:
        handle.remove()
    not_loaded = set(missing[-1]) if missing else set(model.state_dict())
    # as detectron2 does: a checkpoint without the model's own pixel_mean/pixel_std leaves the
    # values from the config, which count as loaded
    own_buffers = dict(model.named_buffers(recurse=False))
    not_loaded -= {k for k in ("pixel_mean", "pixel_std") if k in own_buffers}
    return set(model.state_dict()) - not_loaded


def dataset_images(cfg, dataset: str, count: int) -> list:
    """The first ``count`` inputs of detectron2's test loader on ``dataset`` (fewer if it is smaller)."""
    from detectron2.data import build_detection_test_loader

    if count <= 0:
        return []
    images = list(itertools.islice(iter(build_detection_test_loader(cfg, dataset)), count))
    if len(images) < count:
        logger.warning("%s has only %d images", dataset, len(images))
    return images


def save_converted(model: nn.Module, report: dict, output: str, author: str = "d2_bnstats convert_checkpoint") -> int:
    """Write the converted tensors (``report["state_keys"]``) of ``model`` as a detectron2 checkpoint
    (``.pth``, no name-matching heuristics); returns how many were written."""
    state = model.state_dict()
    out = {k: state[k] for k in report["state_keys"]}
    save_torch({"model": out, "__author__": author, "matching_heuristics": False}, output)
    return len(out)


def _as_floats(results):
    return json.loads(json.dumps(results, default=float))


def convert_checkpoint(
    cfg,
    weights: str,
    output: str,
    source_norm: str = "FrozenBN",
    calibration_images: int = 64,
    compare_images: int = 8,
    dataset: Optional[str] = None,
    evaluate: bool = False,
    author: str = "d2_bnstats convert_checkpoint",
) -> dict:
    """Convert BN/FrozenBN ``weights`` into a checkpoint ``output`` for the MABN config ``cfg``.

    The source model is ``cfg`` with ``source_norm`` in place of MABN (:func:`source_config`; FrozenBN
    loads BN and FrozenBN checkpoints of any detectron2 format). :func:`convert_to_mabn` is calibrated
    on ``calibration_images`` inputs of ``dataset`` (default the first of ``DATASETS.TRAIN``; 0: from
    the statistics alone); the relative backbone-feature distance of source and converted model is
    measured on ``compare_images`` further inputs (in eval mode, and with the converted model in
    training mode); ``evaluate`` also runs both models' evaluation on ``DATASETS.TEST``. Only what
    ``weights`` holds is written. Returns the numbers (counts, distances, evaluation results).
    """
    from .build import build_model
    from .weights import check_weights_file

    for count, name in ((calibration_images, "calibration_images"), (compare_images, "compare_images")):
        if count < 0:
            raise ValueError(f"{name} = {count!r}: give a number of images >= 0 (0: none)")
    check_outputs({"output": output}, {"weights": weights})
    check_weights_file(weights, label="weights")
    source_cfg, _ = source_config(cfg, source_norm)
    source = build_model(source_cfg)
    loaded = load_weights(source, weights)
    logger.info("source: %s (%d of %d tensors loaded)", weights, len(loaded), len(source.state_dict()))
    target = build_model(cfg)
    images = dataset_images(cfg, dataset or cfg.DATASETS.TRAIN[0], calibration_images + compare_images)
    calibration, compare = images[:calibration_images] or None, images[calibration_images:]
    report = convert_to_mabn(target, source, calibration=calibration, loaded_keys=loaded)
    numbers = {
        "source": weights,
        "output": output,
        "converted_layers": len(report["converted"]),
        "calibrated_layers": len(report["calibrated"]),
        "skipped_layers": len(report["skipped"]),
        "centralized_convs": len(report["centralized"]),
        "tensors_written": save_converted(target, report, output, author),
    }
    if compare:
        numbers["feature_distance_eval"] = backbone_distance(source, target, compare)
        numbers["feature_distance_train_mode"] = backbone_distance(source, target, compare, model_training=True)
    if evaluate:
        from .trainer import Trainer

        numbers["source_eval"] = _as_floats(Trainer.test(source_cfg, source))
        numbers["converted_eval"] = _as_floats(Trainer.test(cfg, target))
    return numbers
