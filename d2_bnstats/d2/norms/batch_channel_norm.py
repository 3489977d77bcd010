"""Batch-Channel Normalization in detectron2: the norms "BCN" →
:class:`d2_bnstats.layers.batch_channel_norm.BatchChannelNorm2d` and "BCN+WS" →
:class:`~d2_bnstats.layers.batch_channel_norm.WSBatchChannelNorm2d` after a weight-standardized conv
(the paper's pairing, Qiao et al. 2019 §4), and their ``BNSTATS.BCN`` node.

Options (keys → layer arguments): ``NUM_GROUPS`` → ``num_groups``, ``MOMENTUM`` → ``momentum`` (the
update rate r of the estimates), ``EPS`` → ``eps``; ``WS_EPS`` is the ε of the weight standardization
of "BCN+WS". A layer with fewer channels than groups gets one group per channel (detectron2's
RetinaNet head builds a 1-channel norm only to read its type), as "GN+WS".

The model transform standardizes the convs feeding "BCN+WS" layers (as the WS declarations do), and
makes the BCN layers of ResNet stages that detectron2 froze (``MODEL.BACKBONE.FREEZE_AT``: their
parameters do not train) normalize with their estimates in training too, without updating them
(:func:`d2_bnstats.layers.frozen_bn.freeze_batch_statistics`): detectron2 makes the BN of a frozen
stage a FrozenBN, and a frozen stage of BCN is then as fixed. Deployment folds the standardized convs
and replaces each layer by its inference as plain modules (a BN in eval mode, which the generic
conversion then makes a ``FrozenBatchNorm2d``, followed by ``nn.GroupNorm``).
"""
import logging
from typing import List

from torch import nn

from ...layers.batch_channel_norm import DEFAULT_MOMENTUM, BatchChannelNorm2d, WSBatchChannelNorm2d
from ...layers.frozen_bn import freeze_batch_statistics
from ...layers.population_protocol import is_frozen
from ...registry import Norm
from ..config import bnstats_node, positive_int
from ..weight_standardization import convs_before, fold_standardized_convs, standardize_convs

logger = logging.getLogger(__name__)

KEY = "BNSTATS.BCN"


def _build(cls, name: str, out_channels: int, num_groups: int, momentum: float, eps: float):
    if out_channels < num_groups:
        return cls(out_channels, out_channels, momentum=momentum, eps=eps)
    if out_channels % num_groups:
        raise ValueError(f"{name}: {out_channels} channels do not split into {KEY}.NUM_GROUPS = {num_groups} groups")
    return cls(out_channels, num_groups, momentum=momentum, eps=eps)


def build_bcn(out_channels: int, num_groups: int = 32, momentum: float = DEFAULT_MOMENTUM, eps: float = 1e-5):
    """"BCN": Batch-Channel Normalization with ``num_groups`` groups (32 as detectron2's "GN")."""
    return _build(BatchChannelNorm2d, "BCN", out_channels, num_groups, momentum, eps)


def build_bcn_ws(out_channels: int, num_groups: int = 32, momentum: float = DEFAULT_MOMENTUM, eps: float = 1e-5):
    """"BCN+WS": the same layer, after a conv that the model transform weight-standardizes."""
    return _build(WSBatchChannelNorm2d, "BCN+WS", out_channels, num_groups, momentum, eps)


def defaults(node) -> None:
    """``BNSTATS.BCN``: the options of "BCN" and "BCN+WS" (Qiao et al. 2019, §4)."""
    # groups of the channel normalization (GroupNorm with a per-group affine); default 32 (detectron2's "GN").
    node.NUM_GROUPS = 32
    # update rate r of the estimated mean and second moment (the weight of each training batch, torch's
    # momentum convention); default 0.01: about the last 100 batches (docs/methods.md §9).
    node.MOMENTUM = DEFAULT_MOMENTUM
    # epsilon of both normalizations (estimated BN and channel normalization); default 1e-5.
    node.EPS = 1e-5
    # "BCN+WS" only: epsilon added to each output filter's weight variance in the standardization; default 1e-5.
    node.WS_EPS = 1e-5


def _positive_number(node, key: str, default: float) -> float:
    value = node.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{KEY}.{key} = {value!r}: expected a number > 0")
    return float(value)


def layer_options(cfg, name: str) -> dict:
    """Checked layer keyword arguments from ``cfg.BNSTATS.BCN`` ({} without it)."""
    node = bnstats_node(cfg, "BCN")
    if node is None:
        return {}
    momentum = node.get("MOMENTUM", DEFAULT_MOMENTUM)
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 < momentum <= 1:
        raise ValueError(f"{KEY}.MOMENTUM = {momentum!r}: expected a number in (0, 1] (the update rate of the estimates)")
    _positive_number(node, "WS_EPS", 1e-5)
    return {
        "num_groups": positive_int(node, "NUM_GROUPS", f"{KEY}.NUM_GROUPS", 32),
        "momentum": float(momentum),
        "eps": _positive_number(node, "EPS", 1e-5),
    }


def check_config(cfg) -> None:
    layer_options(cfg, "BCN")


def _frozen_stage_layers(model: nn.Module):
    """(name, layer) of the BCN layers inside a detectron2 ResNet whose parameters do not train (the
    stages ``FREEZE_AT`` froze), not frozen already."""
    from detectron2.modeling.backbone import ResNet

    out, seen = [], set()
    for prefix, module in model.named_modules():
        if not isinstance(module, ResNet):
            continue
        for name, layer in module.named_modules(prefix=prefix):
            if (
                isinstance(layer, BatchChannelNorm2d)
                and id(layer) not in seen
                and not is_frozen(layer)
                and not any(p.requires_grad for p in layer.parameters())
            ):
                seen.add(id(layer))
                out.append((name, layer))
    return out


def transform(model: nn.Module, cfg) -> None:
    node = bnstats_node(cfg, "BCN")
    eps = float(node.get("WS_EPS", 1e-5)) if node is not None else 1e-5
    standardized = standardize_convs(model, (WSBatchChannelNorm2d,), eps)
    if standardized:
        logger.info("Weight Standardization (BCN+WS): %d convs standardized", len(standardized))
    frozen = freeze_batch_statistics(model, _frozen_stage_layers(model))
    if frozen:
        logger.info("BCN: %d layers of frozen ResNet stages normalize with their fixed estimates", len(frozen))
    return None


def deploy(model: nn.Module) -> List[str]:
    """Fold the standardized convs feeding "BCN+WS" layers, then replace every BCN layer by
    ``layer.as_plain_modules()`` (BN in eval mode, then GroupNorm); returns the names converted."""
    fed = {id(conv) for _, conv in convs_before(model, lambda conv, norm: isinstance(norm, WSBatchChannelNorm2d))}
    names = fold_standardized_convs(model, lambda conv: id(conv) in fed)
    replacements = {}  # a layer reachable under several names: one replacement
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, BatchChannelNorm2d):
                if id(child) not in replacements:
                    replacements[id(child)] = child.as_plain_modules()
                setattr(parent, child_name, replacements[id(child)])
                names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


NORM = Norm(
    name="batch_channel_norm",
    factories={"BCN": build_bcn, "BCN+WS": build_bcn_ws},
    config_key="BCN",
    defaults=defaults,
    check=check_config,
    options=layer_options,
    transform=transform,
    deploy=deploy,
    statistics="population",  # running estimates, used in training as well as at inference
    layer_types=(BatchChannelNorm2d, WSBatchChannelNorm2d),
)
