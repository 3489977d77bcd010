"""detectron2 glue of per-level statistics: the ``BNSTATS.PER_LEVEL`` config node and the model
transform that gives heads shared across FPN levels one set of statistics per level (no norm names).

The maths is in :mod:`d2_bnstats.layers.per_level` (:class:`~d2_bnstats.layers.per_level.PerLevelNorm`);
docs/sync_and_shuffle.md is the user's guide. The transform:

- ``ENABLED True``: in every module whose class name is in ``HEADS`` (default ``["RetinaNetHead"]``),
  each norm that keeps statistics (see :func:`d2_bnstats.layers.per_level.keeps_statistics`; never
  detectron2's ``FrozenBatchNorm2d``, whose buffers are fixed parameters) is replaced by a
  ``PerLevelNorm`` with one copy per level sharing the parameters. detectron2's own
  ``CycleBatchNormList`` (what RetinaNet builds for "BN"/"SyncBN") is rebuilt the same way from the
  registered norm, so every per-level norm in a head is the same kind of module.
- Always (when "SyncBN" means the plug-in's layer, ``BNSTATS.SYNC_BN.REPLACE_D2``): detectron2's
  RetinaNet head builds ``CycleBatchNormList(bn_class=nn.SyncBatchNorm)`` for the exact string
  "SyncBN" without asking ``get_norm``; that torch layer fails on CPU/gloo and on empty inputs. Such
  lists are rebuilt with the plug-in's ``SyncBatchNorm2d``, keeping detectron2's per-level semantics.

With ``ENABLED`` the number of levels is ``NUM_LEVELS`` if > 0, else, for a ``RetinaNetHead``,
``len(MODEL.RETINANET.IN_FEATURES)`` (the number of feature maps detectron2 gives it); a positive
``NUM_LEVELS`` that differs from a ``RetinaNetHead``'s number of levels is an error, whatever the
norm. Rebuilt SyncBN lists keep the length detectron2 gave them.
"""
import logging
from typing import List, Optional

from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from torch import nn

from ...layers.per_level import PerLevelNorm, keeps_statistics, wrap_per_level
from ...registry import Norm, get_norm
from ..build import configure_norm
from ..config import bnstats_node
from .sync import replaces_detectron2

logger = logging.getLogger(__name__)

_DEFAULT_HEADS = ("RetinaNetHead",)


def defaults(node) -> None:
    """``BNSTATS.PER_LEVEL``: per-FPN-level statistics in heads shared across levels."""
    # False (default): heads keep what detectron2 builds (RetinaNet: per-level BN only for "BN"/"SyncBN").
    # True: every statistics-keeping norm in the heads below gets one copy per FPN level sharing the
    # parameters (any registered norm: BN, GhostBN, EvalNorm, MABN, third-party).
    node.ENABLED = False
    # Class names of the heads whose norms are applied once per FPN level; default ["RetinaNetHead"].
    node.HEADS = list(_DEFAULT_HEADS)
    # Levels per head; default 0 = infer (RetinaNetHead: len(MODEL.RETINANET.IN_FEATURES)).
    node.NUM_LEVELS = 0


def check_config(cfg) -> None:
    node = bnstats_node(cfg, "PER_LEVEL")
    if node is None:
        return
    enabled = node.get("ENABLED", False)
    if not isinstance(enabled, bool):
        raise ValueError(f"BNSTATS.PER_LEVEL.ENABLED = {enabled!r}: expected True or False")
    heads = node.get("HEADS", list(_DEFAULT_HEADS))
    if not isinstance(heads, (list, tuple)) or not all(isinstance(h, str) and h for h in heads):
        raise ValueError(f"BNSTATS.PER_LEVEL.HEADS = {heads!r}: expected a list of head class names")
    _configured_levels(node)


def _configured_levels(node) -> int:
    value = node.get("NUM_LEVELS", 0) if node is not None else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"BNSTATS.PER_LEVEL.NUM_LEVELS = {value!r}: expected 0 (infer) or a positive integer")
    return value


# ---------------------------------------------------------------------------------------------
# the transform


def _keeps_statistics(module: nn.Module) -> bool:
    return not isinstance(module, FrozenBatchNorm2d) and keeps_statistics(module)


def _is_cycle_list(module: nn.Module) -> bool:
    return isinstance(module, CycleBatchNormList)


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
    if not _is_cycle_list(cycle) or len(cycle) == 0:
        return None
    name = _cycle_norm_name(cycle)
    if name is None or (name == "SyncBN" and not replaces_detectron2(cfg)) or (only_sync and name != "SyncBN"):
        return None
    norm = get_norm(configure_norm(cfg, name), cycle[0].num_features)
    device = _device_of(cycle)
    return norm.to(device) if device is not None else norm


def _num_levels(head: nn.Module, cfg, configured: int) -> int:
    """NUM_LEVELS if > 0 (checked against a RetinaNetHead's levels), else a RetinaNetHead's levels."""
    known = len(cfg.MODEL.RETINANET.IN_FEATURES) if isinstance(head, RetinaNetHead) and cfg is not None else None
    if configured > 0:
        if known is not None and known != configured:
            raise ValueError(
                f"BNSTATS.PER_LEVEL.NUM_LEVELS = {configured} but {type(head).__name__} has {known} levels "
                "(MODEL.RETINANET.IN_FEATURES); leave it 0 to infer"
            )
        return configured
    if known is not None:
        return known
    raise ValueError(
        f"BNSTATS.PER_LEVEL: cannot infer the number of FPN levels of head {type(head).__name__}; "
        "set BNSTATS.PER_LEVEL.NUM_LEVELS to a positive integer"
    )


def _wrap_head(head: nn.Module, num_levels: int, cfg, only_sync: bool) -> List[PerLevelNorm]:
    replaced = {}

    def build(child):
        norm = rebuild_cycle_list(child, cfg, only_sync)
        if norm is not None:
            replaced[id(norm)] = child
        return norm

    predicate = (lambda m: False) if only_sync else _keeps_statistics
    wrappers = wrap_per_level(head, num_levels, predicate=predicate, build=build, leave=_is_cycle_list)
    for wrapper in wrappers:
        cycle = replaced.get(id(wrapper.levels[0]))
        if cycle is not None:
            if len(cycle) != wrapper.num_levels:
                raise ValueError(
                    f"{type(head).__name__}: detectron2 built {len(cycle)} per-level norms but "
                    f"BNSTATS.PER_LEVEL.NUM_LEVELS = {wrapper.num_levels}; leave it 0 to infer"
                )
            wrapper.load_state_dict(cycle.state_dict(), strict=True)
    return wrappers


def _rebuild_sync_cycle_lists(model: nn.Module, cfg) -> None:
    """A CycleBatchNormList of nn.SyncBatchNorm outside the listed heads: same fix, plain cycling."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            norm = rebuild_cycle_list(child, cfg, only_sync=True)
            if norm is not None:
                wrapper = PerLevelNorm(norm, len(child))
                wrapper.load_state_dict(child.state_dict(), strict=True)
                setattr(parent, name, wrapper)


def transform(model: nn.Module, cfg) -> None:
    """Per-level norms in the configured heads, and the plug-in's SyncBN in detectron2's cycle lists."""
    node = bnstats_node(cfg, "PER_LEVEL")
    enabled = bool(node.get("ENABLED", False)) if node is not None else False
    heads = set(node.get("HEADS", _DEFAULT_HEADS)) if node is not None else set(_DEFAULT_HEADS)
    configured = _configured_levels(node)
    matched = 0
    for module in list(model.modules()):
        if type(module).__name__ not in heads:
            continue
        matched += 1
        if enabled:
            levels = _num_levels(module, cfg, configured)
        else:  # only detectron2's SyncBN lists are rebuilt, with the length detectron2 gave them
            cycles = [m for m in module.modules() if _is_cycle_list(m)]
            if not cycles:
                continue
            levels = len(cycles[0])
        count = len(_wrap_head(module, levels, cfg, only_sync=not enabled))
        if count:
            logger.info("per-level statistics: %d norms of %s, %d levels each", count, type(module).__name__, levels)
    if enabled and matched == 0:
        logger.warning(
            "BNSTATS.PER_LEVEL.ENABLED but the model has no head of class %s; nothing to do", sorted(heads)
        )
    _rebuild_sync_cycle_lists(model, cfg)
    return None


# Per-level statistics are a way of applying every norm, not a norm of their own: a declaration
# without names, whose transform runs after every norm's (it copies the layers they prepared).
NORM = Norm(
    name="per_level",
    config_key="PER_LEVEL",
    defaults=defaults,
    check=check_config,
    transform=transform,
    transform_order=10,
)
