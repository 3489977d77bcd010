"""BatchNorm statistics: moments of a batch, merging them across groups and processes, running statistics.

Every normalisation layer of the package takes its statistics from here.

**Moments of a set of values** (per channel c): count n, mean μ and *biased* variance σ² (the second
central moment, what BN normalises with). :func:`local_moments` reduces every dimension but the channel;
:func:`per_sample_moments` reduces H, W only (one set per sample; :func:`shifted_sample_moments`
also hands out the shifted copy of the input it reduced); :func:`shifted_moments` is a one-pass
float64 variant for long accumulations (PreciseBN).

**Merging K sets** (Chan, Golub & LeVeque 1979, the parallel form of the variance update): the
statistics of the concatenation of sets k = 1..K with n_k values each are

    n  = Σ_k n_k
    μ  = Σ_k n_k μ_k / n
    σ² = Σ_k n_k (σ²_k + (μ_k − μ)²) / n

which avoids the cancellation of E[x²] − E[x]² in low precision (:func:`combine_moments`; across
processes :func:`global_moments`, one differentiable all-gather of the packed ``[n_k, μ_k, σ²_k]``:
fvcore's ``differentiable_all_gather`` sums the gradients of all processes and hands each its own
slice). Sets with n_k = 0 contribute nothing. For sums kept over many batches in float64 the raw
power sums Σn, Σn·μ, Σn·(σ² + μ²) are added instead (:func:`power_sums`,
:func:`moments_from_power_sums`); their difference form is exact enough in float64.

**Bessel's correction**: torch's BN stores in ``running_var`` the *unbiased* variance of a batch of
n values, σ²·n/(n − 1) (:func:`bessel_correction`, taken as 1 for n ≤ 1 where it is undefined).

**Statistics of separately normalised groups** (ghost batches, shuffled RoI splits): each group g is
a BN batch of its own, so the running statistics receive the count-weighted mean of the group means
and of the group *unbiased* variances (:func:`aggregate_group_statistics`):

    μ_agg = Σ_g n_g μ_g / Σ_g n_g,     σ²_agg = Σ_g n_g · σ²_g n_g/(n_g − 1) / Σ_g n_g

summed over the groups of every process with ``sync`` (one all-reduce of 2C + 1 numbers).

**Running statistics** (:func:`update_running_stats`), torch's convention: ``momentum`` m weights the
new value, running ← (1 − m)·running + m·batch, with the batch's mean and unbiased variance;
``num_batches_tracked`` counts the updates; ``momentum=None`` is the cumulative average (m =
1 / num_batches_tracked after the increment). A batch with no value leaves the running statistics
*and* ``num_batches_tracked`` untouched (torch would raise). :func:`guarded_batch_norm` is
``nn.BatchNorm2d``'s own training forward (the same ``F.batch_norm`` call, so the same output) for
the layers that are plain BN in some configuration.

**Non-finite batches** (:func:`commit_running_stats`, :func:`guarded_batch_norm`): an update is
kept only if every new value is finite; otherwise the running statistics and
``num_batches_tracked`` keep their values and the layer's counter ``nonfinite_skips`` (a 0-dim
int64 tensor attribute, not a buffer, so checkpoints and state dicts are unchanged) grows by one.
With finite running statistics this is exactly "the batch statistics were not finite" (one NaN/Inf
input poisons the mean and variance of its channel); a layer whose running statistics are already
non-finite (e.g. loaded so) counts a skip at every update. There is no host synchronisation: for
statistics on CPU the decision is read as a Python value (a read of memory, no device to wait for,
and fewer kernels than a tensor decision: the guard of a small layer costs one copy and one dot
product), on every other device it stays a tensor (``torch.where``). The forward output is
unchanged (a non-finite batch still gives a non-finite output and loss). A training loop can take
this decision once per step for the whole model instead (:mod:`.step_guard`; detectron2 training
does): the layers then update as torch does and the guard restores, after the step, every layer
whose running statistics came out non-finite.

**Empty input** (:func:`empty_output`): training on zero values (an empty RoI batch) gives an empty
output still connected to the input and the affine parameters, so every gradient exists (zero).

Without an initialised process group, or with one process, nothing is communicated.
"""
import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fvcore.nn.distributed import differentiable_all_gather
from torch import nn


class Moments(NamedTuple):
    """Per-channel statistics of a set of values: count (0-dim float tensor), mean, biased variance."""

    count: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor


def world_size() -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """In-place sum over processes of tensors that need no gradient (buffers, statistics)."""
    if world_size() == 1:
        return
    for t in tensors:
        dist.all_reduce(t)


# --------------------------------------------------------------------------------------------------
# moments of one set of values


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


# On CPU, torch's fused BN statistics kernel (one call, exact: it accumulates in double) is faster than
# the calls of the checked plain sums below this many values; above, its scalar loops are slower (one
# thread: ~15 against ~25 µs at 8192 values, about even at 16384, ~55-100 against ~40 µs at 32768).
FUSED_STATISTICS_MAX_NUMEL = 1 << 13


def recording_graph() -> bool:
    """Whether torch records a graph of this call: tracing (as the TorchScript-based ONNX exporter does),
    compiling or exporting (as the dynamo-based one does). Those flags cost about 0.1 µs."""
    compiler = torch.compiler
    exporting = hasattr(compiler, "is_exporting") and compiler.is_exporting()
    return torch.jit.is_tracing() or compiler.is_compiling() or exporting


def exporting_to_onnx() -> bool:
    """``torch.onnx.is_in_onnx_export()``, asked only while torch records a graph (:func:`recording_graph`):
    the question itself costs about 3 µs, which a small layer would pay at every call."""
    return recording_graph() and torch.onnx.is_in_onnx_export()


def fits_fused_statistics(x: torch.Tensor) -> bool:
    """Whether ``x`` is an input for torch's fused BN statistics kernel: float32/float64 on CPU, at most
    :data:`FUSED_STATISTICS_MAX_NUMEL` values."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.numel() <= FUSED_STATISTICS_MAX_NUMEL


def uses_fused_statistics(x: torch.Tensor) -> bool:
    """Whether :func:`per_sample_moments` takes torch's fused BN statistics kernel for ``x`` (N, C, H, W):
    when ``x`` fits it (:func:`fits_fused_statistics`) and not while exporting to ONNX, which has no
    operator for that kernel (:func:`exporting_to_onnx`)."""
    return fits_fused_statistics(x) and not exporting_to_onnx()


def shifted_sample_moments(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, d, E[d], biased variance) of a non-empty ``x`` (N, C, H, W) per sample and channel, without
    gradient: s [N, C] the first value of each map, d = x − s as a new contiguous [N, C, H·W] tensor,
    E[d] and the variance [N, C], all in float32 (float64 for double input).

    The variance is E[d²] − E[d]², clamped at 0, from the sum and the L2 norm of d (vectorised
    reductions, 3-5x faster than ``torch.var_mean`` on CPU). The shift is a value of the same map, so
    |E[d]| is of the order of the map's own standard deviation and nothing cancels however large the
    mean: the variance stays within ~5e-6 (relative) of float64 at mean/std up to 1e4, where
    E[x²] − mean² (unshifted sums) loses it entirely. d belongs to the caller, who may overwrite it:
    EvalNorm's inference writes its output into it (one tensor of x's size instead of two)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    n, c, h, w = x.shape
    hw = h * w
    with torch.no_grad():
        flat = x.reshape(n, c, hw)
        shift = flat[:, :, 0]
        if shift.dtype != dtype:
            shift = shift.to(dtype)
        d = torch.sub(flat, shift.unsqueeze(2))  # in ``dtype``: a half input is promoted, not copied first
        m = d.sum(dim=2) / hw
        sq = torch.linalg.vector_norm(d, ord=2, dim=2)
        var = (sq * sq / hw - m * m).clamp_(min=0)
    return shift, d, m, var


# Plain sums are kept for a map whose mean² is at most this many times its variance: their relative
# variance error is about 3e-7·(1 + mean²/variance) in float32 (measured on 49 to 16384 values per
# map), so at most ~2e-6 here; the maps beyond are recomputed with shifted sums.
PLAIN_SUMS_MAX_MEAN_SQ_TO_VAR = 4.0

Floor = Union[torch.Tensor, float, None]


def checked_plain_sample_moments(x: torch.Tensor, var_floor: Floor = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`per_sample_moments` of a non-empty CPU ``x`` from plain sums, E[x] and E[x²] − E[x]²
    (two vectorised reductions, no copy of x), with every map whose mean² exceeds
    :data:`PLAIN_SUMS_MAX_MEAN_SQ_TO_VAR` times its variance (where plain sums lose precision)
    recomputed from shifted sums (:func:`shifted_sample_moments` of those maps only). The choice is
    read on the host, which on CPU waits for nothing. Computed variances ≤ bound·mean² can only come
    from such maps (the cancellation error of plain sums is far below mean²/bound), so none is missed.

    ``var_floor`` (per channel [C], or a number; None: 0): the caller needs each variance only to the
    relative precision of variance + floor, so a map is recomputed only where mean² exceeds the bound
    times (variance + floor). The error of plain sums, ~3e-7·(variance + mean²), is then at most
    ~1.5e-6·(variance + floor) (see :func:`per_sample_moments` for who uses it)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    n, c, h, w = x.shape
    hw = h * w
    with torch.no_grad():
        mean = x.sum(dim=(2, 3), dtype=dtype).div_(hw)
        var = torch.linalg.vector_norm(x, ord=2, dim=(2, 3), dtype=dtype).square_().div_(hw)
        var = torch.addcmul(var, mean, mean, value=-1.0).clamp_(min=0)
        # var (+ floor) − mean²/bound < 0 where plain sums are imprecise: one kernel and one read in the usual case
        margin = torch.addcmul(var, mean, mean, value=-1.0 / PLAIN_SUMS_MAX_MEAN_SQ_TO_VAR)
        if var_floor is not None:
            margin.add_(var_floor)
        if margin.min().item() < 0:
            rows = (margin.view(-1) < 0).nonzero().squeeze(1)
            maps = x.reshape(n * c, h, w).index_select(0, rows).unsqueeze(0)
            shift, _, m, v = shifted_sample_moments(maps)
            mean.view(-1).index_copy_(0, rows, (shift + m)[0])
            var.view(-1).index_copy_(0, rows, v[0])
    return mean, var


def per_sample_moments(x: torch.Tensor, var_floor: Floor = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of ``x`` (N, C, H, W) over H, W: two [N, C] tensors in float32
    (float64 for double input), without gradient, accurate at any mean/std ratio.

    Shifted sums (:func:`shifted_sample_moments`): mean = s + E[d], variance = E[d²] − E[d]² with
    d = x − s, s the first value of each map. Small float inputs on CPU
    (:func:`uses_fused_statistics`) use torch's BN statistics kernel on the (1, N·C, H, W) view
    instead, which is exact and one call; larger CPU inputs use plain sums where they are precise and
    shifted sums for the other maps (:func:`checked_plain_sample_moments`), which skips the copy for
    the usual maps of a network (mean² within a few variances).

    ``var_floor`` (per channel [C] or a number, >= 0; None: 0) relaxes "accurate" for a caller that
    adds the variance with a small weight to a larger term: each variance is then accurate relative to
    variance + floor, not to the variance alone (only the plain sums' check uses it; the other ways
    are accurate anyway). EvalNorm's sigma2_hat = beta·sigma2_i + (1 − beta)·sigma2_E + … keeps its
    relative precision with floor = (1 − beta)/beta · sigma2_E.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    n, c, h, w = x.shape
    if x.numel() == 0 or h * w == 0:
        zeros = torch.zeros(n, c, dtype=dtype, device=x.device)
        return zeros, zeros.clone()
    if x.is_cpu and not exporting_to_onnx():
        if fits_fused_statistics(x):
            with torch.no_grad():
                mean, var = torch.batch_norm_update_stats(x.reshape(1, n * c, h, w), None, None, 0.0)
            return mean.view(n, c), var.view(n, c)
        return checked_plain_sample_moments(x, var_floor)
    shift, _, m, var = shifted_sample_moments(x)
    return shift + m, var


def batch_moments_from_samples(mean_i: torch.Tensor, var_i: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a batch from its samples' moments ([N, C] each, samples
    of equal size): the merge formula with equal counts."""
    mean = mean_i.mean(0)
    var = var_i.mean(0) + (mean_i - mean).pow(2).mean(0)
    return mean, var


def shifted_moments(x: torch.Tensor, shift: Optional[torch.Tensor] = None) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """(n, mean, biased variance) per channel (dim 1, or dim 0 of a 1-d ``x``) of a non-empty ``x``,
    mean and variance in float64, without gradient.

    One pass over x − shift and its square, reduced in float32 (or x's wider dtype): with a shift
    near the channel mean (a running mean, or a first batch's mean) there is no cancellation, and it
    costs a quarter of ``torch.var_mean`` on CPU. ``shift=None`` uses x's mean."""
    c = 1 if x.dim() >= 2 else 0
    dims = [d for d in range(x.dim()) if d != c]
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if shift is None:
        shift = x.mean(dims)
    view = [1] * x.dim()
    view[c] = -1
    d = x - shift.to(x.dtype).reshape(view)
    s1 = d.sum(dims)
    d.mul_(d)
    s2 = d.sum(dims)
    n = x.numel() // x.shape[c]
    m = s1.double() / n
    return n, shift.double() + m, (s2.double() / n - m * m).clamp(min=0.0)


# --------------------------------------------------------------------------------------------------
# merging moments


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


def power_sums(count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, n·μ, n·(σ² + μ²)) in float64: what is added over sets (and processes) to merge them."""
    n = count.to(torch.float64)
    mean = mean.detach().to(torch.float64)
    return n, n * mean, n * (var.detach().to(torch.float64) + mean * mean)


def moments_from_power_sums(count: torch.Tensor, total: torch.Tensor, total_sq: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of the union from summed :func:`power_sums` (count > 0)."""
    mean = total / count
    var = (total_sq / count - mean * mean).clamp(min=0.0)
    return mean, var


# --------------------------------------------------------------------------------------------------
# Bessel's correction and separately normalised groups

Count = Union[int, float, torch.Tensor]


def bessel_correction(count: Count) -> Count:
    """n/(n − 1), and 1 for n ≤ 1 (a tensor for a tensor count, else a float)."""
    if isinstance(count, torch.Tensor):
        return torch.where(count > 1, count / (count - 1).clamp(min=1), torch.ones_like(count))
    n = float(count)
    return n / (n - 1.0) if n > 1 else 1.0


def unbiased_variance(moments: Moments) -> torch.Tensor:
    """σ²·n/(n − 1) (σ² itself for n ≤ 1)."""
    return moments.var * bessel_correction(moments.count)


def aggregate_group_statistics(groups: Moments, sync: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σ_g n_g, count-weighted mean of the means, count-weighted mean of the unbiased variances) of
    G groups (``groups``: counts [G], means and biased variances [G, C]), each a BN batch of its own;
    with ``sync`` over the groups of every process (a collective). A total count of 0 gives zeros."""
    counts = groups.count.reshape(-1, 1)
    channels = groups.mean.shape[-1]
    unbiased = groups.var * bessel_correction(counts)
    packed = torch.cat([counts.sum().reshape(1), (counts * groups.mean).sum(0), (counts * unbiased).sum(0)])
    if sync:
        all_reduce_sum([packed])
    total = packed[0]
    scale = total.clamp(min=1)
    return total, packed[1 : 1 + channels] / scale, packed[1 + channels :] / scale


# --------------------------------------------------------------------------------------------------
# running statistics and empty inputs


SKIP_COUNTER = "nonfinite_skips"
# A layer whose ``vars()`` hold this name set to True leaves the finiteness decision to a guard that
# checks once per training step (:mod:`.step_guard`): its updates here are torch's, unchecked.
GUARDED_PER_STEP = "running_stats_guarded_per_step"


def add_skip_counter(module: nn.Module) -> None:
    """Give ``module`` its counter of skipped non-finite updates (0). A plain attribute holding a 0-dim
    int64 tensor, replaced at each count: not in state dicts (checkpoints keep their keys), not a
    buffer (replica checks and DDP broadcasts see the same tensors as before), and put back by
    PreciseBN's ``preserved_state`` like every rebound attribute."""
    setattr(module, SKIP_COUNTER, torch.zeros((), dtype=torch.int64))


def count_skips(module: nn.Module, skipped: Union[torch.Tensor, int]) -> None:
    """Add ``skipped`` (a 0-dim bool tensor, or a Python count) to ``module``'s counter (created if
    missing). A CPU counter combined with a CUDA ``skipped`` gives a CUDA counter, so the counter
    follows the statistics' device without a host synchronisation."""
    counter = getattr(module, SKIP_COUNTER, None)
    if counter is None:
        counter = torch.zeros((), dtype=torch.int64)
    # a plain attribute: written directly, as Module.__setattr__'s checks cost more than the count
    vars(module)[SKIP_COUNTER] = counter + skipped


def nonfinite_marker(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """0 if every value of the vectors ``a`` and ``b`` (same length) is finite, else NaN: the dot
    product of a − a with b, since x − x is 0 for finite x and NaN otherwise, and 0·y is NaN for
    y = ±Inf. Exact (no sum that could overflow), two small kernels and no Python scalar (wrapping
    one costs more than the kernels here)."""
    return torch.dot(a - a, b)


def all_finite(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor: every value of the vectors ``a`` and ``b`` is finite."""
    return ~nonfinite_marker(a, b).isnan()


def finite_on_host(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Every value of the CPU vectors ``a`` and ``b`` (same length) is finite, as a Python bool. One
    kernel in the common case: a non-finite value makes the dot product a·b non-finite, so a finite
    dot product settles it; a non-finite one (a non-finite value, or finite values whose products
    overflow) is decided exactly by :func:`nonfinite_marker`."""
    return math.isfinite(torch.dot(a, b).item()) or nonfinite_marker(a, b).item() == 0.0


def commit_running_stats(
    bn: nn.Module,
    new_mean: torch.Tensor,
    new_var: torch.Tensor,
    has_values: Optional[torch.Tensor] = None,
    host_decision: Optional[bool] = None,
) -> None:
    """Make ``new_mean``/``new_var`` (the running statistics' dtype) the running statistics of ``bn``
    and count the update in ``num_batches_tracked``, unless a new value is not finite: then nothing
    changes but the skip counter (see the module docstring). ``has_values`` (0-dim bool): False for a
    batch without values, which is neither applied nor counted as a skip. Nothing here needs a
    gradient (the arguments are statistics).

    The decision (``host_decision`` None: on the host for CPU statistics only): on CPU read as a Python
    value (a read of memory, with no device to wait for, and cheaper than the kernels of a tensor
    decision); on any other device a tensor (``torch.where`` on one finiteness reduction), so there
    is no host synchronisation."""
    running_mean, running_var, tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
    per_step = vars(bn).get(GUARDED_PER_STEP, False)
    if running_mean.is_cpu if host_decision is None else host_decision:
        if has_values is not None and not bool(has_values):
            return
        if not per_step and not finite_on_host(new_mean, new_var):
            count_skips(bn, 1)
            return
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
        if tracked is not None:
            tracked.add_(1)
        return
    if per_step:
        ok = torch.ones((), dtype=torch.bool, device=running_mean.device) if has_values is None else has_values
        skipped = None
    else:
        ok = torch.stack((new_mean, new_var)).isfinite().all()
        skipped = ~ok
    if has_values is not None and not per_step:
        ok = ok & has_values
        skipped = skipped & has_values
    torch.where(ok, new_mean, running_mean, out=running_mean)
    torch.where(ok, new_var, running_var, out=running_var)
    if tracked is not None:
        tracked.add_(ok)
    if skipped is not None:
        count_skips(bn, skipped)


def update_running_stats(
    bn: nn.Module, count: torch.Tensor, mean: torch.Tensor, unbiased_var: torch.Tensor, host_decision: Optional[bool] = None
) -> None:
    """Update the running statistics of ``bn`` (a BatchNorm) with torch's conventions from a batch of ``count`` values
    (mean ``mean``, unbiased variance ``unbiased_var``); see the module docstring.

    Nothing changes when the count is 0, nor (but the skip counter) when the result is not finite;
    no host synchronisation (the count is used as a tensor; ``host_decision``: as in
    :func:`commit_running_stats`).
    """
    if not bn.track_running_stats or bn.running_mean is None:
        return
    with torch.no_grad():
        has_values = count > 0
        valid = has_values.to(bn.running_mean.dtype)
        if bn.momentum is None:  # cumulative moving average, as torch: 1 / the count after this batch
            tracked = bn.num_batches_tracked + has_values.to(bn.num_batches_tracked.dtype)
            factor = valid / tracked.clamp(min=1).to(valid.dtype)
        else:
            factor = valid * bn.momentum
        new_mean = bn.running_mean + factor * (mean.to(bn.running_mean.dtype) - bn.running_mean)
        new_var = bn.running_var + factor * (unbiased_var.to(bn.running_var.dtype) - bn.running_var)
        commit_running_stats(bn, new_mean, new_var, has_values, host_decision)


def guarded_batch_norm(bn: nn.Module, x: torch.Tensor, host_decision: Optional[bool] = None) -> torch.Tensor:
    """What ``nn.BatchNorm2d.forward`` returns for ``bn`` in training mode, bit for bit (the op
    ``F.batch_norm`` calls, with the same arguments), with its running-statistics update guarded.

    On CPU torch updates the running statistics in place, as ``nn.BatchNorm2d`` does, and the result
    is checked on the host (:func:`finite_on_host`); a non-finite one is undone from a copy taken
    before the call, written through ``.data`` so that the tensors autograd saved keep their version
    (BN's training backward reads the batch statistics it saved, never the running ones). On other
    devices torch updates a copy of both (one ``[2, C]`` tensor; the copy, not the buffers, is what
    autograd saves), committed with ``torch.where`` on one finiteness reduction: no host
    synchronisation. Either way a skipped update leaves the running statistics and
    ``num_batches_tracked`` as they were and counts one skip. ``host_decision`` overrides the choice
    (None: on the host for CPU statistics only).

    Cost, not semantics: this runs at every layer call, where each tensor created and each Python
    call counts on small maps, so it calls ``torch.batch_norm`` (the body of ``F.batch_norm``)
    directly with the one check of ``F.batch_norm`` that applies here, and the CPU guard is one copy
    and one dot product read on the host."""
    running_mean, running_var = bn.running_mean, bn.running_var
    if running_mean is None or not bn.track_running_stats:
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    if x.shape[0] * math.prod(x.shape[2:]) == 1:  # F.batch_norm's check: the variance of one value is undefined
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    tracked = bn.num_batches_tracked
    factor = bn.momentum
    if factor is None:  # torch's cumulative average reads the count on the host too
        factor = 1.0 / (float(tracked) + 1.0) if tracked is not None else 0.0
    cudnn = torch.backends.cudnn.enabled
    if vars(bn).get(GUARDED_PER_STEP, False):  # decided once per step by a StepStatisticsGuard
        if tracked is not None:
            tracked.add_(1)
        return torch.batch_norm(x, bn.weight, bn.bias, running_mean, running_var, True, factor, bn.eps, cudnn)
    if running_mean.is_cpu if host_decision is None else host_decision:
        before = torch.stack((running_mean, running_var))
        out = torch.batch_norm(x, bn.weight, bn.bias, running_mean, running_var, True, factor, bn.eps, cudnn)
        # finite_on_host, inlined: one dot product unless it is not finite
        finite = math.isfinite(torch.dot(running_mean, running_var).item())
        if finite or nonfinite_marker(running_mean, running_var).item() == 0.0:
            if tracked is not None:
                tracked.add_(1)
        else:
            running_mean.data.copy_(before[0])
            running_var.data.copy_(before[1])
            count_skips(bn, 1)
        return out
    new = torch.stack((running_mean, running_var))
    new_mean, new_var = new.unbind()
    out = torch.batch_norm(x, bn.weight, bn.bias, new_mean, new_var, True, factor, bn.eps, cudnn)
    ok = new.isfinite().all()
    torch.where(ok, new_mean, running_mean, out=running_mean)
    torch.where(ok, new_var, running_var, out=running_var)
    if tracked is not None:
        tracked.add_(ok)
    count_skips(bn, ~ok)
    return out


def empty_output(x: torch.Tensor, weight, bias) -> torch.Tensor:
    """An empty output shaped like ``x`` and connected to ``x``, weight and bias (zero gradients)."""
    y = x * 1
    for p in (weight, bias):
        if p is not None:
            y = y + p.sum() * 0
    return y
