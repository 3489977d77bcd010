"""Weight Standardization (Qiao et al. 2019, §3): against a float64 re-statement of eqs. 5-7 and the
authors' public code's variant, standalone use, and "GN+WS"/"BN+WS" in detectron2 (build, train,
deploy by folding)."""
import copy
import itertools
import pickle

import pytest
import torch
from detectron2.engine import SimpleTrainer
from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import nn

import d2_bnstats
from d2_bnstats.d2.train import load_config
from d2_bnstats.layers.weight_standardization import (
    WeightStandardizedConv2d,
    WSGroupNorm,
    fold_weight_standardization,
    make_weight_standardized,
    standardize,
)

from .conftest import CPU_BASE, synthetic_detection_batch

SIZE = 96


def reference(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Eqs. 5-7, filter by filter, in float64."""
    out = torch.empty_like(weight, dtype=torch.float64)
    for o in range(weight.shape[0]):
        w = weight[o].double().flatten()
        n = w.numel()
        mu = w.sum() / n
        sigma = torch.sqrt(((w - mu) ** 2).sum() / n + eps)
        out[o] = ((w - mu) / sigma).reshape(weight.shape[1:])
    return out


def test_standardize_is_the_papers_equation_with_its_gradient():
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(6, 3, 3, 3, generator=g, dtype=torch.float64) * 0.1 + 0.05).requires_grad_(True)
    for eps in (1e-5, 1e-2):
        torch.testing.assert_close(standardize(weight, eps), reference(weight.detach(), eps), rtol=1e-12, atol=1e-12)
    w_hat = standardize(weight, 0.0 + 1e-12)
    torch.testing.assert_close(w_hat.mean(dim=(1, 2, 3)), torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(w_hat.var(dim=(1, 2, 3), unbiased=False), torch.ones(6, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda w: standardize(w, 1e-3), (weight,))


@pytest.mark.parametrize("shape", [(8, 16, 3, 3), (5, 7, 1, 1), (4, 1, 1, 1), (3, 10)])
def test_standardize_in_float32_matches_the_float64_equation_and_its_gradient(shape):
    """The working precision, every weight layout (one value per filter included), output and gradient
    against the float64 equation differentiated by autograd."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(shape, generator=g) * 0.05 + 0.01
    upstream = torch.randn(shape, generator=g)
    w32 = weight.clone().requires_grad_(True)
    standardize(w32).backward(upstream)
    w64 = weight.double().requires_grad_(True)
    n = w64[0].numel()
    flat = w64.reshape(shape[0], -1)
    mu = flat.sum(1, keepdim=True) / n
    ref = ((flat - mu) / torch.sqrt(((flat - mu) ** 2).sum(1, keepdim=True) / n + 1e-5)).reshape(shape)
    ref.backward(upstream.double())
    torch.testing.assert_close(standardize(weight).double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w32.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)


def test_the_public_codes_variant_differs_by_a_scale_the_next_norm_removes():
    """The authors' code divides by the unbiased std + 1e-5; per filter that is the paper's Ŵ times
    about sqrt((n-1)/n), a constant scale that GN after the conv removes (up to ε)."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64)
    flat = weight.reshape(8, -1)
    public = (weight - flat.mean(1).reshape(-1, 1, 1, 1)) / (flat.std(1).reshape(-1, 1, 1, 1) + 1e-5)
    ours = standardize(weight, 1e-5)
    n = flat.shape[1]
    torch.testing.assert_close(public / ours, torch.full_like(ours, ((n - 1) / n) ** 0.5), rtol=1e-4, atol=0)
    x = torch.randn(2, 4, 10, 10, generator=g, dtype=torch.float64)
    gn = nn.GroupNorm(4, 8).double()
    torch.testing.assert_close(gn(nn.functional.conv2d(x, public)), gn(nn.functional.conv2d(x, ours)), rtol=0, atol=1e-4)


def test_standalone_in_plain_pytorch_copied_reloaded_and_folded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), WSGroupNorm(4, 8), nn.ReLU())
    make_weight_standardized(model[0])
    assert isinstance(model[0], WeightStandardizedConv2d)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    data = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        optimizer.zero_grad()
        model(data).square().mean().backward()
        optimizer.step()
    expected = model(data)
    torch.testing.assert_close(expected, model[2](model[1](nn.functional.conv2d(data, reference(model[0].weight.detach(), 1e-5).float()))),
                               rtol=1e-5, atol=1e-6)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(data), expected)
    reloaded = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), WSGroupNorm(4, 8), nn.ReLU())
    reloaded.load_state_dict(model.state_dict())  # the keys are a plain conv's
    make_weight_standardized(reloaded[0])
    assert torch.equal(reloaded(data), expected)
    folded = copy.deepcopy(model)
    assert fold_weight_standardization(folded) == ["0"] and type(folded[0]) is nn.Conv2d
    torch.testing.assert_close(folded(data), expected, rtol=1e-5, atol=1e-6)


def test_bad_uses_fail_at_once_with_clear_messages():
    with pytest.raises(TypeError, match="Conv2d has its own forward: pass cls"):
        make_weight_standardized(D2Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match=r"eps = 0: expected a number > 0"):
        make_weight_standardized(nn.Conv2d(3, 4, 1), eps=0)
    with pytest.raises(ValueError, match="weights \\[out, in, ...\\]"):
        standardize(torch.ones(4))
    with pytest.raises(ValueError, match=r"BNSTATS.WS_GN.EPS = 0.0: expected a number > 0"):
        load_config(CPU_BASE, ["BNSTATS.WS_GN.EPS", "0.0"])
    with pytest.raises(ValueError, match=r"BNSTATS.WS_GN.NUM_GROUPS = 0: expected a positive integer"):
        load_config(CPU_BASE, ["BNSTATS.WS_GN.NUM_GROUPS", "0"])




def _model(norm, *extra):
    cfg = load_config(CPU_BASE, [
        "MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", norm, "MODEL.FPN.NORM", norm,
        "MODEL.ROI_BOX_HEAD.NUM_CONV", "1", "MODEL.ROI_BOX_HEAD.CONV_DIM", "32", "MODEL.ROI_BOX_HEAD.NUM_FC", "1",
        "MODEL.ROI_BOX_HEAD.NORM", norm, "MODEL.FPN.OUT_CHANNELS", "32", *extra,
    ])
    torch.manual_seed(0)
    return build_model(cfg)


def test_gn_ws_in_detectron2_trains_and_deploys_as_plain_gn():
    assert {"GN+WS", "BN+WS"} <= set(d2_bnstats.available_norms())
    model = _model("GN+WS", "MODEL.BACKBONE.FREEZE_AT", "0", "BNSTATS.WS_GN.NUM_GROUPS", "8")
    norms = [m for m in model.modules() if isinstance(m, WSGroupNorm)]
    convs = [m for m in model.modules() if isinstance(m, WeightStandardizedConv2d)]
    assert norms and {m.num_groups for m in norms} == {8}
    assert len(convs) == len(norms) and all(type(c.norm) is WSGroupNorm for c in convs)
    SimpleTrainer(model, itertools.repeat(synthetic_detection_batch(SIZE)), torch.optim.SGD(model.parameters(), lr=0.01)).train(0, 1)
    model.eval()
    deployed, report = d2_bnstats.convert_for_deployment(model)
    assert len(report.converted["ws_gn"]) == len(convs) + len(norms)
    assert {type(m) for m in deployed.modules()} & {WSGroupNorm, WeightStandardizedConv2d} == set()
    assert all(type(m.norm) is nn.GroupNorm for m in deployed.modules() if isinstance(m, D2Conv2d) and m.norm is not None)
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual = model.backbone(image), deployed.backbone(image)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-4)


def test_bn_ws_with_frozen_stages_standardizes_their_convs_and_folds_into_frozen_bn():
    model = _model("BN+WS", "MODEL.BACKBONE.FREEZE_AT", "2")
    frozen = [m for m in model.backbone.bottom_up.modules() if isinstance(m, D2Conv2d) and isinstance(m.norm, FrozenBatchNorm2d)]
    assert frozen and all(isinstance(m, WeightStandardizedConv2d) for m in frozen)
    assert all(isinstance(m, WeightStandardizedConv2d) for m in model.modules() if isinstance(m, D2Conv2d) and m.norm is not None)
    with EventStorage():  # population statistics, so that activations are normalized at inference
        d2_bnstats.precise_bn(model, [synthetic_detection_batch(SIZE, 1), synthetic_detection_batch(SIZE, 2)], 2)
    model.eval()
    deployed, report = d2_bnstats.convert_for_deployment(model, fold=True)
    assert report.converted["ws_bn"] and not [m for m in deployed.modules() if isinstance(m, WeightStandardizedConv2d)]
    assert report.folded
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual = model.backbone(image), deployed.backbone(image)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-4)
