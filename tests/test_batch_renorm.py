"""Batch Renormalization (Ioffe 2017, §3): against a float64 re-statement of Algorithm 1, the
identities with BN, the schedule, standalone use, and the detectron2 path (config, build, deploy)."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import nn

import d2_bnstats
from d2_bnstats.layers.batch_renorm import BatchRenorm2d
from d2_bnstats.d2.train import load_config
from d2_bnstats.layers.population_protocol import is_population_layer

from .conftest import CPU_BASE

EPS = 1e-5


def _layer(channels=4, dtype=torch.float64, seed=0, **options):
    """A layer with random affine parameters and running statistics away from the batch's."""
    g = torch.Generator().manual_seed(seed)
    layer = BatchRenorm2d(channels, **options).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(channels, generator=g))
        layer.running_mean.copy_(torch.randn(channels, generator=g))
        layer.running_var.copy_(torch.rand(channels, generator=g) * 3 + 0.1)
    return layer


def _input(shape=(2, 4, 5, 6), dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.2, 1.0, 3.0, 0.7], dtype=dtype).reshape(1, -1, 1, 1)[:, : shape[1]]
    return (torch.randn(shape, generator=g, dtype=dtype) * scale + 0.5).requires_grad_(True)


def _bn_twin(layer: BatchRenorm2d) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum).to(layer.weight.dtype)
    bn.load_state_dict(layer.state_dict())
    return bn


def reference(x, weight, bias, running_mean, running_var, r_max, d_max, eps=EPS):
    """Algorithm 1 of Ioffe 2017 in float64, written from the paper: (y, r, d); r and d carry no
    gradient. σ is sqrt(running_var + ε) (the layer keeps BN's variance; see its docstring)."""
    x = x.double()
    mu_b = x.mean(dim=(0, 2, 3))
    sigma_b = (((x - mu_b.reshape(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3)) + eps).sqrt()
    sigma = (running_var.double() + eps).sqrt()
    r = (sigma_b / sigma).detach().clamp(1.0 / r_max, r_max)
    d = ((mu_b - running_mean.double()) / sigma).detach().clamp(-d_max, d_max)
    shape = (1, -1, 1, 1)
    x_hat = (x - mu_b.reshape(shape)) / sigma_b.reshape(shape) * r.reshape(shape) + d.reshape(shape)
    return weight.double().reshape(shape) * x_hat + bias.double().reshape(shape), r, d


def _ramped(**options):
    """Options with the schedule finished at step 0 (the bounds are the final ones)."""
    return dict(ramp_start=0, r_max_end=0, d_max_end=0, **options)


def test_training_output_and_gradients_match_the_papers_equations_with_clipping():
    layer = _layer(**_ramped(r_max=3.0, d_max=0.4))
    with torch.no_grad():  # the input's channels have std 0.2, 1, 3, 0.7 and mean 0.5
        layer.running_var.copy_(torch.tensor([1.0, 1.1, 0.5, 0.5]))
        layer.running_mean.copy_(torch.tensor([0.5, 3.0, 0.0, 0.45]))
    x = _input()
    ref_x = x.detach().clone().requires_grad_(True)
    ref_w = layer.weight.detach().clone().requires_grad_(True)
    ref_b = layer.bias.detach().clone().requires_grad_(True)
    expected, r, d = reference(ref_x, ref_w, ref_b, layer.running_mean, layer.running_var, 3.0, 0.4)
    # the test exercises both bounds of r, and d clipped and not
    assert r[0] == 1 / 3.0 and r[2] == 3.0 and (r[[1, 3]] < 3.0).all() and (r[[1, 3]] > 1 / 3.0).all()
    assert (d.abs() == 0.4).any() and (d.abs() < 0.4).any()
    y = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(y, generator=torch.Generator().manual_seed(5))
    (y * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, ref_w.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, ref_b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_r_max_1_d_max_0_is_batch_norm_exactly(dtype):
    for options in (_ramped(r_max=1.0, d_max=0.0), {}):  # {}: the default schedule before its start
        layer = _layer(dtype=dtype, **options)
        bn = _bn_twin(layer)
        x1 = _input(dtype=dtype)
        x2 = x1.detach().clone().requires_grad_(True)
        y1, y2 = layer(x1), bn(x2)
        assert torch.equal(y1, y2)
        upstream = torch.randn_like(y1, generator=torch.Generator().manual_seed(5))
        (y1 * upstream).sum().backward()
        (y2 * upstream).sum().backward()
        assert torch.equal(x1.grad, x2.grad)
        assert torch.equal(layer.weight.grad, bn.weight.grad) and torch.equal(layer.bias.grad, bn.bias.grad)
        torch.testing.assert_close(layer.running_mean, bn.running_mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(layer.running_var, bn.running_var, rtol=1e-6, atol=0)
        assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked) == 1


def test_unclipped_output_is_normalization_by_the_running_statistics_and_gradient_is_bn_with_weight_times_r():
    layer = _layer(**_ramped(r_max=1e6, d_max=1e6))
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    x = _input()
    y = layer(x)
    shape = (1, -1, 1, 1)
    by_running = layer.weight.reshape(shape) * (x - mean.reshape(shape)) / (var.reshape(shape) + EPS).sqrt()
    torch.testing.assert_close(y, by_running + layer.bias.reshape(shape), rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(y, generator=torch.Generator().manual_seed(5))
    (y * upstream).sum().backward()
    # BN's input gradient with the weight scaled by r = σ_B / σ
    x_bn = x.detach().clone().requires_grad_(True)
    batch_var = x_bn.detach().var(dim=(0, 2, 3), unbiased=False)
    r = ((batch_var + EPS) / (var + EPS)).sqrt()
    y_bn = F.batch_norm(x_bn, None, None, layer.weight.detach() * r, layer.bias.detach(), True, 0.0, EPS)
    (y_bn * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_bn.grad, rtol=1e-10, atol=1e-12)


def test_running_statistics_are_bns_and_inference_is_a_frozen_bn():
    layer = _layer(**_ramped(r_max=2.0, d_max=1.0))
    bn = _bn_twin(layer)
    for seed in range(3):
        x = _input(seed=seed)
        layer(x)
        bn(x.detach())
    torch.testing.assert_close(layer.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
    layer.eval(), bn.eval()
    bn.load_state_dict(layer.state_dict())
    x = _input(seed=9)
    assert torch.equal(layer(x), bn(x))
    frozen = d2_bnstats.to_frozen(layer)
    assert type(frozen).__name__ == "FrozenBatchNorm2d"
    torch.testing.assert_close(frozen(x.detach()), bn(x.detach()), rtol=0, atol=1e-12)
    assert is_population_layer(layer)


def test_the_schedule_relaxes_the_bounds_linearly():
    layer = BatchRenorm2d(2, r_max=3.0, d_max=5.0, ramp_start=100, r_max_end=300, d_max_end=200)
    for t, (r_max, d_max) in {0: (1, 0), 100: (1, 0), 150: (1.5, 2.5), 200: (2, 5), 300: (3, 5), 10**6: (3, 5)}.items():
        layer.num_batches_tracked.fill_(t)
        got = [float(v) for v in layer.clip_bounds()]
        assert got == pytest.approx([r_max, d_max]), t


def test_standalone_in_plain_pytorch_copied_and_reloaded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), BatchRenorm2d(4, ramp_start=1, r_max_end=3, d_max_end=3), nn.ReLU())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = torch.randn(2, 3, 8, 8)
    for _ in range(4):
        optimizer.zero_grad()
        model(data).square().mean().backward()
        optimizer.step()
    layer = model[1]
    assert int(layer.num_batches_tracked) == 4 and torch.isfinite(layer.running_var).all()
    model.eval()
    expected = model(data)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(data), expected) and clone[1].r_max == layer.r_max
    # a BN checkpoint is a Batch Renormalization checkpoint and back: the state is BN's
    assert set(layer.state_dict()) == set(nn.BatchNorm2d(4).state_dict())
    reloaded = BatchRenorm2d(4)
    reloaded.load_state_dict(nn.BatchNorm2d(4).state_dict())
    plain = nn.BatchNorm2d(4)
    plain.load_state_dict(layer.state_dict())
    assert torch.equal(nn.Sequential(model[0], plain, model[2]).eval()(data), expected)
    # empty input: an empty output connected to the parameters
    layer.train()
    empty = layer(torch.zeros(0, 4, 3, 3))
    empty.sum().backward()
    assert empty.shape == (0, 4, 3, 3) and layer.weight.grad is not None


def test_bad_options_fail_at_once_with_clear_messages():
    with pytest.raises(ValueError, match=r"r_max = 0.5: expected a number >= 1"):
        BatchRenorm2d(4, r_max=0.5)
    with pytest.raises(ValueError, match=r"d_max = -1: expected a number >= 0"):
        BatchRenorm2d(4, d_max=-1)
    with pytest.raises(ValueError, match=r"ramp_start = -3: expected an integer >= 0"):
        BatchRenorm2d(4, ramp_start=-3)
    with pytest.raises(ValueError, match="needs its running statistics"):
        BatchRenorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        BatchRenorm2d(4)(torch.randn(1, 4, 1, 1))
    with pytest.raises(ValueError, match=r"BNSTATS.BATCH_RENORM.R_MAX = 0.5: expected a number >= 1"):
        load_config(CPU_BASE, ["BNSTATS.BATCH_RENORM.R_MAX", "0.5"])
    with pytest.raises(ValueError, match=r"bnstats.BATCH_RENORM.D_MAX_END_ITER = -1: expected an integer >= 0"):
        from d2_bnstats.d2.lazy.model import check_config
        from omegaconf import OmegaConf

        cfg = OmegaConf.create({"model": {}, "bnstats": {"BATCH_RENORM": {"D_MAX_END_ITER": -1}}})
        check_config(cfg)


def test_detectron2_builds_it_from_the_config_trains_and_deploys():
    assert "BatchRenorm" in d2_bnstats.available_norms()
    cfg = load_config(CPU_BASE, [
        "MODEL.DEVICE", "cpu",
        "MODEL.RESNETS.NORM", "BatchRenorm",
        "MODEL.FPN.NORM", "BatchRenorm",
        "MODEL.BACKBONE.FREEZE_AT", "0",
        "BNSTATS.BATCH_RENORM.R_MAX", "2.0",
        "BNSTATS.BATCH_RENORM.RAMP_START_ITER", "0",
    ])
    torch.manual_seed(0)
    model = build_model(cfg)
    layers = [m for m in model.modules() if isinstance(m, BatchRenorm2d)]
    assert layers and {(m.r_max, m.ramp_start, m.d_max) for m in layers} == {(2.0, 0, 5.0)}
    with torch.no_grad():
        features = model.backbone(torch.randn(2, 3, 64, 64))  # one training forward of the backbone
    assert all(torch.isfinite(f).all() for f in features.values())
    assert {int(m.num_batches_tracked) for m in layers} == {1}
    model.eval()
    deployed, report = d2_bnstats.convert_for_deployment(model)
    assert not [m for m in deployed.modules() if isinstance(m, BatchRenorm2d)]
    assert len(report.frozen) == len(layers) and not report.kept
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), EventStorage():
        expected, actual = model.backbone(image), deployed.backbone(image)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
