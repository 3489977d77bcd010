"""RoI-shuffled BN: BN applied to the splits of one global permutation, against a plain reference.

Reference (single process, plain torch): concatenate the processes' RoIs in rank order, permute them
with the layer's permutation (``last_permutation``, which must be the same on every process), cut
into splits of near-equal size, apply a fresh ``nn.BatchNorm2d`` to each split, un-permute. The
multi-process cases share one 2-process spawn.
"""
import pytest
import torch
from torch import nn

import d2_bnstats
from d2_bnstats import RoIShuffleBatchNorm2d
from d2_bnstats.layers.ghost_bn import even_split_sizes

from .distributed import run_distributed

C = 3


def rois(seed, n, size=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, size, size, generator=g, dtype=torch.float64) * 2 + seed % 5


def set_affine(bn):
    torch.manual_seed(11)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def reference(parts, grads, perm, groups, momentum=0.1):
    """Outputs, input grads, weight/bias grads and running statistics of BN on the permuted splits."""
    leaves = [p.clone().requires_grad_(True) for p in parts]
    x = torch.cat(leaves)
    xp = x[perm]
    affine = set_affine(nn.BatchNorm2d(C).double())
    weight, bias = affine.weight, affine.bias
    outs, counts, means, unbiased = [], [], [], []
    for split in xp.split(even_split_sizes(len(perm), groups)):
        if split.shape[0] == 0:
            continue
        bn = nn.BatchNorm2d(C, momentum=1.0).double()
        bn.weight, bn.bias = weight, bias
        outs.append(bn(split))
        counts.append(split.numel() / C)
        means.append(bn.running_mean)  # momentum 1: the split's mean and unbiased variance
        unbiased.append(bn.running_var)
    yp = torch.cat(outs)
    y = torch.empty_like(yp)
    y[perm] = yp
    ys = list(y.split([p.shape[0] for p in parts]))
    sum((o * g).sum() for o, g in zip(ys, grads)).backward()
    w = torch.tensor(counts, dtype=torch.float64)[:, None] / sum(counts)
    agg_mean, agg_var = (w * torch.stack(means)).sum(0), (w * torch.stack(unbiased)).sum(0)
    running_mean = momentum * agg_mean
    running_var = (1 - momentum) + momentum * agg_var
    return {
        "outputs": [o.detach() for o in ys],
        "input_grads": [leaf.grad for leaf in leaves],
        "weight_grad": weight.grad,
        "bias_grad": bias.grad,
        "running_mean": running_mean,
        "running_var": running_var,
    }


DIST_CASES = {"unequal": (5, 3), "rank1-empty": (4, 0), "rank0-empty": (0, 3), "one-roi": (1, 0), "all-empty": (0, 0)}


def case_data(name):
    counts = DIST_CASES[name]
    parts = [rois(10 * r + len(name), n) for r, n in enumerate(counts)]
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(r + 50), dtype=torch.float64) for r, p in enumerate(parts)]
    return parts, grads


def _shuffle_worker(rank, world_size, cases):
    from d2_bnstats.layers.roi_shuffle import ShufflePlan, all_to_all

    out = {}
    for name, (parts, grads) in cases.items():
        layer = set_affine(RoIShuffleBatchNorm2d(C, num_groups=7).double())  # num_groups unused with 2 processes
        torch.manual_seed(1000 + rank)  # different generators: the permutation must still be one
        x = parts[rank].clone().requires_grad_(True)
        y = layer(x)
        (y * grads[rank]).sum().backward()
        out[name] = {
            "output": y.detach(),
            "input_grad": x.grad,
            "weight_grad": layer.weight.grad,
            "bias_grad": layer.bias.grad,
            "running_mean": layer.running_mean.clone(),
            "running_var": layer.running_var.clone(),
            "num_batches_tracked": layer.num_batches_tracked.clone(),
            "perm": layer.last_permutation,
        }

    # the routing alone, with row ids for features: split `rank` of a given permutation arrives
    # (in arrival order), and the way back restores this process's rows in their order exactly
    counts = [5, 3]
    perm = torch.arange(8).flip(0).roll(2)
    plan = ShufflePlan(torch.tensor(counts), perm, rank, world_size)
    ids = (torch.arange(counts[rank]) + (5 if rank else 0)).double()[:, None, None, None].expand(-1, 2, 1, 1)
    received = all_to_all(ids.index_select(0, plan.send_order), plan.receive_sizes, plan.send_sizes)
    back = all_to_all(received, plan.send_sizes, plan.receive_sizes)
    out["routing"] = {"perm": perm, "received": received[:, 0, 0, 0], "back": back.index_select(0, plan.send_order_inverse), "ids": ids}

    # evaluation: population statistics, no collectives (ranks call it different numbers of times)
    layer = set_affine(RoIShuffleBatchNorm2d(C).double())
    layer.running_mean.fill_(0.25)
    layer.eval()
    x = cases["unequal"][0][0]
    out["eval"] = [layer(x) for _ in range(rank + 1)][-1].detach()

    # the multi-process benchmark (tools/benchmark_sync.py) runs and is self-consistent
    from bnstats_lab.benchmark.distributed import benchmark_in_process

    out["bench"] = benchmark_in_process(["SyncBN", "RoIShuffleBN"], [((4, C, 2, 2), (2, C, 2, 2))], repeats=1, iters=1, warmup=1)
    return out


@pytest.fixture(scope="module")
def distributed_results():
    return run_distributed(_shuffle_worker, 2, args=({name: case_data(name) for name in DIST_CASES},))


@pytest.mark.parametrize("name", [n for n in DIST_CASES if n != "all-empty"])
def test_two_processes_equal_bn_on_the_permuted_splits(distributed_results, name):
    parts, grads = case_data(name)
    total = sum(p.shape[0] for p in parts)
    got = [r[name] for r in distributed_results]
    perm = got[0]["perm"]
    assert torch.equal(perm, got[1]["perm"]) and torch.equal(perm.sort().values, torch.arange(total))
    ref = reference(parts, grads, perm, groups=2)
    for rank in range(2):
        assert got[rank]["output"].shape == parts[rank].shape
        torch.testing.assert_close(got[rank]["output"], ref["outputs"][rank], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(got[rank]["input_grad"], ref["input_grads"][rank], rtol=1e-8, atol=1e-10)
        for key in ("running_mean", "running_var"):  # identical on both processes
            torch.testing.assert_close(got[rank][key], ref[key], rtol=1e-9, atol=1e-10)
        assert got[rank]["num_batches_tracked"].item() == 1
    torch.testing.assert_close(got[0]["weight_grad"] + got[1]["weight_grad"], ref["weight_grad"], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(got[0]["bias_grad"] + got[1]["bias_grad"], ref["bias_grad"], rtol=1e-8, atol=1e-10)


def test_shuffle_is_not_plain_sync_bn(distributed_results):
    """The splits are normalised separately: the output differs from BN over the global batch."""
    parts, _ = case_data("unequal")
    bn = set_affine(nn.BatchNorm2d(C).double())
    global_bn = bn(torch.cat(parts)).detach().split([5, 3])
    assert not torch.allclose(distributed_results[0]["unequal"]["output"], global_bn[0], atol=1e-3)


def test_all_empty_global_batch(distributed_results):
    for r in distributed_results:
        got = r["all-empty"]
        assert got["output"].shape == (0, C, 3, 3) and torch.all(got["weight_grad"] == 0)
        assert torch.all(got["running_mean"] == 0) and torch.all(got["running_var"] == 1)
        assert got["num_batches_tracked"].item() == 0


def test_routing_delivers_the_split_and_unpermutes_exactly(distributed_results):
    perm = distributed_results[0]["routing"]["perm"]
    splits = perm.split(even_split_sizes(len(perm), 2))  # global row ids of each split
    for rank, r in enumerate(distributed_results):
        assert sorted(r["routing"]["received"].long().tolist()) == sorted(splits[rank].tolist())
        assert torch.equal(r["routing"]["back"], r["routing"]["ids"])


def test_evaluation_uses_population_statistics(distributed_results):
    parts, _ = case_data("unequal")
    bn = set_affine(nn.BatchNorm2d(C).double())
    bn.running_mean.fill_(0.25)
    bn.eval()
    for r in distributed_results:
        torch.testing.assert_close(r["eval"], bn(parts[0]).detach(), rtol=0, atol=0)


def test_distributed_benchmark_rows(distributed_results):
    from bnstats_lab.benchmark.distributed import BN_REFERENCE, format_table

    rows = distributed_results[0]["bench"]
    assert [r.norm for r in rows] == [BN_REFERENCE, "SyncBN", "RoIShuffleBN"]
    assert rows[0].train_ratio == [1.0, 1.0] and rows[0].shapes == ((4, C, 2, 2), (2, C, 2, 2))
    assert all(len(r.train_ms) == 2 and min(r.train_ms) > 0 for r in rows)
    assert "RoIShuffleBN" in format_table(rows)


# --- one process: shuffle + K groups ---------------------------------------------------------------


@pytest.mark.parametrize("n, groups", [(10, 2), (11, 3), (2, 5)])
def test_single_process_equals_bn_on_shuffled_groups(n, groups):
    x = rois(3, n)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    layer = set_affine(RoIShuffleBatchNorm2d(C, num_groups=groups).double())
    xi = x.clone().requires_grad_(True)
    y = layer(xi)
    (y * g).sum().backward()
    perm = layer.last_permutation
    assert torch.equal(perm.sort().values, torch.arange(n))
    ref = reference([x], [g], perm, groups=min(groups, n))
    torch.testing.assert_close(y.detach(), ref["outputs"][0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(xi.grad, ref["input_grads"][0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, ref["weight_grad"], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(layer.running_mean, ref["running_mean"], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.running_var, ref["running_var"], rtol=1e-9, atol=1e-10)


def test_single_process_grouping_differs_from_plain_bn_as_designed():
    x = rois(4, 12)
    bn = set_affine(nn.BatchNorm2d(C).double())
    plain = bn(x)
    layer = set_affine(RoIShuffleBatchNorm2d(C, num_groups=3).double())
    y = layer(x)
    assert not torch.allclose(y, plain, atol=1e-3)  # a shuffle alone would change nothing
    # ... but every group of the permutation is normalised on its own: per-group mean = bias
    for group in layer.last_permutation.split(4):
        z = (y[group] - layer.bias[None, :, None, None]) / layer.weight[None, :, None, None]
        torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(C, dtype=torch.float64), rtol=0, atol=1e-9)
    # K = 1 is exactly BN
    one = set_affine(RoIShuffleBatchNorm2d(C, num_groups=1).double())
    assert torch.equal(one(x), plain)


def test_single_process_empty_and_eval():
    layer = set_affine(RoIShuffleBatchNorm2d(C).double())
    x = torch.zeros(0, C, 3, 3, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == x.shape and layer.num_batches_tracked.item() == 0
    assert torch.all(layer.running_mean == 0) and torch.all(layer.running_var == 1)
    layer(rois(1, 6))
    bn = set_affine(nn.BatchNorm2d(C).double())
    bn.load_state_dict(layer.state_dict())
    layer.eval(), bn.eval()
    assert torch.equal(layer(rois(2, 4)), bn(rois(2, 4)))


def test_num_groups_from_config_and_bad_values():
    from detectron2.config import get_cfg

    from d2_bnstats import add_bnstats_config
    from d2_bnstats.d2.build import configure_norm

    cfg = get_cfg()
    add_bnstats_config(cfg)
    cfg.BNSTATS.ROI_SHUFFLE.NUM_GROUPS = 4
    assert d2_bnstats.get_norm(configure_norm(cfg, "RoIShuffleBN"), 8).num_groups == 4
    cfg.BNSTATS.ROI_SHUFFLE.NUM_GROUPS = 0
    with pytest.raises(ValueError, match="BNSTATS.ROI_SHUFFLE.NUM_GROUPS = 0: expected a positive integer"):
        d2_bnstats.get_norm(configure_norm(cfg, "RoIShuffleBN"), 8)
    assert d2_bnstats.get_norm("RoIShuffleBN", 8).num_groups == 2
