"""Running statistics survive non-finite batches.

Every statistics-keeping layer of the plug-in leaves its running statistics and num_batches_tracked
as they were when a training batch's statistics are not finite, counts the skip, and still returns
BN's output; the decision needs no host read; the counter changes no checkpoint key; PreciseBN leaves
such batches out and reports them; the counts reach detectron2's metrics. References: nn.BatchNorm2d,
F.batch_norm applied to each group, and the same layer fed only the finite batches.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2_bnstats.d2.statistics_health import NEW_KEY, TOTAL_KEY, StatisticsHealthHook
from d2_bnstats.layers.evalnorm import EvalNorm2d
from d2_bnstats.layers.ghost_bn import GhostBatchNorm2d, even_split_sizes, ghost_split_sizes
from d2_bnstats.layers.mabn import MABN2d, end_step
from d2_bnstats.layers.moments import add_skip_counter, guarded_batch_norm, update_running_stats
from d2_bnstats.layers.population import precise_bn
from d2_bnstats.layers.roi_shuffle import RoIShuffleBatchNorm2d
from d2_bnstats.layers.sync_bn import SyncBatchNorm2d

from .distributed import run_distributed

C, N = 4, 6
BAD_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
LAYERS = {
    "EvalNorm": lambda **kw: EvalNorm2d(C, **kw),
    "EvalNorm (no aux loss)": lambda **kw: EvalNorm2d(C, learn=False, **kw),
    "SyncBN": lambda **kw: SyncBatchNorm2d(C, **kw),
    "GhostBN (one group)": lambda **kw: GhostBatchNorm2d(C, **kw),
    "GhostBN (3 groups)": lambda **kw: GhostBatchNorm2d(C, virtual_batch_size=2, **kw),
    "RoIShuffleBN (2 groups)": lambda **kw: RoIShuffleBatchNorm2d(C, **kw),
    "RoIShuffleBN (4 unequal groups)": lambda **kw: RoIShuffleBatchNorm2d(C, num_groups=4, **kw),
    "RoIShuffleBN (1 group)": lambda **kw: RoIShuffleBatchNorm2d(C, num_groups=1, **kw),
}
BN_LIKE = ["EvalNorm", "EvalNorm (no aux loss)", "SyncBN", "GhostBN (one group)", "RoIShuffleBN (1 group)"]


def batch(seed, n=N):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, 3, 3, generator=g) * 2 + 1


def bad_batch(seed, kind="nan"):
    x = batch(seed)
    x[1, 2, 0, 1] = BAD_VALUES[kind]
    return x


def build(name, **kw):
    layer = LAYERS[name](**kw)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        layer.weight.copy_(0.5 + torch.rand(C, generator=g))
        layer.bias.copy_(torch.rand(C, generator=g) - 0.5)
    return layer.train()


def statistics(layer):
    return [t.clone() for t in (layer.running_mean, layer.running_var, layer.num_batches_tracked)]


def assert_same(got, expected):
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def groups_of(layer, n):
    """The row indices of the groups the layer normalized separately in its last training forward."""
    if isinstance(layer, GhostBatchNorm2d):
        sizes, order = ghost_split_sizes(n, layer.virtual_batch_size), torch.arange(n)
    elif isinstance(layer, RoIShuffleBatchNorm2d) and layer.num_groups > 1:
        sizes, order = even_split_sizes(n, min(layer.num_groups, n)), layer.last_permutation
    else:
        sizes, order = [n], torch.arange(n)
    return order.split(sizes)


def reference_output(layer, x):
    y = torch.empty_like(x)
    for rows in groups_of(layer, x.shape[0]):
        y[rows] = F.batch_norm(x[rows], None, None, layer.weight.detach(), layer.bias.detach(), True, 0.0, layer.eps)
    return y


@pytest.mark.parametrize("kind", BAD_VALUES)
@pytest.mark.parametrize("name", LAYERS)
def test_a_nonfinite_batch_changes_no_statistic_and_is_counted(name, kind):
    layer = build(name)
    layer(batch(0))
    before = statistics(layer)
    x = bad_batch(1, kind).requires_grad_(True)
    y = layer(x)
    y.sum().backward()  # committing the statistics in place does not disturb the backward pass
    assert_same(statistics(layer), before)
    assert int(layer.nonfinite_skips) == 1
    # the output is BN's on each group, as before: non-finite where the batch statistics are
    assert not torch.isfinite(y).all()
    torch.testing.assert_close(y.detach(), reference_output(layer, x.detach()), rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum 0.1", "cumulative average"])
@pytest.mark.parametrize("name", LAYERS)
def test_after_a_skipped_batch_the_statistics_are_those_of_the_finite_batches(name, momentum):
    layer = build(name, momentum=momentum)
    only_finite = copy.deepcopy(layer)
    for seed, x in [(0, batch(0)), (1, bad_batch(1)), (2, batch(2)), (3, bad_batch(3, "inf"))]:
        torch.manual_seed(seed)  # the same shuffle in both runs
        layer(x)
    for seed in (0, 2):
        torch.manual_seed(seed)
        only_finite(batch(seed))
    assert_same(statistics(layer), statistics(only_finite))
    assert int(layer.nonfinite_skips) == 2 and int(only_finite.nonfinite_skips) == 0


@pytest.mark.parametrize("name", BN_LIKE)
def test_bn_like_layers_stay_bn_bit_for_bit(name):
    """Output and gradients equal nn.BatchNorm2d's on every batch (non-finite ones included); the
    statistics equal those of a BatchNorm2d that saw only the finite batches."""
    layer = build(name)
    bn, bn_finite = nn.BatchNorm2d(C), nn.BatchNorm2d(C)
    with torch.no_grad():
        bn.weight.copy_(layer.weight)
        bn.bias.copy_(layer.bias)
    grad = batch(9)
    for x in [batch(0), bad_batch(1), batch(2)]:
        results = []
        for m in (layer, bn):
            m.weight.grad = m.bias.grad = None
            leaf = x.clone().requires_grad_(True)
            out = m(leaf)
            (out * grad).sum().backward()
            results.append((out.detach(), leaf.grad, m.weight.grad, m.bias.grad))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        if torch.isfinite(x).all():
            bn_finite(x)
        assert_same(statistics(layer), statistics(bn_finite))


@pytest.mark.parametrize("host_decision", [True, False], ids=["decided on the host", "decided by torch.where"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum 0.1", "cumulative average"])
def test_both_ways_of_deciding_give_bn_outputs_and_skip_nonfinite_updates(host_decision, momentum):
    """The host decision (the default for CPU statistics) and the tensor decision (every other device),
    both run here on CPU: BN's output and gradients bit for bit on every batch, the statistics of a
    BatchNorm2d fed only the finite batches, one count per skipped batch; through guarded_batch_norm
    and through update_running_stats."""
    bn, bn_finite, plain = (nn.BatchNorm2d(C, momentum=momentum) for _ in range(3))
    add_skip_counter(bn)
    grad = batch(9)
    for x in [batch(0), bad_batch(1), batch(2), bad_batch(3, "-inf"), batch(4)]:
        results = []
        for guarded in (True, False):
            m = bn if guarded else plain
            m.weight.grad = None
            leaf = x.clone().requires_grad_(True)
            out = guarded_batch_norm(m, leaf, host_decision=host_decision) if guarded else F.batch_norm(
                leaf, None, None, m.weight, m.bias, True, 0.0, m.eps
            )
            (out * grad).sum().backward()
            results.append((out.detach(), leaf.grad, m.weight.grad))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        if torch.isfinite(x).all():
            bn_finite(x)
        assert_same(statistics(bn), statistics(bn_finite))
    assert int(bn.nonfinite_skips) == 2
    # update_running_stats (the layers that reduce their own statistics) with the same decision
    direct = nn.BatchNorm2d(C, momentum=momentum)
    add_skip_counter(direct)
    reference = nn.BatchNorm2d(C, momentum=momentum)
    for x in [batch(0), bad_batch(1), batch(2)]:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=1)
        update_running_stats(direct, torch.tensor(float(x.numel() // C)), mean, var, host_decision=host_decision)
        if torch.isfinite(x).all():
            update_running_stats(reference, torch.tensor(float(x.numel() // C)), mean, var)
    update_running_stats(direct, torch.tensor(0.0), torch.zeros(C), torch.zeros(C), host_decision=host_decision)
    assert_same(statistics(direct), statistics(reference))
    assert int(direct.nonfinite_skips) == 1 and int(direct.num_batches_tracked) == 2


@pytest.mark.parametrize("name", LAYERS)
def test_finite_statistics_whose_products_overflow_are_updated(name):
    """Running statistics near 1e20: finite, but their dot product (the cheap first test on CPU)
    overflows; the update is kept and counted, as BatchNorm2d keeps it, and nothing is skipped."""
    layer = build(name)
    with torch.no_grad():
        layer.running_mean.fill_(1e20)
        layer.running_var.fill_(3e20)
    assert not torch.isfinite(torch.dot(layer.running_mean, layer.running_var))
    before = statistics(layer)
    torch.manual_seed(0)
    layer(batch(0))
    assert int(layer.nonfinite_skips) == 0 and int(layer.num_batches_tracked) == 1
    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()
    assert not torch.equal(layer.running_var, before[1])
    if name in BN_LIKE:
        bn = nn.BatchNorm2d(C)
        with torch.no_grad():
            bn.running_mean.fill_(1e20)
            bn.running_var.fill_(3e20)
        bn(batch(0))
        assert_same(statistics(layer), statistics(bn))


def test_mabn_counts_a_nonfinite_step_and_keeps_R():
    """MABN's own guard (per channel: the poisoned channel keeps its R and ring-buffer entry) counts
    the step like the other layers."""
    layer = MABN2d(C, buffer_size=2, warmup_iters=0).train()
    for x in [batch(0), bad_batch(1)]:
        r = layer.running_var.clone()
        layer(x.requires_grad_(True)).sum().backward()
        end_step(layer)
    assert layer.running_var[2] == r[2] and torch.isfinite(layer.running_var).all()
    assert int(layer.nonfinite_skips) == 1


@pytest.mark.parametrize("name", LAYERS)
def test_the_decision_reads_no_value_on_the_host(name):
    """On the meta device any host read of a value (.item(), float(), bool()) raises, as such a read
    would synchronize a GPU: every layer trains there and counts on the device."""
    layer = build(name).to("meta")
    layer(torch.empty(N, C, 3, 3, device="meta"))
    assert layer.nonfinite_skips.device.type == "meta"


@pytest.mark.parametrize("name", list(LAYERS) + ["MABN"])
def test_the_counter_changes_no_checkpoint_key_and_no_buffer(name):
    layer = MABN2d(C) if name == "MABN" else build(name)
    assert int(layer.nonfinite_skips) == 0
    assert "nonfinite_skips" not in layer.state_dict()
    assert "nonfinite_skips" not in dict(layer.named_buffers())
    expected = set(nn.BatchNorm2d(C).state_dict())
    if isinstance(layer, EvalNorm2d):
        expected |= {"alpha_hat", "beta_hat", "norm_batch_size", "_extra_state"}
    if name != "MABN":
        assert set(layer.state_dict()) == expected


def test_a_layer_whose_statistics_are_already_nonfinite_counts_every_update():
    layer = build("GhostBN (3 groups)")
    with torch.no_grad():
        layer.running_var[1] = float("nan")
    before = statistics(layer)
    layer(batch(0))
    layer(batch(1))
    assert_same(statistics(layer), before)
    assert int(layer.nonfinite_skips) == 2


def distributed_worker(rank, world_size, per_step=False):
    """Three steps of each synchronised layer on 2 processes, rank 1's second batch with a NaN; the
    layers guard themselves, or (``per_step``) a StepStatisticsGuard checks after each step."""
    from d2_bnstats.layers.step_guard import StepStatisticsGuard

    layers = {
        "SyncBN": SyncBatchNorm2d(C),
        "SyncEvalNorm": EvalNorm2d(C, sync=True),
        "RoIShuffleBN": RoIShuffleBatchNorm2d(C),
    }
    out = {}
    for name, layer in layers.items():
        layer.train()
        guard = StepStatisticsGuard(layer) if per_step else None
        states = []
        for step in range(3):
            if guard is not None:
                guard.snapshot()
            x = bad_batch(10 * step + rank) if (step == 1 and rank == 1) else batch(10 * step + rank, n=N + rank)
            layer(x.requires_grad_(True)).sum().backward()
            if guard is not None:
                guard.restore_nonfinite()
            states.append(statistics(layer) + [layer.nonfinite_skips.clone()])
        out[name] = states
    return out


def assert_every_process_skipped_the_nonfinite_step(results):
    for name in results[0]:
        per_rank = [r[name] for r in results]
        for step in range(3):  # global statistics: every process holds the same state
            assert_same(per_rank[0][step], per_rank[1][step])
        first, skipped, after = per_rank[0]
        assert_same(skipped[:3], first[:3])  # step 1: rank 1's batch had a NaN, nobody updated
        assert int(skipped[3]) == 1 and int(after[3]) == 1
        assert int(after[2]) == 2 and not torch.equal(after[0], first[0])  # step 2 updated again


def test_every_process_skips_a_batch_that_is_nonfinite_on_one_of_them():
    assert_every_process_skipped_the_nonfinite_step(run_distributed(distributed_worker, 2))


@pytest.mark.parametrize("where", ["first", "middle"])
def test_precise_bn_leaves_out_nonfinite_batches_and_reports_them(where):
    """nn.BatchNorm2d (read from its buffers) and a plug-in layer (reduced from its input)."""
    model = nn.Sequential(nn.BatchNorm2d(C), SyncBatchNorm2d(C))
    reference = copy.deepcopy(model)
    finite = [batch(s) for s in (3, 4, 5)]
    batches = [bad_batch(9)] + finite if where == "first" else finite[:1] + [bad_batch(9)] + finite[1:]
    report = precise_bn(model, batches, len(batches), sync=False)
    expected = precise_bn(reference, finite, len(finite), sync=False)
    assert report.nonfinite == {"0": 1, "1": 1} and expected.nonfinite == {}
    for got, ref in zip(report.layers, expected.layers):
        assert got.count == ref.count == 3 * N * 9
    for got, ref in zip(model, reference):
        torch.testing.assert_close(got.running_mean, ref.running_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got.running_var, ref.running_var, rtol=1e-6, atol=1e-7)
        assert torch.isfinite(got.running_var).all()
    assert int(model[1].nonfinite_skips) == 0  # the layer's own skips during the pass are undone with its state


def batch_loop(model, batches, raise_at=None):
    """A detectron2 training loop whose step i is ``model(batches[i])`` (raising, as detectron2 does on
    a non-finite loss, at step ``raise_at``)."""
    from detectron2.engine import TrainerBase

    class Loop(TrainerBase):
        def __init__(self):
            super().__init__()
            self.model = model

        def run_step(self):
            self.model(batches[self.iter])
            if self.iter == raise_at:
                raise FloatingPointError("Loss became infinite or NaN")

    return Loop()


def test_skip_counts_reach_detectron2_metrics():
    model = nn.Sequential(SyncBatchNorm2d(C), EvalNorm2d(C, learn=False)).train()
    batches = [batch(0), bad_batch(1), batch(2), bad_batch(3, "inf")]
    loop = batch_loop(model, batches)
    loop.register_hooks([StatisticsHealthHook()])
    loop.train(0, len(batches))
    new = [v for v, _ in loop.storage.history(NEW_KEY).values()]
    total = [v for v, _ in loop.storage.history(TOTAL_KEY).values()]
    # the NaN spreads over its channel, so both layers skip
    assert new == [0, 2, 0, 2] and total == [0, 2, 2, 4]
