"""SyncBN: exact statistics of the global batch, against nn.BatchNorm2d on all values in one process.

The multi-process cases run in ONE 2-process gloo spawn (module fixture) to keep the suite fast; each
test checks its own case from the collected results.
"""
import pytest
import torch
from torch import nn

import d2_bnstats
from d2_bnstats import SyncBatchNorm2d
from d2_bnstats import add_bnstats_config

from .distributed import run_distributed

C = 4


def make_parts(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64) * (1.5 + i) + i for i, s in enumerate(shapes)]


def upstream_grads(parts, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in parts]


def new_bn(cls=nn.BatchNorm2d, **kwargs):
    torch.manual_seed(3)
    bn = cls(C, **kwargs).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def reference_steps(steps, momentum=0.1):
    """nn.BatchNorm2d on ALL values of all processes at once, one step per entry of ``steps``.

    Each step is (parts, grads): the values of part k are laid out as one long row [1, C, 1, n] so
    that parts of different N and H×W form one BN batch. Returns per step the outputs, input grads
    and weight/bias grads, and the module's final state.
    """
    bn = new_bn(momentum=momentum)
    results = []
    for parts, grads in steps:
        leaves = [p.clone().requires_grad_(True) for p in parts]
        flat = torch.cat([p.transpose(0, 1).reshape(C, -1) for p in leaves], dim=1)
        if flat.shape[1] == 0:
            results.append(None)
            continue
        y = bn(flat[None, :, None, :])[0, :, 0, :]
        outs, start = [], 0
        for p in parts:
            n = p.numel() // C
            shape = (p.shape[1], p.shape[0]) + tuple(p.shape[2:])
            outs.append(y[:, start : start + n].reshape(shape).transpose(0, 1))
            start += n
        bn.weight.grad = bn.bias.grad = None
        sum((o * g).sum() for o, g in zip(outs, grads)).backward()
        results.append(
            {
                "outputs": [o.detach() for o in outs],
                "input_grads": [leaf.grad for leaf in leaves],
                "weight_grad": bn.weight.grad.clone(),
                "bias_grad": bn.bias.grad.clone(),
            }
        )
    return results, {k: v.clone() for k, v in bn.state_dict().items()}


# shapes per case: list of steps, each a pair of (rank 0 shape, rank 1 shape)
CASES = {
    "unequal-N-and-HW": [((3, C, 7, 6), (1, C, 4, 9)), ((2, C, 5, 5), (4, C, 3, 8))],
    "empty-rank": [((3, C, 6, 6), (0, C, 6, 6)), ((0, C, 5, 5), (2, C, 5, 7))],
    "all-empty": [((0, C, 6, 6), (0, C, 6, 6))],
    "cumulative-momentum": [((2, C, 3, 3), (3, C, 4, 4)), ((1, C, 5, 5), (0, C, 5, 5)), ((2, C, 2, 2), (1, C, 2, 2))],
}


def case_steps(name):
    steps = []
    for i, shapes in enumerate(CASES[name]):
        parts = make_parts(100 * i + len(name), shapes)
        steps.append((parts, upstream_grads(parts, seed=i)))
    return steps


def _sync_worker(rank, world_size, cases):
    out = {}
    for name, steps in cases.items():
        momentum = None if name == "cumulative-momentum" else 0.1
        bn = new_bn(SyncBatchNorm2d, momentum=momentum)
        per_step = []
        for parts, grads in steps:
            x = parts[rank].clone().requires_grad_(True)
            bn.weight.grad = bn.bias.grad = None
            y = bn(x)
            (y * grads[rank]).sum().backward()
            per_step.append(
                {"output": y.detach(), "input_grad": x.grad, "weight_grad": bn.weight.grad.clone(), "bias_grad": bn.bias.grad.clone()}
            )
        out[name] = {"steps": per_step, "state": {k: v.clone() for k, v in bn.state_dict().items()}}

    # evaluation communicates nothing: the ranks may call it different numbers of times
    bn = new_bn(SyncBatchNorm2d)
    bn.running_mean.uniform_(-1, 1)
    bn.eval()
    x = make_parts(5, [(2, C, 3, 3)])[0]
    out["eval"] = [bn(x) for _ in range(rank + 1)][-1].detach()

    # per-level SyncBN (RetinaNet head): each level's statistics are those of that level's global batch
    from d2_bnstats import PerLevelNorm

    per_level = PerLevelNorm(new_bn(SyncBatchNorm2d), 2)
    for level, shape in enumerate(PER_LEVEL_SHAPES[rank]):
        per_level(make_parts(30 + 2 * level + rank, [shape])[0])
    out["per-level"] = [{k: v.clone() for k, v in n.state_dict().items()} for n in per_level.levels]

    # replica check: SyncBN buffers agree, plain BN buffers differ, a perturbed parameter is found
    from d2_bnstats.d2.replicas import compare_replicas

    model = nn.Sequential(new_bn(SyncBatchNorm2d), new_bn())
    model(make_parts(rank, [(2, C, 3, 3)])[0])
    if rank == 1:
        with torch.no_grad():
            model[1].bias[0] += 1e-12
    out["replicas"] = compare_replicas(model)
    return out


# per rank: the input of level 0 and of level 1 (levels differ in size; rank 1's level 1 is empty)
PER_LEVEL_SHAPES = [[(2, C, 8, 8), (2, C, 4, 4)], [(1, C, 6, 6), (0, C, 3, 3)]]


@pytest.fixture(scope="module")
def distributed_results():
    cases = {name: case_steps(name) for name in CASES}
    return run_distributed(_sync_worker, 2, args=(cases,))


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_bn_on_the_global_batch(distributed_results, name):
    steps = case_steps(name)
    reference, ref_state = reference_steps(steps, momentum=None if name == "cumulative-momentum" else 0.1)
    for step, ref in enumerate(reference):
        got = [r[name]["steps"][step] for r in distributed_results]
        if ref is None:  # the global batch is empty: empty outputs, zero parameter gradients
            for g in got:
                assert g["output"].numel() == 0 and g["input_grad"].numel() == 0
                assert torch.all(g["weight_grad"] == 0) and torch.all(g["bias_grad"] == 0)
            continue
        for rank, g in enumerate(got):
            assert g["output"].shape == steps[step][0][rank].shape
            torch.testing.assert_close(g["output"], ref["outputs"][rank], rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(g["input_grad"], ref["input_grads"][rank], rtol=1e-8, atol=1e-10)
        # DistributedDataParallel sums the processes' parameter gradients
        torch.testing.assert_close(got[0]["weight_grad"] + got[1]["weight_grad"], ref["weight_grad"], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(got[0]["bias_grad"] + got[1]["bias_grad"], ref["bias_grad"], rtol=1e-8, atol=1e-10)
    # running statistics: those of BN on the global batches, identical on both processes
    for rank in range(2):
        state = distributed_results[rank][name]["state"]
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(state[key], ref_state[key], rtol=1e-9, atol=1e-10, msg=f"{key} on rank {rank}")


def test_all_empty_global_batch_leaves_statistics_untouched(distributed_results):
    state = distributed_results[0]["all-empty"]["state"]
    assert torch.all(state["running_mean"] == 0) and torch.all(state["running_var"] == 1)
    assert state["num_batches_tracked"].item() == 0


def test_evaluation_needs_no_collectives_and_is_bn_inference(distributed_results):
    bn = new_bn()
    bn.running_mean.uniform_(-1, 1)  # same RNG draws as the worker
    bn.eval()
    expected = bn(make_parts(5, [(2, C, 3, 3)])[0]).detach()
    for r in distributed_results:
        torch.testing.assert_close(r["eval"], expected, rtol=0, atol=0)


def test_per_level_sync_bn_keeps_each_levels_global_statistics(distributed_results):
    for level in range(2):
        parts = [make_parts(30 + 2 * level + rank, [PER_LEVEL_SHAPES[rank][level]])[0] for rank in range(2)]
        _, ref_state = reference_steps([(parts, upstream_grads(parts))])
        for r in distributed_results:
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(r["per-level"][level][key], ref_state[key], rtol=1e-9, atol=1e-10)


def test_replica_check_finds_exactly_the_differing_tensors(distributed_results):
    for r in distributed_results:
        rep = r["replicas"]
        assert rep["world_size"] == 2 and rep["parameters"] == 4 and rep["buffers"] == 6
        assert rep["mismatched_parameters"] == ["1.bias"]
        # plain BN saw different data on the two processes; SyncBN's statistics are global
        assert rep["mismatched_buffers"] == ["1.running_mean", "1.running_var"]


# --- one process: exactly nn.BatchNorm2d -----------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
def test_single_process_is_plain_bn(momentum):
    x = make_parts(1, [(3, C, 5, 5)])[0]
    sync, plain = new_bn(SyncBatchNorm2d, momentum=momentum), new_bn(momentum=momentum)
    for _ in range(2):
        xs, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ys, yp = sync(xs), plain(xp)
        assert torch.equal(ys, yp)
        ys.sum().backward(), yp.sum().backward()
        assert torch.equal(xs.grad, xp.grad) and torch.equal(sync.weight.grad, plain.weight.grad)
    for key, value in plain.state_dict().items():
        assert torch.equal(sync.state_dict()[key], value), key
    sync.eval(), plain.eval()
    assert torch.equal(sync(x), plain(x))


def test_single_process_empty_input_changes_nothing():
    bn = new_bn(SyncBatchNorm2d)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.zeros(0, C, 4, 4, dtype=torch.float64, requires_grad=True)
    y = bn(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and torch.all(bn.weight.grad == 0)
    for key, value in before.items():
        assert torch.equal(bn.state_dict()[key], value), key


def test_syncbn_name_builds_the_plugin_layer_unless_switched_off():
    from detectron2.config import get_cfg
    from detectron2.layers import FrozenBatchNorm2d

    from d2_bnstats.d2.build import configure_norm

    assert type(d2_bnstats.get_norm("SyncBN", 8)) is SyncBatchNorm2d
    assert type(d2_bnstats.get_norm("nnSyncBN", 8)) is nn.SyncBatchNorm
    cfg = get_cfg()
    add_bnstats_config(cfg)
    cfg.BNSTATS.SYNC_BN.REPLACE_D2 = False
    assert type(d2_bnstats.get_norm(configure_norm(cfg, "SyncBN"), 8)) is nn.SyncBatchNorm
    # detectron2 treats it as BN: FrozenBN conversion and PreciseBN's module types
    from fvcore.nn.precise_bn import get_bn_modules

    model = nn.Sequential(SyncBatchNorm2d(8))
    assert get_bn_modules(model) == [model[0]]
    assert isinstance(FrozenBatchNorm2d.convert_frozen_batchnorm(model)[0], FrozenBatchNorm2d)
