"""BN statistics maths: moments of a batch and of the global batch (exact statistics of the
concatenation, gradients included), Bessel's correction, separately normalized groups, the running
statistics update; references are plain torch reductions and nn.BatchNorm2d."""
import pytest
import torch

from torch import nn

from d2_bnstats.layers.moments import (
    Moments,
    aggregate_group_statistics,
    batch_moments_from_samples,
    bessel_correction,
    combine_moments,
    global_moments,
    local_moments,
    moments_from_power_sums,
    per_sample_moments,
    power_sums,
    shifted_moments,
    update_running_stats,
)

from .distributed import run_distributed


def reference_moments(parts):
    """Mean and biased variance per channel of all values of all parts, concatenated."""
    flat = torch.cat([p.double().transpose(0, 1).reshape(p.shape[1], -1) for p in parts], dim=1)
    return flat.shape[1], flat.mean(1), flat.var(1, unbiased=False)


def make_parts(seed=0):
    g = torch.Generator().manual_seed(seed)
    # unequal batch sizes and unequal spatial sizes, and one empty part
    return [
        torch.randn(3, 5, 7, 6, generator=g) * 3 + 1,
        torch.randn(1, 5, 4, 9, generator=g) - 2,
        torch.randn(0, 5, 8, 8, generator=g),
    ]


def test_local_moments_match_torch():
    x = make_parts()[0]
    m = local_moments(x)
    assert m.count.item() == 3 * 7 * 6
    torch.testing.assert_close(m.mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(m.var, x.var((0, 2, 3), unbiased=False))


def test_empty_input_has_zero_count_and_no_nan():
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    m = local_moments(x)
    assert m.count.item() == 0 and torch.all(m.mean == 0) and torch.all(m.var == 0)
    (m.mean.sum() + m.var.sum()).backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_combine_equals_concatenated_batch():
    parts = make_parts()
    moments = [local_moments(p) for p in parts]
    merged = combine_moments(
        torch.stack([m.count for m in moments]), torch.stack([m.mean for m in moments]), torch.stack([m.var for m in moments])
    )
    n, mean, var = reference_moments(parts)
    assert merged.count.item() == n
    torch.testing.assert_close(merged.mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged.var.double(), var, rtol=1e-5, atol=1e-6)


def test_combine_all_empty_is_zero():
    z = torch.zeros(2, 3)
    m = combine_moments(torch.zeros(2), z, z)
    assert m.count.item() == 0 and torch.all(m.mean == 0) and torch.all(m.var == 0)


def test_single_process_global_moments_are_local():
    x = make_parts()[0]
    g, l = global_moments(x), local_moments(x)
    assert torch.equal(g.mean, l.mean) and torch.equal(g.var, l.var)


def _loss(m, weight):
    return (m.mean * weight).sum() + (m.var * weight.flip(0)).sum()


def _global_worker(rank, world_size, parts, weight):
    x = parts[rank].clone().requires_grad_(True)
    m = global_moments(x)
    # every process computes the same loss of the global moments; the total is world_size times it
    _loss(m, weight).backward()
    return m.count, m.mean.detach(), m.var.detach(), x.grad


@pytest.mark.parametrize("ranks", [(0, 1), (0, 2)], ids=["unequal-sizes", "one-rank-empty"])
def test_two_processes_equal_single_process_on_the_union(ranks):
    parts = [make_parts()[r] for r in ranks]
    weight = torch.linspace(-1, 2, 5)
    results = run_distributed(_global_worker, 2, args=(parts, weight))
    n, mean, var = reference_moments(parts)
    # single-process reference: gradient of world_size * loss w.r.t. each part of the concatenation
    leaves = [p.double().clone().requires_grad_(True) for p in parts]
    flat = torch.cat([p.transpose(0, 1).reshape(5, -1) for p in leaves], dim=1)
    ref = Moments(torch.tensor(float(n)), flat.mean(1), flat.var(1, unbiased=False))
    (2 * _loss(ref, weight.double())).backward()
    for rank, (count, m, v, grad) in enumerate(results):
        assert count.item() == n
        torch.testing.assert_close(m.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v.double(), var, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), leaves[rank].grad, rtol=1e-4, atol=1e-6)


def test_per_sample_and_shifted_moments_match_torch():
    x = make_parts()[0].double()
    mean_i, var_i = per_sample_moments(x)
    torch.testing.assert_close(mean_i, x.mean((2, 3)))
    torch.testing.assert_close(var_i, x.var((2, 3), unbiased=False))
    mean, var = batch_moments_from_samples(mean_i, var_i)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False))
    n, mean, var = shifted_moments(x.float() + 1e3, shift=torch.full((5,), 1e3))
    assert n == 3 * 7 * 6
    torch.testing.assert_close(mean - 1e3, x.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-4)


def test_power_sums_over_parts_give_the_moments_of_the_union():
    parts = [p.double() for p in make_parts()[:2]]
    sums = [power_sums(*local_moments(p)) for p in parts]
    count, total, total_sq = (sum(s[i] for s in sums) for i in range(3))
    mean, var = moments_from_power_sums(count, total, total_sq)
    n, ref_mean, ref_var = reference_moments(parts)
    assert count.item() == n
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)


def test_bessel_correction():
    assert bessel_correction(5) == 5 / 4 and bessel_correction(1) == 1.0 and bessel_correction(0) == 1.0
    got = bessel_correction(torch.tensor([0.0, 1.0, 2.0, 10.0]))
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0, 2.0, 10 / 9]))
    x = torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(x.var(unbiased=False) * bessel_correction(7), x.var(unbiased=True))


def test_aggregate_group_statistics_is_the_weighted_mean_of_group_statistics():
    groups = [torch.randn(n, 3, 2, 2, dtype=torch.float64) + i for i, n in enumerate((2, 3, 3))]
    stacked = [local_moments(g) for g in groups]
    total, mean, unbiased = aggregate_group_statistics(
        Moments(torch.stack([m.count for m in stacked]), torch.stack([m.mean for m in stacked]), torch.stack([m.var for m in stacked]))
    )
    counts = torch.tensor([g.numel() / 3 for g in groups], dtype=torch.float64)
    assert total.item() == counts.sum().item()
    ref_mean = sum(c * g.mean((0, 2, 3)) for c, g in zip(counts, groups)) / counts.sum()
    ref_var = sum(c * g.var((0, 2, 3), unbiased=True) for c, g in zip(counts, groups)) / counts.sum()
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(unbiased, ref_var)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
def test_running_statistics_update_is_torchs_and_skips_empty_batches(momentum):
    ours, ref = nn.BatchNorm2d(5, momentum=momentum), nn.BatchNorm2d(5, momentum=momentum)
    for seed in range(3):
        x = make_parts(seed)[0]
        ref(x)
        m = local_moments(x)
        update_running_stats(ours, m.count, m.mean, m.var * bessel_correction(m.count))
        empty = local_moments(make_parts(seed)[2])
        update_running_stats(ours, empty.count, empty.mean, empty.var)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
