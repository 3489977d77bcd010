"""Norm name "SyncBN" → :class:`d2_bnstats.layers.sync_bn.SyncBatchNorm2d` (overrides detectron2's).

Decision: the plug-in *replaces* detectron2's "SyncBN" entry (``register_norm(..., force=True)``)
instead of adding a new name, because every existing config that says "SyncBN" (detectron2's own
``Misc/*syncbn*`` configs, users' configs) then works in one process, on CPU/gloo and with empty RoI
batches, with the same exact global-batch statistics that torch's layer computes where it runs.
Consequences, all documented in docs/sync_and_shuffle.md:

- ``MODEL.*.NORM: "SyncBN"`` builds ``SyncBatchNorm2d`` (a ``nn.BatchNorm2d`` subclass, not a
  ``nn.SyncBatchNorm``); code that tests ``isinstance(m, nn.SyncBatchNorm)`` no longer matches;
- torch's fused CUDA implementation stays available as detectron2's "nnSyncBN", and the config key
  ``BNSTATS.SYNC_BN.REPLACE_D2 False`` restores detectron2's "SyncBN" for a config;
- detectron2's RetinaNet head turns the exact string "SyncBN" into a ``CycleBatchNormList`` of
  ``nn.SyncBatchNorm`` without asking ``get_norm``; the per-level model transform
  (``d2_bnstats.d2.per_level``) rebuilds those with this layer, one per FPN level.
"""
from ..layers.sync_bn import SyncBatchNorm2d
from ..registry import register_norm
from .build import current_config


def sync_bn_replaces_detectron2(cfg=None) -> bool:
    """Whether "SyncBN" means the plug-in's layer for ``cfg`` (default: the config being built)."""
    cfg = current_config() if cfg is None else cfg
    if cfg is None or "BNSTATS" not in cfg or "SYNC_BN" not in cfg.BNSTATS:
        return True
    return bool(cfg.BNSTATS.SYNC_BN.REPLACE_D2)


def build_sync_bn(out_channels: int):
    if not sync_bn_replaces_detectron2():
        from .patch import original_get_norm

        return original_get_norm()("SyncBN", out_channels)
    return SyncBatchNorm2d(out_channels)


register_norm("SyncBN", build_sync_bn, force=True)
