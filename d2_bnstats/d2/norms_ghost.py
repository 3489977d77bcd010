"""Norm name "GhostBN" → :class:`d2_bnstats.layers.ghost_bn.GhostBatchNorm2d`.

Option: ``BNSTATS.GHOST_BN.VIRTUAL_BATCH_SIZE`` (samples per sub-batch; default 32 outside a build).
"""
from ..layers.ghost_bn import GhostBatchNorm2d
from ..registry import register_norm
from .build import current_config
from .options import positive_int_option


def build_ghost_bn(out_channels: int):
    size = positive_int_option(current_config(), "BNSTATS.GHOST_BN.VIRTUAL_BATCH_SIZE", default=32)
    return GhostBatchNorm2d(out_channels, virtual_batch_size=size)


register_norm("GhostBN", build_ghost_bn)
