"""Ghost BN: BN applied to each sub-batch, against nn.BatchNorm2d run on each sub-batch separately."""
import pytest
import torch
from torch import nn

import d2_bnstats
from d2_bnstats import GhostBatchNorm2d
from d2_bnstats.layers.ghost_bn import ghost_split_sizes

C = 3


def batch(n, seed=0, size=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, size, size, generator=g, dtype=torch.float64) * 3 + 1


def with_affine(bn):
    torch.manual_seed(2)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


def reference(x, grad, sizes, momentum=0.1, steps=1):
    """Per sub-batch: a BN with momentum 1 gives that sub-batch's output, mean and unbiased variance;
    the running statistics take one EMA step per forward with the count-weighted mean of those."""
    affine = with_affine(nn.BatchNorm2d(C).double())
    running_mean, running_var = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for _ in range(steps):
        leaf = x.clone().requires_grad_(True)
        outs, means, variances, counts = [], [], [], []
        for part in leaf.split(sizes):
            bn = nn.BatchNorm2d(C, momentum=1.0).double()
            bn.weight, bn.bias = affine.weight, affine.bias
            outs.append(bn(part))
            means.append(bn.running_mean)
            variances.append(bn.running_var)
            counts.append(part.numel() / C)
        y = torch.cat(outs)
        affine.weight.grad = affine.bias.grad = None
        (y * grad).sum().backward()
        w = torch.tensor(counts, dtype=torch.float64)[:, None] / sum(counts)
        running_mean = (1 - momentum) * running_mean + momentum * (w * torch.stack(means)).sum(0)
        running_var = (1 - momentum) * running_var + momentum * (w * torch.stack(variances)).sum(0)
    return y.detach(), leaf.grad, affine.weight.grad, affine.bias.grad, running_mean, running_var


def test_split_sizes_spread_the_remainder():
    assert ghost_split_sizes(10, 4) == [4, 3, 3]
    assert ghost_split_sizes(8, 4) == [4, 4]
    assert ghost_split_sizes(9, 4) == [3, 3, 3]
    assert ghost_split_sizes(3, 4) == [3]
    assert ghost_split_sizes(0, 4) == []
    for n in range(1, 40):
        for v in range(1, 9):
            sizes = ghost_split_sizes(n, v)
            assert sum(sizes) == n and max(sizes) <= v and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n, virtual", [(10, 4), (8, 2), (7, 3)])
def test_equals_bn_per_sub_batch(n, virtual):
    x, g = batch(n), batch(n, seed=1)
    layer = with_affine(GhostBatchNorm2d(C, virtual_batch_size=virtual).double())
    for _ in range(2):
        xi = x.clone().requires_grad_(True)
        layer.weight.grad = layer.bias.grad = None
        y = layer(xi)
        (y * g).sum().backward()
    y_ref, gx_ref, gw_ref, gb_ref, rm_ref, rv_ref = reference(x, g, ghost_split_sizes(n, virtual), steps=2)
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(xi.grad, gx_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, gw_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, gb_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(layer.running_mean, rm_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.running_var, rv_ref, rtol=1e-9, atol=1e-10)
    assert layer.num_batches_tracked.item() == 2  # one update per forward, not per sub-batch
    # the sub-batches really are normalised separately: not plain BN over the batch
    plain = with_affine(nn.BatchNorm2d(C).double())
    assert not torch.allclose(y, plain(x), atol=1e-3)


def test_batch_not_larger_than_virtual_size_is_plain_bn():
    x = batch(4)
    layer, plain = with_affine(GhostBatchNorm2d(C, virtual_batch_size=4).double()), with_affine(nn.BatchNorm2d(C).double())
    assert torch.equal(layer(x), plain(x))
    assert torch.equal(layer.running_var, plain.running_var)
    layer.eval(), plain.eval()
    assert torch.equal(layer(batch(3, seed=5)), plain(batch(3, seed=5)))


def test_cumulative_momentum_and_empty_input():
    layer = with_affine(GhostBatchNorm2d(C, virtual_batch_size=2, momentum=None).double())
    x, g = batch(5), torch.zeros(5, C, 4, 4, dtype=torch.float64)
    layer(x)
    *_, rm, rv = reference(x, g, [2, 2, 1], momentum=1.0)
    torch.testing.assert_close(layer.running_mean, rm), torch.testing.assert_close(layer.running_var, rv)
    empty = torch.zeros(0, C, 4, 4, dtype=torch.float64, requires_grad=True)
    layer(empty).sum().backward()
    assert empty.grad.shape == empty.shape and layer.num_batches_tracked.item() == 1
    torch.testing.assert_close(layer.running_mean, rm)


def test_virtual_batch_size_from_config_and_bad_values():
    from detectron2.config import get_cfg

    from d2_bnstats import add_bnstats_config
    from d2_bnstats.d2.build import configure_norm

    assert d2_bnstats.get_norm("GhostBN", 8).virtual_batch_size == 32
    cfg = get_cfg()
    add_bnstats_config(cfg)
    cfg.BNSTATS.GHOST_BN.VIRTUAL_BATCH_SIZE = 16
    assert d2_bnstats.get_norm(configure_norm(cfg, "GhostBN"), 8).virtual_batch_size == 16
    cfg.BNSTATS.GHOST_BN.VIRTUAL_BATCH_SIZE = -1
    with pytest.raises(ValueError, match=r"BNSTATS.GHOST_BN.VIRTUAL_BATCH_SIZE = -1: expected a positive integer"):
        d2_bnstats.get_norm(configure_norm(cfg, "GhostBN"), 8)
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive integer"):
        GhostBatchNorm2d(8, virtual_batch_size=0)
