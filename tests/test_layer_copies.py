"""Every plug-in layer, driven exactly as ``nn.BatchNorm2d`` is (a plain PyTorch model, a torch
optimizer, nothing attached), and copied mid-training (``copy.deepcopy``, a whole-module
``torch.save``/``torch.load``, ``pickle``, or a new model that loads the ``state_dict``) trains on
exactly as an uninterrupted run: same parameters, buffers and extra state, same eval outputs.

The copy point is inside the schedules that matter (MABN's warm-up over, its SMA and renormalization
ahead; a per-level cursor that is not at level 0), and the original model stays alive meanwhile,
so nothing the copy needs may stay behind with it (MABN's step ends, EvalNorm's L_aux, the level
cursor). The layers' own maths are tested against references in their own test files. The loss is
the model's output alone, as for BN, so EvalNorm warns that its L_aux is left out (what that
warning says is tested in tests/test_evalnorm.py).
"""
import copy
import functools
import io
import pickle

import pytest
import torch
from torch import nn

from d2_bnstats import (
    BatchChannelNorm2d,
    BatchRenorm2d,
    CrossIterationBatchNorm2d,
    EvalNorm2d,
    GhostBatchNorm2d,
    MABN2d,
    PerLevelNorm,
    RoIShuffleBatchNorm2d,
    SyncBatchNorm2d,
)

C, STEPS, COPY_AT, CALLS = 4, 12, 5, 2  # CALLS per step, as a head shared over inputs


def _mabn(c):
    return MABN2d(c, buffer_size=3, warmup_iters=3, renorm_start=6, renorm_clip=1.5, decay=0.8)


LAYERS = {
    "BN": nn.BatchNorm2d,  # the control: what every other layer must match in behaviour
    "EvalNorm": lambda c: EvalNorm2d(c, aux_samples=8),
    "MABN": _mabn,
    "GhostBN": lambda c: GhostBatchNorm2d(c, virtual_batch_size=2),
    "RoIShuffleBN": lambda c: RoIShuffleBatchNorm2d(c, num_groups=2),
    "SyncBN": SyncBatchNorm2d,
    "BCN": lambda c: BatchChannelNorm2d(c, 2, momentum=0.1),
    # the ramp of the clipping bounds under way at the copy point
    "BatchRenorm": lambda c: BatchRenorm2d(c, r_max=1.5, d_max=0.5, ramp_start=2, r_max_end=8, d_max_end=8),
    "CrossIterBN": lambda c: CrossIterationBatchNorm2d(c, window=3, burn_in=2),
    "PerLevel(BN)": lambda c: PerLevelNorm(nn.BatchNorm2d(c), 3),
    "PerLevel(MABN)": lambda c: PerLevelNorm(_mabn(c), 3),
    "PerLevel(EvalNorm)": lambda c: PerLevelNorm(EvalNorm2d(c, aux_samples=8), 3),
}


class Net(nn.Module):
    """conv, norm, ReLU, conv; the norm called CALLS times per forward (one call per input chunk)."""

    def __init__(self, build_norm):
        super().__init__()
        self.subnet = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), build_norm(C), nn.ReLU(), nn.Conv2d(C, 2, 1))
        if hasattr(self.subnet[1], "bind_weight"):  # Cross-Iteration BN: the conv whose output it normalizes
            self.subnet[1].bind_weight(self.subnet[0].weight)

    def forward(self, x):
        return torch.cat([self.subnet(chunk) for chunk in x.chunk(CALLS)])


def _batch(step):
    g = torch.Generator().manual_seed(step)
    scale = 1.0 + 0.5 * (step % 3)  # the second moment moves: MABN's r leaves 1
    return (torch.randn(6, 3, 6, 5, generator=g) + 0.5) * scale


def _build(name):
    torch.manual_seed(0)
    return Net(LAYERS[name])


def _copy(model, how, name):
    if how == "deepcopy":
        return copy.deepcopy(model)
    if how in ("torch.save", "pickle"):
        buffer = io.BytesIO()
        torch.save(model, buffer) if how == "torch.save" else pickle.dump(model, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False) if how == "torch.save" else pickle.load(buffer)
    fresh = _build(name)
    fresh.load_state_dict(model.state_dict())
    return fresh


def _train(name, how=None):
    model = _build(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kept = []
    for step in range(STEPS):
        if step == COPY_AT and how is not None:
            kept.append(model)  # the original stays alive (its hooks, if any, too)
            model = _copy(model, how, name)
            state = optimizer.state_dict()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            optimizer.load_state_dict(state)
        torch.manual_seed(1000 + step)  # RoI-shuffled BN draws its groups
        loss = model(_batch(step)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        outputs = [model(_batch(100 + k)) for k in range(2)]
    return model, outputs


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def _uninterrupted(name):
    model, outputs = _train(name)
    return _state(model), outputs


# Cross-Iteration BN's window of past statistics and their weight gradients is transient by design
# (kept out of checkpoints: three weight-sized tensors per past iteration); a layer rebuilt from its
# state_dict refills it, as after a restart (test_a_reloaded_cross_iteration_bn_refills_its_window).
TRANSIENT = {("CrossIterBN", "state_dict")}
COPIES = [(name, how) for name in LAYERS for how in ("deepcopy", "torch.save", "pickle", "state_dict")
          if (name, how) not in TRANSIENT]


@pytest.mark.filterwarnings("ignore:EvalNorm2d. the last training step")
@pytest.mark.parametrize("name,how", COPIES)
def test_a_copy_made_mid_training_ends_as_the_uninterrupted_run(name, how):
    expected, reference_outputs = _uninterrupted(name)
    copied, outputs = _train(name, how)
    got = _state(copied)
    assert got.keys() == expected.keys()
    differing = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not differing, f"{name} copied by {how}: {differing} differ from the uninterrupted run"
    for a, b in zip(outputs, reference_outputs):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:EvalNorm2d. the last training step")
def test_the_layers_trained_and_the_copy_point_matters():
    """The comparison above can fail: each layer's state moved in training, and MABN's schedule and
    the per-level cursor are where a lost piece of state would show."""
    for name in LAYERS:
        trained, _ = _uninterrupted(name)
        fresh = _state(_build(name))
        moved = [k for k, v in trained.items() if not torch.equal(v, fresh[k])]
        assert any("running" in k or "buffer" in k for k in moved), name
    mabn = _train("MABN")[0].subnet[1]
    assert mabn.steps == STEPS and STEPS > mabn.renorm_start > COPY_AT > mabn.warmup_iters
    per_level = _build("PerLevel(BN)")
    for step in range(COPY_AT):
        per_level(_batch(step))
    assert per_level.subnet[1].get_extra_state().item() == COPY_AT * CALLS % 3 != 0


def test_a_reloaded_cross_iteration_bn_refills_its_window():
    """The documented behaviour of the one transient state: the state_dict copy starts with BN's state
    and an empty window (its first step uses its own batch only, as the paper's burn-in does), and
    holds k − 1 past iterations again after k − 1 training calls."""
    model = _build("CrossIterBN")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(COPY_AT):
        model(_batch(step)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    layer = model.subnet[1]
    assert len(layer.history) == layer.window - 1 == 2
    reloaded = _copy(model, "state_dict", "CrossIterBN")
    new_layer = reloaded.subnet[1]
    assert len(new_layer.history) == 0 and new_layer.bound_weight() is reloaded.subnet[0].weight
    assert torch.equal(new_layer.running_mean, layer.running_mean)
    reloaded.subnet(_batch(COPY_AT))  # one training call: one record
    assert len(new_layer.history) == 1
    reloaded.subnet(_batch(COPY_AT + 1))
    assert len(new_layer.history) == new_layer.window - 1
