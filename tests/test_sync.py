"""Global-batch moments: exact statistics of the concatenated batch, gradients included."""
import pytest
import torch

from d2_bnstats.layers.sync import combine_moments, global_moments, local_moments

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
    from d2_bnstats.layers.sync import Moments

    ref = Moments(torch.tensor(float(n)), flat.mean(1), flat.var(1, unbiased=False))
    (2 * _loss(ref, weight.double())).backward()
    for rank, (count, m, v, grad) in enumerate(results):
        assert count.item() == n
        torch.testing.assert_close(m.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v.double(), var, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), leaves[rank].grad, rtol=1e-4, atol=1e-6)
