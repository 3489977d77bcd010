"""Batch-Channel Normalization (Qiao et al. 2019, §4): against a float64 re-statement of the micro-batch
layer (estimated BN, then channel normalization with a per-group affine), its inference as plain
modules, its statistics (update rule, non-finite batches, empty input, the population protocol),
standalone use, and the detectron2 path ("BCN", "BCN+WS": config, build, frozen stages, training,
deployment)."""
import copy
import itertools
import pickle

import pytest
import torch
import torch.nn.functional as F
from detectron2.engine import SimpleTrainer
from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.solver.build import get_default_optimizer_params
from torch import nn

import d2_bnstats
from d2_bnstats.d2.train import load_config
from d2_bnstats.layers.batch_channel_norm import BatchChannelNorm2d, WSBatchChannelNorm2d
from d2_bnstats.layers.population_protocol import is_frozen, is_population_layer
from d2_bnstats.layers.step_guard import StepStatisticsGuard
from d2_bnstats.layers.weight_standardization import WeightStandardizedConv2d

from .conftest import CPU_BASE, synthetic_detection_batch

EPS = 1e-5
C, G = 6, 3
SIZE = 96


def _layer(dtype=torch.float64, seed=0, momentum=0.3, **options):
    """A layer with random affine parameters and estimates away from the input's statistics."""
    g = torch.Generator().manual_seed(seed)
    layer = BatchChannelNorm2d(C, G, momentum=momentum, **options).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=g))
        layer.group_weight.copy_(torch.rand(G, generator=g) + 0.5)
        layer.group_bias.copy_(torch.randn(G, generator=g))
        layer.running_mean.copy_(torch.randn(C, generator=g))
        layer.running_var.copy_(torch.rand(C, generator=g) * 3 + 0.1)
    return layer


def _input(shape=(2, C, 5, 4), dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.2, 1.0, 3.0, 0.7, 1.5, 0.5], dtype=dtype).reshape(1, -1, 1, 1)[:, : shape[1]]
    return (torch.randn(shape, generator=g, dtype=dtype) * scale + 0.5).requires_grad_(True)


def reference_step(x, gamma, beta, group_weight, group_bias, mu, var, r, groups, eps=EPS, training=True):
    """The micro-batch BCN of the paper's §4 in float64, written from the equations: (y, μ̂, σ̂²).
    In training, m and v (second moment about the previous μ̂) carry no gradient and update the
    estimates, which then normalize as constants; in inference the estimates are used as they are."""
    x = x.double()
    mu, var = mu.detach().double(), var.detach().double()
    if training:
        xd = x.detach()
        m = xd.mean(dim=(0, 2, 3))
        v = ((xd - mu.reshape(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
        mu, var = (1 - r) * mu + r * m, (1 - r) * var + r * v
    shape = (1, -1, 1, 1)
    z = gamma.double().reshape(shape) * (x - mu.reshape(shape)) / (var.reshape(shape) + eps).sqrt()
    z = z + beta.double().reshape(shape)
    n = z.shape[0]
    zg = z.reshape(n, groups, -1)
    mean_g = zg.mean(-1, keepdim=True)
    var_g = ((zg - mean_g) ** 2).mean(-1, keepdim=True)
    y = group_weight.double().reshape(1, -1, 1) * (zg - mean_g) / (var_g + eps).sqrt() + group_bias.double().reshape(1, -1, 1)
    return y.reshape(z.shape), mu, var


def _leaves(layer):
    return [p.detach().clone().requires_grad_(True) for p in (layer.weight, layer.bias, layer.group_weight, layer.group_bias)]


def test_training_output_estimates_and_gradients_match_the_papers_equations():
    layer = _layer()
    mu, var = layer.running_mean.clone(), layer.running_var.clone()
    upstream_gen = torch.Generator().manual_seed(5)
    for step in range(3):  # the estimates move: each step normalizes with the ones it updated
        layer.zero_grad()
        x = _input(seed=step)
        ref_x = x.detach().clone().requires_grad_(True)
        params = _leaves(layer)
        expected, mu, var = reference_step(ref_x, *params, mu, var, r=0.3, groups=G)
        y = layer(x)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_mean, mu, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-12, atol=1e-12)
        assert int(layer.num_batches_tracked) == step + 1
        upstream = torch.randn(y.shape, generator=upstream_gen, dtype=y.dtype)
        (y * upstream).sum().backward()
        (expected * upstream).sum().backward()
        torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-10, atol=1e-12)
        for p, ref in zip((layer.weight, layer.bias, layer.group_weight, layer.group_bias), params):
            torch.testing.assert_close(p.grad, ref.grad, rtol=1e-10, atol=1e-12)


def test_the_variance_estimate_is_the_second_moment_about_the_previous_mean():
    layer = _layer(momentum=1.0)  # r = 1: the estimates are this batch's m and v
    previous = layer.running_mean.clone()
    x = _input()
    layer(x)
    xd = x.detach()
    torch.testing.assert_close(layer.running_mean, xd.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    second = ((xd - previous.reshape(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
    torch.testing.assert_close(layer.running_var, second, rtol=1e-12, atol=1e-12)
    assert (layer.running_var > xd.var(dim=(0, 2, 3), unbiased=False) + 1e-3).all()  # not the batch variance


def test_no_gradient_flows_through_the_statistics():
    """The input gradient of a training call is that of the same layer in evaluation mode holding the
    estimates the call produced: a fixed affine, then GroupNorm (unlike BN, whose batch statistics
    depend on x)."""
    layer = _layer()
    x = _input()
    y = layer(x)
    frozen = copy.deepcopy(layer).eval()  # the updated estimates, as constants
    x2 = x.detach().clone().requires_grad_(True)
    y2 = frozen(x2)
    assert torch.equal(y, y2)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    (y * upstream).sum().backward()
    (y2 * upstream).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    # a BN in front (batch statistics) would give another gradient
    x3 = x.detach().clone().requires_grad_(True)
    z = F.batch_norm(x3, None, None, layer.weight.detach(), layer.bias.detach(), True, 0.0, EPS)
    (F.group_norm(z, G, *[t.detach() for t in layer.channel_affine()], EPS) * upstream).sum().backward()
    assert not torch.allclose(x.grad, x3.grad, atol=1e-3)


def test_inference_is_a_fixed_affine_then_groupnorm_per_sample_and_plain_modules_match_bit_for_bit():
    layer = _layer().eval()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _input(shape=(3, C, 5, 4)).detach()
    y = layer(x)
    expected, _, _ = reference_step(x, *_leaves(layer), layer.running_mean, layer.running_var, 0.3, G, training=False)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())  # no update in evaluation
    assert torch.equal(layer(x[1:2]), y[1:2])  # each sample on its own
    # GroupNorm with the per-group affine repeated over each group's channels
    gn = nn.GroupNorm(G, C, eps=EPS).double()
    with torch.no_grad():
        gn.weight.copy_(layer.group_weight.repeat_interleave(C // G))
        gn.bias.copy_(layer.group_bias.repeat_interleave(C // G))
        affine = F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, EPS)
        assert torch.equal(gn(affine), y)
    for dtype in (torch.float32, torch.float64):
        trained = _layer(dtype=dtype)
        trained(_input(dtype=dtype))
        trained.eval()
        plain = trained.as_plain_modules()
        assert [type(m) for m in plain] == [nn.BatchNorm2d, nn.GroupNorm] and not plain.training
        xi = _input(dtype=dtype, seed=7).detach()
        with torch.no_grad():
            assert torch.equal(plain(xi), trained(xi))
        assert not any(p.requires_grad for p in plain.parameters())


def test_nonfinite_batches_leave_the_estimates_and_count_a_skip():
    for per_step in (False, True):
        layer = _layer(dtype=torch.float32)
        guard = StepStatisticsGuard(layer) if per_step else None
        if guard is not None:
            guard.snapshot()
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        x = _input(dtype=torch.float32).detach().clone()
        x[0, 2, 1, 1] = float("nan")
        y = layer(x)
        assert torch.isnan(y[:, 2:4]).all() and torch.isfinite(y[:, 4:]).all()  # group 1 (channels 2, 3) only
        if guard is not None:
            assert guard.restore_nonfinite() == 1
            guard.close()
        assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items()), per_step
        assert int(layer.nonfinite_skips) == 1
        layer(_input(dtype=torch.float32).detach())  # a finite batch updates again
        assert int(layer.num_batches_tracked) == 1 and torch.isfinite(layer.running_var).all()


def test_empty_input_gives_an_empty_output_connected_to_every_parameter():
    layer = _layer()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for training in (True, False):
        layer.train(training)
        empty = layer(torch.zeros(0, C, 3, 3, dtype=torch.float64, requires_grad=True))
        assert empty.shape == (0, C, 3, 3)
        layer.zero_grad()
        empty.sum().backward()
        for p in layer.parameters():
            assert p.grad is not None and not p.grad.any()
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def test_population_statistics_protocol():
    layer = _layer(dtype=torch.float32)
    assert is_population_layer(layer)
    mean, var = torch.arange(C, dtype=torch.float32), torch.arange(1, C + 1, dtype=torch.float32)
    d2_bnstats.layers.population_protocol.set_population_statistics(layer, mean, var, 10)
    assert torch.equal(layer.running_mean, mean) and torch.equal(layer.running_var, var)  # biased: no n/(n-1)
    layer.set_population_statistics(mean + 1, var, torch.tensor(0.0, dtype=torch.float64))  # nothing seen
    assert torch.equal(layer.running_mean, mean)
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        layer.set_population_statistics(mean[:2], var[:2], 4)
    # PreciseBN gives the mean and biased variance of the layer's input over all batches
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, C, 3), BatchChannelNorm2d(C, G))
    batches = [torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    d2_bnstats.precise_bn(model, batches, 3)
    with torch.no_grad():
        features = torch.cat([model[0](b) for b in batches])
    torch.testing.assert_close(model[1].running_mean, features.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, features.var(dim=(0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)
    assert int(model[1].num_batches_tracked) == 0
    layer.reset_running_stats()
    assert not layer.running_mean.any() and torch.equal(layer.running_var, torch.ones(C))


def test_standalone_in_plain_pytorch_copied_and_reloaded():
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), BatchChannelNorm2d(8, 4, momentum=0.2), nn.ReLU(), nn.Conv2d(8, 2, 1))

    def train(model, optimizer, steps):
        for step in steps:
            data = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(step)) * (1 + step % 3)
            optimizer.zero_grad()
            model(data).square().mean().backward()
            optimizer.step()

    reference = build()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    train(reference, optimizer, range(6))
    layer = reference[1]
    assert int(layer.num_batches_tracked) == 6 and torch.isfinite(layer.running_var).all()
    assert not torch.equal(layer.group_weight, torch.ones(4))  # the per-group affine trains
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, optimizer, range(3))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        reloaded = build()
        reloaded.load_state_dict(clone.state_dict())
        for copy_ in (clone, reloaded):
            opt = torch.optim.SGD(copy_.parameters(), lr=0.1, momentum=0.9)
            opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
            train(copy_, opt, range(3, 6))
            for key, value in reference.state_dict().items():
                assert torch.equal(copy_.state_dict()[key], value), key
    data = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(99))
    reference.eval()
    plain = nn.Sequential(reference[0], reference[1].as_plain_modules(), *reference[2:]).eval()
    with torch.no_grad():
        assert torch.equal(plain(data), reference(data))


def test_bad_options_and_inputs_fail_at_once_with_clear_messages():
    with pytest.raises(ValueError, match=r"num_groups = 4: expected a divisor of num_channels = 6"):
        BatchChannelNorm2d(6, 4)
    with pytest.raises(ValueError, match=r"num_channels = 0: expected a positive integer"):
        BatchChannelNorm2d(0, 1)
    with pytest.raises(ValueError, match=r"momentum = 0: expected a number in \(0, 1\]"):
        BatchChannelNorm2d(4, 2, momentum=0)
    with pytest.raises(ValueError, match=r"eps = -1: expected a number > 0"):
        BatchChannelNorm2d(4, 2, eps=-1)
    layer = BatchChannelNorm2d(4, 2)
    with pytest.raises(ValueError, match=r"expects 4-D input \(N, C, H, W\), got 2-D"):
        layer(torch.randn(3, 4))
    with pytest.raises(ValueError, match="of 4 channels got input with 3 channels"):
        layer(torch.randn(2, 3, 4, 4))
    layer(torch.randn(1, 4, 1, 1))  # one value per channel: defined for estimated statistics (unlike BN)
    for key, value, message in (
        ("NUM_GROUPS", "0", r"BNSTATS.BCN.NUM_GROUPS = 0: expected a positive integer"),
        ("MOMENTUM", "1.5", r"BNSTATS.BCN.MOMENTUM = 1.5: expected a number in \(0, 1\]"),
        ("EPS", "0.0", r"BNSTATS.BCN.EPS = 0.0: expected a number > 0"),
        ("WS_EPS", "-1.0", r"BNSTATS.BCN.WS_EPS = -1.0: expected a number > 0"),
    ):
        with pytest.raises(ValueError, match=message):
            load_config(CPU_BASE, [f"BNSTATS.BCN.{key}", value])
    from omegaconf import OmegaConf

    from d2_bnstats.d2.lazy.model import check_config

    with pytest.raises(ValueError, match=r"bnstats.BCN.MOMENTUM = 0.0: expected a number in \(0, 1\]"):
        check_config(OmegaConf.create({"model": {}, "bnstats": {"BCN": {"MOMENTUM": 0.0}}}))
    with pytest.raises(ValueError, match=r"BCN: 48 channels do not split into BNSTATS.BCN.NUM_GROUPS = 32 groups"):
        d2_bnstats.get_norm(d2_bnstats.ConfiguredNorm("BCN", {"num_groups": 32}), 48)
    assert d2_bnstats.get_norm("BCN", 1).num_groups == 1  # detectron2's RetinaNet probes with 1 channel


def _model(norm, *extra, heads=True):
    cfg = load_config(CPU_BASE, [
        "MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", norm, "MODEL.FPN.NORM", norm,
        "MODEL.ROI_BOX_HEAD.NUM_CONV", "1", "MODEL.ROI_BOX_HEAD.CONV_DIM", "32", "MODEL.ROI_BOX_HEAD.NUM_FC", "1",
        "MODEL.ROI_BOX_HEAD.NORM", norm if heads else "", "MODEL.FPN.OUT_CHANNELS", "32", *extra,
    ])
    torch.manual_seed(0)
    return build_model(cfg)


def test_faster_rcnn_with_bcn_trains_and_deploys_to_identical_outputs():
    assert {"BCN", "BCN+WS"} <= set(d2_bnstats.available_norms())
    model = _model("BCN", "MODEL.BACKBONE.FREEZE_AT", "0", "BNSTATS.BCN.NUM_GROUPS", "8",
                   "BNSTATS.BCN.MOMENTUM", "0.05", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    layers = [m for m in model.modules() if isinstance(m, BatchChannelNorm2d)]
    assert layers and {(type(m), m.num_groups, m.momentum) for m in layers} == {(BatchChannelNorm2d, 8, 0.05)}
    # detectron2's optimizer treats its parameters as a norm's (SOLVER.WEIGHT_DECAY_NORM), as BN's and GN's
    groups = get_default_optimizer_params(model, weight_decay=1e-4, weight_decay_norm=0.0)
    norm_params = {id(p) for m in layers for p in m.parameters()}
    assert all(g["weight_decay"] == 0.0 for g in groups for p in g["params"] if id(p) in norm_params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = (synthetic_detection_batch(SIZE, seed) for seed in itertools.count())
    SimpleTrainer(model, batches, optimizer).train(0, 3)
    assert {int(m.num_batches_tracked) for m in layers} == {3}
    assert all(torch.isfinite(m.running_var).all() for m in layers)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.endswith("group_weight") for n in changed) and any("fpn" in n and "norm.weight" in n for n in changed)
    model.eval()
    deployed, report = d2_bnstats.convert_for_deployment(model)
    assert len(report.converted["batch_channel_norm"]) == len(layers) == len(report.frozen)
    assert not [m for m in deployed.modules() if isinstance(m, BatchChannelNorm2d)]
    convs = [m for m in deployed.modules() if isinstance(m, D2Conv2d) and m.norm is not None]
    assert convs and all([type(n) for n in m.norm] == [FrozenBatchNorm2d, nn.GroupNorm] for m in convs)
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 255
    with torch.no_grad():
        features, deployed_features = model.backbone(image[None]), deployed.backbone(image[None])
        expected, actual = model([{"image": image}])[0]["instances"], deployed([{"image": image}])[0]["instances"]
    for key in features:
        assert torch.equal(deployed_features[key], features[key]), key
    assert len(expected) and torch.equal(actual.pred_boxes.tensor, expected.pred_boxes.tensor)
    assert torch.equal(actual.scores, expected.scores) and torch.equal(actual.pred_classes, expected.pred_classes)


def test_bcn_ws_standardizes_its_convs_and_frozen_stages_keep_their_estimates():
    model = _model("BCN+WS", "MODEL.BACKBONE.FREEZE_AT", "2", heads=False)
    layers = [m for m in model.modules() if isinstance(m, WSBatchChannelNorm2d)]
    convs = [m for m in model.modules() if isinstance(m, D2Conv2d) and isinstance(m.norm, WSBatchChannelNorm2d)]
    assert layers and len(convs) == len(layers) and all(isinstance(c, WeightStandardizedConv2d) for c in convs)
    bottom_up = model.backbone.bottom_up
    frozen = [m for m in bottom_up.stem.modules() if isinstance(m, BatchChannelNorm2d)]
    frozen += [m for m in bottom_up.res2.modules() if isinstance(m, BatchChannelNorm2d)]
    trained = [m for m in layers if not any(m is f for f in frozen)]
    assert frozen and all(is_frozen(m) for m in frozen) and not any(is_frozen(m) for m in trained)
    with torch.no_grad():
        model.backbone(torch.rand(2, 3, 64, 64))  # a training forward
    assert {int(m.num_batches_tracked) for m in frozen} == {0} and {int(m.num_batches_tracked) for m in trained} == {1}
    assert all(not m.running_mean.any() for m in frozen)
    model.eval()
    deployed, report = d2_bnstats.convert_for_deployment(model, fold=True)
    assert {type(m) for m in deployed.modules()} & {WeightStandardizedConv2d, WSBatchChannelNorm2d} == set()
    assert len(report.converted["batch_channel_norm"]) == len(convs) + len(layers)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual = model.backbone(image), deployed.backbone(image)
    for key in expected:  # the standardized weights stored in plain convs: equal up to rounding
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-4)
