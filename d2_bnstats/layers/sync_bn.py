"""Synchronised BatchNorm with the exact statistics of the global batch, on any device and backend.

BatchNorm (Ioffe & Szegedy 2015) normalises channel c with the mean μ and biased variance σ² of all
values of that channel in the batch, y = γ (x − μ) / sqrt(σ² + ε) + β. At 1–2 images per GPU the
batch of one process is too small (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", §3 and §5.3:
SyncBN); :class:`SyncBatchNorm2d` takes μ and σ² over the *global* batch of all processes:

    n = Σ_k n_k,   μ = Σ_k n_k μ_k / n,   σ² = Σ_k n_k (σ²_k + (μ_k − μ)²) / n

with n_k = N_k·H_k·W_k the number of values of process k, so processes may differ in batch size and
in spatial size, and a process may hold no values at all (an empty RoI batch). The moments come from
:func:`d2_bnstats.layers.moments.global_moments` (one all-gather of [n_k, μ_k, σ²_k]). The backward pass
is BN's, with its two reductions taken over the global batch: with x̂ = (x − μ)/sqrt(σ² + ε) and g the
output gradient,

    ∂L/∂x = γ / sqrt(σ² + ε) · (g − Σ g / n − x̂ · Σ g x̂ / n),   sums over all processes' values,

where Σ g and Σ g x̂ are summed by one :func:`~d2_bnstats.layers.moments.all_reduce_sum` of 2C numbers
(the gradient autograd would get by differentiating through ``global_moments``, computed with two
fused passes over x instead of the ~8 of the autograd graph). Weight and bias gradients are the local
Σ g x̂ and Σ g; DistributedDataParallel sums them over processes, giving BN's on the global batch.

Running statistics follow torch's conventions (``momentum`` weights the new value, ``running_var``
is the unbiased variance σ²·n/(n − 1) of the *global* batch), so every process holds the same running
statistics. They are updated once per forward and not at all when the global batch is empty, nor
when the batch statistics are not finite (the update is skipped and counted in ``nonfinite_skips``:
:func:`~d2_bnstats.layers.moments.commit_running_stats`).

Without an initialised process group, with one process, with ``sync=False`` or in evaluation mode the
layer is exactly ``nn.BatchNorm2d`` (the same ``F.batch_norm`` call, so the same output), except that
in training mode an empty input leaves the running statistics *and* ``num_batches_tracked``
untouched and so does a non-finite batch (:func:`~d2_bnstats.layers.moments.guarded_batch_norm`).

Differences from ``torch.nn.SyncBatchNorm``: works on CPU with gloo (and any backend with
``all_gather``), needs no process group in one process, accepts empty inputs, is a subclass of
``nn.BatchNorm2d`` (so detectron2's FrozenBN conversion and PreciseBN treat it as BN); it synchronises
over the default (whole-world) process group only, and on CUDA it uses a few unfused kernels where
torch's uses fused ones. A process whose loss does not depend on the layer's output (not even ×0)
would skip the backward all-reduce and hang the others; detectron2's losses always depend on it.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .moments import (
    add_skip_counter,
    all_reduce_sum,
    empty_output,
    global_moments,
    guarded_batch_norm,
    unbiased_variance,
    update_running_stats,
    world_size,
)


class _GlobalBatchNorm(torch.autograd.Function):
    """y = γ (x − μ) / sqrt(σ² + ε) + β with given global μ, σ² (count n); backward as in the module
    docstring (one all-reduce of Σ g, Σ g x̂). Collective in backward: every process must run it."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, count, eps):
        y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        ctx.eps = eps
        ctx.save_for_backward(x, weight, mean, var, count)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, var, count = ctx.saved_tensors
        eps = ctx.eps
        channels = mean.numel()
        if x.numel() > 0:
            # one fused pass: Σ g x̂ and Σ g over this process's values
            _, sum_gx, sum_g = torch.ops.aten.native_batch_norm_backward(
                grad.contiguous(), x, None, mean, var, None, None, False, eps, [False, True, True]
            )
            local = torch.cat([sum_g.to(mean.dtype), sum_gx.to(mean.dtype)])
        else:
            local = mean.new_zeros(2 * channels)
        sums = local.clone()
        all_reduce_sum([sums])
        n = count.clamp(min=1)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
        mean_g, mean_gx = sums[:channels] / n, sums[channels:] / n
        grad_x = None
        if ctx.needs_input_grad[0]:
            # ∂L/∂x = scale·g + (−scale·invstd·mean_gx)·x + scale·(invstd·mean_gx·μ − mean_g): one fused
            # per-channel affine of x (an inference-mode batch_norm) plus one in-place addcmul
            b = -scale * invstd * mean_gx
            c = scale * (invstd * mean_gx * mean - mean_g)
            # eps > 0 (older torch refuses 0); with var 1, 1/sqrt(1 + 1e-30) is exactly 1 in float32/64
            grad_x = F.batch_norm(x, torch.zeros_like(b), torch.ones_like(b), b, c, False, 0.0, 1e-30)
            grad_x.addcmul_(grad, scale.to(x.dtype).reshape((1, -1) + (1,) * (x.dim() - 2)))
        grad_weight = local[channels:].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = local[:channels].to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over the global batch of all processes (see module docstring).

    Args are those of ``nn.BatchNorm2d`` plus ``sync``: False makes it plain BN (useful to switch
    one layer off without rebuilding the model).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, sync=True, **kwargs):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats, **kwargs)
        self.sync = sync
        add_skip_counter(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        if not self.sync or world_size() == 1:
            if x.numel() == 0:
                return empty_output(x, self.weight, self.bias)
            return guarded_batch_norm(self, x)
        with torch.no_grad():
            moments = global_moments(x.detach(), channel_dim=1, sync=True)
        y = _GlobalBatchNorm.apply(x, self.weight, self.bias, moments.mean, moments.var, moments.count, self.eps)
        update_running_stats(self, moments.count, moments.mean, unbiased_variance(moments))
        return y

    def extra_repr(self):
        return super().extra_repr() + f", sync={self.sync}"
