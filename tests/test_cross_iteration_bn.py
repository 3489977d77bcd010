"""Cross-Iteration BN (Yao et al. 2021, §3-4): against a float64 re-statement with closed-form Taylor
terms, the identities (k = 1 is BN; unchanged weights give the union of the last k batches),
standalone use, and the detectron2 path (config, conv binding, training, deployment)."""
import copy
import itertools
import pickle

import pytest
import torch
import torch.nn.functional as F
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from torch import nn

import d2_bnstats
from d2_bnstats.d2.train import load_config
from d2_bnstats.layers.cross_iteration_bn import CrossIterationBatchNorm2d

from .conftest import CPU_BASE, synthetic_detection_batch

EPS = 1e-5
SIZE = 96


def _pair(window, burn_in=0, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 4, 3, bias=False).to(dtype)
    layer = CrossIterationBatchNorm2d(4, window=window, burn_in=burn_in).to(dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    layer.bind_weight(conv.weight)
    return conv, layer


def _inputs(count, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 7, 7, generator=g, dtype=dtype) * (1 + i) + i for i in range(count)]


def _normalize(y, mean, var, layer):
    shape = (1, -1, 1, 1)
    return (y - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + EPS) * layer.weight.reshape(shape) + layer.bias.reshape(shape)


@pytest.mark.parametrize("window, burn_in", [(1, 0), (4, 10)])  # k = 1, and any k during the burn-in
def test_one_iteration_window_and_the_burn_in_are_batch_norm_exactly(window, burn_in):
    conv, layer = _pair(window, burn_in, dtype=torch.float32)
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(layer.state_dict())
    conv_bn = copy.deepcopy(conv)
    for x in _inputs(3, dtype=torch.float32):
        y1, y2 = layer(conv(x)), bn(conv_bn(x))
        assert torch.equal(y1, y2)
        y1.square().sum().backward()
        y2.square().sum().backward()
        assert torch.equal(conv.weight.grad, conv_bn.weight.grad) and torch.equal(layer.weight.grad, bn.weight.grad)
    assert torch.equal(layer.running_mean, bn.running_mean) and torch.equal(layer.running_var, bn.running_var)


def test_unchanged_weights_give_the_statistics_of_the_union_of_the_last_k_batches():
    conv, layer = _pair(window=3)
    xs = _inputs(5)
    for x in xs:
        y = layer(conv(x))
    union = torch.cat([conv(x) for x in xs[-3:]]).detach()  # the last k = 3 batches
    mean, var = union.mean(dim=(0, 2, 3)), union.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(y, _normalize(conv(xs[-1]), mean, var, layer), rtol=1e-12, atol=1e-12)


def _closed_form_reference(conv_weights, inputs, layer, k):
    """The window statistics at the last iteration, written from eqs. 6-8 with the Taylor terms in
    closed form: for y_c = W_c · p (p an input patch), ∂μ_c/∂W_c = E[p] and ∂ν_c/∂W_c = 2 E[y_c p]."""
    w_t = conv_weights[-1].double().flatten(1)
    means, squares = [], []
    for tau in range(k):
        x, w = inputs[-1 - tau].double(), conv_weights[-1 - tau].double().flatten(1)
        patches = F.unfold(x, 3).transpose(1, 2).reshape(-1, w.shape[1])  # [values, fan-in]
        y = patches @ w.T  # [values, C]
        mu, nu = y.mean(0), (y * y).mean(0)
        if tau:
            dmu = patches.mean(0).expand_as(w)  # [C, fan-in]
            dnu = 2 * (y.T @ patches) / patches.shape[0]
            mu = mu + (dmu * (w_t - w)).sum(1)
            nu = nu + (dnu * (w_t - w)).sum(1)
            nu = torch.maximum(nu, mu * mu)
        means.append(mu)
        squares.append(nu)
    mean = torch.stack(means).mean(0)
    return mean, torch.stack(squares).mean(0) - mean * mean


def test_changing_weights_are_compensated_by_the_papers_taylor_term():
    conv, layer = _pair(window=3)
    xs = _inputs(3)
    g = torch.Generator().manual_seed(7)
    weights = []
    for i, x in enumerate(xs):
        if i:
            with torch.no_grad():  # a weight update between iterations
                conv.weight.add_(torch.randn(conv.weight.shape, generator=g, dtype=conv.weight.dtype) * 0.002)
        weights.append(conv.weight.detach().clone())
        y = layer(conv(x))
    mean, var = _closed_form_reference(weights, xs, layer, 3)
    torch.testing.assert_close(y, _normalize(conv(xs[-1]), mean, var, layer), rtol=1e-10, atol=1e-10)
    # μ is linear in W, so its compensation is exact: the mean is the union's under the current weights
    exact = torch.cat([conv(x) for x in xs]).detach()
    torch.testing.assert_close(mean, exact.mean(dim=(0, 2, 3)), rtol=1e-10, atol=1e-12)
    # ν is quadratic in W: for a small update the first-order term leaves an error of second order, far
    # below the first-order error of not compensating
    exact_var = exact.var(dim=(0, 2, 3), unbiased=False)
    raw = torch.cat([F.conv2d(x, w) for x, w in zip(xs, weights)])
    raw_var = raw.var(dim=(0, 2, 3), unbiased=False)
    assert ((var - exact_var).abs() < 0.2 * (raw_var - exact_var).abs()).all()


def test_running_statistics_follow_the_window_with_bns_convention():
    conv, layer = _pair(window=2)
    xs = _inputs(2)
    layer(conv(xs[0]))
    before_mean, before_var = layer.running_mean.clone(), layer.running_var.clone()
    layer(conv(xs[1]))
    union = torch.cat([conv(x) for x in xs]).detach()
    n = union.numel() // 4
    mean, var = union.mean(dim=(0, 2, 3)), union.var(dim=(0, 2, 3), unbiased=False) * n / (n - 1)
    torch.testing.assert_close(layer.running_mean, 0.9 * before_mean + 0.1 * mean, rtol=1e-12, atol=1e-12)
    # (the layer's variance is ν̄ − μ̄², the paper's form, which loses a few digits to cancellation)
    torch.testing.assert_close(layer.running_var, 0.9 * before_var + 0.1 * var, rtol=1e-7, atol=1e-12)
    layer.eval()
    bn = nn.BatchNorm2d(4).double().eval()
    bn.load_state_dict(layer.state_dict())
    assert torch.equal(layer(conv(xs[0])), bn(conv(xs[0])))


def test_standalone_in_plain_pytorch_copied_and_reloaded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), CrossIterationBatchNorm2d(4, window=3), nn.ReLU())
    model[1].bind_weight(model[0].weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = torch.randn(2, 3, 8, 8)
    for _ in range(4):
        optimizer.zero_grad()
        model(data).square().mean().backward()
        optimizer.step()
    assert len(model[1].history) == 2 and torch.isfinite(model[1].running_var).all()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone[1].bound_weight() is clone[0].weight  # the binding follows the copy of the model
        clone(data).sum().backward()
        assert clone[0].weight.grad is not None
    # a copy of the layer alone (per-level copies) normalizes the output of the same conv
    assert copy.deepcopy(model[1]).bound_weight() is model[0].weight
    per_level = copy.deepcopy(model)
    wrapped = d2_bnstats.wrap_per_level(per_level, 2, predicate=lambda m: isinstance(m, CrossIterationBatchNorm2d))
    assert len(wrapped) == 1 and all(level.bound_weight() is per_level[0].weight for level in wrapped[0].levels)
    levels = wrapped[0].levels
    before = levels[1].history[0].mean.clone()
    per_level(data * 2).sum().backward()  # a call of level 0 only: only its window records it
    assert torch.equal(levels[1].history[0].mean, before) and not torch.equal(levels[0].history[0].mean, before)
    model.eval()
    expected = model(data)
    reloaded = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), CrossIterationBatchNorm2d(4, window=3), nn.ReLU())
    reloaded.load_state_dict(model.state_dict())  # BN's keys; the window refills in training
    assert set(model[1].state_dict()) == set(nn.BatchNorm2d(4).state_dict())
    assert torch.equal(reloaded.eval()(data), expected)


def test_bad_uses_fail_at_once_with_clear_messages():
    with pytest.raises(RuntimeError, match=r"needs the weight of the conv before it: call layer.bind_weight"):
        CrossIterationBatchNorm2d(4)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"window = 0: expected an integer >= 1"):
        CrossIterationBatchNorm2d(4, window=0)
    with pytest.raises(ValueError, match="conv with 4 output channels"):
        CrossIterationBatchNorm2d(4).bind_weight(torch.ones(5, 3, 1, 1))
    layer = CrossIterationBatchNorm2d(4)
    layer.bind_weight(nn.Conv2d(3, 4, 1).weight)
    with pytest.raises(RuntimeError, match="does not produce this layer's input"):
        layer(torch.randn(2, 4, 3, 3, requires_grad=True))
    with pytest.raises(ValueError, match=r"BNSTATS.CROSS_ITER_BN.WINDOW = 0: expected a positive integer"):
        load_config(CPU_BASE, ["BNSTATS.CROSS_ITER_BN.WINDOW", "0"])




def test_detectron2_binds_each_layer_to_its_conv_trains_and_deploys():
    assert "CrossIterBN" in d2_bnstats.available_norms()
    cfg = load_config(CPU_BASE, [
        "MODEL.DEVICE", "cpu", "MODEL.FPN.NORM", "CrossIterBN", "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.ROI_BOX_HEAD.NUM_CONV", "1", "MODEL.ROI_BOX_HEAD.CONV_DIM", "32", "MODEL.ROI_BOX_HEAD.NUM_FC", "1",
        "MODEL.ROI_BOX_HEAD.NORM", "CrossIterBN",
        "BNSTATS.CROSS_ITER_BN.WINDOW", "3", "BNSTATS.CROSS_ITER_BN.BURN_IN", "1",
    ])
    torch.manual_seed(0)
    model = build_model(cfg)
    pairs = [(m, m.norm) for m in model.modules() if isinstance(getattr(m, "norm", None), CrossIterationBatchNorm2d)]
    assert len(pairs) == 9 and all(norm.bound_weight() is conv.weight for conv, norm in pairs)
    assert {(norm.window, norm.burn_in) for _, norm in pairs} == {(3, 1)}
    SimpleTrainer(model, itertools.repeat(synthetic_detection_batch(SIZE)), torch.optim.SGD(model.parameters(), lr=0.01)).train(0, 3)
    assert {len(norm.history) for _, norm in pairs} == {2} and {int(n.num_batches_tracked) for _, n in pairs} == {3}
    model.eval()
    deployed, report = d2_bnstats.convert_for_deployment(model)
    assert not [m for m in deployed.modules() if isinstance(m, CrossIterationBatchNorm2d)] and not report.kept
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual = model.backbone(image), deployed.backbone(image)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
