"""Moments of the global batch across processes: the one piece every synchronised layer shares.

For channel c, process k holds n_k values with mean μ_k and biased variance σ²_k (n_k = N_k·H_k·W_k,
so processes may differ in batch size *and* spatial size; n_k may be 0). The statistics of the
concatenation of all values are (Chan, Golub & LeVeque's parallel formula)

    n  = Σ_k n_k
    μ  = Σ_k n_k μ_k / n
    σ² = Σ_k n_k (σ²_k + (μ_k − μ)²) / n

which avoids the cancellation of E[x²] − E[x]² in low precision. One all-gather of the packed
``[n_k, μ_k, σ²_k]`` carries everything; it is differentiable (fvcore's ``differentiable_all_gather``
sums the gradients of all processes and hands each its own slice), so gradients flow back to every
process's own inputs exactly as if the global batch had been normalised in one process.

Without an initialised process group, or with one process, nothing is communicated.
"""
from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist
from fvcore.nn.distributed import differentiable_all_gather


class Moments(NamedTuple):
    """Per-channel statistics of a set of values: count (0-dim float tensor), mean, biased variance."""

    count: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor


def world_size() -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def local_moments(x: torch.Tensor, channel_dim: int = 1) -> Moments:
    """Moments of ``x`` per channel over every other dimension, computed in float32 or wider.

    An input with no values gives count 0 and zero mean and variance (never NaN).
    """
    dims = [d for d in range(x.dim()) if d != channel_dim]
    channels = x.shape[channel_dim]
    dtype = torch.promote_types(x.dtype, torch.float32)
    count = x.numel() // max(channels, 1)
    if count == 0:
        zeros = x.new_zeros(channels, dtype=dtype)
        # keep the graph connected so an empty input still gets a (zero) gradient
        zeros = zeros + x.to(dtype).sum() * 0
        return Moments(x.new_tensor(0.0, dtype=dtype), zeros, zeros)
    var, mean = torch.var_mean(x.to(dtype), dim=dims, correction=0)
    return Moments(x.new_tensor(float(count), dtype=dtype), mean, var)


def combine_moments(counts: torch.Tensor, means: torch.Tensor, variances: torch.Tensor) -> Moments:
    """Merge K sets of moments (``counts`` [K], ``means``/``variances`` [K, C]) into one.

    Sets with count 0 contribute nothing; if all are empty, the result has count 0 and zeros.
    """
    total = counts.sum()
    weights = counts / total.clamp(min=1.0)  # all-empty: weights are 0, so mean and var are 0
    mean = (weights[:, None] * means).sum(0)
    var = (weights[:, None] * (variances + (means - mean) ** 2)).sum(0)
    return Moments(total, mean, var)


def global_moments(x: torch.Tensor, channel_dim: int = 1, sync: bool = True) -> Moments:
    """Moments of ``x`` over the global batch of all processes (or this process only if not ``sync``).

    Collective: with ``sync`` and more than one process, every process must call it the same
    number of times (also processes whose ``x`` is empty).
    """
    local = local_moments(x, channel_dim)
    if not sync or world_size() == 1:
        return local
    packed = torch.cat([local.count.reshape(1), local.mean, local.var])
    gathered = torch.stack(differentiable_all_gather(packed))
    channels = local.mean.numel()
    return combine_moments(gathered[:, 0], gathered[:, 1 : 1 + channels], gathered[:, 1 + channels :])


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """In-place sum over processes of tensors that need no gradient (buffers, statistics)."""
    if world_size() == 1:
        return
    for t in tensors:
        dist.all_reduce(t)
