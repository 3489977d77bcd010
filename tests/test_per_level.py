"""Per-level statistics: each level's statistics equal the norm run on that level alone; shared affine.

Generic over norms: nn.BatchNorm2d, GhostBN and a stateful third-party norm that is not a BN subclass.
"""
import copy
import os

import pytest
import torch
from torch import nn

import d2_bnstats
from d2_bnstats import GhostBatchNorm2d, PerLevelNorm, SyncBatchNorm2d, wrap_per_level
from d2_bnstats.d2.train import argument_parser, load_config, main

from .conftest import REPO, tiny_opts

RETINANET_CPU = os.path.join(REPO, "configs", "cpu", "retinanet_r18_perlevel_2img.yaml")
C, LEVELS = 6, 3


class RunningMeanNorm(nn.Module):
    """A third party's stateful norm (not a BatchNorm): subtracts an EMA of the mean, counts calls."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.running_mean.mul_(0.5).add_(0.5 * x.mean((0, 2, 3)))
                self.calls += 1
        return (x - self.running_mean[None, :, None, None]) * self.weight[None, :, None, None]


NORMS = {
    "BN": lambda c: nn.BatchNorm2d(c),
    "GhostBN": lambda c: GhostBatchNorm2d(c, virtual_batch_size=2),
    "third-party": RunningMeanNorm,
}


class ToyHead(nn.Module):
    """Like RetinaNet's head: the same conv + norm applied to every level's feature map."""

    def __init__(self, build_norm):
        super().__init__()
        self.subnet = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), build_norm(C), nn.ReLU(), nn.Conv2d(C, C, 1))

    def forward(self, features):
        return [self.subnet(f) for f in features]


def level_features(seed, batch=5):
    g = torch.Generator().manual_seed(seed)
    # the levels are different domains: different means, scales and sizes
    return [torch.randn(batch, C, 8 >> i, 8 >> i, generator=g) * (1 + i) + 3 * i for i in range(LEVELS)]


def capture_inputs(head):
    inputs = {i: [] for i in range(LEVELS)}
    wrapper = head.subnet[1]
    for i, norm in enumerate(wrapper.levels):
        norm.register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0].detach().clone()))
    return inputs


@pytest.mark.parametrize("kind", list(NORMS))
def test_each_level_keeps_the_statistics_of_that_level_alone(kind):
    torch.manual_seed(0)
    head = ToyHead(NORMS[kind])
    fresh_norm = copy.deepcopy(head.subnet[1])
    n_params = len(list(head.parameters()))
    wrappers = wrap_per_level(head, LEVELS)
    assert len(wrappers) == 1 and isinstance(head.subnet[1], PerLevelNorm)
    assert len(list(head.parameters())) == n_params  # parameters shared, not copied
    inputs = capture_inputs(head)
    head.train()
    for step in range(3):
        outs = head(level_features(step))
        sum(o.sum() for o in outs).backward()
    for level in range(LEVELS):
        # reference: the norm as built, run on this level's inputs only
        ref = copy.deepcopy(fresh_norm)
        ref.train()
        for x in inputs[level]:
            ref(x)
        got = head.subnet[1].levels[level]
        for name, buf in ref.named_buffers():
            torch.testing.assert_close(dict(got.named_buffers())[name], buf, msg=f"{kind} level {level} {name}")
        assert len(inputs[level]) == 3  # once per head forward
    # the levels really differ (different domains), and the parameters are one object
    buffers = [dict(n.named_buffers())["running_mean"] for n in head.subnet[1].levels]
    assert not torch.allclose(buffers[0], buffers[2])
    assert all(n.weight is head.subnet[1].levels[0].weight for n in head.subnet[1].levels)


def test_shared_affine_gets_the_gradient_of_all_levels():
    torch.manual_seed(0)
    head = ToyHead(NORMS["BN"])
    reference = copy.deepcopy(head)
    wrap_per_level(head, LEVELS)
    feats = level_features(1)
    sum(o.sum() for o in head(feats)).backward()
    # reference: one BN per level (copies of the original) sharing one weight, as plain code
    ref_norms = [copy.deepcopy(reference.subnet[1]) for _ in range(LEVELS)]
    weight, bias = reference.subnet[1].weight, reference.subnet[1].bias
    total = 0
    for f, norm in zip(feats, ref_norms):
        norm.weight, norm.bias = weight, bias
        x = reference.subnet[0](f)
        total = total + reference.subnet[3](torch.relu(norm(x))).sum()
    total.backward()
    torch.testing.assert_close(head.subnet[1].levels[0].weight.grad, weight.grad)
    torch.testing.assert_close(head.subnet[1].levels[0].bias.grad, bias.grad)


def test_level_counter_resets_at_every_head_forward_and_eval_uses_each_level():
    torch.manual_seed(0)
    head = ToyHead(NORMS["BN"])
    wrap_per_level(head, LEVELS)
    head.train()
    head(level_features(0))
    head.subnet[1](torch.randn(2, C, 4, 4))  # a stray call (e.g. an interrupted forward) ...
    inputs = capture_inputs(head)
    head(level_features(1))  # ... does not shift the levels of the next head forward
    assert [len(inputs[i]) for i in range(LEVELS)] == [1, 1, 1]
    assert inputs[2][0].shape[-1] == 2
    head.eval()
    feats = level_features(2)
    outs = head(feats)
    for level in range(LEVELS):
        bn = head.subnet[1].levels[level]
        x = head.subnet[0](feats[level])
        expected = head.subnet[3](torch.relu(nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False)))
        torch.testing.assert_close(outs[level], expected)


def test_precise_bn_sees_each_level_once_per_forward():
    """fvcore's update_bn_stats (detectron2's PreciseBN) asserts that no BN runs twice in a forward."""
    from fvcore.nn.precise_bn import update_bn_stats

    torch.manual_seed(0)
    head = ToyHead(NORMS["BN"])
    wrap_per_level(head, LEVELS)
    inputs = capture_inputs(head)
    batches = [level_features(s) for s in range(4)]
    head.train()
    update_bn_stats(head, batches, num_iters=4)
    for level in range(LEVELS):
        values = torch.cat([x.transpose(0, 1).reshape(C, -1) for x in inputs[level]], dim=1)
        torch.testing.assert_close(head.subnet[1].levels[level].running_mean, values.mean(1), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_and_other_layouts():
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(C)
    with torch.no_grad():
        norm.running_mean.uniform_(), norm.weight.uniform_()
    wrapper = PerLevelNorm(copy.deepcopy(norm), LEVELS)
    # the un-wrapped norm's checkpoint goes into every level
    wrapper.load_state_dict(norm.state_dict())
    for level in wrapper.levels:
        assert torch.equal(level.running_mean, norm.running_mean) and torch.equal(level.weight, norm.weight)
    with torch.no_grad():
        wrapper.levels[1].running_mean.add_(1)
    other = PerLevelNorm(nn.BatchNorm2d(C), LEVELS)
    other.load_state_dict(wrapper.state_dict())
    assert torch.equal(other.levels[1].running_mean, wrapper.levels[1].running_mean)
    assert other.levels[2].weight is other.levels[0].weight
    # detectron2's CycleBatchNormList layout
    from detectron2.layers import CycleBatchNormList

    cycle = CycleBatchNormList(LEVELS, num_features=C)
    with torch.no_grad():
        cycle[2].running_var.fill_(3.0), cycle.bias.fill_(0.5)
    other.load_state_dict(cycle.state_dict())
    assert torch.all(other.levels[2].running_var == 3.0) and torch.all(other.levels[0].running_var == 1.0)
    assert torch.all(other.levels[1].bias == 0.5)


def test_the_next_level_is_saved_and_older_states_load_at_level_zero():
    torch.manual_seed(0)
    wrapper = PerLevelNorm(nn.BatchNorm2d(C), LEVELS)
    features = level_features(0)
    wrapper(features[0])  # the next call goes to level 1
    state = wrapper.state_dict()
    assert state._metadata[""]["version"] == PerLevelNorm._version == 3
    reloaded = PerLevelNorm(nn.BatchNorm2d(C), LEVELS)
    reloaded.load_state_dict(state)
    wrapper.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(features[1]), wrapper(features[1]))  # level 1 in both
    # a version-2 state has no level: it loads (strictly) with the next call at level 0
    older = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    reloaded.load_state_dict(older)
    assert reloaded.get_extra_state().item() == 0
    with pytest.raises(ValueError, match="3 levels"):
        reloaded.set_extra_state(torch.tensor(5))


# --- detectron2 RetinaNet through the model transform --------------------------------------------


def _retinanet_batch(seed=0):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    images = []
    for i in range(2):
        inst = Instances((128, 128))
        inst.gt_boxes = Boxes(torch.tensor([[10.0 + 5 * i, 12.0, 60.0, 70.0], [70.0, 64.0, 120.0, 100.0]]))
        inst.gt_classes = torch.tensor([1, 3])
        images.append({"image": torch.rand(3, 128, 128, generator=g) * 255, "instances": inst})
    return images


def _build(opts):
    from detectron2.modeling import build_model

    return build_model(load_config(RETINANET_CPU, opts + ["MODEL.FPN.OUT_CHANNELS", "32"]))


@pytest.fixture
def stateful_third_party_norm():
    d2_bnstats.register_norm("RunningMeanNorm", RunningMeanNorm)
    yield "RunningMeanNorm"
    d2_bnstats.unregister_norm("RunningMeanNorm")


def test_retinanet_head_norms_per_level_for_any_registered_norm(stateful_third_party_norm):
    from detectron2.utils.events import EventStorage

    # (plain BN is covered on the toy head and by the CPU config's SyncBN below)
    for name, cls in [("GhostBN", GhostBatchNorm2d), (stateful_third_party_norm, RunningMeanNorm)]:
        model = _build(["MODEL.RETINANET.NORM", name])
        wrappers = [m for m in model.head.modules() if isinstance(m, PerLevelNorm)]
        assert len(wrappers) == 4, name  # 2 convs x (cls, bbox) subnets
        assert all(w.num_levels == 5 and type(w.levels[0]) is cls for w in wrappers), name
        assert not any(type(m).__name__ == "CycleBatchNormList" for m in model.modules())
        inputs = {}
        for w in wrappers[:1]:
            for i, norm in enumerate(w.levels):
                norm.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, []).append(a[0].detach().clone()))
        reference = copy.deepcopy(wrappers[0].levels[0])
        model.train()
        with EventStorage():
            losses = model(_retinanet_batch())
        sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values())
        # each level ran once and holds the statistics of that level alone (P3 .. P7 differ in size)
        assert [inputs[i][0].shape[-1] for i in range(5)] == [16, 8, 4, 2, 1]
        for level in range(5):
            assert len(inputs[level]) == 1
            ref = copy.deepcopy(reference)
            ref(inputs[level][0])
            got = dict(wrappers[0].levels[level].named_buffers())
            for key, value in ref.named_buffers():
                torch.testing.assert_close(got[key], value, msg=f"{name} level {level} {key}")


def test_evalnorm_per_level_copies_all_contribute_to_the_auxiliary_loss():
    """Per-level copies are made after the EvalNorm transform attached its hook: the hook must
    still see every copy, so loss_evalnorm = weight x the sum of the aux losses of all 4 x 5 copies."""
    from detectron2.utils.events import EventStorage

    from d2_bnstats import EvalNorm2d

    model = _build(["MODEL.RETINANET.NORM", "EvalNorm", "BNSTATS.EVALNORM.AUX_LOSS_WEIGHT", "0.5"])
    wrappers = [m for m in model.head.modules() if isinstance(m, PerLevelNorm)]
    copies = [level for w in wrappers for level in w.levels]
    assert len(copies) == 20 and all(type(c) is EvalNorm2d for c in copies)
    model.train()
    with EventStorage():
        losses = model(_retinanet_batch())
    assert all(c.aux_loss is not None for c in copies)
    everywhere = [m.aux_loss for m in model.modules() if isinstance(m, EvalNorm2d) and m.aux_loss is not None]
    torch.testing.assert_close(losses["loss_evalnorm"], 0.5 * torch.stack([l.reshape(()) for l in everywhere]).sum())
    losses["loss_evalnorm"].backward()
    assert all(c.alpha_hat.grad is not None and torch.isfinite(c.alpha_hat.grad).all() for c in copies)


def test_detectron2_syncbn_cycle_list_is_rebuilt_with_the_plugin_layer():
    """RetinaNet turns "SyncBN" into CycleBatchNormList(nn.SyncBatchNorm) behind get_norm's back."""
    model = _build(["MODEL.RETINANET.NORM", "SyncBN", "BNSTATS.PER_LEVEL.ENABLED", "False"])
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    wrappers = [m for m in model.head.modules() if isinstance(m, PerLevelNorm)]
    assert len(wrappers) == 4 and all(type(w.levels[0]) is SyncBatchNorm2d for w in wrappers)
    # switched off: detectron2's own list stays
    model = _build(["MODEL.RETINANET.NORM", "SyncBN", "BNSTATS.PER_LEVEL.ENABLED", "False", "BNSTATS.SYNC_BN.REPLACE_D2", "False"])
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    # "BN" without ENABLED: detectron2's CycleBatchNormList is left alone
    model = _build(["MODEL.RETINANET.NORM", "BN", "BNSTATS.PER_LEVEL.ENABLED", "False"])
    assert any(type(m).__name__ == "CycleBatchNormList" for m in model.modules())


def test_detectron2_per_level_checkpoint_loads_into_per_level_norms(tmp_path):
    """A checkpoint of detectron2's RetinaNet with "BN" (CycleBatchNormList) loads level by level."""
    from detectron2.checkpoint import DetectionCheckpointer

    source = _build(["MODEL.RETINANET.NORM", "BN", "BNSTATS.PER_LEVEL.ENABLED", "False"])
    cycle = source.head.bbox_subnet[1]
    assert type(cycle).__name__ == "CycleBatchNormList"
    with torch.no_grad():
        for i, bn in enumerate(cycle):
            bn.running_mean.fill_(i + 1.0)
        cycle.weight.fill_(0.25)
    DetectionCheckpointer(source, save_dir=str(tmp_path)).save("source")
    target = _build(["MODEL.RETINANET.NORM", "BN"])
    DetectionCheckpointer(target).load(str(tmp_path / "source.pth"))
    wrapper = target.head.bbox_subnet[1]
    assert isinstance(wrapper, PerLevelNorm)
    assert [float(level.running_mean[0]) for level in wrapper.levels] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert all(torch.all(level.weight == 0.25) for level in wrapper.levels)


def test_enabled_on_a_model_without_the_heads_warns(caplog):
    from detectron2.modeling import build_model

    cfg = load_config(os.path.join(REPO, "configs", "cpu", "frcnn_r18_bn_2img.yaml"), ["BNSTATS.PER_LEVEL.ENABLED", "True"])
    with caplog.at_level("WARNING"):
        model = build_model(cfg)
    assert not any(isinstance(m, PerLevelNorm) for m in model.modules())
    assert "no head of class ['RetinaNetHead']" in caplog.text


@pytest.mark.slow
def test_cpu_retinanet_config_trains_and_evaluates(datasets_root, tmp_path):
    import json

    main(argument_parser().parse_args(["--config", RETINANET_CPU] + tiny_opts(tmp_path, max_iter=2)))
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.json") if line.strip()]
    assert any("bbox/AP" in m for m in metrics)  # COCO evaluation ran (AP may be nan after 2 iterations)
    assert all(torch.isfinite(torch.tensor(m["loss_cls"])) for m in metrics if "loss_cls" in m)
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    # five levels of statistics per head norm were trained and saved
    tracked = [k for k in state if k.startswith("head.cls_subnet.1.levels.") and k.endswith("num_batches_tracked")]
    assert len(tracked) == 5 and all(state[k].item() == 2 for k in tracked)
