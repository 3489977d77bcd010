"""Ghost BatchNorm: normalise fixed-size sub-batches ("ghost batches") of the batch separately.

Hoffer, Hubara & Soudry 2017 ("Train longer, generalize better", §4) split a large batch into
sub-batches of a *virtual batch size* V and apply BN to each; Wu & Johnson 2021 ("Rethinking 'Batch'
in BatchNorm", §3, §5) use the same construction to decouple the normalisation batch from the SGD
batch (and, after a shuffle, to emulate cross-GPU normalisation on one GPU: see ``roi_shuffle``).

Sub-batches (along dim 0, i.e. images or RoIs; V counts samples, not values): a batch of N samples is
cut into G = ⌈N / V⌉ consecutive sub-batches whose sizes differ by at most one (the first N mod G
have ⌈N/G⌉ samples, the rest ⌊N/G⌋), so every sub-batch has at most V samples and the remainder is
spread over the sub-batches instead of forming a tiny last one. N ≤ V gives one sub-batch: plain BN.
Sub-batch g (n_g values per channel, mean μ_g, biased variance σ²_g) is normalised as
y = γ (x − μ_g) / sqrt(σ²_g + ε) + β; gradients are those of BN applied to each sub-batch.

Running statistics are updated once per forward (so ``momentum`` keeps its per-iteration meaning,
PreciseBN's "momentum = 1 replaces" works, and the layer runs once per forward as the
population-statistics protocol requires) with the statistics of the sub-batches aggregated as if each
had been a separate BN batch, weighted by their number of values
(:func:`d2_bnstats.layers.moments.aggregate_group_statistics`):

    μ_agg = Σ_g n_g μ_g / Σ_g n_g,     σ²_agg = Σ_g n_g · σ²_g n_g/(n_g − 1) / Σ_g n_g
    running_mean ← (1 − m) running_mean + m μ_agg,   running_var ← (1 − m) running_var + m σ²_agg

i.e. the mean of the sub-batch means and of their unbiased variances. With one sub-batch this is
exactly ``nn.BatchNorm2d``'s update. A batch whose statistics are not finite updates nothing (the
skip is counted in ``nonfinite_skips``; :func:`~d2_bnstats.layers.moments.commit_running_stats`). (It is not the variance of the whole batch: what a sample sees
in training is its sub-batch's statistics, and the within-sub-batch variance is their consistent
population counterpart.) Evaluation uses the running statistics, as BN.
"""
import math
from typing import List, Sequence, Tuple

import torch
from torch import nn

from .moments import Moments, add_skip_counter, aggregate_group_statistics, empty_output, guarded_batch_norm, update_running_stats


def even_split_sizes(total: int, parts: int) -> List[int]:
    """``parts`` sizes summing to ``total`` that differ by at most one, larger ones first."""
    parts = max(1, parts)
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def ghost_split_sizes(n: int, virtual_batch_size: int) -> List[int]:
    """Sub-batch sizes of a batch of ``n`` samples for virtual batch size V (see module docstring)."""
    if n <= 0:
        return []
    return even_split_sizes(n, math.ceil(n / virtual_batch_size))


def batch_norm_with_moments(x: torch.Tensor, weight, bias, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BN of ``x`` with its own batch statistics (no running statistics touched).

    Returns (output, mean, biased variance); differentiable like ``F.batch_norm``. ``x`` must hold at
    least one value per channel.
    """
    y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    var = (invstd.detach().double().pow(-2) - eps).clamp(min=0).to(mean.dtype)
    return y, mean.detach(), var


def normalise_groups(x: torch.Tensor, sizes: Sequence[int], weight, bias, eps: float) -> Tuple[torch.Tensor, Moments]:
    """Split ``x`` along dim 0 into consecutive groups of ``sizes`` and BN-normalise each separately.

    Returns the output (same shape as ``x``) and the per-group moments (counts [G], means [G, C],
    biased variances [G, C]) of the non-empty groups.

    Groups of equal size are normalised in ONE batch-norm call: a run of G groups of n samples is
    viewed as n samples of G·C channels (one transposing copy in, one out), which on CPU is several
    times faster than G separate calls on the slices.
    """
    channels = x.shape[1]
    outputs, counts, means, variances = [], [], [], []
    start = 0
    for size, repeat in _runs(sizes):
        block = x[start : start + size * repeat]
        start += size * repeat
        if size == 0:
            continue
        merged = block.reshape(repeat, size, channels, -1).transpose(0, 1).reshape(size, repeat * channels, -1)
        w = weight.repeat(repeat) if weight is not None and repeat > 1 else weight
        b = bias.repeat(repeat) if bias is not None and repeat > 1 else bias
        y, mean, var = batch_norm_with_moments(merged, w, b, eps)
        outputs.append(y.reshape(size, repeat, channels, -1).transpose(0, 1).reshape(block.shape))
        counts.extend([float(block[0].numel() // channels * size)] * repeat)
        means.append(mean.reshape(repeat, channels))
        variances.append(var.reshape(repeat, channels))
    if not outputs:
        zeros = x.new_zeros(1, channels, dtype=torch.promote_types(x.dtype, torch.float32))
        return empty_output(x, weight, bias), Moments(zeros.new_zeros(1), zeros, zeros)
    y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
    mean = torch.cat(means)
    return y, Moments(torch.tensor(counts, device=x.device, dtype=mean.dtype), mean, torch.cat(variances))


def _runs(sizes: Sequence[int]) -> List[Tuple[int, int]]:
    """[(size, how many consecutive groups have it)]"""
    runs: List[Tuple[int, int]] = []
    for size in sizes:
        if runs and runs[-1][0] == size:
            runs[-1] = (size, runs[-1][1] + 1)
        else:
            runs.append((size, 1))
    return runs


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over sub-batches of ``virtual_batch_size`` samples (see module docstring)."""

    def __init__(self, num_features, virtual_batch_size: int = 32, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, **kwargs):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats, **kwargs)
        if not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be a positive integer (samples per sub-batch), got {virtual_batch_size!r}")
        self.virtual_batch_size = virtual_batch_size
        add_skip_counter(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        if x.numel() == 0:
            return empty_output(x, self.weight, self.bias)
        sizes = ghost_split_sizes(x.shape[0], self.virtual_batch_size)
        if len(sizes) == 1:
            return guarded_batch_norm(self, x)
        return normalise_and_track(self, x, sizes)

    def extra_repr(self):
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"


def normalise_interleaved(x: torch.Tensor, groups: int, weight, bias, eps: float) -> Tuple[torch.Tensor, Moments]:
    """BN-normalise ``groups`` interleaved groups of ``x`` separately: row s·G + g belongs to group g
    (N divisible by G). No copy: ``x`` viewed as (N/G samples, G·C channels) is one batch-norm call."""
    n, channels = x.shape[0], x.shape[1]
    size = n // groups
    merged = x.reshape(size, groups * channels, -1)
    w = weight.repeat(groups) if weight is not None else None
    b = bias.repeat(groups) if bias is not None else None
    y, mean, var = batch_norm_with_moments(merged, w, b, eps)
    count = float(x[0].numel() // channels * size)
    counts = torch.full((groups,), count, device=x.device, dtype=mean.dtype)
    return y.reshape(x.shape), Moments(counts, mean.reshape(groups, channels), var.reshape(groups, channels))


def normalise_and_track(bn: nn.BatchNorm2d, x: torch.Tensor, sizes: Sequence[int], interleaved: bool = False) -> torch.Tensor:
    """Normalise groups of ``x`` separately (consecutive groups of ``sizes``; or, with
    ``interleaved``, len(sizes) equal interleaved groups) and update ``bn``'s running statistics with
    the aggregated group statistics (shared by GhostBN and the one-process RoI shuffle)."""
    if interleaved:
        y, groups = normalise_interleaved(x, len(sizes), bn.weight, bn.bias, bn.eps)
    else:
        y, groups = normalise_groups(x, sizes, bn.weight, bn.bias, bn.eps)
    if bn.track_running_stats and bn.running_mean is not None:
        update_running_stats(bn, *aggregate_group_statistics(groups))
    return y
