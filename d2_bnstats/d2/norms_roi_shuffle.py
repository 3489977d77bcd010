"""Norm name "RoIShuffleBN" → :class:`d2_bnstats.layers.roi_shuffle.RoIShuffleBatchNorm2d`.

Meant for ``MODEL.ROI_BOX_HEAD.NORM`` (with ``ROI_BOX_HEAD.NUM_CONV > 0``) and
``MODEL.ROI_MASK_HEAD.NORM``. Option: ``BNSTATS.ROI_SHUFFLE.NUM_GROUPS`` (groups normalised
separately in one process; default 2 outside a build).
"""
from ..layers.roi_shuffle import RoIShuffleBatchNorm2d
from ..registry import register_norm
from .build import current_config
from .options import positive_int_option


def build_roi_shuffle_bn(out_channels: int):
    groups = positive_int_option(current_config(), "BNSTATS.ROI_SHUFFLE.NUM_GROUPS", default=2)
    return RoIShuffleBatchNorm2d(out_channels, num_groups=groups)


register_norm("RoIShuffleBN", build_roi_shuffle_bn)
