"""EvalNorm's per-sample moments and its alpha = beta = 1 output stay accurate in float32 at large
mean/std ratios (1 to 1e4), against float64 references: ``torch.var_mean`` of the same float32 input
in float64, and instance normalization computed in float64."""
import math

import pytest
import torch

from d2_bnstats.layers.evalnorm import EvalNorm2d
from d2_bnstats.layers import moments
from d2_bnstats.layers.moments import FUSED_STATISTICS_MAX_NUMEL, per_sample_moments

RATIOS = (1.0, 1e2, 1e3, 1e4)
# both ways of computing them on CPU: torch's fused statistics kernel up to FUSED_STATISTICS_MAX_NUMEL
# values, checked plain sums above (shifted sums for the maps where plain sums are imprecise: at
# ratio 1 some maps, above all of them)
SHAPES = {
    "backbone, fused": (2, 8, 16, 16),
    "head, fused": (16, 8, 7, 7),
    "backbone, checked sums": (2, 8, 64, 64),
    "head, checked sums": (256, 8, 7, 7),
}


def test_the_shapes_cover_both_ways():
    sizes = [torch.Size(s).numel() for s in SHAPES.values()]
    assert min(sizes) <= FUSED_STATISTICS_MAX_NUMEL < max(sizes)


def maps(shape, ratio, seed=0):
    """float32 maps whose mean (per sample and channel, between ratio and 1.5 ratio) is ``ratio``
    times their standard deviation (between 0.5 and 1.5)."""
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    mean = ratio * (1 + 0.5 * torch.rand(n, c, 1, 1, generator=g, dtype=torch.float64))
    std = 0.5 + torch.rand(n, c, 1, 1, generator=g, dtype=torch.float64)
    return (mean + std * torch.randn(shape, generator=g, dtype=torch.float64)).float()


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_per_sample_moments_match_float64_at_any_mean_to_std_ratio(shape, ratio):
    x = maps(shape, ratio)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(2, 3), correction=0)
    mean, var = per_sample_moments(x)
    assert mean.dtype == var.dtype == torch.float32
    # the variance to float32 precision, whatever the ratio (E[x²] − μ² lost it beyond ~1e2)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=0)
    # the mean to float32 rounding of the mean itself
    torch.testing.assert_close(mean.double(), ref_mean, rtol=4e-7, atol=1e-6)


def test_plain_sums_are_kept_where_precise_and_replaced_where_not(monkeypatch):
    x = maps(SHAPES["backbone, checked sums"], 0.1)  # mean² at most 0.09 variances: plain sums
    x[0, :3] += 1e3  # three maps at mean/std ~1e3: shifted sums
    recomputed = []
    shifted = moments.shifted_sample_moments
    monkeypatch.setattr(moments, "shifted_sample_moments", lambda m: recomputed.append(m.shape[1]) or shifted(m))
    mean, var = per_sample_moments(x)
    assert recomputed == [3]
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(2, 3), correction=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=4e-7, atol=1e-6)


def test_a_variance_floor_keeps_plain_sums_where_the_caller_needs_no_more(monkeypatch):
    """With ``var_floor`` a map is recomputed only where mean² > 4 (variance + floor), and every variance is
    accurate relative to variance + floor (what EvalNorm's sigma2_hat needs of sigma2_i for beta < 1)."""
    x = maps(SHAPES["backbone, checked sums"], 10.0)  # mean² 100-900 variances: all recomputed without a floor
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(2, 3), correction=0)
    recomputed = []
    shifted = moments.shifted_sample_moments
    monkeypatch.setattr(moments, "shifted_sample_moments", lambda m: recomputed.append(m.shape[1]) or shifted(m))
    n, c = x.shape[:2]
    floor = torch.tensor([0.0, 1e3] * (c // 2))  # every other channel: plain sums suffice
    for var_floor, expected in ((None, [n * c]), (floor, [n * c // 2]), (1e3, []), (math.inf, [])):
        recomputed.clear()
        mean, var = per_sample_moments(x, var_floor)
        assert recomputed == expected, var_floor
        f = 0.0 if var_floor is None else torch.as_tensor(var_floor, dtype=torch.float64)
        assert torch.all((var.double() - ref_var).abs() <= 1e-5 * (ref_var + f))
        torch.testing.assert_close(mean.double(), ref_mean, rtol=4e-7, atol=1e-6)


@pytest.mark.parametrize("ratio", (1.0, 10.0) + RATIOS[1:])
@pytest.mark.parametrize("ab", [1e-3, 0.25])
@pytest.mark.parametrize("shape", ["backbone, fused", "backbone, checked sums", "head, checked sums"])
def test_evalnorm_output_matches_float64_with_small_beta(shape, ab, ratio):
    """Inference without gradient with alpha = beta < 1 (learned values, 1/B²): the plain sums kept by the
    variance floor leave sigma2_hat, and so the output, as accurate as the float32 input allows."""
    x = maps(SHAPES[shape], ratio, seed=3)
    c = x.shape[1]
    layer = EvalNorm2d(c, mode="fixed", alpha=ab, beta=ab).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        layer.weight.copy_(0.5 + torch.rand(c, generator=g))
        layer.bias.copy_(torch.rand(c, generator=g) - 0.5)
        layer.running_mean.copy_(ratio * (1 + 0.5 * torch.rand(c, generator=g)))  # as far as the maps' means
        layer.running_var.copy_(0.5 + torch.rand(c, generator=g))
        y = layer(x)
    xd = x.double()
    var_i, mean_i = torch.var_mean(xd, dim=(2, 3), correction=0, keepdim=True)
    mean_e, var_e = (t.double()[:, None, None] for t in (layer.running_mean, layer.running_var))
    mu_hat = ab * mean_i + (1 - ab) * mean_e
    var_hat = ab * var_i + (1 - ab) * var_e + ab * (1 - ab) * (mean_i - mean_e) ** 2
    ref = (xd - mu_hat) / torch.sqrt(var_hat + layer.eps) * layer.weight.double()[:, None, None] + layer.bias.double()[:, None, None]
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-6 * ratio + 5e-5)


@pytest.mark.parametrize("shape", [SHAPES["backbone, fused"], SHAPES["backbone, checked sums"]], ids=["fused", "checked sums"])
def test_per_sample_moments_in_float64_for_double_input(shape):
    x = maps(shape, 1e4).double()
    ref_var, ref_mean = torch.var_mean(x, dim=(2, 3), correction=0)
    mean, var = per_sample_moments(x)
    assert var.dtype == torch.float64
    torch.testing.assert_close(var, ref_var, rtol=1e-9, atol=0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-13, atol=0)


def instance_norm_float64(x, layer):
    x = x.double()
    var, mean = torch.var_mean(x, dim=(2, 3), correction=0, keepdim=True)
    y = (x - mean) / torch.sqrt(var + layer.eps)
    return y * layer.weight.double()[:, None, None] + layer.bias.double()[:, None, None]


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("shape", ["backbone, fused", "backbone, checked sums"])
@pytest.mark.parametrize("path", ["no_grad", "channels_last", "with_grad"])
def test_evalnorm_alpha_beta_one_is_instance_norm_in_float64(path, shape, ratio):
    """alpha = beta = 1: mu_hat = mu_i, sigma2_hat = sigma2_i (instance normalization). The error
    allowed is what float32 carries: the inputs' own rounding (~6e-8 of the mean, so 1e-6 x ratio)
    plus float32 accumulation over a map (5e-5)."""
    x = maps(SHAPES[shape], ratio, seed=1)
    layer = EvalNorm2d(x.shape[1], mode="fixed", alpha=1.0, beta=1.0).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        layer.weight.copy_(0.5 + torch.rand(x.shape[1], generator=g))
        layer.bias.copy_(torch.rand(x.shape[1], generator=g) - 0.5)
        layer.running_mean.fill_(0.3 * ratio)  # population statistics far from the samples: unused at alpha = beta = 1
        layer.running_var.fill_(2.0)
    ref = instance_norm_float64(x, layer)
    if path == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    if path == "with_grad":
        x.requires_grad_(True)
        y = layer(x)
    else:
        with torch.no_grad():
            y = layer(x)
    torch.testing.assert_close(y.detach().double(), ref, rtol=0, atol=1e-6 * ratio + 5e-5)
