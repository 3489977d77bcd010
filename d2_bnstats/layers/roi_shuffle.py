"""RoI-shuffled BatchNorm for detection heads: normalise random mixtures of RoIs instead of one image's.

The RoIs of one image normalised together leak batch information (their statistics describe that
image), which hurts BN in box and mask heads (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm",
§6 "information leakage"; the remedy is the shuffle BN of MoCo/CMC). In training:

Several processes (W > 1): the global RoI batch is the concatenation, in rank order, of every
process's RoIs (N = Σ_k n_k rows; unequal n_k and empty processes allowed). One random permutation π
of the N rows is chosen by rank 0 and made known to every process. The permuted batch is cut into W
consecutive splits whose sizes differ by at most one (the first N mod W splits have one row more);
process j normalises split j with that split's own BN statistics; the outputs go back to the owners
of the rows and are un-permuted, so every process receives the outputs of exactly its own RoIs, in
their order. Gradients take the reverse route to the process that owns each RoI; the weight/bias
gradients of process j are those of split j (DistributedDataParallel sums them: the gradient of BN
applied to every split). ``last_permutation`` holds π of the last training forward.

    Communication, and how it differs from the textbook recipe (all-gather the RoI features padded
    to max_k n_k, broadcast π, let each process pick its split, all-gather the outputs back): that
    moves W·max_k n_k rows to and from every process (and all-reduces as much in the backward
    pass). Here one all-gather carries the W row counts together with a random seed drawn on rank 0
    from its default generator; every process expands the seed into the same π
    (``torch.randperm`` with a generator seeded by it: chosen on rank 0, broadcast as its seed).
    Each row is then sent only where it is needed, with one variable-size all-to-all each way
    (forward: owner → split, split → owner; backward: the reverse), and BN, being indifferent to
    the order of the rows within a split, normalises them in arrival order. Same π, same splits,
    same outputs; the features each process sends and receives are its own rows, not W times the
    largest batch. Plus one all-reduce of 2C + 1 numbers for the running statistics.

One process: a shuffle alone changes nothing (BN is permutation invariant), so the layer draws a
random permutation, cuts the permuted batch into K groups (``num_groups``; sizes differ by at most
one; K is capped at the number of rows) normalised separately — ghost BN on a shuffled batch — and
un-permutes. With K = 1 it is plain BN.

Running statistics: updated once per forward from the statistics of the splits (or groups), as in
:mod:`d2_bnstats.layers.ghost_bn`: the count-weighted mean of their means and of their unbiased
variances (each split a separate BN batch), all-reduced so that every process holds the same values;
not updated when the global batch is empty, nor when the statistics are not finite (counted in
``nonfinite_skips``; :func:`~d2_bnstats.layers.moments.commit_running_stats`). Evaluation (or ``training=False``) is plain BN with the
running (population) statistics and communicates nothing, so processes may evaluate different
numbers of images. With ``track_running_stats=False`` and no running buffers, evaluation uses the
statistics of the local input, unshuffled.

Collective in training with W > 1: every process must call the layer the same number of times (also
processes with 0 RoIs, which detectron2's mask head produces) and back-propagate through it.
The seed comes from rank 0's default generator (seeded by detectron2's SEED); in one process the
permutation is ``torch.randperm`` from the default generator.
"""
from typing import List, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .ghost_bn import batch_norm_with_moments, even_split_sizes, normalise_and_track
from .moments import (
    Moments,
    add_skip_counter,
    aggregate_group_statistics,
    empty_output,
    guarded_batch_norm,
    update_running_stats,
    world_size,
)


class _AllToAll(torch.autograd.Function):
    """Differentiable variable-size all-to-all along dim 0: the backward pass is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_sizes: List[int], input_sizes: List[int]):
        ctx.output_sizes, ctx.input_sizes = output_sizes, input_sizes
        return _all_to_all(x.contiguous(), output_sizes, input_sizes)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad.contiguous(), ctx.input_sizes, ctx.output_sizes), None, None


def _all_to_all(x: torch.Tensor, output_sizes: List[int], input_sizes: List[int]) -> torch.Tensor:
    out = x.new_empty((sum(output_sizes),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=list(output_sizes), input_split_sizes=list(input_sizes))
    return out


def all_to_all(x: torch.Tensor, output_sizes: Sequence[int], input_sizes: Sequence[int]) -> torch.Tensor:
    """Send rows ``x[sum(input_sizes[:j]) : ...]`` to process j; receive ``output_sizes[k]`` rows from
    process k, concatenated in rank order. Differentiable."""
    return _AllToAll.apply(x, list(output_sizes), list(input_sizes))


class _PermuteRows(torch.autograd.Function):
    """x[perm] whose gradient is the gather grad[inverse] (a permutation's adjoint is its inverse),
    instead of autograd's scatter-add, which is several times slower on CPU for a few large rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor):
        ctx.save_for_backward(inverse)
        return x[perm]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x[perm]`` (``inverse`` is the inverse permutation), differentiable."""
    return _PermuteRows.apply(x, perm, inverse)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


class ShufflePlan:
    """Where each row goes in the global shuffle (computed identically on every process).

    ``counts[k]`` rows live on process k (the global rows after those of processes 0..k−1);
    ``perm[p]`` is the global row at permuted position p; split j holds the next ``split_sizes[j]``
    permuted positions after those of splits 0..j−1. Rows are sent grouped by destination split
    (``send_order``, ``send_sizes``) and arrive grouped by owner (``receive_sizes``); the order of
    the rows within a split does not matter to BN, so they are normalised in arrival order and sent
    back in that order, and ``send_order_inverse`` puts the returned rows back in the owner's order.
    """

    def __init__(self, counts: torch.Tensor, perm: torch.Tensor, rank: int, world: int):
        device = perm.device
        counts_list = [int(c) for c in counts.tolist()]
        self.total = sum(counts_list)
        self.split_sizes = even_split_sizes(self.total, world)
        ends = torch.tensor(counts_list, device=device).cumsum(0)
        split_ends = torch.tensor(self.split_sizes, device=device).cumsum(0)
        offset = int(ends[rank]) - counts_list[rank]
        start = int(split_ends[rank]) - self.split_sizes[rank]
        inverse = inverse_permutation(perm)
        # this process's rows: their permuted positions give their destination splits
        destination = torch.bucketize(inverse[offset : offset + counts_list[rank]], split_ends, right=True)
        self.send_order = torch.argsort(destination, stable=True)
        self.send_order_inverse = inverse_permutation(self.send_order)
        self.send_sizes = torch.bincount(destination, minlength=world).tolist()
        # this process's split: the owner of each of its rows
        sources = torch.bucketize(perm[start : start + self.split_sizes[rank]], ends, right=True)
        self.receive_sizes = torch.bincount(sources, minlength=world).tolist()


class RoIShuffleBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over a random mixture of the global RoI batch (see module docstring).

    Args are those of ``nn.BatchNorm2d`` plus ``num_groups`` (K, used in one process only).
    """

    def __init__(self, num_features, num_groups: int = 2, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, **kwargs):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats, **kwargs)
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive integer (groups normalised separately in one process), got {num_groups!r}")
        self.num_groups = num_groups
        # the permutation of the last training forward (global row order, identical on every process)
        self.last_permutation = None
        add_skip_counter(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        if world_size() > 1:
            return self._forward_distributed(x)
        n = x.shape[0]
        if x.numel() == 0:
            return empty_output(x, self.weight, self.bias)
        groups = min(self.num_groups, n)
        if groups == 1:
            return guarded_batch_norm(self, x)
        perm = torch.randperm(n, device=x.device)
        self.last_permutation = perm
        if n % groups:
            inverse = inverse_permutation(perm)
            y_perm = normalise_and_track(self, permute_rows(x, perm, inverse), even_split_sizes(n, groups))
            return permute_rows(y_perm, inverse, perm)
        # K equal groups (consecutive chunks of perm) in one copy each way: order the rows so that row
        # s·K + g is the s-th row of group g; then a view as (n/K samples, K·C channels) is the K groups
        size = n // groups
        order = perm.view(groups, size).t().reshape(-1)
        inverse = inverse_permutation(order)
        merged = permute_rows(x, order, inverse)
        y = normalise_and_track(self, merged, [size] * groups, interleaved=True)
        return permute_rows(y, inverse, order)

    def _forward_distributed(self, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        device = x.device
        # one all-gather: every process's row count, and the seed of the permutation drawn on rank 0
        seed = torch.randint(0, 2**62, (1,), device=device) if rank == 0 else torch.zeros(1, dtype=torch.int64, device=device)
        info = torch.cat([torch.tensor([x.shape[0]], dtype=torch.int64, device=device), seed])
        gathered = [torch.empty_like(info) for _ in range(world)]
        dist.all_gather(gathered, info)
        counts = torch.stack(gathered)[:, 0]
        total = int(counts.sum())
        if total == 0:  # the global batch is empty: every process knows, nothing more to exchange
            self.last_permutation = counts.new_zeros(0)
            return empty_output(x, self.weight, self.bias)
        generator = torch.Generator(device=device)
        generator.manual_seed(int(gathered[0][1]))
        perm = torch.randperm(total, generator=generator, device=device)  # identical on every process
        self.last_permutation = perm
        plan = ShufflePlan(counts, perm, rank, world)

        split = all_to_all(permute_rows(x, plan.send_order, plan.send_order_inverse), plan.receive_sizes, plan.send_sizes)
        if split.shape[0] > 0:
            y_split, mean, var = batch_norm_with_moments(split, self.weight, self.bias, self.eps)
        else:
            y_split = empty_output(split, self.weight, self.bias)
            mean = var = x.new_zeros(x.shape[1], dtype=torch.promote_types(x.dtype, torch.float32))
        if self.track_running_stats and self.running_mean is not None:
            # every process's split is one BN batch: aggregate them over processes (one all-reduce)
            count = mean.new_tensor([float(split.numel() // x.shape[1])])
            update_running_stats(self, *aggregate_group_statistics(Moments(count, mean[None], var[None]), sync=True))
        back = all_to_all(y_split, plan.send_sizes, plan.receive_sizes)
        return permute_rows(back, plan.send_order_inverse, plan.send_order)

    def extra_repr(self):
        return super().extra_repr() + f", num_groups={self.num_groups}"
