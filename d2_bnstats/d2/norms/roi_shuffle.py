"""detectron2 glue of RoI-shuffled BN: the norm "RoIShuffleBN" →
:class:`d2_bnstats.layers.roi_shuffle.RoIShuffleBatchNorm2d`, and its ``BNSTATS.ROI_SHUFFLE`` config node.

Meant for ``MODEL.ROI_BOX_HEAD.NORM`` (with ``ROI_BOX_HEAD.NUM_CONV > 0``) and
``MODEL.ROI_MASK_HEAD.NORM``. Option ``NUM_GROUPS`` → ``num_groups`` (groups normalized separately in
one process; the layer's default, 2, without a config).
"""
from ...layers.roi_shuffle import RoIShuffleBatchNorm2d
from ...registry import Norm
from ..config import bnstats_node, positive_int


def defaults(node) -> None:
    """``BNSTATS.ROI_SHUFFLE``: the options of the norm "RoIShuffleBN"."""
    # "RoIShuffleBN", training in ONE process: the shuffled RoIs are normalized in this many groups
    # (default 2; 1 = plain BN). With several processes each normalizes one split; this is unused.
    node.NUM_GROUPS = 2


def layer_options(cfg, name: str) -> dict:
    node = bnstats_node(cfg, "ROI_SHUFFLE")
    if node is None or "NUM_GROUPS" not in node:
        return {}
    return {"num_groups": positive_int(node, "NUM_GROUPS", "BNSTATS.ROI_SHUFFLE.NUM_GROUPS", 2)}


def check_config(cfg) -> None:
    layer_options(cfg, "RoIShuffleBN")


NORM = Norm(
    name="roi_shuffle",
    factories={"RoIShuffleBN": RoIShuffleBatchNorm2d},
    config_key="ROI_SHUFFLE",
    defaults=defaults,
    check=check_config,
    options=layer_options,
    statistics="population",  # the moving average of the shuffled groups' statistics
    layer_types=(RoIShuffleBatchNorm2d,),
)
