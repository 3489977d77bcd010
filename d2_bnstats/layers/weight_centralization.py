"""Weight centralization: convolutions whose output filters have zero mean.

Yan et al., "Towards Stabilizing Batch Statistics in Backward Propagation of Batch Normalization",
ICLR 2020, §4.2. For a conv weight W of shape [out, in, kh, kw] the centralized weight is

    Ŵ[o] = W[o] − α · mean over (in, kh, kw) of W[o]            (α = 1: fully centralized)

Normalizations without mean centring (MABN normalizes by the second moment only) rely on it: each
output channel of a centralized conv has a mean close to 0 whatever the input's mean.

Three things live here, the one implementation of weight centralization in the package:

* :func:`centralize`: the formula above, differentiable (the gradient of a centralized conv is the
  centred gradient, so SGD with momentum and weight decay keeps a centred stored weight centred).
* :class:`WeightCentralizedConv2d`: a conv that computes with ``centralize(weight, α)``. Instances
  are made by reassigning the class of an existing conv (:func:`make_weight_centralized`), so every
  parameter and state-dict key stays as it was. For conv classes with their own ``forward`` a
  subclass deriving from both is used (provided by the glue code of the library that owns the class).
  Optional ramp, for fine-tuning weights trained without centralization: with ``wc_ramp_iters`` = K
  > 0, α = min(1, t / K) where t is the step count (``.steps``) of the layer the conv feeds (see
  :meth:`WeightCentralizedConv2d.ramp_layer`); at t = 0 the conv is the original one.
* :func:`fold_weight_centralization`: for deployment or export, store every centralized conv's weight
  centred and give the conv its plain class back (same outputs, no centralization per forward).
"""
from typing import List, Optional

import torch
from torch import nn

from .conv_class import give_conv_class

__all__ = [
    "WeightCentralizedConv2d",
    "centralize",
    "centralize_conv_weight_",
    "fold_weight_centralization",
    "make_weight_centralized",
]


def centralize(weight: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Each output filter (dim 0) minus ``alpha`` × its mean over every other dimension."""
    if weight.dim() < 2:
        raise ValueError(
            "weight centralization applies to weights [out, in, ...] (conv: [out, in, kh, kw]); "
            f"got shape {tuple(weight.shape)}"
        )
    mean = weight.mean(dim=tuple(range(1, weight.dim())), keepdim=True)
    return weight - mean if alpha == 1.0 else weight - alpha * mean


def centralize_weight(weight: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Deprecated name of :func:`centralize`."""
    return centralize(weight, alpha)


class WeightCentralizedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that computes with :func:`centralize` of its weight (gradients flow through it).

    Not built directly: :func:`make_weight_centralized` gives an existing conv this class (or a
    subclass that also derives from the conv's own class), keeping every parameter and key.
    """

    wc_ramp_iters = 0  # default: fully centralized from the start (the authors' method)

    def link_mabn(self, layer: nn.Module) -> None:
        """The layer (anything with a ``steps`` count, normally the MABN layer this conv feeds) whose
        step count drives the ramp. Kept as a plain attribute holding a tuple: not a submodule, so no
        state-dict key; deep copies follow it to the copied layer."""
        self.__dict__["_wc_mabn"] = (layer,)

    def ramp_layer(self) -> Optional[nn.Module]:
        """The layer whose ``steps`` drive the ramp (the one given to :meth:`link_mabn`), or None."""
        linked = self.__dict__.get("_wc_mabn")
        return linked[0] if linked else None

    def centralization_factor(self) -> float:
        """α: 1 without a ramp, else min(1, t / wc_ramp_iters) (a host-side number, no sync)."""
        ramp = self.wc_ramp_iters
        if ramp <= 0:
            return 1.0
        layer = self.ramp_layer()
        if layer is None:
            return 1.0
        return min(1.0, layer.steps / ramp)

    def centralized_weight(self) -> torch.Tensor:
        """The weight the conv computes with: :func:`centralize` (weight, :meth:`centralization_factor`)."""
        return centralize(self.weight, self.centralization_factor())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.centralized_weight(), self.bias)


@torch.no_grad()
def centralize_conv_weight_(conv: nn.Conv2d) -> None:
    """Centralize a conv's stored weight in place (no change to a weight-centralized conv's output)."""
    conv.weight.copy_(centralize(conv.weight))


def make_weight_centralized(
    conv: nn.Conv2d,
    cls: Optional[type] = None,
    ramp_iters: int = 0,
    ramp_layer: Optional[nn.Module] = None,
) -> nn.Conv2d:
    """Make ``conv`` (in place) compute with its centralized weight; returns it.

    ``cls``: the weight-centralized class to give it, a subclass of :class:`WeightCentralizedConv2d`
    and of ``type(conv)``; default :class:`WeightCentralizedConv2d`, for a plain ``nn.Conv2d`` only
    (another conv class has its own ``forward``, which needs its own centralized subclass). Without a
    ramp the stored weight is centralized too (no change to any output); with ``ramp_iters`` > 0 it is
    left as it is and the centralization ramps in over ``ramp_layer``'s first ``ramp_iters`` steps.
    A conv that is weight-centralized already keeps its class.
    """
    give_conv_class(conv, WeightCentralizedConv2d, cls)
    if ramp_iters > 0:
        conv.wc_ramp_iters = int(ramp_iters)
        if ramp_layer is not None:
            conv.link_mabn(ramp_layer)
    else:
        centralize_conv_weight_(conv)
    return conv


def plain_class(conv: WeightCentralizedConv2d) -> type:
    """The conv class a weight-centralized conv was made from (the first conv base that is not
    weight-centralized in its class hierarchy)."""
    return next(
        c for c in type(conv).__mro__ if issubclass(c, nn.Conv2d) and not issubclass(c, WeightCentralizedConv2d)
    )


def fold_weight_centralization(model: nn.Module) -> List[str]:
    """Store every weight-centralized conv's weight centred and give the conv its plain class back, so
    inference computes the same without centralizing on every forward (the model should then not be
    trained further: the plain conv no longer keeps its weight centred). Returns the names of the convs
    folded. A conv whose ramp has not finished is an error (folding would change its output)."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, WeightCentralizedConv2d)]
    for name, conv in convs:
        if conv.centralization_factor() < 1.0:
            raise ValueError(
                f"{name}: its centralization ramp (wc_ramp_iters={conv.wc_ramp_iters}) has not finished; "
                "fold only a model whose MABN layers have trained that many steps"
            )
    for _, conv in convs:
        centralize_conv_weight_(conv)
        conv.__class__ = plain_class(conv)
    return [name for name, _ in convs]
