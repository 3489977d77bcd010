"""Cross-Iteration Batch Normalization: BN statistics over the last k iterations, each compensated to
the current weights of the convolution that produced the layer's input.

Yao, Cao, Zheng, Huang & Lin, "Cross-Iteration Batch Normalization" (CVPR 2021), §3-4. Per channel c,
the layer's input y = W ∗ x comes from a conv with weight θ = W. At iteration t the layer keeps, for
the previous k − 1 iterations t − τ, the batch mean μ_{t−τ} and mean of squares ν_{t−τ} (= E[y²]) and
their gradients with respect to θ at that time. Compensated to the current weights by the first-order
Taylor term (eqs. 6-7; the paper shows the preceding layer's weights suffice):

    μ_{t−τ}(θ_t) ≈ μ_{t−τ}(θ_{t−τ}) + ∂μ_{t−τ}/∂θ_{t−τ} · (θ_t − θ_{t−τ})        (same for ν)

and the statistics of the window (eq. 8; equal batch sizes, so a plain average):

    μ̄_t = (1/k) Σ_{τ=0}^{k−1} μ_{t−τ}(θ_t),    ν̄_t = (1/k) Σ_τ max(ν_{t−τ}(θ_t), μ_{t−τ}(θ_t)²),
    σ̄²_t = ν̄_t − μ̄_t²,    y' = γ (y − μ̄_t) / sqrt(σ̄²_t + ε) + β

Because each channel's μ_c, ν_c depend on θ only through that channel's filter W[c], the per-channel
gradients are one autograd pass each: ∂(Σ_c μ_c)/∂W has W[c]'s row equal to ∂μ_c/∂W[c].

Choices, where the paper leaves them open (its reference code makes the same ones): gradients flow
through the current iteration's μ_t, ν_t only (the compensated statistics of past iterations are
constants); the max(ν, μ²) clamp is applied to the past iterations (the current one satisfies it);
for the first ``burn_in`` training calls the layer is plain BN (the weights change too fast for a
first-order compensation; the paper's burn-in), while it already records the window. Running
statistics follow BN's convention (:func:`~d2_bnstats.layers.moments.update_running_stats`) with
the window's μ̄ and σ̄² (a batch of k·n values), so inference is a frozen BN.

Identities (tested): k = 1 is BN exactly; with unchanged weights (learning rate 0) the statistics
are those of the union of the last k batches (the Taylor terms vanish).

The window is transient state, kept as plain attributes (not buffers): checkpoints hold BN's state and
a reloaded layer refills its window, as after a restart. The layer needs the preceding conv's weight
(:meth:`CrossIterationBatchNorm2d.bind_weight`; in detectron2 models the plug-in's model transform
binds it); with k > 1 a training call without one is an error naming the fix. When the bound weight
does not require a gradient (a frozen conv, or ``torch.no_grad``) the past statistics are used
uncompensated (θ does not change then).
"""
import collections
import copy
from typing import Optional

import torch
from torch import nn

from .moments import bessel_correction, empty_output, guarded_batch_norm, update_running_stats

_Record = collections.namedtuple("_Record", "mean sq dmean dsq weight")


def compensate(record: _Record, weight: torch.Tensor):
    """(μ, ν) of a past iteration compensated to ``weight`` by the first-order Taylor term."""
    delta = (weight.detach() - record.weight).flatten(1)  # [C, fan-in]
    if record.dmean is None:
        return record.mean, record.sq
    mean = record.mean + (record.dmean.flatten(1) * delta).sum(1)
    sq = record.sq + (record.dsq.flatten(1) * delta).sum(1)
    return mean, sq


def window_statistics(mean_t: torch.Tensor, sq_t: torch.Tensor, past):
    """(μ̄, σ̄²) of the window from the current (μ_t, ν_t) and the compensated past [(μ, ν), ...]."""
    means = [mean_t] + [m for m, _ in past]
    squares = [sq_t] + [torch.maximum(s, m * m) for m, s in past]
    mean = torch.stack(means).mean(0)
    sq = torch.stack(squares).mean(0)
    return mean, (sq - mean * mean).clamp(min=0)


class CrossIterationBatchNorm2d(nn.BatchNorm2d):
    """Cross-Iteration BN over (N, C, H, W) (see the module docstring). ``window``: k, iterations whose
    statistics are combined (k = 1: BN); ``burn_in``: training calls of plain BN first."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 window: int = 4, burn_in: int = 0):
        for name, value, low in (("window", window, 1), ("burn_in", burn_in, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} = {value!r}: expected an integer >= {low}")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True)
        self.window = window
        self.burn_in = burn_in
        self.history = collections.deque(maxlen=window - 1)

    def bind_weight(self, weight: Optional[torch.Tensor]) -> None:
        """The weight [C, ...] of the conv whose output this layer normalizes (None: unbind). A plain
        attribute holding a tuple: no submodule or state-dict key; deep copies follow it to the copied conv."""
        if weight is not None and (weight.dim() < 2 or weight.shape[0] != self.num_features):
            raise ValueError(
                f"bind_weight: expected the weight of a conv with {self.num_features} output channels, "
                f"got shape {tuple(weight.shape)}"
            )
        self.__dict__["_cbn_weight"] = (weight,) if weight is not None else None
        self.history.clear()

    def __deepcopy__(self, memo):
        """A copy of a whole model binds to the copied conv (the weight is copied first, as the conv's
        parameter); a copy of the layer alone (per-level copies) stays bound to the same conv."""
        weight = self.bound_weight()
        if weight is not None and id(weight) not in memo:
            memo[id(weight)] = weight
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def bound_weight(self) -> Optional[torch.Tensor]:
        bound = self.__dict__.get("_cbn_weight")
        return bound[0] if bound else None

    def _record(self, y: torch.Tensor, mean: torch.Tensor, sq: torch.Tensor, weight: torch.Tensor) -> None:
        dmean = dsq = None
        if weight.requires_grad and y.requires_grad:
            dmean, dsq = (
                torch.autograd.grad(m.sum(), weight, retain_graph=True, allow_unused=True)[0] for m in (mean, sq)
            )
            if dmean is None or dsq is None:  # the input does not come from this weight
                raise RuntimeError(
                    "CrossIterationBatchNorm2d: the bound weight does not produce this layer's input; "
                    "bind the weight of the conv right before it"
                )
        self.history.appendleft(_Record(mean.detach(), sq.detach(), dmean, dsq, weight.detach().clone()))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(y)
        self._check_input_dim(y)
        if y.numel() == 0:
            return empty_output(y, self.weight, self.bias)
        if self.window == 1:
            return guarded_batch_norm(self, y)
        weight = self.bound_weight()
        if weight is None:
            raise RuntimeError(
                "CrossIterationBatchNorm2d with window > 1 needs the weight of the conv before it: call "
                "layer.bind_weight(conv.weight) (in detectron2 models built with the plug-in the model transform does it)"
            )
        dims = (0, 2, 3)
        yf = y.float() if y.dtype in (torch.float16, torch.bfloat16) else y
        mean_t = yf.mean(dims)
        sq_t = (yf * yf).mean(dims)
        past = [compensate(r, weight) for r in self.history]
        burning = int(self.num_batches_tracked) < self.burn_in
        self._record(y, mean_t, sq_t, weight)
        if burning:
            return guarded_batch_norm(self, y)
        mean, var = window_statistics(mean_t, sq_t, past)
        shape = (1, -1, 1, 1)
        out = (yf - mean.reshape(shape)) * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        count = torch.tensor(float(y.numel() // y.shape[1] * (1 + len(past))), device=y.device)
        with torch.no_grad():
            update_running_stats(self, count, mean.detach(), var.detach() * bessel_correction(count))
        return out.to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", window={self.window}, burn_in={self.burn_in}"
