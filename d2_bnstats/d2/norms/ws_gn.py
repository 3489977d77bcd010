"""GN + Weight Standardization in detectron2: the norm "GN+WS" → :class:`d2_bnstats.layers.weight_standardization.WSGroupNorm`
(GroupNorm) after a weight-standardized conv, and its ``BNSTATS.WS_GN`` node (``NUM_GROUPS`` →
``num_groups``; ``EPS``, the ε of the standardization). The model transform standardizes the convs
feeding these norms; deployment folds Ŵ into plain convs and leaves plain GroupNorm
(:mod:`d2_bnstats.d2.weight_standardization`).
"""
from ...layers.weight_standardization import WSGroupNorm
from ...registry import Norm
from ..config import bnstats_node, positive_int
from ..weight_standardization import fold_group_norm_ws, transform_for

KEY = "BNSTATS.WS_GN"


def build_gn_ws(out_channels: int, num_groups: int = 32) -> WSGroupNorm:
    """detectron2's "GN" (32 groups) for a weight-standardized conv. Fewer channels than groups give
    one group per channel (detectron2's RetinaNet head builds a 1-channel norm only to read its type)."""
    if out_channels < num_groups:
        return WSGroupNorm(out_channels, out_channels)
    if out_channels % num_groups:
        raise ValueError(f"GN+WS: {out_channels} channels do not split into {KEY}.NUM_GROUPS = {num_groups} groups")
    return WSGroupNorm(num_groups, out_channels)


def defaults(node) -> None:
    """``BNSTATS.WS_GN``: the options of "GN+WS" (Qiao et al. 2019, §3)."""
    # groups of the GroupNorm after each standardized conv; default 32 (detectron2's "GN").
    node.NUM_GROUPS = 32
    # epsilon added to each output filter's weight variance in the standardization; default 1e-5.
    node.EPS = 1e-5


def layer_options(cfg, name: str) -> dict:
    node = bnstats_node(cfg, "WS_GN")
    if node is None:
        return {}
    eps = node.get("EPS", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{KEY}.EPS = {eps!r}: expected a number > 0")
    return {"num_groups": positive_int(node, "NUM_GROUPS", f"{KEY}.NUM_GROUPS", 32)}


def check_config(cfg) -> None:
    layer_options(cfg, "GN+WS")


NORM = Norm(
    name="ws_gn",
    factories={"GN+WS": build_gn_ws},
    config_key="WS_GN",
    defaults=defaults,
    check=check_config,
    options=layer_options,
    transform=transform_for((WSGroupNorm,), ("GN+WS",), "WS_GN"),
    deploy=fold_group_norm_ws,
    statistics="none",
    layer_types=(WSGroupNorm,),
)
