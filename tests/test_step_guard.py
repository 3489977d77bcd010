"""The once-per-step non-finite guard (d2_bnstats/layers/step_guard.py, StepGuardHook).

References: the layers' own per-call guard (tests/test_nonfinite.py checks it against runs on the
finite batches only) and runs that never saw the bad batches."""
import copy

import pytest
import torch
from torch import nn

from d2_bnstats.d2.statistics_health import NEW_KEY, StatisticsHealthHook, StepGuardHook
from d2_bnstats.layers.evalnorm import EvalNorm2d
from d2_bnstats.layers.moments import GUARDED_PER_STEP
from d2_bnstats.layers.step_guard import StepStatisticsGuard
from d2_bnstats.layers.sync_bn import SyncBatchNorm2d

from .distributed import run_distributed
from .test_nonfinite import (
    LAYERS,
    C,
    N,
    assert_every_process_skipped_the_nonfinite_step,
    assert_same,
    bad_batch,
    batch,
    batch_loop,
    build,
    distributed_worker,
    statistics,
)

ALL_LAYERS = list(LAYERS) + ["BN (torch)"]
SEQUENCE = [(0, "finite"), (1, "nan"), (2, "finite"), (3, "inf")]


def build_any(name, **kw):
    if name == "BN (torch)":
        return nn.BatchNorm2d(C, **kw).train()
    return build(name, **kw)


def inputs(seed, kind):
    return batch(seed) if kind == "finite" else bad_batch(seed, kind)


def train_steps(layer, steps, guard=None):
    """One forward + backward per step (the shuffle seeded per step); the outputs."""
    outputs = []
    for seed, kind in steps:
        if guard is not None:
            guard.snapshot()
        torch.manual_seed(seed)
        x = inputs(seed, kind).requires_grad_(True)
        y = layer(x)
        y.sum().backward()
        outputs.append(y.detach())
        if guard is not None:
            guard.restore_nonfinite()
    return outputs


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum 0.1", "cumulative average"])
@pytest.mark.parametrize("name", ALL_LAYERS)
def test_each_layer_ends_as_if_it_had_seen_only_the_finite_batches(name, momentum):
    layer = build_any(name, momentum=momentum)
    only_finite = copy.deepcopy(layer)
    guard = StepStatisticsGuard(layer)
    train_steps(layer, SEQUENCE, guard)
    train_steps(only_finite, [s for s in SEQUENCE if s[1] == "finite"])
    assert_same(statistics(layer), statistics(only_finite))
    assert int(layer.nonfinite_skips) == 2


@pytest.mark.parametrize("name", LAYERS)
def test_outputs_and_statistics_equal_the_layers_own_guard_bit_for_bit(name):
    per_call = build(name)
    per_step = copy.deepcopy(per_call)
    guard = StepStatisticsGuard(per_step)
    expected = train_steps(per_call, SEQUENCE)
    got = train_steps(per_step, SEQUENCE, guard)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert_same(statistics(per_step), statistics(per_call))
    assert int(per_step.nonfinite_skips) == int(per_call.nonfinite_skips) == 2


@pytest.mark.parametrize("name", LAYERS)
def test_under_the_guard_the_layers_leave_the_decision_to_it_until_closed(name):
    layer = build(name)
    train_steps(layer, [(0, "finite")])
    before = statistics(layer)
    guard = StepStatisticsGuard(layer)
    guard.snapshot()
    train_steps(layer, [(1, "nan")])
    assert not torch.isfinite(layer.running_mean).all()  # the layer did not check
    assert int(layer.nonfinite_skips) == 0
    assert guard.restore_nonfinite() == 1
    assert_same(statistics(layer), before)
    assert int(layer.nonfinite_skips) == 1
    guard.close()
    assert GUARDED_PER_STEP not in vars(layer)
    train_steps(layer, [(2, "nan")])  # its own guard again
    assert_same(statistics(layer), before)
    assert int(layer.nonfinite_skips) == 2


LEVELS = [(10, "finite"), (11, "nan"), (12, "finite"), (13, "inf"), (14, "finite")]  # one step, 5 FPN levels


def shared_steps(layer, steps, guard=None, keep=lambda kind: True):
    """Steps of a head shared by the levels: each step calls ``layer`` once per level (the calls
    whose kind ``keep`` refuses are left out); the shuffle seeded per call."""
    for step, levels in enumerate(steps):
        if guard is not None:
            guard.snapshot()
        total = 0
        for seed, kind in levels:
            if keep(kind):
                torch.manual_seed(100 * step + seed)
                total = total + layer(inputs(seed, kind).requires_grad_(True)).sum()
        total.backward()
        if guard is not None:
            guard.restore_nonfinite()


@pytest.mark.parametrize("name", ALL_LAYERS)
def test_a_layer_shared_within_a_step_keeps_the_updates_of_its_finite_calls(name):
    layer = build_any(name)
    only_finite = copy.deepcopy(layer)
    guard = StepStatisticsGuard(layer)
    # the first step's first call is finite: from the second call on the layer is guarded per call
    steps = [[(0, "finite"), (1, "finite")], LEVELS, LEVELS[::-1]]
    shared_steps(layer, steps, guard)
    shared_steps(only_finite, steps, keep=lambda kind: kind == "finite")
    assert_same(statistics(layer), statistics(only_finite))
    assert int(layer.nonfinite_skips) == 4
    guard.close()
    assert not layer._forward_pre_hooks and not layer._forward_hooks  # nothing left behind


def test_a_layer_called_once_per_step_is_still_decided_once_per_step():
    layer = nn.BatchNorm2d(C).train()
    guard = StepStatisticsGuard(layer)
    train_steps(layer, [(0, "finite")], guard)
    assert not layer._forward_pre_hooks and not layer._forward_hooks  # the call count is gone after step 1
    before = statistics(layer)
    guard.snapshot()
    layer(bad_batch(2))
    assert guard.restore_nonfinite() == 1
    assert_same(statistics(layer), before)


def test_only_the_layers_that_went_nonfinite_are_restored():
    """A NaN confined to the second layer's input (the first layer's batch is finite)."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.BatchNorm2d(C), SyncBatchNorm2d(C)

        def forward(self, x, poison):
            return self.a(x), self.b(x + poison)

    model = Model().train()
    reference = copy.deepcopy(model)
    guard = StepStatisticsGuard(model)
    guard.snapshot()
    model(batch(0), torch.full((), float("nan")))
    assert guard.restore_nonfinite() == 1
    reference.a(batch(0))
    assert_same(statistics(model.a), statistics(reference.a))  # a kept this step's update
    assert_same(statistics(model.b), statistics(reference.b))  # b is as before the step
    assert int(model.a.nonfinite_skips) == 0 and int(model.b.nonfinite_skips) == 1


def test_restoring_without_a_snapshot_is_an_error():
    guard = StepStatisticsGuard(nn.BatchNorm2d(C))
    with pytest.raises(RuntimeError, match="snapshot"):
        guard.restore_nonfinite()


@pytest.mark.parametrize("name", LAYERS)
def test_layers_under_the_guard_read_no_value_on_the_host(name):
    """On the meta device any host read raises (as it would synchronise a GPU): under the guard the
    layers' updates are torch's, decided nowhere but in the guard."""
    layer = build(name).to("meta")
    vars(layer)[GUARDED_PER_STEP] = True
    layer(torch.empty(N, C, 3, 3, device="meta"))


# --------------------------------------------------------------------------------------------------
# in a detectron2 loop


def test_the_hook_undoes_nonfinite_steps_before_the_later_hooks_and_counts_them():
    model = nn.Sequential(nn.BatchNorm2d(C), SyncBatchNorm2d(C), EvalNorm2d(C, learn=False)).train()
    reference = copy.deepcopy(model)
    batches = [batch(0), bad_batch(1), batch(2), bad_batch(3, "inf")]
    seen = []

    from detectron2.engine import HookBase

    class Spy(HookBase):  # a later hook: what it sees after each step
        def after_step(self):
            seen.append(all(bool(torch.isfinite(m.running_mean).all()) for m in model))

    loop = batch_loop(model, batches)
    loop.register_hooks([StepGuardHook(), Spy(), StatisticsHealthHook()])
    loop.train(0, len(batches))
    for x in (batches[0], batches[2]):
        reference(x)
    for got, ref in zip(model, reference):
        assert_same(statistics(got), statistics(ref))
    assert seen == [True] * 4
    assert [v for v, _ in loop.storage.history(NEW_KEY).values()] == [0, 3, 0, 3]
    assert all(GUARDED_PER_STEP not in vars(m) for m in model)  # closed after training


def test_a_step_that_raises_still_leaves_finite_statistics():
    model = nn.Sequential(nn.BatchNorm2d(C), SyncBatchNorm2d(C)).train()
    batches = [batch(0), bad_batch(1)]
    loop = batch_loop(model, batches, raise_at=1)
    loop.register_hooks([StepGuardHook()])
    with pytest.raises(FloatingPointError):
        loop.train(0, len(batches))
    after_first = nn.Sequential(nn.BatchNorm2d(C), SyncBatchNorm2d(C)).train()
    after_first(batches[0])
    for got, ref in zip(model, after_first):
        assert_same(statistics(got), statistics(ref))


# --------------------------------------------------------------------------------------------------
# across processes


def test_every_process_restores_a_step_that_was_nonfinite_on_one_of_them():
    assert_every_process_skipped_the_nonfinite_step(run_distributed(distributed_worker, 2, args=(True,)))
