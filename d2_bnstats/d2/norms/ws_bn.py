"""BN + Weight Standardization in detectron2: the norm "BN+WS" → :class:`d2_bnstats.layers.weight_standardization.WSBatchNorm2d`
(BatchNorm) after a weight-standardized conv, and its ``BNSTATS.WS_BN`` node (``EPS``, the ε of the
standardization). The model transform standardizes the convs feeding these norms (and, with
``FREEZE_AT``, those before the FrozenBN detectron2 makes of them); deployment folds Ŵ into plain
convs, after which the BN is frozen and folded as any BN (:mod:`d2_bnstats.d2.weight_standardization`).
"""
from ...layers.weight_standardization import WSBatchNorm2d
from ...registry import Norm
from ..config import bnstats_node
from ..weight_standardization import fold_other_ws, transform_for

KEY = "BNSTATS.WS_BN"


def defaults(node) -> None:
    """``BNSTATS.WS_BN``: the options of "BN+WS" (Qiao et al. 2019, §3)."""
    # epsilon added to each output filter's weight variance in the standardization; default 1e-5.
    node.EPS = 1e-5


def check_config(cfg) -> None:
    node = bnstats_node(cfg, "WS_BN")
    eps = node.get("EPS", 1e-5) if node is not None else 1e-5
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{KEY}.EPS = {eps!r}: expected a number > 0")


NORM = Norm(
    name="ws_bn",
    factories={"BN+WS": WSBatchNorm2d},
    config_key="WS_BN",
    defaults=defaults,
    check=check_config,
    transform=transform_for((WSBatchNorm2d,), ("BN+WS",), "WS_BN"),
    deploy=fold_other_ws,
    statistics="batch",  # BN's: the moving average of the batch statistics it normalizes with
    layer_types=(WSBatchNorm2d,),
)
