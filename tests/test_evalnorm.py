"""EvalNorm2d (layers/evalnorm.py) against independent references: nn.BatchNorm2d for training,
the paper's formulas (eqs. 3-9) re-implemented plainly in float64 here, exact batch statistics,
and a single-process BN on the union of the processes' batches for the synchronised variant."""
import copy
import gc
import inspect
import io
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import d2_bnstats
from d2_bnstats.layers.evalnorm import MODES, EvalNorm2d, evalnorm_state, set_evalnorm_mode
from d2_bnstats.layers.evalnorm_aux import attach_aux_loss_hook
from d2_bnstats.layers.evalnorm_math import l1_of_affine
from d2_bnstats.layers.evalnorm_projection import attach_projection_hook
from d2_bnstats.layers import moments
from d2_bnstats.layers.moments import per_sample_moments

from .distributed import run_distributed


# ------------------------------------------------------------------------------------ references
def ref_eval(x, running_mean, running_var, weight, bias, eps, alpha, beta):
    """Eqs. 5-8 and the affine, plainly, in float64: sigma2_i biased over H, W; sigma2_E = running_var."""
    x = x.double()
    mu_i = x.mean(dim=(2, 3))
    var_i = x.var(dim=(2, 3), unbiased=False)
    mu_e, var_e = running_mean.double(), running_var.double()
    mu_hat = alpha * mu_i + (1 - alpha) * mu_e
    var_hat = beta * var_i + (1 - beta) * var_e + beta * (1 - beta) * (mu_i - mu_e) ** 2
    z = (x - mu_hat[:, :, None, None]) / torch.sqrt(var_hat[:, :, None, None] + eps)
    return z * weight.double()[None, :, None, None] + bias.double()[None, :, None, None]


def ref_aux_loss(x, mu_e, var_e, alpha, beta, eps):
    """Eq. 9 with autograd to alpha, beta only (x, statistics are constants)."""
    x = x.double()
    mu_b = x.mean(dim=(0, 2, 3))
    var_b = x.var(dim=(0, 2, 3), unbiased=False)
    z_b = (x - mu_b[None, :, None, None]) / torch.sqrt(var_b[None, :, None, None] + eps)
    mu_i = x.mean(dim=(2, 3))
    var_i = x.var(dim=(2, 3), unbiased=False)
    mu_e, var_e = mu_e.double(), var_e.double()
    mu_hat = alpha * mu_i + (1 - alpha) * mu_e
    var_hat = beta * var_i + (1 - beta) * var_e + beta * (1 - beta) * (mu_i - mu_e) ** 2
    z_hat = (x - mu_hat[:, :, None, None]) / torch.sqrt(var_hat[:, :, None, None] + eps)
    return (z_b - z_hat).abs().mean()


def trained_layer(channels=6, seed=0, **kwargs):
    """An EvalNorm2d with non-trivial affine and running statistics."""
    g = torch.Generator().manual_seed(seed)
    layer = EvalNorm2d(channels, **kwargs)
    with torch.no_grad():
        weight, bias = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)
        if layer.affine:
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        layer.running_mean.copy_(torch.randn(channels, generator=g))
        layer.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return layer


def sample(shape, seed=1, offset=1.0):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    # per-sample offsets and scales, so samples differ from each other and from the population
    return torch.randn(shape, generator=g) * (torch.rand(n, c, 1, 1, generator=g) + 0.5) + offset * torch.randn(
        n, c, 1, 1, generator=g
    )


# ------------------------------------------------------------------------------------ training = BN
class TinyNet(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.n1 = norm(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.n2 = norm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.n1(self.conv1(x)))
        x = F.relu(self.n2(self.conv2(x)))
        return {"loss_task": self.head(x.mean((2, 3))).pow(2).mean()}


@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_is_exactly_batchnorm_and_only_alpha_beta_get_the_aux_gradient(momentum):
    torch.manual_seed(0)
    bn_net = TinyNet(lambda c: nn.BatchNorm2d(c, momentum=momentum))
    en_net = TinyNet(lambda c: EvalNorm2d(c, momentum=momentum, aux_samples=0))
    missing, unexpected = en_net.load_state_dict(bn_net.state_dict(), strict=False)
    assert sorted(missing) == sorted(f"{n}.{p}" for n in ("n1", "n2") for p in ("alpha_hat", "beta_hat"))
    assert unexpected == []
    hook = attach_aux_loss_hook(en_net)
    assert hook is not None
    attach_projection_hook(en_net)
    opt_bn = torch.optim.SGD(bn_net.parameters(), lr=0.1, momentum=0.9)
    opt_en = torch.optim.SGD(en_net.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        x = sample((2, 3, 9, 7), seed=step)
        out_bn, out_en = bn_net(x), en_net(x)
        assert set(out_en) == {"loss_task", "loss_evalnorm"} and set(out_bn) == {"loss_task"}
        assert torch.equal(out_bn["loss_task"], out_en["loss_task"])
        opt_bn.zero_grad()
        opt_en.zero_grad()
        sum(out_bn.values()).backward()
        sum(out_en.values()).backward()
        bn_params = dict(bn_net.named_parameters())
        for name, p in en_net.named_parameters():
            if name.endswith(("alpha_hat", "beta_hat")):
                assert p.grad is not None and p.grad.abs() > 0, name
            else:
                torch.testing.assert_close(p.grad, bn_params[name].grad, rtol=0, atol=1e-6)
        for name, buf in bn_net.named_buffers():
            assert torch.equal(buf, dict(en_net.named_buffers())[name]), name
        opt_bn.step()
        opt_en.step()
    for name, p in bn_net.named_parameters():  # identical trajectories
        torch.testing.assert_close(dict(en_net.named_parameters())[name], p, rtol=0, atol=1e-6)
    assert en_net.n1.norm_batch_size.item() == 2.0


def test_learn_false_has_no_aux_loss_and_frozen_alpha_beta():
    layer = EvalNorm2d(4, learn=False)
    assert not layer.alpha_hat.requires_grad and not layer.beta_hat.requires_grad
    layer(sample((2, 4, 5, 5)))
    assert layer.aux_loss is None
    assert attach_aux_loss_hook(nn.Sequential(layer)) is None


# ------------------------------------------------------------------------------------ evaluation
@pytest.mark.parametrize("alpha, beta", [(0.3, 0.6), (0.05, 0.9), (1.0, 0.0), (0.0, 1.0), (0.25, 0.25)])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_fixed_mode_equals_the_formula(alpha, beta, requires_grad):
    layer = trained_layer().eval().set_mode("fixed", alpha=alpha, beta=beta)
    x = sample((3, 6, 5, 4)).requires_grad_(requires_grad)
    y = layer(x)
    ref = ref_eval(x.detach(), layer.running_mean, layer.running_var, layer.weight, layer.bias, layer.eps, alpha, beta)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert float(layer.alpha) == pytest.approx(alpha) and float(layer.beta) == pytest.approx(beta)


INFERENCE_WAYS = {  # the ways inference without gradient computes on CPU, by input (moments.per_sample_moments)
    "fused statistics": dict(shape=(3, 6, 5, 4)),
    "checked plain sums": dict(shape=(2, 6, 64, 48)),  # more than FUSED_STATISTICS_MAX_NUMEL values
    "checked plain sums, float64": dict(shape=(2, 6, 64, 48), dtype=torch.float64),
    "in the shifted copy (off CPU)": dict(shape=(2, 6, 64, 48), shifted_copy=True),
    "in the shifted copy (off CPU), float64": dict(shape=(2, 6, 64, 48), dtype=torch.float64, shifted_copy=True),
    "channels_last": dict(shape=(2, 6, 64, 48), channels_last=True),
    "half": dict(shape=(2, 6, 64, 48), dtype=torch.float16),
}


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no affine"])
@pytest.mark.parametrize("way", INFERENCE_WAYS)
def test_every_way_of_inference_equals_the_formula(way, affine, monkeypatch):
    """Each mode through each path of inference without gradient against eqs. 5-8 in float64, the
    population far from the samples (mean/std ~ 10) so that a shift error would show. The path of
    other devices (output written into the shifted copy) is called directly here."""
    spec = INFERENCE_WAYS[way]
    if spec.get("shifted_copy"):
        plain = EvalNorm2d.forward

        def through_shifted_copy(self, x):
            if self.training:
                return plain(self, x)
            mean_e, var_e = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
            return self._eval_in_shifted_copy(x, mean_e, var_e, float(self.alpha), float(self.beta))

        monkeypatch.setattr(EvalNorm2d, "forward", through_shifted_copy)
    dtype = spec.get("dtype", torch.float32)
    x = (sample(spec["shape"], offset=3.0) + 10.0).to(dtype)
    if spec.get("channels_last"):
        x = x.to(memory_format=torch.channels_last)
    layer = trained_layer(6, affine=affine)
    with torch.no_grad():
        layer.norm_batch_size.fill_(2.0)
        layer.alpha_hat.fill_(0.35)
        layer.beta_hat.fill_(0.6)
    if dtype == torch.float64:
        layer.double()
    layer.eval()
    weight = layer.weight.detach() if affine else torch.ones(6)
    bias = layer.bias.detach() if affine else torch.zeros(6)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    for mode, kw in [("learned", {}), ("rule", {}), ("exact", {}), ("fixed", {"alpha": 0.8, "beta": 0.3}), ("ema", {})]:
        layer.set_mode(mode, **kw)
        with torch.no_grad():
            y = layer(x)
        assert y.dtype == dtype and y.shape == x.shape
        ref = ref_eval(x, layer.running_mean, layer.running_var, weight, bias, layer.eps, float(layer.alpha), float(layer.beta))
        torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol, msg=lambda m: f"{mode}: {m}")


@pytest.mark.parametrize("alpha, beta", [(0.3, 0.2), (0.0, 0.0)])
def test_learned_inference_reads_alpha_beta_without_warning(alpha, beta):
    """Without gradient a CPU layer reads alpha_hat, beta_hat as numbers: no warning about converting a
    tensor that requires grad (also with grad mode on, where nothing needs a gradient: frozen affine
    parameters, an input without grad), the formula's output, and BN inference exactly at 0, 0."""
    layer = trained_layer(4).eval()
    with torch.no_grad():
        layer.alpha_hat.fill_(alpha)
        layer.beta_hat.fill_(beta)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    x = sample((2, 4, 5, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(x)
        assert not y.requires_grad
        with torch.no_grad():
            torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    ref = ref_eval(x, layer.running_mean, layer.running_var, layer.weight.detach(), layer.bias.detach(), layer.eps, alpha, beta)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    if alpha == beta == 0.0:
        bn = nn.BatchNorm2d(4)
        bn.load_state_dict(layer.state_dict(), strict=False)
        assert torch.equal(y, bn.eval()(x))


def test_eval_gradient_flows_through_the_sample_statistics():
    layer = trained_layer().eval().set_mode("fixed", alpha=0.4, beta=0.7)
    x = sample((2, 6, 4, 4)).double().requires_grad_(True)
    layer.double()
    g = torch.randn(x.shape, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    ref = ref_eval(xr, layer.running_mean, layer.running_var, layer.weight.detach(), layer.bias.detach(), layer.eps, 0.4, 0.7)
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-9)
    assert layer.alpha_hat.grad is not None and layer.alpha_hat.grad == 0  # used, but constant in eval


def test_alpha_beta_one_is_instance_normalisation():
    layer = trained_layer().eval().set_mode("fixed", alpha=1.0, beta=1.0)
    x = sample((2, 6, 7, 5))
    ref = F.instance_norm(x, weight=layer.weight, bias=layer.bias, eps=layer.eps)
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)


def test_ema_is_batchnorm_inference_exactly():
    layer = trained_layer()
    bn = nn.BatchNorm2d(6)
    bn.load_state_dict(layer.state_dict(), strict=False)
    layer.eval().set_mode("ema")
    bn.eval()
    x = sample((3, 6, 5, 5))
    assert torch.equal(layer(x), bn(x))
    assert torch.equal(layer(x.requires_grad_(True)), bn(x))
    # "learned" before any learning (alpha_hat = beta_hat = 0) is BN inference up to rounding
    layer.set_mode("learned")
    torch.testing.assert_close(layer(x), bn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [2, 3, 5])
def test_batch_identity_alpha_beta_one_over_b_with_the_other_samples_as_population(batch):
    """Eqs. 3-4: with alpha = beta = 1/B and mu_E, sigma2_E the exact statistics of the other
    B-1 samples, evaluating sample i alone equals training-mode BN of the whole batch at i."""
    torch.manual_seed(batch)
    x = sample((batch, 4, 6, 5), seed=batch).double()
    layer = trained_layer(4, seed=batch).double()
    train_out = F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
    layer.train()
    layer(x)  # records B = batch; "exact" mode then uses alpha = beta = 1/B
    layer.eval().set_mode("exact")
    assert float(layer.alpha) == pytest.approx(1 / batch)
    for i in range(batch):
        others = torch.cat([x[:i], x[i + 1 :]])
        with torch.no_grad():
            layer.running_mean.copy_(others.mean(dim=(0, 2, 3)))
            layer.running_var.copy_(others.var(dim=(0, 2, 3), unbiased=False))
        torch.testing.assert_close(layer(x[i : i + 1]), train_out[i : i + 1], rtol=1e-10, atol=1e-10)


def test_rule_and_exact_use_the_recorded_batch_and_the_override():
    layer = EvalNorm2d(3, momentum=0.5)
    layer.eval().set_mode("rule")
    with pytest.warns(UserWarning, match="never trained"):
        assert float(layer.alpha) == 0.0  # B unknown: BN inference, with a warning
    layer.train()
    layer(sample((4, 3, 5, 5)))
    assert layer.norm_batch_size.item() == 4.0  # first batch: taken as is
    layer(sample((2, 3, 5, 5)))
    assert layer.norm_batch_size.item() == pytest.approx(3.0)  # then a running average (momentum 0.5)
    layer.eval()
    assert float(layer.alpha) == pytest.approx(1 / 9) and float(layer.beta) == pytest.approx(1 / 9)
    layer.set_mode("exact")
    assert float(layer.alpha) == pytest.approx(1 / 3)
    layer.set_mode("rule", batch_size=2)
    assert float(layer.alpha) == pytest.approx(1 / 4)
    x = sample((2, 3, 4, 4))
    ref = ref_eval(x, layer.running_mean, layer.running_var, layer.weight.detach(), layer.bias.detach(), layer.eps, 0.25, 0.25)
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    layer.set_mode("learned")
    assert float(layer.alpha) == 0.0


def test_modes_and_errors():
    layer = EvalNorm2d(3)
    for mode in MODES:
        kwargs = {"alpha": 0.5} if mode == "fixed" else {}
        assert layer.set_mode(mode, **kwargs).mode == mode
    with pytest.raises(ValueError, match="accepted: learned, rule, exact, fixed, ema"):
        layer.set_mode("batch")
    with pytest.raises(ValueError, match="needs alpha="):
        layer.set_mode("fixed")
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        layer.set_mode("fixed", alpha=1.5)
    with pytest.raises(ValueError, match="only used by mode 'fixed'"):
        layer.set_mode("rule", alpha=0.1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        layer.set_mode("rule", batch_size=0.5)
    with pytest.raises(ValueError, match="track_running_stats"):
        EvalNorm2d(3, track_running_stats=False)
    layer.set_mode("fixed", alpha=0.2)
    assert float(layer.beta) == pytest.approx(0.2)  # beta defaults to alpha


def test_alpha_beta_are_read_only_and_kept_in_the_unit_interval():
    layer = EvalNorm2d(3)
    with pytest.raises(AttributeError):
        layer.alpha = torch.tensor(0.5)
    with pytest.raises(AttributeError):
        layer.beta = 0.5
    # a huge step pushes the raw parameters outside [0, 1]; the step hook projects them back
    attach_projection_hook(layer)
    opt = torch.optim.SGD([layer.alpha_hat, layer.beta_hat], lr=1e3)
    layer.alpha_hat.grad = torch.tensor(-1.0)
    layer.beta_hat.grad = torch.tensor(1.0)
    opt.step()
    assert layer.alpha_hat.item() == 1.0 and layer.beta_hat.item() == 0.0
    # set by hand outside the interval: the value in use is clamped, gradient still flows
    with torch.no_grad():
        layer.alpha_hat.fill_(1.7)
    assert float(layer.alpha) == 1.0
    layer.alpha_hat.grad = layer.beta_hat.grad = None
    layer.train()
    layer(sample((2, 3, 4, 4)))
    layer.aux_loss.backward()
    assert layer.alpha_hat.grad.abs() > 0 and layer.beta_hat.grad.abs() > 0  # not stuck at the bounds
    assert d2_bnstats.EvalNorm2d is EvalNorm2d


def _step_up(params, lr=1e3):
    """One SGD step that moves every parameter up by ``lr``."""
    for p in params:
        p.grad = torch.full_like(p, -1.0)
    torch.optim.SGD(params, lr=lr).step()


def test_projection_hook_is_per_model_idempotent_removable_and_holds_the_model_weakly():
    a, b = nn.Sequential(EvalNorm2d(3)), nn.Sequential(EvalNorm2d(3))
    _step_up([a[0].alpha_hat])
    assert a[0].alpha_hat.item() == 1e3  # building a layer installs no projection
    hook = attach_projection_hook(a)
    assert attach_projection_hook(a) is hook
    _step_up([a[0].alpha_hat, b[0].alpha_hat])
    assert a[0].alpha_hat.item() == 1.0 and b[0].alpha_hat.item() == 1e3  # only the model's layers
    with torch.no_grad():
        a[0].beta_hat.fill_(5.0)
    _step_up([a[0].alpha_hat])
    assert a[0].alpha_hat.item() == 1.0 and a[0].beta_hat.item() == 5.0  # only what the optimizer holds
    a.append(EvalNorm2d(3))  # layers added after attaching are covered
    _step_up([a[1].beta_hat])
    assert a[1].beta_hat.item() == 1.0
    hook.remove()
    _step_up([a[0].alpha_hat])
    assert a[0].alpha_hat.item() == 1e3 + 1
    again = attach_projection_hook(a)
    assert again is not hook
    _step_up([a[0].alpha_hat])
    assert a[0].alpha_hat.item() == 1.0
    model = weakref.ref(a)
    del a
    gc.collect()
    assert model() is None and again.model is None  # the hook does not keep the model alive
    _step_up([b[0].alpha_hat])
    assert b[0].alpha_hat.item() == 2e3


# ---------------------------------------------------------- a plain PyTorch loop, and copies of a model
def _plain_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), EvalNorm2d(4, aux_samples=0), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _plain_steps(net, optimizer, steps, start=0, with_aux=True, clamp=False):
    for step in range(start, start + steps):
        loss = net(sample((3, 3, 5, 5), seed=step)).square().mean()
        if with_aux:
            loss = loss + net[1].aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if clamp:  # the reference: projected gradient descent written out
            with torch.no_grad():
                net[1].alpha_hat.clamp_(0.0, 1.0), net[1].beta_hat.clamp_(0.0, 1.0)


def test_in_a_plain_loop_and_in_a_copy_alpha_beta_are_learned_and_projected():
    import warnings

    # a large learning rate for alpha_hat, beta_hat: the raw steps leave [0, 1]
    def sgd(net):
        return torch.optim.SGD([{"params": [p for n, p in net.named_parameters() if "_hat" not in n]},
                                {"params": [net[1].alpha_hat, net[1].beta_hat], "lr": 50.0}], lr=0.01)

    reference = _plain_net()
    ref_opt = sgd(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a loop that adds L_aux is not warned
        _plain_steps(reference, ref_opt, 8, clamp=True)
    net = _plain_net()  # no hook attached to it: the layer's own projection
    opt = sgd(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _plain_steps(net, opt, 4)
    copied = copy.deepcopy(net)  # trained on with an optimizer of its own
    copy_opt = sgd(copied)
    copy_opt.load_state_dict(opt.state_dict())
    _plain_steps(copied, copy_opt, 4, start=4)
    for name in ("alpha_hat", "beta_hat"):
        value = getattr(copied[1], name)
        assert 0.0 <= value.item() <= 1.0
        assert torch.equal(value, getattr(reference[1], name)), name
    assert {getattr(reference[1], n).item() for n in ("alpha_hat", "beta_hat")} & {0.0, 1.0}  # a bound was hit


def test_a_loop_that_leaves_out_the_aux_loss_is_told_at_the_next_training_forward():
    net = _plain_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    _plain_steps(net, opt, 1, with_aux=False)
    with pytest.warns(RuntimeWarning, match="attach_aux_loss_hook"):
        _plain_steps(net, opt, 1, start=1, with_aux=False)
    assert net[1].alpha_hat.item() == 0.0 and net[1].beta_hat.item() == 0.0  # not learned, as it says
    # a forward whose output is not back-propagated (a validation loss in training mode) is not a step
    other = _plain_net()
    with torch.no_grad():
        other(sample((3, 3, 5, 5)))
    other(sample((3, 3, 5, 5)))
    _plain_steps(other, torch.optim.SGD(other.parameters(), lr=0.01), 2)  # with L_aux: silent
    # learn=False: no L_aux, nothing to tell
    quiet = nn.Sequential(nn.Conv2d(3, 4, 3), EvalNorm2d(4, learn=False))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(2):
            quiet(sample((2, 3, 5, 5), seed=step)).sum().backward()


# ------------------------------------------------------------------------------------ the aux loss
def test_aux_loss_value_and_gradient_equal_eq9():
    layer = trained_layer(5, aux_samples=0)
    with torch.no_grad():
        layer.alpha_hat.fill_(0.3)
        layer.beta_hat.fill_(0.45)
    mu_e, var_e = layer.running_mean.clone(), layer.running_var.clone()
    x = sample((3, 5, 6, 4))
    layer.train()
    layer(x)
    alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(0.45, dtype=torch.float64, requires_grad=True)
    ref = ref_aux_loss(x, mu_e, var_e, alpha, beta, layer.eps)  # statistics before this batch's update
    ref.backward()
    torch.testing.assert_close(layer.aux_loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    layer.aux_loss.backward()
    torch.testing.assert_close(layer.alpha_hat.grad.double(), alpha.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.beta_hat.grad.double(), beta.grad, rtol=1e-4, atol=1e-6)


def test_l1_of_affine_matches_autograd_of_abs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 6, generator=g)
    a = torch.randn(4, 3, generator=g, requires_grad=True)
    b = torch.randn(4, 3, generator=g, requires_grad=True)
    loss = l1_of_affine(x, a, b)
    loss.backward()
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    ref = (x * a2[:, :, None, None] + b2[:, :, None, None]).abs().mean()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


@pytest.mark.parametrize(
    "shape, budget, cycle",
    [((2, 3, 8, 4), 16, 4), ((12, 3, 2, 2), 16, 3)],
    ids=["rows-of-large-maps", "samples-of-small-maps"],
)
def test_aux_subset_cycles_over_all_values(shape, budget, cycle):
    """L_aux on a subset of at most ``budget`` values per channel; over one cycle of offsets
    every value is used once, so the mean over the cycle equals the full L_aux."""
    x = sample(shape)
    full = trained_layer(3, aux_samples=0)
    sub = trained_layer(3, aux_samples=budget)
    full.momentum = sub.momentum = 0.0  # keep mu_E, sigma2_E fixed over the steps
    full(x)
    seen = torch.zeros(shape)
    losses = []
    for _ in range(cycle):
        view, rows = sub._aux_subset(seen)  # a view of its input: mark what this step uses
        assert view.shape[0] * view[0, 0].numel() == budget
        view += 1
        sub(x)
        losses.append(sub.aux_loss.detach())
    assert torch.all(seen == 1)
    torch.testing.assert_close(torch.stack(losses).mean(), full.aux_loss.detach(), rtol=1e-5, atol=1e-6)


def test_alpha_beta_learn_toward_the_minimum_of_the_aux_loss():
    """A stream whose train/test gap is known: samples of 2 with per-sample channel offsets and
    scales. SGD on L_aux alone must end near the (alpha, beta) minimising L_aux over a grid
    evaluated with the plain reference, and well below the loss at the start (BN inference)."""
    g = torch.Generator().manual_seed(0)

    def batch():
        n, c = 2, 4
        return torch.randn(n, c, 6, 6, generator=g) * (0.5 + torch.rand(n, c, 1, 1, generator=g)) + 1.5 * torch.randn(
            n, c, 1, 1, generator=g
        )

    layer = EvalNorm2d(4, momentum=None, aux_samples=0)
    layer.train()
    with torch.no_grad():  # population statistics first (cumulative average), as after training
        for _ in range(200):
            layer(batch())
    layer.momentum = 0.0
    held_out = torch.stack([batch() for _ in range(20)]).double()  # (K, 2, C, H, W)
    mu_e, var_e = layer.running_mean.double(), layer.running_var.double()

    def mean_ref_loss(a, b):  # eq. 9 averaged over the held-out batches, plainly (vectorised over K)
        x = held_out
        mu_b = x.mean(dim=(1, 3, 4), keepdim=True)
        var_b = x.var(dim=(1, 3, 4), unbiased=False, keepdim=True)
        mu_i = x.mean(dim=(3, 4), keepdim=True)
        var_i = x.var(dim=(3, 4), unbiased=False, keepdim=True)
        m, v = mu_e[:, None, None], var_e[:, None, None]
        mu_hat = a * mu_i + (1 - a) * m
        var_hat = b * var_i + (1 - b) * v + b * (1 - b) * (mu_i - m) ** 2
        z_b = (x - mu_b) / torch.sqrt(var_b + layer.eps)
        return ((z_b - (x - mu_hat) / torch.sqrt(var_hat + layer.eps)).abs().mean()).item()

    assert mean_ref_loss(0.3, 0.4) == pytest.approx(
        sum(ref_aux_loss(x, mu_e, var_e, 0.3, 0.4, layer.eps).item() for x in held_out) / len(held_out)
    )
    grid = torch.linspace(0, 1, 21).tolist()
    values = torch.tensor([[mean_ref_loss(a, b) for b in grid] for a in grid])
    best = divmod(int(values.argmin()), len(grid))
    best_alpha, best_beta, best_loss = grid[best[0]], grid[best[1]], values.min().item()
    assert 0.1 < best_alpha < 0.9 and 0.1 < best_beta < 0.9  # the gap is real: neither BN nor IN

    attach_projection_hook(layer)
    opt = torch.optim.SGD([layer.alpha_hat, layer.beta_hat], lr=0.05, momentum=0.9)
    for it in range(400):
        for group in opt.param_groups:
            group["lr"] = 0.05 * (1 - it / 400)
        layer(batch())
        opt.zero_grad()
        layer.aux_loss.backward()
        opt.step()
    learned = (layer.alpha_hat.item(), layer.beta_hat.item())
    assert abs(learned[0] - best_alpha) < 0.1 and abs(learned[1] - best_beta) < 0.1, (learned, best_alpha, best_beta)
    assert mean_ref_loss(*learned) < values[0, 0].item() * 0.8
    assert mean_ref_loss(*learned) < best_loss * 1.02


# ------------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("mode", MODES)
def test_empty_input_in_training_and_evaluation_leaves_state_untouched(mode):
    layer = trained_layer(4)
    kwargs = {"alpha": 0.5} if mode == "fixed" else {}
    layer.set_mode(mode, **kwargs)
    state = copy.deepcopy(layer.state_dict())
    for training in (True, False):
        layer.train(training)
        x = torch.zeros(0, 4, 7, 7, requires_grad=True)
        y = layer(x)
        assert y.shape == (0, 4, 7, 7)
        loss = y.sum() + (layer.aux_loss if training else 0)
        loss.backward()
        assert x.grad.shape == x.shape
        for name in ("weight", "bias", "alpha_hat", "beta_hat"):
            p = getattr(layer, name)
            assert p.grad is not None and torch.all(p.grad == 0), (training, name)
            p.grad = None
        for k, v in layer.state_dict().items():
            assert torch.equal(v, state[k]), (training, k)


def test_batch_of_one_and_one_by_one_maps():
    layer = trained_layer(4)
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(layer.state_dict(), strict=False)
    x = sample((1, 4, 5, 5))
    assert torch.equal(layer(x), bn(x))  # B = 1: BN over the sample's positions
    assert layer.norm_batch_size.item() == 1.0 and torch.isfinite(layer.aux_loss)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 4, 1, 1))  # as nn.BatchNorm2d
    x = sample((3, 4, 1, 1))  # 1x1 maps: sigma2_i = 0
    layer(x)
    assert torch.isfinite(layer.aux_loss)
    layer.aux_loss.backward()
    assert torch.isfinite(layer.alpha_hat.grad) and torch.isfinite(layer.beta_hat.grad)
    layer.eval()
    mean, var = per_sample_moments(x)
    assert torch.all(var == 0) and torch.equal(mean, x[:, :, 0, 0])
    for alpha in (0.0, 0.3, 1.0):  # alpha = beta = 1: instance norm of one value, i.e. the bias
        layer.set_mode("fixed", alpha=alpha)
        y = layer(x)
        ref = ref_eval(x, layer.running_mean, layer.running_var, layer.weight.detach(), layer.bias.detach(), layer.eps, alpha, alpha)
        assert torch.isfinite(y).all()
        # sigma2_hat = 0 at alpha = 1: BN's fused kernel scales float32 rounding by 1/sqrt(eps) ~ 316
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    layer = trained_layer(4)
    x = sample((2, 4, 8, 8))
    layer.train()
    y = layer(x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(layer.aux_loss)
    assert layer.aux_loss.dtype == torch.float32
    layer.aux_loss.backward()
    assert torch.isfinite(layer.alpha_hat.grad)
    layer.eval()
    for mode, kwargs in (("fixed", {"alpha": 0.3, "beta": 0.5}), ("rule", {}), ("ema", {}), ("learned", {})):
        layer.set_mode(mode, **kwargs)
        y = layer(x.to(dtype))
        assert y.dtype == dtype, mode
        torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05)


def test_per_sample_moments_are_accurate():
    x = sample((3, 5, 17, 13), offset=4.0) * 3
    mean, var = per_sample_moments(x)
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean((2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), xd.var((2, 3), unbiased=False), rtol=1e-4, atol=1e-5)
    mean, var = per_sample_moments(x.half())
    assert mean.dtype == torch.float32
    torch.testing.assert_close(var.double(), xd.var((2, 3), unbiased=False), rtol=2e-2, atol=2e-2)


def test_during_onnx_export_the_moments_take_no_op_that_onnx_lacks(monkeypatch):
    """torch's fused BN statistics kernel has no ONNX operator: during an export a small CPU input takes
    the shifted sums, as accurate (against float64), and inference of any input the plain path (no
    output written in place)."""
    x = sample((2, 4, 5, 5), offset=4.0) * 3
    assert x.numel() <= moments.FUSED_STATISTICS_MAX_NUMEL
    layer = trained_layer(4).eval().set_mode("fixed", alpha=0.5, beta=0.5)
    large = sample((1, 4, 160, 120), offset=4.0)  # above it: the output written into the shifted copy
    with torch.no_grad():
        expected, expected_large = layer(x), layer(large)
    # what torch.onnx.export sets while it traces the model
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)

    def refused(*args, **kwargs):
        raise AssertionError("batch_norm_update_stats called while exporting to ONNX")

    monkeypatch.setattr(torch, "batch_norm_update_stats", refused)
    monkeypatch.setattr(EvalNorm2d, "_eval_in_shifted_copy", refused)
    assert not moments.uses_fused_statistics(x)
    mean, var = per_sample_moments(x)
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean((2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), xd.var((2, 3), unbiased=False), rtol=1e-5, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(large), expected_large, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 4, 6, 5), (1, 4, 160, 120)], ids=["fused-size input", "large input"])
def test_evalnorm_exports_to_onnx_with_torch_operators_only(tmp_path, shape):
    """An EvalNorm layer (mode fixed) exports with torch's own ONNX translations, no custom symbolic
    registered (torch refuses aten::batch_norm_update_stats, which small CPU inputs use outside an
    export); where onnxruntime is installed, the file computes what the layer does."""
    onnx = pytest.importorskip("onnx", reason="ONNX export needs the 'onnx' package")
    layer = trained_layer(4).eval().set_mode("fixed", alpha=0.5, beta=0.25)
    x = sample(shape, offset=4.0)
    path = str(tmp_path / "evalnorm.onnx")
    kwargs = {"opset_version": 17}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    with torch.no_grad():
        torch.onnx.export(layer, (x,), path, **kwargs)
        expected = layer(x)
    model = onnx.load(path)
    onnx.checker.check_model(model)
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ checkpoints
def test_state_dict_round_trip_and_bn_checkpoints_in_both_directions():
    from detectron2.layers import FrozenBatchNorm2d

    layer = trained_layer(4, mode="rule")
    layer.train()
    layer(sample((2, 4, 5, 5)))
    with torch.no_grad():
        layer.alpha_hat.fill_(0.3)
        layer.beta_hat.fill_(0.2)
    sd = layer.state_dict()
    assert set(sd) == {
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked", "alpha_hat", "beta_hat", "norm_batch_size",
        "_extra_state",
    }
    fresh = EvalNorm2d(4, mode="rule")
    fresh.load_state_dict(sd)  # strict
    x = sample((2, 4, 5, 5), seed=7)
    for mode in ("rule", "learned"):
        layer.eval().set_mode(mode)
        fresh.eval().set_mode(mode)
        assert torch.equal(layer(x), fresh(x))

    # EvalNorm -> BN / FrozenBN: the BN state loads, EvalNorm's own keys are unexpected
    bn = nn.BatchNorm2d(4)
    result = bn.load_state_dict(sd, strict=False)
    assert sorted(result.unexpected_keys) == ["_extra_state", "alpha_hat", "beta_hat", "norm_batch_size"]
    assert not result.missing_keys
    assert torch.equal(bn.running_var, layer.running_var) and torch.equal(bn.weight, layer.weight)
    frozen = FrozenBatchNorm2d(4)
    result = frozen.load_state_dict(sd, strict=False)
    assert not result.missing_keys and torch.equal(frozen.running_mean, layer.running_mean)

    # BN / FrozenBN / Caffe2-style (weight and bias only) -> EvalNorm: only alpha_hat, beta_hat missing
    bn.eval()
    frozen_sd = FrozenBatchNorm2d.convert_frozen_batchnorm(copy.deepcopy(bn)).state_dict()
    c2 = {"weight": bn.weight.detach().clone(), "bias": bn.bias.detach().clone()}
    for source in (bn.state_dict(), frozen_sd, c2):
        target = EvalNorm2d(4)
        result = target.load_state_dict(dict(source), strict=False)
        assert sorted(result.missing_keys) == ["alpha_hat", "beta_hat"], source.keys()
        assert not result.unexpected_keys
        assert target.recorded_batch_size is None and target.alpha_hat.item() == 0.0
        target.eval().set_mode("ema")
        if source is c2:  # folded BN: identity statistics, as FrozenBatchNorm2d
            assert torch.equal(target.running_mean, torch.zeros(4)) and torch.equal(target.running_var, torch.ones(4))
        else:
            assert torch.equal(target(x), bn(x))


def test_set_evalnorm_mode_and_state_on_a_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), EvalNorm2d(4), nn.Sequential(EvalNorm2d(4)), nn.BatchNorm2d(4))
    assert set_evalnorm_mode(model, "fixed", alpha=0.2, beta=0.4) == 2
    rows = evalnorm_state(model)
    assert [r["layer"] for r in rows] == ["1", "2.0"]
    assert all(r["mode"] == "fixed" and r["alpha"] == pytest.approx(0.2) and r["beta"] == pytest.approx(0.4) for r in rows)
    assert d2_bnstats.set_evalnorm_mode(model, "rule", batch_size=4) == 2
    assert all(r["alpha"] == pytest.approx(1 / 16) for r in evalnorm_state(model))
    assert set_evalnorm_mode(nn.Conv2d(1, 1, 1), "ema") == 0
    with pytest.raises(ValueError, match="accepted"):
        set_evalnorm_mode(model, "EMA")


def test_aux_hook_sums_layers_and_the_calls_of_a_shared_layer():
    shared = EvalNorm2d(3, aux_samples=0, momentum=0.0)  # statistics fixed: passes are comparable
    other = EvalNorm2d(3, aux_samples=0, momentum=0.0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.other = shared, other

        def forward(self, xs):
            outs = [self.shared(x) for x in xs] + [self.other(xs[0])]
            return {"loss_task": sum(o.mean() for o in outs)}

    net = Net()
    attach_aux_loss_hook(net, weight=0.5)
    xs = [sample((2, 3, 4, 4), seed=s) for s in range(3)]
    out = net(xs)
    assert out["loss_evalnorm"].requires_grad
    separate = []
    for layer, x in [(shared, xs[0]), (shared, xs[1]), (shared, xs[2]), (other, xs[0])]:
        layer(x)  # outside the model's forward a layer keeps only its latest loss
        separate.append(layer.aux_loss.detach())
    torch.testing.assert_close(out["loss_evalnorm"].detach(), 0.5 * torch.stack(separate).sum())
    assert torch.equal(shared.aux_loss.detach(), separate[2])
    out["loss_evalnorm"].backward()
    assert shared.alpha_hat.grad.abs() > 0 and other.alpha_hat.grad.abs() > 0
    net.eval()
    assert "loss_evalnorm" not in net(xs)
    net.train()
    with torch.no_grad():
        assert "loss_evalnorm" not in net(xs)


def test_checkpoint_version_tells_the_own_format_from_other_files():
    layer = trained_layer(4)
    layer(sample((2, 4, 5, 5)))
    sd = layer.state_dict()
    del sd["norm_batch_size"]
    result = EvalNorm2d(4).load_state_dict(sd, strict=False)  # own format: a missing key is reported
    assert result.missing_keys == ["norm_batch_size"] and not result.unexpected_keys
    fresh = EvalNorm2d(4)
    result = fresh.load_state_dict(dict(sd), strict=False)  # no version (metadata dropped): completed
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.recorded_batch_size is None and torch.equal(fresh.running_var, layer.running_var)


def _aux_losses(layer, batches):
    out = []
    for x in batches:
        layer(x)
        out.append(layer.aux_loss.detach().clone())
    return out


def _serialized(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_the_aux_subset_step_is_part_of_the_checkpoint():
    """A layer restored from a checkpoint after k steps computes L_aux on the same values as the layer
    that went on: the subset offset (k mod 4 here) is saved and loaded with the state."""
    budget, cycle, steps = 16, 4, 3  # 8 rows of maps 4 wide, 2 samples: every 4th row (16 values)
    batches = [sample((2, 3, 8, 4), seed=s) for s in range(steps + cycle)]
    layer = trained_layer(3, aux_samples=budget)
    _aux_losses(layer, batches[:steps])
    state = _serialized(layer.state_dict())
    assert state._metadata[""]["version"] == EvalNorm2d._version == 5
    assert state["_extra_state"].dtype == torch.int64 and state["_extra_state"].device.type == "cpu"
    resumed = trained_layer(3, seed=5, aux_samples=budget)
    assert not resumed.load_state_dict(state).missing_keys  # strict
    expected = _aux_losses(layer, batches[steps:])
    assert all(torch.equal(a, b) for a, b in zip(_aux_losses(resumed, batches[steps:]), expected))
    # the same state with the step reset (a layer restarted from 0): other values, other losses
    restarted = trained_layer(3, aux_samples=budget)
    restarted.load_state_dict({**state, "_extra_state": torch.tensor(0)})
    losses = _aux_losses(restarted, batches[steps:])
    assert not all(torch.equal(a, b) for a, b in zip(losses, expected))


def test_a_version_4_state_dict_loads_with_the_step_at_zero():
    """Version-4 files (before the step was saved) load strictly, the L_aux subsets starting again from
    the first offset; files of older versions too, as before."""
    budget = 16
    x = sample((2, 3, 8, 4))
    layer = trained_layer(3, aux_samples=budget)
    for _ in range(3):
        layer(x)
    sd = layer.state_dict()
    del sd["_extra_state"]
    sd._metadata[""]["version"] = 4
    target = trained_layer(3, aux_samples=budget)
    target.set_extra_state(torch.tensor(2))
    result = target.load_state_dict(sd)  # strict: no missing key
    assert not result.missing_keys and not result.unexpected_keys
    fresh = trained_layer(3, aux_samples=budget)
    seen = torch.zeros(2, 3, 8, 4)
    view, _ = target._aux_subset(seen)
    view += 1
    reference, _ = fresh._aux_subset(torch.zeros(2, 3, 8, 4))
    assert torch.equal(seen[:, :, 0::4], torch.ones(2, 3, 2, 4)) and seen.sum() == reference.numel()
    assert torch.equal(target.get_extra_state(), torch.tensor(0))
    for k, v in sd.items():
        assert torch.equal(target.state_dict()[k], v), k
    # a version-4 file with a missing key still reports it (own format), the step is not reported
    del sd["norm_batch_size"]
    result = trained_layer(3).load_state_dict(sd, strict=False)
    assert result.missing_keys == ["norm_batch_size"]
    # a BN file (version 2): completed as before, step 0
    bn_sd = nn.BatchNorm2d(3).state_dict()
    target.set_extra_state(torch.tensor(5))
    result = target.load_state_dict(bn_sd, strict=False)
    assert sorted(result.missing_keys) == ["alpha_hat", "beta_hat"]
    assert torch.equal(target.get_extra_state(), torch.tensor(0))


# ------------------------------------------------------------------------------------ synchronised
def _sync_worker(rank, world_size, parts, grad_out):
    torch.manual_seed(0)
    layer = trained_layer(3, sync=True, aux_samples=0)
    x = parts[rank].clone().requires_grad_(True)
    y = layer(x)
    (y * grad_out[rank]).sum().backward()
    layer.aux_loss.backward()
    return {
        "y": y.detach(),
        "x_grad": x.grad,
        "w_grad": layer.weight.grad,
        "b_grad": layer.bias.grad,
        "running_mean": layer.running_mean.clone(),
        "running_var": layer.running_var.clone(),
        "num_batches_tracked": layer.num_batches_tracked.clone(),
        "B": layer.norm_batch_size.clone(),
        "alpha_grad": layer.alpha_hat.grad,
    }


@pytest.mark.parametrize(
    "sizes", [(2, 3), pytest.param((2, 0), marks=pytest.mark.slow)], ids=["unequal-batches", "one-rank-empty"]
)
def test_sync_evalnorm_in_two_processes_equals_batchnorm_on_the_union(sizes):
    g = torch.Generator().manual_seed(0)
    parts = [sample((n, 3, 5, 4), seed=10 + i) for i, n in enumerate(sizes)]
    grads = [torch.randn(p.shape, generator=g) for p in parts]
    results = run_distributed(_sync_worker, 2, args=(parts, grads))
    ref = trained_layer(3)
    bn = nn.BatchNorm2d(3)
    bn.load_state_dict(ref.state_dict(), strict=False)
    leaves = [p.clone().requires_grad_(True) for p in parts]
    y = bn(torch.cat(leaves))
    (y * torch.cat(grads)).sum().backward()
    offsets = [0, sizes[0], sum(sizes)]
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["y"], y[offsets[rank] : offsets[rank + 1]].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["x_grad"], leaves[rank].grad, rtol=1e-4, atol=1e-5)
        # every process holds the gradient of its own loss term; their sum is the union's gradient
    torch.testing.assert_close(results[0]["w_grad"] + results[1]["w_grad"], bn.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0]["b_grad"] + results[1]["b_grad"], bn.bias.grad, rtol=1e-4, atol=1e-5)
    for r in results:
        torch.testing.assert_close(r["running_mean"], bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["running_var"], bn.running_var, rtol=1e-5, atol=1e-6)  # unbiased
        assert r["num_batches_tracked"].item() == 1
        assert r["B"].item() == pytest.approx(sum(sizes))  # the global batch
    assert results[0]["alpha_grad"] is not None and results[1]["alpha_grad"] is not None


def test_sync_evalnorm_in_one_process_an_empty_batch_counts_for_nothing():
    layer = trained_layer(3, sync=True, momentum=None)
    state = copy.deepcopy(layer.state_dict())
    layer(torch.zeros(0, 3, 4, 4))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = sample((2, 3, 5, 4))
    layer(x)  # weighted as the first batch: the cumulative average of one batch is that batch
    assert layer.num_batches_tracked.item() == 1
    torch.testing.assert_close(layer.running_mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(layer.running_var, x.var((0, 2, 3), unbiased=True))


def _empty_then_batch_worker(rank, world_size, parts):
    layer = trained_layer(3, sync=True, momentum=None, aux_samples=0)
    before = copy.deepcopy(layer.state_dict())
    layer(torch.zeros(0, 3, 5, 4))  # the global batch is empty
    unchanged = all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    layer(parts[rank])
    return {
        "unchanged": unchanged,
        "num_batches_tracked": layer.num_batches_tracked.item(),
        "running_mean": layer.running_mean.clone(),
        "running_var": layer.running_var.clone(),
        "B": layer.norm_batch_size.item(),
    }


@pytest.mark.slow
def test_sync_evalnorm_an_empty_global_batch_counts_for_nothing_in_two_processes():
    parts = [sample((2, 3, 5, 4), seed=20), sample((1, 3, 5, 4), seed=21)]
    union = torch.cat(parts)
    for r in run_distributed(_empty_then_batch_worker, 2, args=(parts,)):
        assert r["unchanged"] and r["num_batches_tracked"] == 1
        # momentum=None: the batch after the empty one is weighted as the first
        torch.testing.assert_close(r["running_mean"], union.mean((0, 2, 3)))
        torch.testing.assert_close(r["running_var"], union.var((0, 2, 3), unbiased=True))
        assert r["B"] == pytest.approx(3.0)
