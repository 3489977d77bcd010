"""detectron2 glue of Ghost BN: the norm "GhostBN" → :class:`d2_bnstats.layers.ghost_bn.GhostBatchNorm2d`,
and its ``BNSTATS.GHOST_BN`` config node (option ``VIRTUAL_BATCH_SIZE`` → ``virtual_batch_size``;
the layer's default, 32, without a config).
"""
from ...layers.ghost_bn import GhostBatchNorm2d
from ...registry import Norm
from ..config import bnstats_node, positive_int


def defaults(node) -> None:
    """``BNSTATS.GHOST_BN``: the options of the norm "GhostBN"."""
    # "GhostBN": samples (images or RoIs) per sub-batch; default 32. A batch of N is cut into
    # ceil(N / VIRTUAL_BATCH_SIZE) sub-batches whose sizes differ by at most one.
    node.VIRTUAL_BATCH_SIZE = 32


def layer_options(cfg, name: str) -> dict:
    node = bnstats_node(cfg, "GHOST_BN")
    if node is None or "VIRTUAL_BATCH_SIZE" not in node:
        return {}
    return {"virtual_batch_size": positive_int(node, "VIRTUAL_BATCH_SIZE", "BNSTATS.GHOST_BN.VIRTUAL_BATCH_SIZE", 32)}


def check_config(cfg) -> None:
    layer_options(cfg, "GhostBN")


NORM = Norm(
    name="ghost",
    factories={"GhostBN": GhostBatchNorm2d},
    config_key="GHOST_BN",
    defaults=defaults,
    check=check_config,
    options=layer_options,
    statistics="population",  # the moving average of sub-batch statistics, not of the batch's
    layer_types=(GhostBatchNorm2d,),
)
