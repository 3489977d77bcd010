"""Weight Standardization in detectron2's models: which convolutions feed a "GN+WS"/"BN+WS" norm, the
detectron2 ``Conv2d`` that standardizes its weight, and the deployment fold. The declarations are
:mod:`d2_bnstats.d2.norms.ws_gn` and :mod:`d2_bnstats.d2.norms.ws_bn`; the maths is
:mod:`d2_bnstats.layers.weight_standardization`.

Which convs to standardize, without forking detectron2's modules: every detectron2 ``Conv2d`` applies
its ``.norm`` right after the convolution, so they are the ``Conv2d`` instances whose ``.norm`` is a
WS norm (stem, bottleneck and shortcut convs, FPN, box and mask heads); in an ``nn.Sequential`` an
``nn.Conv2d`` directly followed by one. With ``MODEL.BACKBONE.FREEZE_AT`` detectron2 turns the
``WSBatchNorm2d`` of frozen stages into ``FrozenBatchNorm2d``; the convs before those are standardized
too (their weights were trained standardized). Each conv gets a standardized subclass of its own class
(:class:`StandardizedConv2d` for detectron2's ``Conv2d``); parameters and checkpoint keys are unchanged.
"""
import logging
from typing import Callable, List, Tuple

from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from ..layers.weight_standardization import (
    WeightStandardizedConv2d,
    WSGroupNorm,
    fold_weight_standardization,
    make_weight_standardized,
)
from .config import bnstats_node

logger = logging.getLogger(__name__)


class StandardizedConv2d(WeightStandardizedConv2d, D2Conv2d):
    """detectron2's ``Conv2d`` (norm and activation after the conv) with a standardized weight."""

    def forward(self, x):
        x = self._conv_forward(x, self.standardized_weight(), self.bias)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


_STANDARDIZED_CLASS = {D2Conv2d: StandardizedConv2d, nn.Conv2d: WeightStandardizedConv2d}


def _resnet_scope(model: nn.Module) -> set:
    from detectron2.modeling.backbone import ResNet

    return {id(m) for module in model.modules() if isinstance(module, ResNet) for m in module.modules()}


def convs_before(model: nn.Module, feeds: Callable[[nn.Module, nn.Module], bool]) -> List[Tuple[str, nn.Conv2d]]:
    """``(name, conv)`` of every conv whose output goes straight into a norm ``n`` with ``feeds(conv, n)``."""
    pairs, seen = [], set()
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        norm = getattr(module, "norm", None)
        if isinstance(module, nn.Conv2d) and norm is not None and feeds(module, norm):
            if id(module) not in seen:
                seen.add(id(module))
                pairs.append((name, module))
        elif isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (n1, c1), (_, c2) in zip(children, children[1:]):
                if isinstance(c1, nn.Conv2d) and getattr(c1, "norm", None) is None and feeds(c1, c2):
                    if id(c1) not in seen:
                        seen.add(id(c1))
                        pairs.append((prefix + n1, c1))
    return pairs


def standardize_convs(model: nn.Module, norm_types: tuple, eps: float, frozen_resnet: bool = False) -> List[str]:
    """Standardize (in place) every conv feeding a norm of ``norm_types`` (and, with ``frozen_resnet``,
    every ResNet conv feeding a ``FrozenBatchNorm2d``); returns their names."""
    scope = _resnet_scope(model) if frozen_resnet else set()

    def feeds(conv, norm):
        return isinstance(norm, norm_types) or (isinstance(norm, FrozenBatchNorm2d) and id(conv) in scope)

    done = []
    for name, conv in convs_before(model, feeds):
        cls = type(conv) if isinstance(conv, WeightStandardizedConv2d) else _STANDARDIZED_CLASS.get(type(conv))
        if cls is None:
            logger.warning("Weight Standardization: %s is a %s, not detectron2's Conv2d or nn.Conv2d; left as is",
                           name, type(conv).__name__)
            continue
        make_weight_standardized(conv, cls, eps=eps)
        done.append(name)
    return done


def transform_for(norm_types: tuple, names: Tuple[str, ...], config_key: str):
    """The model transform of a WS declaration: standardize the convs feeding its norms, with
    ``BNSTATS.<config_key>.EPS``."""

    def transform(model: nn.Module, cfg) -> None:
        node = bnstats_node(cfg, config_key)
        eps = float(node.get("EPS", 1e-5)) if node is not None else 1e-5
        frozen = (
            cfg is not None
            and cfg.MODEL.RESNETS.get("NORM", "") in names
            and cfg.MODEL.BACKBONE.FREEZE_AT > 0
        )
        done = standardize_convs(model, norm_types, eps, frozen_resnet=frozen)
        if done:
            logger.info("Weight Standardization (%s): %d convs standardized", "/".join(names), len(done))
        return None

    return transform


def fold_group_norm_ws(model: nn.Module) -> List[str]:
    """Deployment of "GN+WS": the convs feeding WSGroupNorm store Ŵ and become plain convs, and the
    WSGroupNorm layers plain ``nn.GroupNorm`` (the same computation); returns their names."""
    fed = convs_before(model, lambda conv, norm: isinstance(norm, WSGroupNorm))
    fed_ids = {id(conv) for _, conv in fed}
    names = fold_standardized_convs(model, lambda conv: id(conv) in fed_ids)
    for name, module in model.named_modules():
        if type(module) is WSGroupNorm:
            module.__class__ = nn.GroupNorm
            names.append(name)
    return names


def fold_other_ws(model: nn.Module) -> List[str]:
    """Deployment of "BN+WS": every standardized conv that does not feed a WSGroupNorm stores Ŵ and
    becomes a plain conv (the BN after it is then frozen and folded as any BN)."""
    gn_fed = {id(conv) for _, conv in convs_before(model, lambda conv, norm: isinstance(norm, WSGroupNorm))}
    return fold_standardized_convs(model, lambda conv: id(conv) not in gn_fed)


def fold_standardized_convs(model: nn.Module, chosen_if: Callable[[nn.Module], bool]) -> List[str]:
    """Fold (store Ŵ, plain class back) every standardized conv of ``model`` for which ``chosen_if``
    holds; returns their names. The deployment conversions of the WS declarations use it."""
    holder = nn.Module()  # fold_weight_standardization walks a module: give it the chosen convs only
    chosen = [(n, m) for n, m in model.named_modules() if isinstance(m, WeightStandardizedConv2d) and chosen_if(m)]
    for i, (_, conv) in enumerate(chosen):
        holder.add_module(str(i), conv)
    fold_weight_standardization(holder)
    return [name for name, _ in chosen]
