"""Weight Standardization: convolutions whose output filters have zero mean and unit variance.

Qiao, Wang, Liu, Shen & Yuille, "Micro-Batch Training with Batch-Channel Normalization and Weight
Standardization" (2019), §3 ("Weight Standardization", eqs. 5-7). For a conv weight W of shape
[O, I, kh, kw], with n = I·kh·kw values per output filter o,

    μ_o = (1/n) Σ W[o],    σ_o = sqrt((1/n) Σ (W[o] − μ_o)² + ε),    Ŵ[o] = (W[o] − μ_o) / σ_o

and the conv computes with Ŵ; gradients flow through the standardization (the paper back-propagates
through it). The paper pairs it with GN ("GN + WS", its micro-batch recipe) and shows it helps BN too.

Where this differs from the authors' public code: that code divides by the *unbiased* standard
deviation plus 1e-5 (ε outside the square root); this module follows the paper's equation (biased
variance, ε inside). The two differ by a factor sqrt(n/(n−1)) per filter, i.e. a constant scale that
the following normalization removes.

Here, the one implementation of weight standardization in the package:

* :func:`standardize`: the formula above, differentiable.
* :class:`WeightStandardizedConv2d`: a conv that computes with ``standardize(weight, ws_eps)``.
  Instances are made by reassigning the class of an existing conv (:func:`make_weight_standardized`),
  so every parameter and state-dict key stays as it was; conv classes with their own ``forward`` use a
  subclass deriving from both (provided by the glue code of the library that owns the class). The
  stored weight is left as it is (standardizing is idempotent up to ε, so a standardized weight
  stays one).
* :class:`WSGroupNorm`, :class:`WSBatchNorm2d`: GN and BN exactly, with a type that says that the conv
  before them is weight-standardized (what a model transform looks for).
* :func:`fold_weight_standardization`: for deployment, store every standardized conv's weight as Ŵ
  and give the conv its plain class back (same outputs, no standardization per forward).
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .conv_class import give_conv_class

__all__ = [
    "WSBatchNorm2d",
    "WSGroupNorm",
    "WeightStandardizedConv2d",
    "fold_weight_standardization",
    "make_weight_standardized",
    "standardize",
]

DEFAULT_EPS = 1e-5


def standardize(weight: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Each output filter (dim 0) minus its mean, over sqrt(its biased variance + ``eps``)."""
    if weight.dim() < 2:
        raise ValueError(
            f"weight standardization applies to weights [out, in, ...] (conv: [out, in, kh, kw]); got shape {tuple(weight.shape)}"
        )
    if weight[0].numel() == 1:  # one value per filter: batch_norm refuses it; the formula gives 0
        var, mean = torch.var_mean(weight, dim=tuple(range(1, weight.dim())), correction=0, keepdim=True)
        return (weight - mean) * torch.rsqrt(var + eps)
    # The filters as the channels of a one-sample batch: batch normalization in training mode without
    # affine or running statistics is exactly this formula, in one fused kernel forward and backward
    # (4-5x faster than var_mean and two elementwise ops with their autograd nodes, on CPU).
    flat = weight.reshape(1, weight.shape[0], -1)
    return F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=eps).reshape(weight.shape)


class WeightStandardizedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that computes with :func:`standardize` of its weight.

    Not built directly: :func:`make_weight_standardized` gives an existing conv this class (or a
    subclass that also derives from the conv's own class), keeping every parameter and key.
    """

    ws_eps = DEFAULT_EPS

    def standardized_weight(self) -> torch.Tensor:
        return standardize(self.weight, self.ws_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def make_weight_standardized(conv: nn.Conv2d, cls: Optional[type] = None, eps: float = DEFAULT_EPS) -> nn.Conv2d:
    """Make ``conv`` (in place) compute with its standardized weight; returns it.

    ``cls``: a subclass of :class:`WeightStandardizedConv2d` and of ``type(conv)``; default
    :class:`WeightStandardizedConv2d`, for a plain ``nn.Conv2d`` only (another conv class has its own
    ``forward``). A conv that is standardized already keeps its class (and takes ``eps``)."""
    if not eps > 0:
        raise ValueError(f"eps = {eps!r}: expected a number > 0 (added to each filter's variance)")
    give_conv_class(conv, WeightStandardizedConv2d, cls)
    conv.ws_eps = float(eps)
    return conv


def plain_class(conv: WeightStandardizedConv2d) -> type:
    """The conv class a standardized conv was made from."""
    return next(
        c for c in type(conv).__mro__ if issubclass(c, nn.Conv2d) and not issubclass(c, WeightStandardizedConv2d)
    )


@torch.no_grad()
def fold_weight_standardization(model: nn.Module) -> List[str]:
    """Store every standardized conv's weight as Ŵ (in the weight's dtype, computed in float64) and
    give it its plain class back; returns the names of the convs folded. The model should then not be
    trained further (a plain conv no longer standardizes)."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, WeightStandardizedConv2d)]
    for _, conv in convs:
        conv.weight.copy_(standardize(conv.weight.double(), conv.ws_eps).to(conv.weight.dtype))
        conv.__class__ = plain_class(conv)
        conv.__dict__.pop("ws_eps", None)
    return [name for name, _ in convs]


class WSGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` after a weight-standardized conv ("GN + WS"); computes exactly as GN."""


class WSBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` after a weight-standardized conv ("BN + WS"); computes exactly as BN."""
