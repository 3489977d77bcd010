"""Batch Renormalization: BN whose training output is corrected towards the population statistics.

Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized Models"
(NeurIPS 2017), §3, Algorithm 1. Per channel, a training batch with mean μ_B and biased variance σ²_B
(σ_B = sqrt(σ²_B + ε)) and the moving averages μ, σ (σ = sqrt(running_var + ε)) give

    r = stop_gradient(clip(σ_B / σ, 1/r_max, r_max))
    d = stop_gradient(clip((μ_B − μ) / σ, −d_max, d_max))
    x̂ = (x − μ_B) / σ_B · r + d,        y = γ x̂ + β

then μ, σ are updated with the batch. At inference y = γ (x − μ) / σ + β: exactly a frozen BN with
the moving averages (``nn.BatchNorm2d``'s eval forward). Consequences the tests show:

- r_max = 1, d_max = 0 gives r = 1, d = 0: BN exactly, outputs and gradients bit for bit (such calls,
  and on the CPU the steps before the ramp, run BN's own training op; others compute x̂ and the batch
  statistics with that op and then y = (γ·r) x̂ + (β + γ·d), one elementwise pass more);
- unclipped, x̂ = (x − μ) / σ: the training output is the normalization by the moving averages, and,
  r and d being constants to autograd, the input gradient is BN's with the weight γ·r.

**Schedule** (paper §4: r_max = 1 and d_max = 0 for the first steps, then relaxed gradually): r_max(t)
rises linearly from 1 to ``r_max`` and d_max(t) from 0 to ``d_max`` over the steps t in
[``ramp_start``, ``r_max_end``] and [``ramp_start``, ``d_max_end``]; the paper does not give the shape
of its relaxation, a linear ramp is this implementation's choice. t is the layer's count of training
batches before this one (``num_batches_tracked``, BN's own counter, so a checkpoint resumes the
schedule), read as a tensor: no host synchronisation.

**Moving averages**, where this differs from the paper: Algorithm 1 averages σ_B (a standard
deviation); this layer keeps BN's statistics exactly as ``nn.BatchNorm2d`` does (the moving average
of the batch mean and *unbiased* variance, torch's ``momentum``, the plug-in's guarded update
:func:`~d2_bnstats.layers.moments.update_running_stats`), and σ = sqrt(running_var + ε). So a BN
checkpoint is a Batch Renormalization checkpoint and back (the state is BN's: same keys, same
meaning, BN's ``_version``), and PreciseBN, FrozenBN and the deployment conversion treat the layer as
the BN it is at inference.

Empty input (an empty RoI batch) gives an empty output connected to the parameters
(:func:`~d2_bnstats.layers.moments.empty_output`).
"""
from typing import Tuple

import torch
from torch import nn

from .moments import bessel_correction, empty_output, guarded_batch_norm, update_running_stats


def ramp(t: torch.Tensor, start: int, end: int, first: float, last: float, dtype=torch.float32) -> torch.Tensor:
    """``first`` up to step ``start``, ``last`` from step ``end`` on, linear in between (a ``dtype``
    tensor on ``t``'s device)."""
    t = t.to(dtype)
    if end <= start:
        progress = (t >= start).to(dtype)
    else:
        progress = ((t - start) / float(end - start)).clamp(0.0, 1.0)
    return first + (last - first) * progress


def check_options(r_max: float, d_max: float, ramp_start: int, r_max_end: int, d_max_end: int) -> None:
    """ValueError naming the first bad option and what is accepted."""
    if not r_max >= 1.0:
        raise ValueError(f"r_max = {r_max!r}: expected a number >= 1 (r is clipped to [1/r_max, r_max])")
    if not d_max >= 0.0:
        raise ValueError(f"d_max = {d_max!r}: expected a number >= 0 (d is clipped to [-d_max, d_max])")
    for name, value in (("ramp_start", ramp_start), ("r_max_end", r_max_end), ("d_max_end", d_max_end)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} = {value!r}: expected an integer >= 0 (a training step)")


class BatchRenorm2d(nn.BatchNorm2d):
    """Batch Renormalization over (N, C, H, W) (see the module docstring).

    ``r_max``, ``d_max``: the final clipping bounds (paper §4: 3 and 5); ``ramp_start``, ``r_max_end``,
    ``d_max_end``: the schedule's steps (paper §4: relaxed after 5000 steps, r_max reaching 3 by 40k
    and d_max 5 by 25k steps). The other arguments are ``nn.BatchNorm2d``'s; the running statistics
    are required (the method uses them in training).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        ramp_start: int = 5000,
        r_max_end: int = 40000,
        d_max_end: int = 25000,
    ):
        if not track_running_stats:
            raise ValueError(
                "BatchRenorm2d needs its running statistics (track_running_stats=True): training corrects "
                "the batch statistics towards them"
            )
        check_options(r_max, d_max, ramp_start, r_max_end, d_max_end)
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.ramp_start = int(ramp_start)
        self.r_max_end = int(r_max_end)
        self.d_max_end = int(d_max_end)

    def clip_bounds(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(r_max(t), d_max(t)) for the next training batch (0-dim tensors of the running statistics' dtype)."""
        t, dtype = self.num_batches_tracked, self.running_mean.dtype
        return (
            ramp(t, self.ramp_start, self.r_max_end, 1.0, self.r_max, dtype),
            ramp(t, self.ramp_start, self.d_max_end, 0.0, self.d_max, dtype),
        )

    def plain_batch_norm(self) -> bool:
        """Whether this training call is BN exactly (r = 1, d = 0) by the host-side options: r_max = 1 and
        d_max = 0, or, with statistics on the CPU (reading the step costs nothing there), a step before
        the ramp starts. Such calls run BN's own op, so they are BN bit for bit and cost what BN costs."""
        if self.r_max == 1.0 and self.d_max == 0.0:
            return True
        tracked = self.num_batches_tracked
        return tracked.is_cpu and int(tracked) < self.ramp_start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        if x.numel() == 0:
            return empty_output(x, self.weight, self.bias)
        if self.plain_batch_norm():
            return guarded_batch_norm(self, x)
        if x.shape[0] * x[0, 0].numel() == 1:  # F.batch_norm's check, before any statistic is used
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
        # x̂ and the batch statistics in one op (BN's), then y = (γ r) x̂ + (β + γ d): one more pass
        x_hat, batch_mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, self.eps)
        with torch.no_grad():
            r_max, d_max = self.clip_bounds()
            dtype = self.running_mean.dtype
            batch_std = invstd.detach().to(dtype).reciprocal()  # σ_B = sqrt(σ²_B + ε)
            sigma = (self.running_var + self.eps).sqrt()
            r = (batch_std / sigma).clamp(min=1.0 / r_max, max=r_max)
            d = ((batch_mean.detach().to(dtype) - self.running_mean) / sigma).clamp(min=-d_max, max=d_max)
            count = x.numel() // x.shape[1]
            batch_var = (batch_std.double().square() - self.eps).clamp(min=0).to(dtype)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.affine:
            scale = (self.weight * r.to(self.weight.dtype)).reshape(shape)
            shift = (self.bias + self.weight * d.to(self.weight.dtype)).reshape(shape)
        else:
            scale, shift = r.to(x.dtype).reshape(shape), d.to(x.dtype).reshape(shape)
        y = torch.addcmul(shift, x_hat, scale)
        counted = torch.tensor(float(count), dtype=dtype, device=x.device)
        update_running_stats(self, counted, batch_mean.detach(), batch_var * bessel_correction(counted))
        return y

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", r_max={self.r_max}, d_max={self.d_max}, ramp_start={self.ramp_start}, "
            f"r_max_end={self.r_max_end}, d_max_end={self.d_max_end}"
        )
