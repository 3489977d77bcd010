"""Cross-Iteration BN in detectron2: the norm "CrossIterBN" →
:class:`d2_bnstats.layers.cross_iteration_bn.CrossIterationBatchNorm2d`, its ``BNSTATS.CROSS_ITER_BN``
node (``WINDOW`` → ``window``, k; ``BURN_IN`` → ``burn_in``), and the model transform that binds each
layer to the weight of the conv before it (the Taylor compensation differentiates through that conv).

The conv of a layer: a detectron2 ``Conv2d`` whose ``.norm`` is the layer, or an ``nn.Conv2d``
directly before it in an ``nn.Sequential``. A layer without such a conv is made plain BN (``window = 1``) with a warning. At
deployment the layer is a BN with population statistics: the generic conversion freezes it.
"""
import logging

from torch import nn

from ...layers.cross_iteration_bn import CrossIterationBatchNorm2d
from ...registry import Norm
from ..config import bnstats_node, positive_int

logger = logging.getLogger(__name__)

KEY = "BNSTATS.CROSS_ITER_BN"


def defaults(node) -> None:
    """``BNSTATS.CROSS_ITER_BN``: the options of "CrossIterBN" (Yao et al. 2021)."""
    # k: iterations whose compensated statistics are averaged (1 = plain BN). Default 4.
    node.WINDOW = 4
    # Training iterations of plain BN before the window is used (the paper's burn-in). Default 100.
    node.BURN_IN = 100


def layer_options(cfg, name: str) -> dict:
    node = bnstats_node(cfg, "CROSS_ITER_BN")
    if node is None:
        return {}
    burn_in = node.get("BURN_IN", 100)
    if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
        raise ValueError(f"{KEY}.BURN_IN = {burn_in!r}: expected an integer >= 0")
    return {"window": positive_int(node, "WINDOW", f"{KEY}.WINDOW", 4), "burn_in": burn_in}


def check_config(cfg) -> None:
    layer_options(cfg, "CrossIterBN")


def transform(model: nn.Module, cfg) -> None:
    """Bind every CrossIterationBatchNorm2d to the weight of the conv before it."""
    layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    if not layers:
        return None
    bound = set()
    for module in model.modules():
        norm = getattr(module, "norm", None)
        if isinstance(module, nn.Conv2d) and isinstance(norm, CrossIterationBatchNorm2d):
            norm.bind_weight(module.weight)
            bound.add(id(norm))
    for parent in model.modules():
        if isinstance(parent, nn.Sequential):
            children = list(parent.children())
            for conv, norm in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(norm, CrossIterationBatchNorm2d):
                    norm.bind_weight(conv.weight)
                    bound.add(id(norm))
    orphans = [m for m in layers if id(m) not in bound and m.window > 1]
    for layer in orphans:
        layer.window = 1
    if orphans:
        logger.warning("Cross-Iteration BN: %d layers have no conv right before them; they are plain BN", len(orphans))
    logger.info("Cross-Iteration BN: %d layers bound to the weights of their convs", len(bound))
    return None


NORM = Norm(
    name="cross_iteration",
    factories={"CrossIterBN": CrossIterationBatchNorm2d},
    config_key="CROSS_ITER_BN",
    defaults=defaults,
    check=check_config,
    options=layer_options,
    transform=transform,
    statistics="population",  # BN's moving average, of the window's statistics
    layer_types=(CrossIterationBatchNorm2d,),
)
