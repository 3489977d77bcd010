"""Batch-Channel Normalization: a BN whose statistics are estimates, followed by a channel normalization.

Qiao, Wang, Liu, Shen & Yuille, "Micro-Batch Training with Batch-Channel Normalization and Weight
Standardization" (2019), §4 ("Batch-Channel Normalization"), the micro-batch form, in which the batch
part normalizes with estimated statistics so that it works at one or two images per batch. For x of
shape (N, C, H, W), per channel c, with the estimates μ̂_c, σ̂²_c (``running_mean``, ``running_var``):

**Estimated BN, training.** Without gradient through any statistic, from the values x_c of channel c
over (N, H, W):

    m_c = mean(x_c),    v_c = mean((x_c − μ̂_c)²)          (μ̂_c before this call's update)
    μ̂_c ← (1 − r) μ̂_c + r m_c,    σ̂²_c ← (1 − r) σ̂²_c + r v_c
    x̂ = (x − μ̂_c) / sqrt(σ̂²_c + ε),    z = γ_c x̂ + β_c       (the updated μ̂, σ̂², as constants)

v_c is the second moment about the previous estimate, not the batch variance: it is what the
authors' public code accumulates (their ``EstBN``). Gradients reach x, γ and β only.

**Estimated BN, inference**: the same with the stored estimates and no update, i.e. a fixed
per-channel affine (what a frozen BN computes).

**Channel normalization**: group normalization of z over G groups (per sample and group, the mean and
biased variance over (C/G, H, W), ε inside the root), then an affine per *group*: y = ω_g ẑ + b_g,
ω, b of G values (``group_weight``, ``group_bias``), which is GroupNorm whose per-channel weight and
bias repeat each group's value (:meth:`BatchChannelNorm2d.as_plain_modules`).

So at inference the layer is a frozen BN followed by ``nn.GroupNorm``; :meth:`~BatchChannelNorm2d.as_plain_modules`
builds exactly those two torch modules (identical outputs: the same two ops).

**The update rate r** (``momentum``, torch's convention: the weight of the new batch). The authors'
code keeps it in a buffer that their training scripts set; this layer makes it an argument, default
0.01: the estimates then average about the last 1/r = 100 batches, which at one or two images per
batch gives estimates far less noisy than BN's default 0.1 (≈ 10 batches), and they are used in
training, where their noise is noise in every activation. The price is lag: after a change of the
weights the estimates need a few hundred steps to follow, which the channel normalization after them
absorbs (its output is normalized per sample whatever the estimates).

**State**: ``weight``, ``bias`` (γ, β: per channel, BN's names, so a BN state's affine and statistics
load into the batch part), ``running_mean``, ``running_var`` (μ̂, σ̂²: ``running_var`` is the second
moment above, used without Bessel's correction), ``num_batches_tracked`` (training calls that updated
the estimates), ``group_weight``, ``group_bias``. The class derives from ``nn.GroupNorm`` (it *is* a
GroupNorm, with the estimated BN in front of it) so that code that recognizes normalization layers by
type, such as detectron2's optimizer groups (``SOLVER.WEIGHT_DECAY_NORM``), treats its parameters as
it treats BN's and GN's; ``num_groups``, ``num_channels`` and ``eps`` keep GroupNorm's meaning.

**Reliability**: the estimates are updated through
:func:`~d2_bnstats.layers.moments.commit_running_stats` (a non-finite update is skipped and counted
in ``nonfinite_skips``; a per-step guard may take that decision instead); the output of a training
call is the formula above with the values computed for this call, whether or not they were kept.
Empty input (an empty RoI batch) gives an empty output connected to every parameter
(:func:`~d2_bnstats.layers.moments.empty_output`) and leaves the estimates as they are. The layer
implements the population-statistics protocol (PreciseBN, batch statistics at test):
``set_population_statistics(mean, var, count)`` makes μ̂ the mean and σ̂² the biased variance.

**No synchronised variant**: the method defines none (its statistics are running estimates, not the
statistics of one global batch). With several processes each keeps its own estimates from its own
batches, as torch's BN does with its running statistics.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .moments import add_skip_counter, commit_running_stats, empty_output, shifted_moments

__all__ = ["BatchChannelNorm2d", "WSBatchChannelNorm2d", "check_options"]

DEFAULT_MOMENTUM = 0.01


def check_options(num_channels: int, num_groups: int, momentum: float, eps: float) -> None:
    """ValueError naming the first bad option and what is accepted."""
    for name, value in (("num_channels", num_channels), ("num_groups", num_groups)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} = {value!r}: expected a positive integer")
    if num_channels % num_groups:
        raise ValueError(f"num_groups = {num_groups}: expected a divisor of num_channels = {num_channels}")
    number = isinstance(momentum, (int, float)) and not isinstance(momentum, bool)
    if not number or not 0.0 < momentum <= 1.0:
        raise ValueError(f"momentum = {momentum!r}: expected a number in (0, 1] (the update rate of the estimates)")
    number = isinstance(eps, (int, float)) and not isinstance(eps, bool)
    if not number or not eps > 0:
        raise ValueError(f"eps = {eps!r}: expected a number > 0")


class BatchChannelNorm2d(nn.GroupNorm):
    """Batch-Channel Normalization over (N, C, H, W) (see the module docstring): an estimated BN with
    per-channel affine, then GroupNorm over ``num_groups`` groups with a per-group affine.

    ``momentum``: the update rate r of the estimates; ``eps``: ε of both normalizations (the authors'
    code uses 1e-5 in both).
    """

    def __init__(self, num_channels: int, num_groups: int = 32, momentum: float = DEFAULT_MOMENTUM, eps: float = 1e-5):
        check_options(num_channels, num_groups, momentum, eps)
        super().__init__(num_groups, num_channels, eps=float(eps), affine=True)  # weight, bias: γ, β
        self.momentum = float(momentum)
        self.group_weight = nn.Parameter(torch.ones(num_groups))
        self.group_bias = nn.Parameter(torch.zeros(num_groups))
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        add_skip_counter(self)

    def reset_running_stats(self) -> None:
        """Estimates back to mean 0, variance 1 (BN's initial values); ``num_batches_tracked`` 0."""
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        super().reset_parameters()  # γ = 1, β = 0
        if "group_weight" in self._parameters:  # not yet during nn.GroupNorm.__init__
            nn.init.ones_(self.group_weight)
            nn.init.zeros_(self.group_bias)

    def channel_affine(self):
        """The per-group affine as GroupNorm's per-channel weight and bias (each group's value repeated)."""
        repeats = self.num_channels // self.num_groups
        return self.group_weight.repeat_interleave(repeats), self.group_bias.repeat_interleave(repeats)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects 4-D input (N, C, H, W), got {x.dim()}-D input of size {tuple(x.shape)}")
        if x.shape[1] != self.num_channels:
            raise ValueError(
                f"{type(self).__name__} of {self.num_channels} channels got input with {x.shape[1]} channels "
                f"(size {tuple(x.shape)})"
            )

    @torch.no_grad()
    def _updated_estimates(self, x: torch.Tensor):
        """(μ̂, σ̂²) after this training batch, in the estimates' dtype; committed to the buffers unless
        not finite."""
        previous_mean = self.running_mean
        dtype = previous_mean.dtype
        # mean and variance of the batch in float64, reduced about the previous estimate (no cancellation
        # where the estimate is near the batch mean); the second moment about it is var + (m − μ̂)²
        _, batch_mean, batch_var = shifted_moments(x, previous_mean)
        previous = previous_mean.double()
        second_moment = batch_var + (batch_mean - previous).square()
        r = self.momentum
        new_mean = ((1.0 - r) * previous + r * batch_mean).to(dtype)
        new_var = ((1.0 - r) * self.running_var.double() + r * second_moment).to(dtype)
        commit_running_stats(self, new_mean, new_var)
        return new_mean, new_var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.numel() == 0:
            return empty_output(empty_output(x, self.weight, self.bias), self.group_weight, self.group_bias)
        if self.training:
            mean, var = self._updated_estimates(x)
        else:
            mean, var = self.running_mean, self.running_var
        # BN's inference op with the estimates as constants (training=False: no batch statistics, and the
        # gradient reaches x, γ and β only): the same op as a frozen BN, so deployment changes no bit
        z = F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        weight, bias = self.channel_affine()
        return F.group_norm(z, self.num_groups, weight, bias, self.eps)

    @torch.no_grad()
    def set_population_statistics(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """Population-statistics protocol: μ̂ = ``mean``, σ̂² = ``var`` (biased) of the layer's input;
        with ``count`` 0 (no values seen) the estimates are left unchanged."""
        c = self.num_channels
        if mean.shape != (c,) or var.shape != (c,):
            raise ValueError(
                f"set_population_statistics expects per-channel mean and var of shape ({c},); "
                f"got {tuple(mean.shape)} and {tuple(var.shape)}"
            )
        valid = torch.as_tensor(count, device=self.running_mean.device) > 0
        self.running_mean.copy_(torch.where(valid, mean.to(self.running_mean), self.running_mean))
        self.running_var.copy_(torch.where(valid, var.to(self.running_var), self.running_var))

    @torch.no_grad()
    def as_plain_modules(self) -> nn.Sequential:
        """The layer at inference as plain torch modules: ``nn.BatchNorm2d`` in eval mode holding the
        estimates and γ, β (a fixed affine), then ``nn.GroupNorm`` whose weight and bias repeat each
        group's value. Identical eval outputs (the same two ops); copies, on the layer's device and dtype."""
        bn = nn.BatchNorm2d(self.num_channels, eps=self.eps)
        gn = nn.GroupNorm(self.num_groups, self.num_channels, eps=self.eps)
        bn.to(device=self.running_mean.device, dtype=self.weight.dtype)
        gn.to(device=self.running_mean.device, dtype=self.weight.dtype)
        bn.running_mean = self.running_mean.detach().clone()
        bn.running_var = self.running_var.detach().clone()
        bn.num_batches_tracked.copy_(self.num_batches_tracked)
        bn.weight.copy_(self.weight)
        bn.bias.copy_(self.bias)
        weight, bias = self.channel_affine()
        gn.weight.copy_(weight)
        gn.bias.copy_(bias)
        plain = nn.Sequential(bn, gn).eval()
        for p in plain.parameters():
            p.requires_grad_(False)
        return plain

    def extra_repr(self) -> str:
        return f"{self.num_channels}, num_groups={self.num_groups}, momentum={self.momentum}, eps={self.eps}"


class WSBatchChannelNorm2d(BatchChannelNorm2d):
    """:class:`BatchChannelNorm2d` after a weight-standardized conv ("BCN + WS", the paper's pairing);
    computes exactly as BatchChannelNorm2d, with a type that says that the conv before it is standardized."""
