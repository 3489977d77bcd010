"""MABN's training-mode forward and backward as one autograd function (the maths of
:mod:`d2_bnstats.layers.mabn`, ICLR 2020 §4.1-4.2), with the per-channel reductions it needs.

Forward: χ² (mean of x², no mean centring), its SMA S over the ring buffer, renormalization r against
R, y = γ r x / sqrt(S + ε) + b. Backward: Ψ = mean(g z), its SMA Ψ̄, dL/dx = (g − z Ψ̄) / sqrt(S + ε)
(g_B, the mean of the output gradient, is dropped). The backward hands the call's χ² and Ψ to the
layer (``layer._record``): a call is recorded only when its backward runs.

With ``sync`` the sums of x² and g z are added over processes (one all-reduce each), which gives the
statistics of the global batch.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .moments import all_reduce_sum, bessel_correction, world_size


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every input dtype but float64 (statistics of low-precision inputs in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def channel_sums(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Σ a·b, Σ a) per channel over (N, H, W), in float32 (float64 for float64 inputs).

    For float32/float64 inputs this is one fused pass: aten's batch-norm backward with saved mean
    0 and inverse std 1 returns exactly these two sums as its weight and bias gradients.
    """
    c = a.shape[1]
    dtype = accumulation_dtype(a.dtype)
    if a.numel() == 0:
        zeros = a.new_zeros(c, dtype=dtype)
        return zeros, zeros.clone()
    if a.dtype == b.dtype == dtype:
        ones, zeros = a.new_ones(c), a.new_zeros(c)
        _, sab, sa = torch.ops.aten.native_batch_norm_backward(
            a, b, ones, None, None, zeros, ones, True, 0.0, [False, True, True]
        )
        return sab, sa
    dims = [0] + list(range(2, a.dim()))
    a32, b32 = a.to(dtype), b.to(dtype)
    return (a32 * b32).sum(dims), a32.sum(dims)


def channel_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against ``like`` (channels in dim 1)."""
    shape = [1] * like.dim()
    shape[1] = -1
    return v.reshape(shape)


def affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x · scale + shift per channel (one fused pass for float32/float64)."""
    if x.dtype == scale.dtype == shift.dtype and x.dtype in (torch.float32, torch.float64) and x.numel() > 0:
        ones, zeros = scale.new_ones(scale.shape), scale.new_zeros(scale.shape)
        # eps > 0 (older torch refuses 0); with var 1, 1/sqrt(1 + 1e-30) is exactly 1 in float32/64
        return F.batch_norm(x, zeros, ones, scale, shift, False, 0.0, 1e-30)
    return x * channel_view(scale, x).to(x.dtype) + channel_view(shift, x).to(x.dtype)


def _second_moment(x: torch.Tensor, sync: bool):
    """(χ², count): the mean of x² per channel over the local (or, with ``sync``, global) batch;
    count is a float locally and a tensor with ``sync``. A caller without ``sync`` passes no empty x."""
    c = x.shape[1]
    n = x.numel() // c if c else 0
    sum_sq, _ = channel_sums(x, x)
    if not sync:
        return sum_sq / n, float(n)
    packed = torch.cat([sum_sq, sum_sq.new_full((1,), float(n))])
    all_reduce_sum([packed])
    sum_sq, count = packed[:c], packed[c]
    return sum_sq / count.clamp(min=1.0), count


class MABNFunction(torch.autograd.Function):
    """Training-mode MABN: forward with SMA(χ²) and renormalization, backward with SMA(Ψ).

    ``replace_running_stats``: the PreciseBN convention of :class:`~d2_bnstats.layers.mabn.MABN2d`
    (R = this batch's χ², Bessel-inflated; mean 0).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, layer, replace_running_stats=False):
        n = x.numel() // x.shape[1] if x.shape[1] else 0
        dtype = accumulation_dtype(x.dtype)
        t = layer.steps + 1
        m = layer.buffer_size
        slot = (t - 1) % m
        use_sma = t > max(m, layer.warmup_iters)
        renorm = t > max(layer.renorm_start, layer.warmup_iters)
        sync = layer.sync and world_size() > 1

        chi2, count = _second_moment(x, sync)
        if replace_running_stats:
            total = count if sync else torch.tensor(float(n), dtype=dtype, device=x.device)
            layer.running_var.copy_(torch.where(total > 0, chi2 * bessel_correction(total), layer.running_var))
            layer.running_mean.zero_()
        chi2_buffer = layer.chi2_buffer.to(dtype)
        sma = (chi2_buffer.sum(0) - chi2_buffer[slot] + chi2) / m if use_sma else chi2
        var_eps = sma + layer.eps
        inv_std = var_eps.rsqrt()
        if renorm:
            clip = layer.renorm_clip
            r = (var_eps / (layer.running_var.to(dtype) + layer.eps)).sqrt().clamp(1.0 / clip, clip)
            r_inv_std = r * inv_std
        else:
            r_inv_std = inv_std
        scale = weight.to(dtype) * r_inv_std
        y = affine(x, scale, bias.to(dtype))

        ctx.save_for_backward(x, scale, r_inv_std, inv_std)
        ctx.layer, ctx.chi2, ctx.count, ctx.n = layer, chi2, count, n
        ctx.sync, ctx.use_sma, ctx.slot = sync, use_sma, slot
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, bias.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, scale, r_inv_std, inv_std = ctx.saved_tensors
        layer = ctx.layer
        m = layer.buffer_size
        sum_dyx, sum_dy = channel_sums(dy, x)
        psi_sum = scale * sum_dyx  # Σ g·z with g = dy·γ·r, z = x / sqrt(S + ε)
        if ctx.sync:
            all_reduce_sum([psi_sum])
            psi = psi_sum / ctx.count.clamp(min=1.0)
        else:
            psi = psi_sum / ctx.n
        if ctx.use_sma:
            psi_buffer = layer.psi_buffer.to(psi.dtype)
            psi_bar = (psi_buffer.sum(0) - psi_buffer[ctx.slot] + psi) / m
        else:
            psi_bar = psi
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # (g − z Ψ̄) / sqrt(S + ε) = dy · γ r / sqrt(S + ε) − x · Ψ̄ / (S + ε)
            dx = dy * channel_view(scale, dy).to(dy.dtype)
            dx.addcmul_(x, channel_view(-(inv_std * inv_std * psi_bar), x).to(dy.dtype))
        if ctx.needs_input_grad[1]:
            dw = (r_inv_std * sum_dyx).to(ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            db = sum_dy.to(ctx.bias_dtype)
        layer._record(ctx.chi2, psi, ctx.count)
        return dx, dw, db, None, None
