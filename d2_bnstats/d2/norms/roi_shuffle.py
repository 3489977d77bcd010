"""detectron2 glue of RoI-shuffled BN: the norm "RoIShuffleBN" →
:class:`d2_bnstats.layers.roi_shuffle.RoIShuffleBatchNorm2d`, and its ``BNSTATS.ROI_SHUFFLE`` config node.

Meant for ``MODEL.ROI_BOX_HEAD.NORM`` (with ``ROI_BOX_HEAD.NUM_CONV > 0``) and
``MODEL.ROI_MASK_HEAD.NORM``. Option ``NUM_GROUPS`` → ``num_groups`` (groups normalized separately in
one process; the layer's default, 2, without a config).
"""
from typing import Callable, Dict

from detectron2.config import CfgNode as CN
from torch import nn

from ...layers.roi_shuffle import RoIShuffleBatchNorm2d
from ..config import bnstats_node, positive_int

NORMS: Dict[str, Callable[..., nn.Module]] = {"RoIShuffleBN": RoIShuffleBatchNorm2d}


def add_config(bnstats: CN) -> None:
    """``BNSTATS.ROI_SHUFFLE``: the options of the norm "RoIShuffleBN"."""
    bnstats.ROI_SHUFFLE = CN()
    # "RoIShuffleBN", training in ONE process: the shuffled RoIs are normalized in this many groups
    # (default 2; 1 = plain BN). With several processes each normalizes one split; this is unused.
    bnstats.ROI_SHUFFLE.NUM_GROUPS = 2


def layer_options(cfg, name: str) -> dict:
    node = bnstats_node(cfg, "ROI_SHUFFLE")
    if node is None or "NUM_GROUPS" not in node:
        return {}
    return {"num_groups": positive_int(node, "NUM_GROUPS", "BNSTATS.ROI_SHUFFLE.NUM_GROUPS", 2)}


def check_config(cfg) -> None:
    layer_options(cfg, "RoIShuffleBN")
