"""Population statistics: PreciseBN, FrozenBN late in training, batch statistics at test (the maths,
on small torch models; the detectron2 trainer paths are in test_population_trainer.py).

References are computed plainly in the tests: the statistics of the concatenated layer inputs, and
the training-mode normalisation formula."""
import copy

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from fvcore.nn.precise_bn import update_bn_stats
from torch import nn

from d2_bnstats.layers.evalnorm import EvalNorm2d
from d2_bnstats.layers.frozen_bn import freeze_batch_statistics, frozen_layers, unfreeze_batch_statistics
from d2_bnstats.layers.population import precise_bn
from d2_bnstats.layers.population_protocol import population_layers
from d2_bnstats.layers.test_batch_stats import batch_statistics

from .distributed import run_distributed


class SecondMomentNorm2d(nn.Module):
    """A protocol layer that is not a _BatchNorm (like MABN's inference): y = w·x/sqrt(R + eps) + b.
    Training normalises by the batch second moment; it has state PreciseBN must not touch (a step
    counter buffer, a Python attribute) and receives population statistics via the protocol."""

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_sq", torch.ones(channels))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.last_batch = None
        self.received = []

    def forward(self, x):
        if self.training:
            sq = (x * x).mean((0, 2, 3)) if x.numel() else self.running_sq
            self.steps += 1
            self.last_batch = x.shape[0]
            self.running_sq.mul_(0.9).add_(0.1 * sq.detach())
        else:
            sq = self.running_sq
        return x / torch.sqrt(sq + self.eps)[None, :, None, None] * self.weight[None, :, None, None] + self.bias[
            None, :, None, None
        ]

    def set_population_statistics(self, mean, var, count):
        self.received.append((mean.clone(), var.clone(), count.clone()))
        self.running_sq.copy_(var + mean * mean)


class BatchNorm2dSubclass(nn.BatchNorm2d):
    """A BN subclass: PreciseBN reduces its input itself instead of reading torch's buffers."""


NORMS = {
    "nn.BatchNorm2d": nn.BatchNorm2d,  # also detectron2's BatchNorm2d (the same class)
    "BN subclass": BatchNorm2dSubclass,
    "NaiveSyncBatchNorm": lambda c: NaiveSyncBatchNorm(c, stats_mode="N"),
    "protocol layer": SecondMomentNorm2d,
    "EvalNorm2d": EvalNorm2d,  # trains as BN; its own state (alpha_hat, beta_hat, B) must not move
}


def train_normalise(norm, x):
    """Training-mode output of a norm layer, written out plainly (the reference)."""
    w, b = norm.weight[None, :, None, None], norm.bias[None, :, None, None]
    if isinstance(norm, SecondMomentNorm2d):
        return x / torch.sqrt((x * x).mean((0, 2, 3)) + norm.eps)[None, :, None, None] * w + b
    var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
    return (x - mean[None, :, None, None]) / torch.sqrt(var + norm.eps)[None, :, None, None] * w + b


class TwoNormNet(nn.Module):
    def __init__(self, make_norm):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.norm1 = make_norm(4)
        self.conv2 = nn.Conv2d(4, 5, 1)
        self.norm2 = make_norm(5)
        with torch.no_grad():  # non-trivial affine, so a wrong normalisation upstream would show
            for n in (self.norm1, self.norm2):
                n.weight.uniform_(0.5, 2.0)
                n.bias.uniform_(-1.0, 1.0)

    def forward(self, x):
        return self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))

    def reference_inputs(self, x):
        """Inputs of norm1 and norm2 in a training-mode forward, computed without the layers' code."""
        with torch.no_grad():
            a = self.conv1(x)
            b = self.conv2(F.relu(train_normalise(self.norm1, a)))
        return a, b


def batches(seed=0, shapes=((3, 8, 8), (1, 11, 7), (5, 6, 9), (2, 8, 8))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, h, w, generator=g) * 2 + 0.5 for n, h, w in shapes]


def union_moments(tensors):
    """Count, mean and biased variance per channel of all values of all tensors, in float64."""
    flat = torch.cat([t.double().transpose(0, 1).reshape(t.shape[1], -1) for t in tensors], dim=1)
    return flat.shape[1], flat.mean(1), flat.var(1, unbiased=False)


def population_of(norm):
    """(mean, biased variance) the layer holds after PreciseBN, whatever its kind."""
    if isinstance(norm, SecondMomentNorm2d):
        mean, var, _ = norm.received[-1]
        return mean.double(), var.double()
    return norm.running_mean.double(), norm.running_var.double()


@pytest.mark.parametrize("kind", list(NORMS))
def test_precise_bn_equals_the_statistics_of_all_the_data(kind):
    torch.manual_seed(0)
    net = TwoNormNet(NORMS[kind])
    data = batches()
    refs = [net.reference_inputs(x) for x in data]
    report = precise_bn(net, data, len(data))
    assert report.updated == ["norm1", "norm2"] and report.skipped == []
    for index, norm in ((0, net.norm1), (1, net.norm2)):
        n, mean, var = union_moments([r[index] for r in refs])
        assert report.layers[index].count == n
        got_mean, got_var = population_of(norm)
        torch.testing.assert_close(got_mean, mean, rtol=1e-5, atol=1e-5)
        if isinstance(norm, SecondMomentNorm2d):
            torch.testing.assert_close(got_var, var, rtol=1e-5, atol=1e-5)  # biased, as the protocol says
            assert norm.received[-1][2].item() == n
            torch.testing.assert_close(norm.running_sq.double(), var + mean**2, rtol=1e-5, atol=1e-5)
        else:
            # torch's convention: running_var is unbiased, over the N values of the union
            torch.testing.assert_close(got_var, var * n / (n - 1), rtol=1e-5, atol=1e-5)


def test_plain_bn_matches_fvcore_update_bn_stats():
    """fvcore is correct for BN layers called once per forward with data in every batch; there the
    two agree, up to our unbiased running_var (factor N/(N-1))."""
    torch.manual_seed(1)
    net = TwoNormNet(nn.BatchNorm2d)
    ours, theirs = copy.deepcopy(net), copy.deepcopy(net)
    data = batches(1)
    report = precise_bn(ours, data, len(data))
    theirs.train()
    update_bn_stats(theirs, iter(data), len(data))
    for name in ("norm1", "norm2"):
        n = report[name].count
        a, b = getattr(ours, name), getattr(theirs, name)
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.running_var * (n - 1) / n, b.running_var, rtol=1e-5, atol=1e-6)


class SharedHead(nn.Module):
    """One BN applied to several feature maps per forward (a head shared across FPN levels)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x):
        levels = [x, F.avg_pool2d(x, 2), F.avg_pool2d(x, 4)]
        return [self.norm(self.conv(level)) for level in levels]


def test_a_layer_called_several_times_per_forward_accumulates_every_call():
    torch.manual_seed(2)
    head = SharedHead()
    data = batches(2, shapes=((2, 16, 16), (1, 8, 12), (3, 12, 8)))
    with torch.no_grad():
        inputs = [head.conv(level) for x in data for level in (x, F.avg_pool2d(x, 2), F.avg_pool2d(x, 4))]
    n, mean, var = union_moments(inputs)
    stock = copy.deepcopy(head).train()
    report = precise_bn(head, data, len(data))
    assert report["norm"].calls == 9 and report["norm"].count == n
    torch.testing.assert_close(head.norm.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.norm.running_var.double(), var * n / (n - 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError, match="reused"):  # what the stock fvcore/detectron2 code does
        update_bn_stats(stock, iter(data), len(data))


class BranchyNet(nn.Module):
    """``unused`` is never called, ``empty`` only ever sees 0 samples (a mask head without positive
    RoIs), ``sometimes`` sees 0 samples in some batches."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.always = nn.BatchNorm2d(4)
        self.unused = nn.BatchNorm2d(4)
        self.empty = nn.BatchNorm2d(4)
        self.sometimes = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.always(self.conv(x))
        self.empty(y[:0])
        keep = y if x.shape[0] > 1 else y[:0]
        return self.sometimes(keep)


def test_layers_that_saw_no_data_are_skipped_not_crashed():
    torch.manual_seed(3)
    net = BranchyNet()
    with torch.no_grad():
        for bn in (net.unused, net.empty):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    net.sometimes.running_mean.fill_(float("nan"))  # a broken checkpoint: PreciseBN repairs it
    before = copy.deepcopy(net.state_dict())
    data = batches(3, shapes=((2, 5, 5), (1, 6, 6), (3, 4, 7)))
    report = precise_bn(net, data, len(data))
    assert sorted(report.skipped) == ["empty", "unused"]
    assert sorted(report.updated) == ["always", "sometimes"]
    for name in ("unused", "empty"):
        for key in ("running_mean", "running_var"):
            assert torch.equal(net.state_dict()[f"{name}.{key}"], before[f"{name}.{key}"])
    assert report["empty"].calls == 3 and report["empty"].count == 0
    with torch.no_grad():
        seen = [train_normalise(net.always, net.conv(x)) for x in data if x.shape[0] > 1]
    n, mean, _ = union_moments(seen)
    assert report["sometimes"].count == n
    torch.testing.assert_close(net.sometimes.running_mean.double(), mean, rtol=1e-5, atol=1e-6)


def test_precise_bn_changes_nothing_but_the_population_statistics():
    torch.manual_seed(4)
    net = nn.Sequential(TwoNormNet(nn.BatchNorm2d), nn.Dropout(0.5), SecondMomentNorm2d(5))
    net[1].eval()  # a submodule deliberately in eval mode stays so
    net[2].tag = "kept"
    modes = {name: m.training for name, m in net.named_modules()}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = {k: (p, p.detach().clone()) for k, p in net.named_parameters()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    precise_bn(net, batches(4), 4)
    assert torch.equal(torch.rand(3), expected_next), "the random number generator must be restored"
    for name, (p, value) in params.items():
        assert torch.equal(p, value) and p.grad is None, name
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {
        "0.norm1.running_mean", "0.norm1.running_var", "0.norm2.running_mean", "0.norm2.running_var", "2.running_sq",
    }
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert net[2].tag == "kept" and net[2].last_batch is None and len(net[2].received) == 1
    assert net[0].norm1.num_batches_tracked.item() == 0 and net[2].steps.item() == 0


def test_precise_bn_leaves_evalnorm_state_alone():
    """PreciseBN forwards in training mode: an EvalNorm layer must not record the PreciseBN batch as
    its B, nor learn alpha_hat/beta_hat, nor keep an auxiliary loss from those passes."""
    torch.manual_seed(5)
    net = TwoNormNet(EvalNorm2d)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    for x in batches(6, shapes=((4, 8, 8), (4, 8, 8))):  # training at B = 4 records B and moves alpha_hat
        net.norm1.aux_loss = net.norm2.aux_loss = None
        net(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert before["norm1.norm_batch_size"].item() > 0
    precise_bn(net, batches(7, shapes=((1, 8, 8), (1, 8, 8), (1, 8, 8))), 3)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"norm1.running_mean", "norm1.running_var", "norm2.running_mean", "norm2.running_var"}


def test_precise_bn_gives_mabn_the_second_moment_of_all_the_data_and_nothing_else():
    """MABN normalises by R = E[x²] at inference; PreciseBN must set R to the union's second moment
    (through the protocol) and leave its ring buffers, pending sums and step counter alone."""
    from d2_bnstats.layers.mabn import MABN2d

    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), MABN2d(4))
    data = batches(8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = precise_bn(net, data, len(data))
    assert report.updated == ["1"]
    with torch.no_grad():
        n, mean, var = union_moments([net[0](x) for x in data])
    torch.testing.assert_close(net[1].running_var.double(), var + mean**2, rtol=1e-5, atol=1e-5)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"1.running_var"}


def test_population_layers_select_batch_statistic_layers_only():
    net = nn.Sequential(
        nn.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False), FrozenBatchNorm2d(3),
        nn.GroupNorm(1, 3), SecondMomentNorm2d(3), nn.BatchNorm1d(3), nn.SyncBatchNorm(3),
    )
    assert [name for name, _ in population_layers(net)] == ["0", "4", "5", "6"]


@pytest.mark.parametrize("kind", ["nn.BatchNorm2d", "BN subclass"])
def test_no_cancellation_when_the_mean_dwarfs_the_spread(kind):
    """Inputs around 1000 with spread 1: E[x²] − E[x]² in float32 would lose the variance."""
    net = nn.Sequential(NORMS[kind](3))
    data = [x + 1000.0 for x in batches(11)]
    n, mean, var = union_moments(data)
    precise_bn(net, data, len(data))
    torch.testing.assert_close(net[0].running_mean.double(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(net[0].running_var.double(), var * n / (n - 1), rtol=1e-4, atol=0)
    net.eval()
    with torch.no_grad(), batch_statistics(net):
        y = net(data[0])
    n0, mean0, var0 = union_moments([data[0]])
    expected = (data[0].double() - mean0[None, :, None, None]) / torch.sqrt(var0 + net[0].eps)[None, :, None, None]
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=2e-3)


def test_precise_bn_on_batchnorm1d_inputs():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    data = [torch.randn(n, 3) for n in (5, 2, 7)]
    with torch.no_grad():
        inputs = [net[0](x) for x in data]
    flat = torch.cat(inputs).double()
    precise_bn(net, data, 3)
    torch.testing.assert_close(net[1].running_mean.double(), flat.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[1].running_var.double(), flat.var(0, unbiased=True), rtol=1e-5, atol=1e-6)


def test_precise_bn_says_when_the_data_runs_out():
    with pytest.raises(ValueError, match="asked for 5 batches but the data ran out after 2"):
        precise_bn(TwoNormNet(nn.BatchNorm2d), batches()[:2], 5)


# ----------------------------------------------------------------------------------------------
# two processes


class SyncNet(nn.Module):
    """A synchronised BN (normalises with the statistics of both processes' batches), then a plain BN
    (per process), then a BN that only sees data on a process whose batch has >= 3 images."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.synced = NaiveSyncBatchNorm(4, stats_mode="N")
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.local = nn.BatchNorm2d(4)
        self.large_only = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.local(self.conv2(F.relu(self.synced(self.conv(x)))))
        if x.shape[0] >= 3:
            y = self.large_only(y)
        return y


RANK_SHAPES = (((3, 8, 8), (1, 6, 10), (2, 7, 7)), ((1, 8, 8), (2, 6, 10), (1, 7, 7)))


def _precise_bn_worker(rank, world_size, state, data):
    net = SyncNet()
    net.load_state_dict(state)
    report = precise_bn(net, data[rank], len(data[rank]))
    return {k: v for k, v in net.state_dict().items() if "running" in k}, report.skipped


def test_two_processes_get_identical_statistics_equal_to_one_process_on_the_union():
    torch.manual_seed(6)
    net = SyncNet()
    state = copy.deepcopy(net.state_dict())
    data = [batches(10 + r, shapes=RANK_SHAPES[r]) for r in range(2)]
    (stats0, skipped0), (stats1, skipped1) = run_distributed(_precise_bn_worker, 2, args=(state, data))
    for key in stats0:
        assert torch.equal(stats0[key], stats1[key]), f"{key} differs between the processes"
    assert skipped0 == skipped1 == []
    # one process over the union: batch i of both processes concatenated (what the synced layer
    # normalised together); the per-process layers see the same values either way
    single = SyncNet()
    single.load_state_dict(state)
    union = [torch.cat([data[0][i], data[1][i]]) for i in range(3)]
    precise_bn(single, union, 3)
    for key, value in single.state_dict().items():
        if "running" in key and "large_only" not in key:
            torch.testing.assert_close(stats0[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # large_only saw data on process 0 only (its 3-image first batch, normalised by `local` there)
    ref = SyncNet()
    ref.load_state_dict(state)
    with torch.no_grad():
        z = ref.conv2(F.relu(train_normalise(ref.synced, ref.conv(union[0]))))[:3]
        y = train_normalise(ref.local, z)
    n, mean, var = union_moments([y])
    torch.testing.assert_close(stats0["large_only.running_mean"].double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats0["large_only.running_var"].double(), var * n / (n - 1), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# FrozenBN late in training


@pytest.mark.parametrize("kind", ["nn.BatchNorm2d", "protocol layer"])
def test_frozen_layers_use_population_statistics_in_training_and_stay_frozen(kind):
    torch.manual_seed(7)
    net = TwoNormNet(NORMS[kind])
    precise_bn(net, batches(7), 4)
    frozen_state = {k: v.clone() for k, v in net.state_dict().items()}
    x = batches(8)[0]
    expected = copy.deepcopy(net).eval()(x)
    assert freeze_batch_statistics(net) == ["norm1", "norm2"]
    for _ in range(2):  # the evaluator's eval()/train() toggling changes nothing
        net.eval()
        net.train()
        assert frozen_layers(net) == ["norm1", "norm2"] and net.norm1.training
        y = net(x)
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.sum().backward()
    assert net.norm1.weight.grad is not None and net.norm1.weight.grad.abs().sum() > 0, "affine keeps training"
    assert net.norm2.bias.grad is not None and net.norm2.bias.grad.abs().sum() > 0
    for k, v in net.state_dict().items():
        assert torch.equal(v, frozen_state[k]), f"{k} changed while frozen"
    assert precise_bn(net, batches(9), 2).layers == []  # PreciseBN leaves frozen layers alone
    assert unfreeze_batch_statistics(net) == ["norm1", "norm2"]
    net(x)
    assert not torch.equal(net.state_dict()["norm1." + ("running_mean" if kind != "protocol layer" else "running_sq")],
                           frozen_state["norm1." + ("running_mean" if kind != "protocol layer" else "running_sq")])


# ----------------------------------------------------------------------------------------------
# batch statistics at test


def test_batch_statistics_at_test_normalise_like_training_and_leave_state_alone():
    torch.manual_seed(8)
    net = TwoNormNet(nn.BatchNorm2d)
    precise_bn(net, batches(8), 4)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = batches(9)[2]
    # reference: torch's own batch-statistics mode (no running statistics at all)
    reference = copy.deepcopy(net)
    for bn in (reference.norm1, reference.norm2):
        bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
    with torch.no_grad(), batch_statistics(net):
        y = net(x)
    torch.testing.assert_close(y, reference(x), rtol=1e-5, atol=1e-5)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.allclose(net(x), y, atol=1e-3)  # outside the block: population statistics again
    with batch_statistics(net):  # an empty batch passes through
        assert net(x[:0]).shape == (0, 5, 6, 9)


def test_batch_statistics_at_test_per_call_and_through_the_protocol():
    torch.manual_seed(9)
    head = SharedHead().eval()
    x = batches(10)[0]
    with torch.no_grad(), batch_statistics(head):
        outs = head(x)
    for level, out in zip((x, F.avg_pool2d(x, 2), F.avg_pool2d(x, 4)), outs):
        torch.testing.assert_close(out, train_normalise(head.norm, head.conv(level)), rtol=1e-5, atol=1e-5)
    net = TwoNormNet(SecondMomentNorm2d).eval()
    with torch.no_grad(), batch_statistics(net):
        y = net(x)
    a, b = net.reference_inputs(x)
    torch.testing.assert_close(y, train_normalise(net.norm2, b), rtol=1e-4, atol=1e-4)
    assert torch.equal(net.norm1.running_sq, torch.ones(4)) and net.norm1.steps.item() == 0



class PerLevelHead(nn.Module):
    """A head shared across 3 FPN levels with per-level statistics (detectron2's CycleBatchNormList,
    what RetinaNet builds for "BN"): each level's BN is called once per forward."""

    def __init__(self):
        super().__init__()
        from detectron2.layers import CycleBatchNormList

        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = CycleBatchNormList(3, num_features=4)

    def forward(self, x):
        return [self.norm(self.conv(level)) for level in (x, F.avg_pool2d(x, 2), F.avg_pool2d(x, 4))]


def test_per_level_statistics_get_their_own_level_only():
    torch.manual_seed(12)
    head = PerLevelHead()
    data = batches(12, shapes=((2, 16, 16), (1, 8, 16), (3, 16, 8)))
    report = precise_bn(head, data, len(data))
    assert sorted(report.updated) == ["norm.0", "norm.1", "norm.2"]
    assert head.norm._pos == 0  # the cycling position (a plain attribute) is left as it was
    for level, pool in enumerate((1, 2, 4)):
        with torch.no_grad():
            inputs = [head.conv(F.avg_pool2d(x, pool) if pool > 1 else x) for x in data]
        n, mean, var = union_moments(inputs)
        bn = head.norm[level]
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var * n / (n - 1), rtol=1e-5, atol=1e-6)
