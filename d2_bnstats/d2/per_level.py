"""Model transform "per_level_norms": per-FPN-level statistics in heads shared across levels.

Config (``BNSTATS.PER_LEVEL.*``, see d2_bnstats/d2/config.py):

- ``ENABLED True``: in every module whose class name is in ``HEADS`` (default ``["RetinaNetHead"]``),
  each norm that keeps statistics (BN-type layers, layers with ``set_population_statistics``, other
  modules owning buffers; see :func:`d2_bnstats.layers.per_level.keeps_statistics`) is replaced by a
  :class:`~d2_bnstats.layers.per_level.PerLevelNorm` with one copy per level sharing the parameters.
  detectron2's own ``CycleBatchNormList`` (what RetinaNet builds for "BN"/"SyncBN") is rebuilt the same
  way from the registered norm, so every per-level norm in a head is the same kind of module.
- Always (when "SyncBN" means the plug-in's layer, ``BNSTATS.SYNC_BN.REPLACE_D2``): detectron2's
  RetinaNet head builds ``CycleBatchNormList(bn_class=nn.SyncBatchNorm)`` for the exact string
  "SyncBN" without asking ``get_norm``; that torch layer fails on CPU/gloo and on empty inputs. Such
  lists are rebuilt with the plug-in's ``SyncBatchNorm2d``, keeping detectron2's per-level semantics.

The number of levels is ``NUM_LEVELS`` if > 0, else the head's ``_num_features`` (detectron2's
RetinaNetHead), else ``len(MODEL.RETINANET.IN_FEATURES)`` for a RetinaNetHead.
"""
import logging
from typing import Optional

from torch import nn

from ..layers.per_level import PerLevelNorm, wrap_per_level
from ..registry import get_norm
from .build import register_model_transform
from .norms_sync import sync_bn_replaces_detectron2

logger = logging.getLogger(__name__)


def _device_of(module: nn.Module):
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return None


def _cycle_norm_name(cycle: nn.Module) -> Optional[str]:
    """The detectron2 norm name a CycleBatchNormList was built for ("BN" or "SyncBN")."""
    child = cycle[0]
    if isinstance(child, nn.SyncBatchNorm):
        return "SyncBN"
    if type(child) is nn.BatchNorm2d:
        return "BN"
    return None


def rebuild_cycle_list(cycle: nn.Module, cfg, only_sync: bool) -> Optional[nn.Module]:
    """The norm (to be copied per level) replacing a detectron2 ``CycleBatchNormList``, built from
    the registry, or None to keep it. Its state is carried over by :class:`PerLevelNorm`'s loader."""
    if type(cycle).__name__ != "CycleBatchNormList" or len(cycle) == 0:
        return None
    name = _cycle_norm_name(cycle)
    if name is None or (name == "SyncBN" and not sync_bn_replaces_detectron2(cfg)) or (only_sync and name != "SyncBN"):
        return None
    channels = cycle[0].num_features
    norm = get_norm(name, channels)
    device = _device_of(cycle)
    return norm.to(device) if device is not None else norm


def _carry_state(cycle: nn.Module, wrapper: PerLevelNorm) -> None:
    wrapper.load_state_dict(cycle.state_dict(), strict=True)


def _num_levels(head: nn.Module, cfg) -> int:
    configured = cfg.BNSTATS.PER_LEVEL.NUM_LEVELS
    if not isinstance(configured, int) or configured < 0:
        raise ValueError(f"BNSTATS.PER_LEVEL.NUM_LEVELS = {configured!r}: expected 0 (infer) or a positive integer")
    if configured > 0:
        return configured
    inferred = getattr(head, "_num_features", None)
    if isinstance(inferred, int) and inferred > 0:
        return inferred
    if type(head).__name__ == "RetinaNetHead":
        return len(cfg.MODEL.RETINANET.IN_FEATURES)
    raise ValueError(
        f"BNSTATS.PER_LEVEL: cannot infer the number of FPN levels of head {type(head).__name__}; "
        "set BNSTATS.PER_LEVEL.NUM_LEVELS to a positive integer"
    )


def _wrap(head: nn.Module, num_levels: int, cfg, only_sync: bool) -> int:
    replaced = {}

    def build(child):
        norm = rebuild_cycle_list(child, cfg, only_sync)
        if norm is not None:
            replaced[id(norm)] = child
        return norm

    predicate = (lambda m: False) if only_sync else None
    kwargs = {"predicate": predicate} if predicate is not None else {}
    wrappers = wrap_per_level(head, num_levels, build=build, **kwargs)
    for wrapper in wrappers:
        cycle = replaced.get(id(wrapper.levels[0]))
        if cycle is not None:
            if len(cycle) != wrapper.num_levels:
                raise ValueError(
                    f"{type(head).__name__}: detectron2 built {len(cycle)} per-level norms but "
                    f"BNSTATS.PER_LEVEL.NUM_LEVELS = {wrapper.num_levels}; leave it 0 to infer"
                )
            _carry_state(cycle, wrapper)
    return len(wrappers)


def per_level_transform(model: nn.Module, cfg) -> None:
    if "BNSTATS" not in cfg or "PER_LEVEL" not in cfg.BNSTATS:
        return None
    node = cfg.BNSTATS.PER_LEVEL
    heads = set(node.HEADS)
    matched = 0
    for module in list(model.modules()):
        if type(module).__name__ not in heads:
            continue
        matched += 1
        levels = _num_levels(module, cfg)
        count = _wrap(module, levels, cfg, only_sync=not node.ENABLED)
        if count:
            logger.info("per-level statistics: %d norms of %s, %d levels each", count, type(module).__name__, levels)
    if node.ENABLED and matched == 0:
        logger.warning(
            "BNSTATS.PER_LEVEL.ENABLED but the model has no head of class %s; nothing to do", sorted(heads)
        )
    # a CycleBatchNormList of nn.SyncBatchNorm outside the listed heads: same fix, plain cycling
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            norm = rebuild_cycle_list(child, cfg, only_sync=True)
            if norm is not None:
                wrapper = PerLevelNorm(norm, len(child))
                _carry_state(child, wrapper)
                setattr(parent, name, wrapper)
    return None


register_model_transform("per_level_norms", per_level_transform)
