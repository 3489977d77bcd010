"""detectron2 glue of synchronized BN: the norm "SyncBN" → :class:`d2_bnstats.layers.sync_bn.SyncBatchNorm2d`,
and its ``BNSTATS.SYNC_BN`` config node.

Decision: the plug-in *replaces* detectron2's "SyncBN" entry (``overrides_detectron2`` of its declaration) instead of
adding a new name, because every existing config that says "SyncBN" (detectron2's own
``Misc/*syncbn*`` configs, users' configs) then works in one process, on CPU/gloo and with empty RoI
batches, with the same exact global-batch statistics that torch's layer computes where it runs.
Consequences, all documented in docs/sync_and_shuffle.md:

- ``MODEL.*.NORM: "SyncBN"`` builds ``SyncBatchNorm2d`` (a ``nn.BatchNorm2d`` subclass, not a
  ``nn.SyncBatchNorm``); code that tests ``isinstance(m, nn.SyncBatchNorm)`` no longer matches;
- torch's fused CUDA implementation stays available as detectron2's "nnSyncBN", and the config key
  ``BNSTATS.SYNC_BN.REPLACE_D2 False`` (the factory option ``replace_detectron2``) restores
  detectron2's "SyncBN" for a config;
- detectron2's RetinaNet head turns the exact string "SyncBN" into a ``CycleBatchNormList`` of
  ``nn.SyncBatchNorm`` without asking ``get_norm``; the per-level model transform
  (:mod:`d2_bnstats.d2.norms.per_level`) rebuilds those with this layer, one per FPN level.
"""
from torch import nn

from ...layers.sync_bn import SyncBatchNorm2d
from ...registry import Norm, detectron2_get_norm
from ..config import bnstats_node


def build_sync_bn(out_channels: int, replace_detectron2: bool = True) -> nn.Module:
    """The plug-in's layer, or with ``replace_detectron2=False`` what detectron2's "SyncBN" builds."""
    if not replace_detectron2:
        return detectron2_get_norm()("SyncBN", out_channels)
    return SyncBatchNorm2d(out_channels)


def defaults(node) -> None:
    """``BNSTATS.SYNC_BN``: whether "SyncBN" means the plug-in's layer."""
    # True (default): the norm name "SyncBN" builds d2_bnstats' SyncBatchNorm2d: exact statistics of
    # the global batch on CUDA/NCCL and CPU/gloo, plain BN in one process, empty inputs allowed.
    # False: detectron2's own "SyncBN" (torch nn.SyncBatchNorm, CUDA only). "nnSyncBN" is always torch's.
    node.REPLACE_D2 = True


def replaces_detectron2(cfg) -> bool:
    """Whether "SyncBN" means the plug-in's layer for ``cfg`` (True without a config or the key)."""
    node = bnstats_node(cfg, "SYNC_BN")
    value = node.get("REPLACE_D2", True) if node is not None else True
    if not isinstance(value, bool):
        raise ValueError(f"BNSTATS.SYNC_BN.REPLACE_D2 = {value!r}: expected True or False")
    return value


def layer_options(cfg, name: str) -> dict:
    if bnstats_node(cfg, "SYNC_BN") is None:
        return {}
    return {"replace_detectron2": replaces_detectron2(cfg)}


def check_config(cfg) -> None:
    replaces_detectron2(cfg)


NORM = Norm(
    name="sync",
    factories={"SyncBN": build_sync_bn},
    config_key="SYNC_BN",
    defaults=defaults,
    check=check_config,
    options=layer_options,
    statistics="batch",  # the moving average of the global batch's statistics it normalizes with
    layer_types=(SyncBatchNorm2d,),
    overrides_detectron2=("SyncBN",),
)
