"""MABN: the layer against methods.md §2 written out plainly, its step semantics, state, glue and tools."""
import collections
import copy
import io
import logging
import math
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

import d2_bnstats
from d2_bnstats.d2.build import build_model, configure_norm
from d2_bnstats.d2.norms.mabn import CentralizedConv2d, centralize_convs, layer_options, transform
from d2_bnstats.d2.train import load_config
from d2_bnstats.layers.mabn import MABN_BUFFERS, MABN2d, attach_step_hook, end_step
from d2_bnstats.layers.weight_centralization import WeightCentralizedConv2d, centralize, fold_weight_centralization

from .conftest import CPU_BASE, REPO, tiny_opts
from .distributed import run_distributed

MABN_CPU = f"{REPO}/configs/cpu/frcnn_r18_mabn_2img.yaml"
MRCNN_MABN_CPU = f"{REPO}/configs/cpu/mrcnn_r18_mabn_2img.yaml"
EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# the independent reference: methods.md §2, one optimiser step at a time, in float64


def _mean_last(history, current, m):
    """Mean of the last m − 1 committed values and the current one."""
    previous = history[len(history) - (m - 1):] if m > 1 else []
    return torch.stack(previous + [current]).mean(0)


class PlainMABN:
    """χ²/Ψ ring buffers as Python lists, R, t; written from methods.md §2 without the layer's code.

    A step may have several calls (gradient accumulation, shared heads): each call uses the m − 1
    previous steps' entries plus its own statistic; the step's entry is the count-weighted mean of
    its calls' statistics (for one call per step this is exactly methods.md §2).
    """

    def __init__(self, channels, m, warmup, renorm_start, clip, rho, eps=EPS):
        self.m, self.warmup, self.renorm_start, self.clip, self.rho, self.eps = m, warmup, renorm_start, clip, rho, eps
        self.chi2, self.psi = [], []
        self.R = torch.ones(channels, dtype=torch.float64)
        self.t = 0
        self.clipped = 0

    def step(self, calls, gamma, beta):
        """calls: [(x, dy)]; returns [(y, dx)], dgamma, dbeta (γ, b shared by the calls)."""
        t = self.t + 1
        use_sma = t > max(self.m, self.warmup)
        renorm = t > max(self.renorm_start, self.warmup)
        c = lambda v: v[None, :, None, None]  # noqa: E731
        out, chi2s, psis, counts = [], [], [], []
        dgamma = torch.zeros_like(gamma)
        dbeta = torch.zeros_like(beta)
        for x, dy in calls:
            n = x.numel() // x.shape[1]
            chi2 = (x * x).mean(dim=(0, 2, 3))
            S = _mean_last(self.chi2, chi2, self.m) if use_sma else chi2
            sd = torch.sqrt(S + self.eps)
            z = x / c(sd)
            if renorm:
                raw = sd / torch.sqrt(self.R + self.eps)
                r = raw.clamp(1 / self.clip, self.clip)
                self.clipped += int((raw != r).sum())
            else:
                r = torch.ones_like(S)
            y = c(gamma) * c(r) * z + c(beta)
            g = dy * c(gamma) * c(r)
            psi = (g * z).mean(dim=(0, 2, 3))
            P = _mean_last(self.psi, psi, self.m) if use_sma else psi
            dx = (g - z * c(P)) / c(sd)
            dgamma = dgamma + (dy * c(r) * z).sum(dim=(0, 2, 3))
            dbeta = dbeta + dy.sum(dim=(0, 2, 3))
            out.append((y, dx))
            chi2s.append(chi2)
            psis.append(psi)
            counts.append(n)
        total = sum(counts)
        chi2_entry = sum(n * v for n, v in zip(counts, chi2s)) / total
        psi_entry = sum(n * v for n, v in zip(counts, psis)) / total
        S_entry = _mean_last(self.chi2, chi2_entry, self.m) if use_sma else chi2_entry
        self.R = self.rho * self.R + (1 - self.rho) * S_entry
        self.chi2.append(chi2_entry)
        self.psi.append(psi_entry)
        self.t = t
        return out, dgamma, dbeta


def _batch(t, n, channels=4, h=5, w=3, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + t)
    scale = 1.0 + 0.8 * math.sin(1.3 * t)  # the second moment moves, so r leaves 1 and gets clipped
    x = (torch.randn(n, channels, h + t % 3, w, generator=g, dtype=torch.float64) + 0.3) * scale
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, dy


SCHEDULE = dict(m=3, warmup=5, renorm_start=8, clip=1.25, rho=0.9)


def _layer(channels=4, hook=True, **kw):
    """A layer whose steps end with every optimizer step (with ``hook``: the hook a model built by the
    plug-in gets; without: as a plain PyTorch model has it)."""
    s = dict(SCHEDULE, **kw)
    layer = MABN2d(
        channels, eps=EPS, decay=s["rho"], buffer_size=s["m"], warmup_iters=s["warmup"],
        renorm_start=s["renorm_start"], renorm_clip=s["clip"],
    ).double()
    if hook:
        attach_step_hook(layer)
    return layer


def _copy_layer(layer, how):
    """A copy of ``layer`` as a user would make one mid-training."""
    if how == "deepcopy":
        return copy.deepcopy(layer)
    if how in ("torch.save", "pickle"):
        buffer = io.BytesIO()
        if how == "pickle":
            pickle.dump(layer, buffer)
        else:
            torch.save(layer, buffer)
        buffer.seek(0)
        return pickle.load(buffer) if how == "pickle" else torch.load(buffer, weights_only=False)
    fresh = _layer(hook=False)  # "state_dict": a new layer that loads the state
    fresh.load_state_dict(layer.state_dict())
    return fresh


def _run_against_reference(calls_per_step, steps=14, hook=True, copy_at=None, how=None):
    torch.manual_seed(0)
    layer = _layer(hook=hook)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    ref = PlainMABN(4, **SCHEDULE)
    sizes = [2, 1, 3, 2, 1]
    original = layer
    for t in range(1, steps + 1):
        if t == copy_at:  # the copy trains on with its own optimizer; the original stays alive
            layer = _copy_layer(original, how)
            state = opt.state_dict()
            opt = torch.optim.SGD(layer.parameters(), lr=0.05)
            opt.load_state_dict(state)
        calls = [_batch(t, sizes[(t + k) % len(sizes)], seed=k) for k in range(calls_per_step)]
        gamma, beta = layer.weight.detach().clone(), layer.bias.detach().clone()
        expected, dgamma, dbeta = ref.step(calls, gamma, beta)
        opt.zero_grad()
        for (x, dy), (y_ref, dx_ref) in zip(calls, expected):
            x = x.clone().requires_grad_(True)
            y = layer(x)
            y.backward(dy)
            torch.testing.assert_close(y.detach(), y_ref, rtol=1e-10, atol=1e-10, msg=f"y at step {t}")
            torch.testing.assert_close(x.grad, dx_ref, rtol=1e-10, atol=1e-10, msg=f"dx at step {t}")
        torch.testing.assert_close(layer.weight.grad, dgamma, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.bias.grad, dbeta, rtol=1e-10, atol=1e-10)
        assert layer.steps == t - 1  # the step ends with the optimiser step, not with a call
        opt.step()
        assert layer.steps == t and int(layer.num_batches_tracked) == t
        torch.testing.assert_close(layer.running_var, ref.R, rtol=1e-12, atol=1e-12, msg=f"R at step {t}")
        torch.testing.assert_close(layer.chi2_buffer[(t - 1) % 3], ref.chi2[-1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.psi_buffer[(t - 1) % 3], ref.psi[-1], rtol=1e-12, atol=1e-12)
    return ref


def test_forward_backward_and_R_match_the_equations_through_warmup_sma_and_renorm():
    ref = _run_against_reference(calls_per_step=1)
    assert ref.clipped > 0  # the clip of r was exercised, not only r = 1


def test_several_calls_per_step_give_one_entry_per_step():
    # gradient accumulation / a head shared by several inputs: 3 calls per optimiser step
    _run_against_reference(calls_per_step=3)


def test_driven_as_batchnorm_in_a_plain_pytorch_loop_it_matches_the_equations():
    # no attach_step_hook, no end_step: the torch optimizer that holds the parameters ends the steps
    ref = _run_against_reference(calls_per_step=2, hook=False)
    assert ref.clipped > 0


@pytest.mark.parametrize("how", ["deepcopy", "torch.save", "pickle", "state_dict"])
@pytest.mark.parametrize("hook", [True, False], ids=["hooked", "plain"])
def test_a_copy_made_mid_training_trains_on_as_the_equations_say(how, hook):
    # copied after step 6 (in warmup, the ring buffer full), trained on through the SMA and renorm
    # steps: the original's hooks must not be needed by the copy
    ref = _run_against_reference(calls_per_step=2, hook=hook, copy_at=7, how=how)
    assert ref.clipped > 0


def test_a_copy_made_between_backward_and_optimizer_step_ends_that_step():
    layer = _layer(hook=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    _backward(layer)
    copied = copy.deepcopy(layer)  # pending statistics of step 1 in the copy
    opt.step()
    assert layer.steps == 1 and copied.steps == 0 and copied.pending_count > 0  # another optimizer's step
    copy_opt = torch.optim.SGD(copied.parameters(), lr=0.05)
    copy_opt.step()
    assert copied.steps == 1 and not copied.pending_count
    for name, value in layer.named_buffers():  # the step's statistics (deepcopy leaves .grad out)
        assert torch.equal(value, dict(copied.named_buffers())[name]), name


def test_a_loop_without_a_torch_optimizer_that_never_ends_steps_is_told():
    from d2_bnstats.layers.mabn_step import PENDING_CALLS_WARNING

    layer = MABN2d(4).double()
    x, dy = _batch(1, 2)
    with pytest.warns(RuntimeWarning, match=r"end_step\(\)"):
        for _ in range(PENDING_CALLS_WARNING):
            layer(x).backward(dy)
            with torch.no_grad():  # an update that no torch optimizer makes
                layer.weight -= 0.01 * layer.weight.grad
            layer.weight.grad = None
    assert layer.steps == 0
    end_step()
    assert layer.steps == 1


def test_accumulated_micro_batches_record_the_exact_union_statistics():
    layer = _layer()
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    micro = [_batch(1, n, seed=k)[0] for k, n in enumerate((1, 2, 3))]
    for x in micro:
        layer(x.clone().requires_grad_(True)).sum().backward()
    opt.step()
    union = torch.cat([x.permute(1, 0, 2, 3).reshape(4, -1) for x in micro], dim=1)
    torch.testing.assert_close(layer.chi2_buffer[0], (union * union).mean(1), rtol=1e-12, atol=0)
    assert layer.steps == 1


def test_m1_no_warmup_no_renorm_is_batch_rms_norm_and_passes_gradcheck():
    layer = MABN2d(3, buffer_size=1, warmup_iters=0, renorm_start=10**9).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.normal_()
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    dy = torch.randn_like(x)

    def rms_norm(x, w, b):
        s = (x * x).mean(dim=(0, 2, 3), keepdim=True)
        return x / torch.sqrt(s + layer.eps) * w[None, :, None, None] + b[None, :, None, None]

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, layer.weight, layer.bias)]
    rms_norm(*leaves).backward(dy)
    xl = x.clone().requires_grad_(True)
    layer(xl).backward(dy)
    torch.testing.assert_close(xl.grad, leaves[0].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, leaves[1].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, leaves[2].grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, w, b: layer(a), (xl.detach().requires_grad_(True), layer.weight, layer.bias))


# ---------------------------------------------------------------------------------------------
# better than the authors' code


def _trained_layer(steps=4, **kw):
    layer = _layer(**kw)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for t in range(1, steps + 1):
        x, dy = _batch(t, 2)
        opt.zero_grad()
        layer(x).backward(dy)
        opt.step()
    return layer, opt


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_empty_input_changes_nothing_gives_empty_output_and_zero_gradients():
    layer, opt = _trained_layer(steps=6)
    before = _state(layer)
    x = torch.zeros(0, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    opt.zero_grad()
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(layer.weight.grad, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(layer.bias.grad, torch.zeros(4, dtype=torch.float64))
    opt.step()
    _assert_same_state(before, _state(layer))
    assert layer.steps == 6
    # an empty call next to a real one: the step's entry is the real call's alone
    real, dy = _batch(9, 2)
    layer(torch.zeros(0, 4, 3, 3, dtype=torch.float64, requires_grad=True)).sum().backward()
    layer(real).backward(dy)
    opt.step()
    torch.testing.assert_close(layer.chi2_buffer[6 % 3], (real * real).mean(dim=(0, 2, 3)), rtol=1e-12, atol=0)
    layer.eval()
    assert layer(torch.zeros(0, 4, 2, 2, dtype=torch.float64)).shape == (0, 4, 2, 2)
    assert all(torch.isfinite(v).all() for v in layer.state_dict().values() if v.is_floating_point())


def test_a_non_finite_step_does_not_poison_the_buffers_or_R():
    layer, opt = _trained_layer(steps=3)
    R, previous = layer.running_var.clone(), layer.chi2_buffer[2].clone()
    x, dy = _batch(4, 2)
    x[:, 0] = float("inf")
    layer(x).backward(dy)
    opt.step()
    assert layer.chi2_buffer[0, 0] == previous[0] and layer.running_var[0] == R[0]
    assert torch.isfinite(layer.chi2_buffer).all() and torch.isfinite(layer.psi_buffer).all()
    assert (layer.running_var[1:] != R[1:]).all()  # the finite channels were updated


class Block(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm1 = _layer(**kw).float()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.norm2 = _layer(**kw).float()

    def forward(self, x):
        return self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_recomputation_records_each_call_once(use_reentrant):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    plain = Block()
    recomputed = copy.deepcopy(plain)
    attach_step_hook(recomputed)  # a copy is a model of its own: its steps end by its own hook
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, recomputed)]
    for t in range(1, 8):
        x = torch.randn(2, 3, 6, 6, requires_grad=True)
        y1 = plain(x)
        y2 = checkpoint(recomputed, x, use_reentrant=use_reentrant)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
        for y, opt in zip((y1, y2), opts):
            opt.zero_grad()
            y.square().sum().backward()
            opt.step()
        for (name, p1), p2 in zip(plain.named_parameters(), recomputed.parameters()):
            torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-7, msg=name)
    s1, s2 = plain.state_dict(), recomputed.state_dict()
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-6, atol=1e-7, msg=k)
    assert plain.norm1.steps == recomputed.norm1.steps == 7


def _trained_block(steps=5):
    torch.manual_seed(0)
    model = Block()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(2, 3, 6, 6)).square().mean().backward()
        opt.step()
    opt.zero_grad()
    return model, opt


def test_training_mode_forwards_without_backward_change_nothing():
    model, opt = _trained_block()
    before = _state(model)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 3, 6, 6))
    model(torch.randn(1, 3, 6, 6))  # with autograd, never back-propagated
    opt.step()  # an optimiser step without a backward of MABN
    _assert_same_state(before, _state(model))


def test_detectron2_precise_bn_hook_sets_R_to_the_population_second_moment():
    from fvcore.nn.precise_bn import update_bn_stats

    model, _ = _trained_block()
    before = _state(model)
    inputs = {"norm1": [], "norm2": []}
    handles = [
        getattr(model, name).register_forward_pre_hook(lambda m, a, name=name: inputs[name].append(a[0].clone()))
        for name in inputs
    ]
    batches = [torch.randn(n, 3, 6, 6) for n in (2, 1, 3)]
    update_bn_stats(model, batches, num_iters=3)  # what detectron2's PreciseBN hook runs
    for h in handles:
        h.remove()
    for name, xs in inputs.items():
        layer = getattr(model, name)
        flat = torch.cat([x.transpose(0, 1).reshape(4, -1) for x in xs], dim=1).double()
        torch.testing.assert_close(layer.running_var.double(), (flat * flat).mean(1), rtol=1e-5, atol=1e-7)
        assert torch.equal(layer.running_mean, torch.zeros(4))
        assert layer.momentum == pytest.approx(1 - SCHEDULE["rho"]) and layer.steps == 5
    after = _state(model)
    for k in before:
        if not k.endswith(("running_var", "running_mean")):
            assert torch.equal(before[k], after[k]), k


def test_no_host_synchronisation_in_forward_backward_and_step_end(monkeypatch):
    layer, opt = _trained_layer(steps=9)  # past warmup, SMA and renormalisation start
    x, dy = _batch(10, 2)
    x.requires_grad_(True)

    def forbidden(name):
        def f(*args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name}")

        return f

    with monkeypatch.context() as mp:
        for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy"):
            mp.setattr(torch.Tensor, name, forbidden(name))
        layer(x).backward(dy)
        end_step()
    assert layer.steps == 10


def test_resumed_run_matches_an_uninterrupted_one():
    torch.manual_seed(0)
    data = [(torch.randn(n, 3, 6, 6), torch.randn(n, 4, 6, 6)) for n in (2, 1, 3, 2, 1, 2, 2, 1)]

    def step(model, opt, batch):
        x, w = batch
        opt.zero_grad()
        y = model(x)
        (y * w).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        return y.detach(), grads

    def new():
        model = Block(m=3, warmup=4, renorm_start=5)  # steps 5 and 6 start the SMA and the renorm
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    model, opt = new()
    for batch in data[:4]:
        step(model, opt, batch)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)
    uninterrupted = [step(model, opt, b) for b in data[4:]]

    torch.manual_seed(123)  # a different initialisation, overwritten by the checkpoint
    resumed, ropt = new()
    saved.seek(0)
    ckpt = torch.load(saved, weights_only=False)
    resumed.load_state_dict(ckpt["model"])
    ropt.load_state_dict(ckpt["opt"])
    assert resumed.norm1.steps == 4
    for (y1, g1), batch in zip(uninterrupted, data[4:]):
        y2, g2 = step(resumed, ropt, batch)
        assert torch.equal(y1, y2)
        for a, b in zip(g1, g2):
            assert torch.equal(a, b)
    _assert_same_state(_state(model), _state(resumed))


def test_pending_statistics_survive_a_checkpoint_taken_before_the_optimiser_step():
    layer, opt = _trained_layer(steps=2)
    x, dy = _batch(3, 2)
    layer(x).backward(dy)
    copy_ = _layer()
    copy_.load_state_dict(layer.state_dict())
    deep = copy.deepcopy(layer)
    attach_step_hook(deep)
    assert copy_.steps == 2 and copy_._has_pending
    opt.step()  # ends the step of all three (each has its hook, and pending statistics)
    a = _state(layer)
    for other in (copy_, deep):
        b = _state(other)
        for k in a:
            if k not in ("weight", "bias"):  # the optimiser updated only the original's parameters
                assert torch.equal(a[k], b[k]), k
    assert copy_.steps == 3


# ---------------------------------------------------------------------------------------------
# inference, statistics protocols, state loading


def test_inference_is_frozen_bn_with_mean_zero_and_variance_R():
    layer, _ = _trained_layer(steps=9)
    layer.eval()
    x = _batch(11, 3)[0]
    expected = layer.weight[None, :, None, None] * x / torch.sqrt(layer.running_var + EPS)[None, :, None, None]
    expected = expected + layer.bias[None, :, None, None]
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    # detectron2's FREEZE_AT conversion turns it into a FrozenBN that computes exactly the same
    frozen = FrozenBatchNorm2d.convert_frozen_batchnorm(copy.deepcopy(layer))
    assert isinstance(frozen, FrozenBatchNorm2d)
    torch.testing.assert_close(frozen(x), layer(x), rtol=0, atol=0)
    # batch statistics at test: track_running_stats False uses the input's own second moment
    layer.track_running_stats = False
    chi2 = (x * x).mean(dim=(0, 2, 3))
    expected = layer.weight[None, :, None, None] * x / torch.sqrt(chi2 + EPS)[None, :, None, None]
    torch.testing.assert_close(layer(x), expected + layer.bias[None, :, None, None], rtol=1e-12, atol=1e-12)


def test_set_population_statistics_sets_R_to_the_second_moment():
    layer, _ = _trained_layer(steps=3)
    before = _state(layer)
    mean, var = torch.tensor([0.5, -1.0, 0.0, 2.0]), torch.tensor([1.0, 0.25, 3.0, 0.5])
    layer.set_population_statistics(mean, var, torch.tensor(100.0))
    torch.testing.assert_close(layer.running_var, (var + mean**2).double())
    layer.set_population_statistics(mean * 9, var * 9, torch.tensor(0.0))  # saw nothing: unchanged
    torch.testing.assert_close(layer.running_var, (var + mean**2).double())
    for k in before:
        if k != "running_var":
            assert torch.equal(before[k], layer.state_dict()[k]), k
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        layer.set_population_statistics(mean[:2], var[:2], 1)


def test_loading_an_ordinary_bn_state_maps_it_to_mabn(caplog):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(90000)
    bn.eval()
    layer = _layer()
    with caplog.at_level(logging.INFO, logger="d2_bnstats.layers.mabn"):
        result = layer.load_state_dict(bn.state_dict(), strict=True)
    assert not result.missing_keys and "ordinary BN/FrozenBN" in caplog.text
    layer.eval()
    x = _batch(2, 3)[0]
    torch.testing.assert_close(layer(x), bn(x), rtol=1e-10, atol=1e-10)
    assert layer.steps == 0 and torch.equal(layer.running_mean, torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(layer.running_var, bn.running_var + bn.running_mean**2)


def test_changing_the_buffer_size_on_load_restarts_the_schedule(caplog):
    layer, _ = _trained_layer(steps=5)
    bigger = _layer(m=5)
    with caplog.at_level(logging.WARNING, logger="d2_bnstats.layers.mabn"):
        bigger.load_state_dict(layer.state_dict())
    assert "buffer_size=5" in caplog.text
    assert bigger.steps == 0 and torch.equal(bigger.running_var, layer.running_var)
    assert not bigger.chi2_buffer.any()


def test_decay_and_momentum_are_one_value_in_two_conventions():
    layer = MABN2d(4, decay=0.98)
    assert layer.decay == 0.98 and layer.momentum == pytest.approx(0.02)
    layer.momentum = 0.0  # torch's convention: R frozen
    assert layer.decay == 1.0
    layer(torch.randn(2, 4, 3, 3)).sum().backward()
    end_step()
    assert torch.equal(layer.running_var, torch.ones(4)) and layer.steps == 1
    with pytest.raises(ValueError, match="momentum=None"):
        layer.momentum = None
    with pytest.raises(ValueError, match="buffer_size.*>= 1.*renorm_clip must be >= 1"):
        MABN2d(4, buffer_size=0, renorm_clip=0.5)


def test_state_format_is_read_from_the_state_dict_version():
    layer, _ = _trained_layer(steps=5)
    state = layer.state_dict()
    assert state._metadata[""]["version"] == MABN2d._version == 3
    # version 3 without the MABN buffers is an incomplete MABN state, not a BN one: nothing is mapped
    partial = collections.OrderedDict((k, v) for k, v in state.items() if k not in MABN_BUFFERS)
    partial._metadata = state._metadata
    fresh = _layer()
    result = fresh.load_state_dict(partial, strict=False)
    assert sorted(result.missing_keys) == sorted(MABN_BUFFERS)
    assert torch.equal(fresh.weight, layer.weight) and torch.equal(fresh.running_var, layer.running_var)
    # an MABN state written without metadata (a converted checkpoint file): read by its keys
    other = _layer()
    other.load_state_dict({k: v.clone() for k, v in state.items()})
    _assert_same_state(_state(layer), _state(other))
    assert other.steps == 5


# ---------------------------------------------------------------------------------------------
# who ends a step: the model's optimizer-step hook, or end_step


def _backward(layer, t=1):
    x, dy = _batch(t, 2)
    layer(x).backward(dy)


def test_steps_end_with_the_optimizer_that_holds_the_parameters():
    a, b = MABN2d(4).double(), MABN2d(4).double()  # constructing a layer installs nothing
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    _backward(a)
    _backward(b)
    opt_a.step()
    assert a.steps == 1 and b.steps == 0 and b.pending_count > 0  # another model's optimizer
    opt_b.step()
    assert b.steps == 1 and not b.pending_count


def _frozen_backward(layer, t=1):
    x, dy = _batch(t, 2)
    layer(x.requires_grad_(True)).backward(dy)


def test_layers_no_optimizer_updates_end_by_their_models_hook_or_end_step():
    free, hooked = MABN2d(4).double(), MABN2d(4).double()
    for p in (*free.parameters(), *hooked.parameters()):
        p.requires_grad_(False)  # a frozen affine: no optimizer holds γ, b
    handle = attach_step_hook(hooked)
    assert attach_step_hook(hooked) is handle and handle.model is hooked  # one hook per model
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # another part of the model
    _frozen_backward(free)
    _frozen_backward(hooked)
    opt.step()
    assert hooked.steps == 1 and free.steps == 0 and free.pending_count > 0
    end_step(free)  # a loop without a torch optimizer ends the step itself
    assert free.steps == 1 and not free.pending_count
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.attached
    _frozen_backward(hooked, 2)
    opt.step()
    assert hooked.steps == 1
    end_step()  # every layer with pending statistics
    assert hooked.steps == 2
    assert attach_step_hook(hooked) is not handle  # a new hook after removal


def test_the_hook_holds_its_model_weakly():
    import gc
    import weakref

    model = nn.Sequential(MABN2d(3))
    handle = attach_step_hook(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None and handle.model is None
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1).step()  # the orphaned hook does nothing
    attach_step_hook(nn.Sequential(MABN2d(3)))  # and is taken out at the next attach
    assert not handle.attached


def test_the_deprecated_process_wide_hook_ends_every_layer():
    from d2_bnstats.layers.mabn import set_optimizer_step_hook

    layer = MABN2d(4).double()
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # does not hold the layer's parameters
    with pytest.warns(DeprecationWarning):
        set_optimizer_step_hook(True)
    try:
        _backward(layer)
        opt.step()
        assert layer.steps == 1
    finally:
        with pytest.warns(DeprecationWarning):
            set_optimizer_step_hook(False)
    _backward(layer, 2)
    opt.step()
    assert layer.steps == 1


# ---------------------------------------------------------------------------------------------
# detectron2 glue: names, config keys, weight centralisation


def _cfg(path=MABN_CPU, *opts):
    return load_config(path, list(opts))


def test_config_keys_reach_the_layers():
    cfg = _cfg(MABN_CPU, "BNSTATS.MABN.BUFFER_SIZE", "5", "BNSTATS.MABN.WARMUP_ITERS", "7",
               "BNSTATS.MABN.RENORM_START", "9", "BNSTATS.MABN.RENORM_CLIP", "3.0", "BNSTATS.MABN.DECAY", "0.9",
               "BNSTATS.MABN.EPS", "0.001")
    layer = d2_bnstats.get_norm(configure_norm(cfg, "MABN"), 8)
    synced = d2_bnstats.get_norm(configure_norm(cfg, "SyncMABN"), 8)
    assert (layer.buffer_size, layer.warmup_iters, layer.renorm_start, layer.renorm_clip) == (5, 7, 9, 3.0)
    assert (layer.decay, layer.eps, layer.sync, synced.sync) == (0.9, 0.001, False, True)
    assert d2_bnstats.get_norm("MABN", 1).buffer_size == 16  # outside a build: the defaults
    cfg.BNSTATS.MABN.SIMULATED_BATCH = 32
    assert layer_options(cfg, "MABN")["buffer_size"] == 16  # 32 / 2 images per step
    cfg.SOLVER.IMS_PER_BATCH = 4
    assert layer_options(cfg, "SyncMABN")["buffer_size"] == 8
    cfg.BNSTATS.MABN.SIMULATED_BATCH = 30
    with pytest.raises(ValueError, match="SIMULATED_BATCH = 30 must be a multiple"):
        layer_options(cfg, "MABN")
    cfg.BNSTATS.MABN.SIMULATED_BATCH = 0
    cfg.BNSTATS.MABN.DECAY = 1.5
    with pytest.raises(ValueError, match="BNSTATS.MABN.*decay"):
        layer_options(cfg, "MABN")


@pytest.mark.parametrize("key, value, accepted", [
    ("BUFFER_SIZE", 0, "an integer >= 1"), ("SIMULATED_BATCH", -2, "an integer >= 0"), ("EPS", 0.0, "a number > 0"),
    ("RENORM_CLIP", 0.5, "a number >= 1"), ("WEIGHT_CENTRALIZATION", 1, "True or False"),
    ("WC_RAMP_ITERS", -1, "an integer >= 0"), ("WARMUP_ITERS", 2.5, "an integer >= 0"),
])
def test_config_check_names_key_value_and_what_is_accepted(key, value, accepted):
    from d2_bnstats.d2.norms.mabn import check_config

    cfg = _cfg()
    check_config(cfg)
    cfg.BNSTATS.MABN[key] = value
    with pytest.raises(ValueError, match=re.escape(f"BNSTATS.MABN.{key} = {value!r}: expected {accepted}")):
        check_config(cfg)


def test_weight_centralization_needs_a_class_for_conv_subclasses_and_a_filter_dimension():
    from d2_bnstats.layers.weight_centralization import make_weight_centralized

    class OwnConv(nn.Conv2d):
        pass

    with pytest.raises(TypeError, match="pass cls"):
        make_weight_centralized(OwnConv(2, 3, 1))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        centralize(torch.ones(3))
    conv = make_weight_centralized(nn.Conv2d(2, 3, 3))
    assert type(conv) is WeightCentralizedConv2d and conv.weight.mean(dim=(1, 2, 3)).abs().max() < 1e-7


def test_mabn_model_centralises_exactly_the_convs_feeding_mabn_with_unchanged_keys():
    mabn = build_model(_cfg(MRCNN_MABN_CPU))
    norms = {n: m for n, m in mabn.named_modules() if isinstance(m, MABN2d)}
    # stem + 16 block convs + 3 shortcuts; FPN 4 lateral + 4 output; 4 box-head and 2 mask-head convs
    assert len(norms) == 20 + 8 + 4 + 2
    convs = {n: m for n, m in mabn.named_modules() if isinstance(m, nn.Conv2d)}
    for name, conv in convs.items():
        assert isinstance(conv, CentralizedConv2d) == isinstance(getattr(conv, "norm", None), MABN2d), name
        if isinstance(conv, CentralizedConv2d):
            assert conv.weight.mean(dim=(1, 2, 3)).abs().max() < 1e-6, name  # stored centred too
    same = [
        "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN", "MODEL.ROI_BOX_HEAD.NORM", "BN", "MODEL.ROI_MASK_HEAD.NORM", "BN",
    ]
    bn_keys = set(build_model(_cfg(MRCNN_MABN_CPU, *same)).state_dict())
    extra = {k for k in mabn.state_dict() if k.rsplit(".", 1)[-1] in MABN_BUFFERS}
    assert set(mabn.state_dict()) == bn_keys | extra
    off = build_model(_cfg(MRCNN_MABN_CPU, "BNSTATS.MABN.WEIGHT_CENTRALIZATION", "False"))
    assert not any(isinstance(m, WeightCentralizedConv2d) for m in off.modules())
    ramped = build_model(_cfg(MABN_CPU, "BNSTATS.MABN.WC_RAMP_ITERS", "100"))
    convs = [m for m in ramped.modules() if isinstance(m, WeightCentralizedConv2d)]
    assert len(convs) == 32 and all(c.wc_ramp_iters == 100 and c.centralization_factor() == 0.0 for c in convs)


def test_centralised_conv_forward_and_gradient():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), MABN2d(5), nn.ReLU(), nn.Conv2d(5, 2, 1))
    transform(seq, _cfg())  # RetinaNet-style: an nn.Conv2d followed by MABN in a Sequential
    conv = seq[0]
    assert type(conv) is WeightCentralizedConv2d and type(seq[3]) is nn.Conv2d
    with torch.no_grad():
        conv.weight.add_(0.3)  # a weight that is not centred any more (e.g. after Adam)
    x = torch.randn(2, 3, 6, 6)
    w = conv.weight.detach() - conv.weight.detach().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(conv(x), F.conv2d(x, w, conv.bias, padding=1))
    conv(x).square().sum().backward()
    assert conv.weight.grad.sum(dim=(1, 2, 3)).abs().max() < 1e-4  # the gradient is centred as well


def test_folding_weight_centralisation_for_deployment_keeps_inference():
    from detectron2.layers import Conv2d as D2Conv2d

    model = build_model(_cfg(MABN_CPU, "MODEL.FPN.OUT_CHANNELS", "32"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CentralizedConv2d):
                m.weight.add_(0.05)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model.backbone(x)
        assert len(fold_weight_centralization(model)) == 32  # backbone, FPN and box head
        after = model.backbone(x)
    assert not any(isinstance(m, WeightCentralizedConv2d) for m in model.modules())
    assert type(model.backbone.bottom_up.stem.conv1) is D2Conv2d
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-5, atol=1e-5)


def test_retinanet_head_convs_feeding_mabn_are_centralised():
    cfg = _cfg(CPU_BASE, "MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.RETINANET.NORM", "MABN",
               "MODEL.RETINANET.NUM_CLASSES", "10", "MODEL.FPN.OUT_CHANNELS", "32",
               "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone",
               "MODEL.RESNETS.OUT_FEATURES", "['res3', 'res4', 'res5']", "MODEL.FPN.IN_FEATURES", "['res3', 'res4', 'res5']")
    head = build_model(cfg).head
    for subnet in (head.cls_subnet, head.bbox_subnet):
        kinds = [type(m) for m in subnet]
        assert kinds == [WeightCentralizedConv2d, MABN2d, nn.ReLU] * 4
    assert type(head.cls_score) is nn.Conv2d


def test_low_precision_inputs_keep_their_dtype_with_float32_statistics():
    layer = MABN2d(4, buffer_size=2, warmup_iters=0, renorm_start=0)
    reference = copy.deepcopy(layer)
    for t in range(3):
        x = torch.randn(2, 4, 5, 5) * (1 + t)
        dy = torch.randn_like(x)
        xb = x.bfloat16().requires_grad_(True)
        y = layer(xb)
        y.backward(dy.bfloat16())
        xf = xb.detach().float().requires_grad_(True)
        yf = reference(xf)
        yf.backward(dy.bfloat16().float())
        assert y.dtype == xb.grad.dtype == torch.bfloat16 and layer.running_var.dtype == torch.float32
        torch.testing.assert_close(y.float(), yf, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(xb.grad.float(), xf.grad, rtol=2e-2, atol=2e-2)
        end_step()
    torch.testing.assert_close(layer.running_var, reference.running_var, rtol=1e-3, atol=1e-4)


def test_freeze_at_keeps_mabn_inference_and_centralisation():
    opts = ["MODEL.FPN.OUT_CHANNELS", "32"]
    free = build_model(_cfg(MABN_CPU, *opts))
    frozen = build_model(_cfg(MABN_CPU, *opts, "MODEL.BACKBONE.FREEZE_AT", "2"))
    stem = frozen.backbone.bottom_up.stem.conv1
    assert isinstance(stem.norm, FrozenBatchNorm2d) and isinstance(stem, CentralizedConv2d)
    with torch.no_grad():
        for m in free.modules():
            if isinstance(m, MABN2d):
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
            if isinstance(m, CentralizedConv2d):
                m.weight.add_(0.05)  # not centred: only a centralising forward ignores this
    state = free.state_dict()
    frozen.load_state_dict({k: v for k, v in state.items() if k in frozen.state_dict()}, strict=False)
    free.eval(), frozen.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = free.backbone(x), frozen.backbone(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# SyncMABN: 2 real processes (gloo) against one process on the concatenated batch

SYNC_SIZES = [(2, 1), (1, 1), (0, 2), (1, 3), (2, 0), (1, 1)]  # per step, per rank; one rank empty twice


def _sync_data():
    g = torch.Generator().manual_seed(7)
    steps = []
    for t, sizes in enumerate(SYNC_SIZES):
        scale = 1.0 + 0.5 * math.sin(t)
        steps.append([
            ((torch.randn(n, 4, 5, 3, generator=g, dtype=torch.float64) + 0.2) * scale,
             torch.randn(n, 4, 5, 3, generator=g, dtype=torch.float64))
            for n in sizes
        ])
    return steps


def _sync_layer(sync):
    layer = MABN2d(4, buffer_size=2, warmup_iters=1, renorm_start=2, renorm_clip=1.3, decay=0.8, sync=sync).double()
    attach_step_hook(layer)
    return layer


def _sync_worker(rank, world_size, steps):
    import torch.distributed as dist

    layer = _sync_layer(sync=True)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    results = []
    for parts in steps:
        x, dy = parts[rank]
        x = x.clone().requires_grad_(True)
        opt.zero_grad()
        y = layer(x)
        y.backward(dy)
        for p in layer.parameters():  # what DDP does (as a sum: the gradient of the summed losses)
            dist.all_reduce(p.grad)
        results.append((y.detach(), x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()))
        opt.step()
    return results, _state(layer)


@pytest.mark.slow
def test_sync_mabn_in_two_processes_equals_one_process_on_the_concatenated_batch():
    steps = _sync_data()
    per_rank = run_distributed(_sync_worker, 2, args=(steps,))
    layer = _sync_layer(sync=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for t, parts in enumerate(steps):
        x = torch.cat([p[0] for p in parts]).requires_grad_(True)
        opt.zero_grad()
        y = layer(x)
        y.backward(torch.cat([p[1] for p in parts]))
        start = 0
        for rank, (results, _) in enumerate(per_rank):
            y_r, dx_r, dw_r, db_r = results[t]
            n = parts[rank][0].shape[0]
            torch.testing.assert_close(y_r, y.detach()[start : start + n], rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(dx_r, x.grad[start : start + n], rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(dw_r, layer.weight.grad, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(db_r, layer.bias.grad, rtol=1e-9, atol=1e-10)
            start += n
        opt.step()
    single = _state(layer)
    for _, state in per_rank:
        for k in single:
            torch.testing.assert_close(state[k], single[k], rtol=1e-9, atol=1e-10, msg=k)
    assert layer.steps == len(steps)


# ---------------------------------------------------------------------------------------------
# conversion from ordinary BN weights


def _conv_bn_pair(centred: bool):
    torch.manual_seed(0)

    def make(norm):
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), norm(8), nn.ReLU(),
            nn.Conv2d(8, 6, 3, padding=1, bias=False), norm(6), nn.ReLU(),
        )

    source = make(nn.BatchNorm2d)
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.add_(0.03)  # filters with a clear mean, as in ordinary (non-centralised) training
                if centred:
                    m.weight.sub_(m.weight.mean(dim=(1, 2, 3), keepdim=True))
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.momentum = None  # cumulative average: population statistics of the training data
    source.train()
    with torch.no_grad():
        for _ in range(4):
            source(_images(4))
    source.eval()
    target = make(MABN2d)
    centralize_convs(target)
    return source, target


def _images(n, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(n, 3, 8, 8, generator=g) * 2 + 0.5


def test_converting_centred_weights_reproduces_bn_inference_exactly():
    source, target = _conv_bn_pair(centred=True)
    report = d2_bnstats.convert_to_mabn(target, source)
    assert report["converted"] == ["1", "4"] and report["centralized"] == ["0", "3"] and not report["skipped"]
    target.eval()
    x = _images(3, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-5)
    assert all(m.steps == 0 for m in target.modules() if isinstance(m, MABN2d))


def test_conversion_without_weight_centralisation_is_exact():
    source, target = _conv_bn_pair(centred=False)
    target = copy.deepcopy(target)
    for m in target.modules():
        if type(m) is WeightCentralizedConv2d:
            m.__class__ = nn.Conv2d  # what BNSTATS.MABN.WEIGHT_CENTRALIZATION False builds
    report = d2_bnstats.convert_to_mabn(target, source, calibration=[_images(4, seed=5)])
    assert report["converted"] == ["1", "4"] and report["centralized"] == []
    target.eval()
    x = _images(3, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-5)


def test_centralisation_ramp_starts_at_the_original_conv_and_ends_fully_centralised():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False), _layer(5, m=2, warmup=0).float(), nn.ReLU())
    with torch.no_grad():
        seq[0].weight.add_(0.1)
    original = seq[0].weight.detach().clone()
    centralize_convs(seq, ramp_iters=4)
    conv = seq[0]
    assert torch.equal(conv.weight, original)  # stored weights untouched with a ramp
    opt = torch.optim.SGD(seq.parameters(), lr=0.0)
    x = torch.randn(2, 3, 6, 6)
    mean = original.mean(dim=(1, 2, 3), keepdim=True)
    for t in range(7):
        expected = F.conv2d(x, original - min(1.0, t / 4) * mean, padding=1)
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-6, msg=f"step {t}")
        seq(x).sum().backward()
        opt.step()
    copied = copy.deepcopy(seq)  # the link to the MABN layer follows the copy
    assert copied[0].__dict__["_wc_mabn"][0] is copied[1]


def test_centralisation_ramp_effective_weight_schedule_and_folding_only_after_the_ramp():
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _layer(4, m=2, warmup=0).float(), nn.ReLU())
    with torch.no_grad():
        seq[0].weight.add_(0.2)  # filters with a clearly non-zero mean
    original = seq[0].weight.detach().clone()
    mean = original.mean(dim=(1, 2, 3), keepdim=True)
    centred = original - mean  # the fully centralised weight, computed plainly here
    centralize_convs(seq, ramp_iters=3)
    conv = seq[0]
    opt = torch.optim.SGD(seq.parameters(), lr=0.0)  # lr 0: the stored weight stays the original
    x = torch.randn(2, 3, 5, 5)
    for t in range(3):
        assert seq[1].steps == t
        effective = centralize(conv.weight, conv.centralization_factor())
        torch.testing.assert_close(effective, original - (t / 3) * mean, rtol=0, atol=1e-7, msg=f"step {t}")
        with pytest.raises(ValueError, match="ramp"):
            fold_weight_centralization(copy.deepcopy(seq))  # mid-ramp: folding would change the function
        seq(x).sum().backward()
        opt.step()
    assert seq[1].steps == 3 and conv.centralization_factor() == 1.0
    assert torch.equal(centralize(conv.weight, conv.centralization_factor()), centred)  # exactly, after the ramp
    seq.eval()
    with torch.no_grad():
        expected = seq[2](seq[1](F.conv2d(x, centred, conv.bias, padding=1)))
        torch.testing.assert_close(seq(x), expected, rtol=0, atol=0)
        assert fold_weight_centralization(seq) == ["0"]
        assert type(seq[0]) is nn.Conv2d and torch.equal(seq[0].weight, centred)
        torch.testing.assert_close(seq(x), expected, rtol=1e-6, atol=1e-6)


def test_converted_model_with_a_ramp_starts_exactly_at_the_source():
    source, target = _conv_bn_pair(centred=False)
    target = copy.deepcopy(target)
    for conv, norm in ((target[0], target[1]), (target[3], target[4])):
        conv.wc_ramp_iters = 10
        conv.link_mabn(norm)
    report = d2_bnstats.convert_to_mabn(target, source, calibration=[_images(4, seed=5)])
    assert report["centralized"] == []
    target.eval()
    x = _images(3, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-5)


def test_calibrated_conversion_matches_the_source_on_its_calibration_data():
    source, free = _conv_bn_pair(centred=False)
    calibrated = copy.deepcopy(free)
    d2_bnstats.convert_to_mabn(free, source)
    data = [_images(4, seed=s) for s in range(3)]
    d2_bnstats.convert_to_mabn(calibrated, source, calibration=data)
    for m in (free, calibrated):
        m.eval()
    x = torch.cat(data)
    with torch.no_grad():
        ref = source(x)
        error = {name: float((m(x) - ref).norm() / ref.norm()) for name, m in (("free", free), ("cal", calibrated))}
        assert error["cal"] < 0.7 * error["free"], error
        # first layer: the converted output has exactly the source's mean per channel on that data,
        # and R is the second moment of the centralised conv's output
        u = source[0](x)
        y_src = source[1](u)
        w = source[0].weight - source[0].weight.mean(dim=(1, 2, 3), keepdim=True)
        u_c = F.conv2d(x, w, padding=1)
        y_cal = calibrated[1](calibrated[0](x))
        torch.testing.assert_close(y_cal.mean(dim=(0, 2, 3)), y_src.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(calibrated[1].running_var, (u_c * u_c).mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# real detectron2 training loops and the conversion tool


def centralize_convs_of_bn(model):
    return [(n, m, n + ".norm") for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and isinstance(getattr(m, "norm", None), nn.BatchNorm2d)]


def _read_metrics(output_dir):
    import json

    with open(output_dir / "metrics.json") as f:
        return [json.loads(line) for line in f if line.strip()]


def _train(config, tmp_path, max_iter):
    from d2_bnstats.d2.train import argument_parser, main

    # a short schedule: step 3 is past warmup, the SMA start and the renormalisation start
    opts = tiny_opts(tmp_path, max_iter=max_iter, **{
        "BNSTATS.MABN.BUFFER_SIZE": 2, "BNSTATS.MABN.WARMUP_ITERS": 1, "BNSTATS.MABN.RENORM_START": 2,
    })
    main(argument_parser().parse_args(["--config", config] + opts))
    metrics = _read_metrics(tmp_path)
    losses = [m for m in metrics if "total_loss" in m]
    assert losses and all(math.isfinite(v) for m in losses for k, v in m.items() if k.startswith("loss"))
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    steps = {k[: -len(".num_batches_tracked")]: int(v) for k, v in state.items()
             if k.endswith("num_batches_tracked") and k[: -len("num_batches_tracked")] + "chi2_buffer" in state}
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    return metrics, state, steps


def test_faster_rcnn_with_mabn_everywhere_trains_and_evaluates(datasets_root, tmp_path):
    metrics, state, steps = _train(MABN_CPU, tmp_path, max_iter=3)
    assert any("bbox/AP" in m for m in metrics)
    # one step per optimiser step in detectron2's own loop, for every one of the 32 layers
    assert len(steps) == 32 and set(steps.values()) == {3}
    assert not torch.equal(state["backbone.bottom_up.stem.conv1.norm.running_var"], torch.ones(64))


@pytest.mark.slow
def test_mask_rcnn_with_mabn_everywhere_trains_and_evaluates(datasets_root, tmp_path):
    metrics, _, steps = _train(MRCNN_MABN_CPU, tmp_path, max_iter=4)
    assert any("segm/AP" in m for m in metrics)
    mask = {k: v for k, v in steps.items() if "mask_head" in k}
    assert len(mask) == 2 and all(v <= 4 for v in mask.values())  # fewer if a step had no foreground RoI
    assert all(v == 4 for k, v in steps.items() if "mask_head" not in k)


@pytest.mark.slow
def test_convert_tool_turns_a_bn_checkpoint_into_a_close_mabn_start(datasets_root, tmp_path):
    import importlib.util

    from detectron2.checkpoint import DetectionCheckpointer

    bn = ["MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN", "MODEL.ROI_BOX_HEAD.NORM", "BN"]
    source = build_model(_cfg(MABN_CPU, *bn))
    with torch.no_grad():  # non-trivial statistics, as after training
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
        # centred convs: then MABN can reproduce BN exactly and the whole pipeline is checked exactly
        # (with ordinary convs the distance reflects what centralisation removes; see docs/mabn.md)
        for name, conv, _ in centralize_convs_of_bn(source):
            conv.weight.sub_(conv.weight.mean(dim=(1, 2, 3), keepdim=True))
    DetectionCheckpointer(source, save_dir=str(tmp_path)).save("bn")
    spec = importlib.util.spec_from_file_location("convert_to_mabn", f"{REPO}/tools/convert_to_mabn.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "mabn.pth"
    numbers = tool.main([
        "--config", MABN_CPU, "--weights", str(tmp_path / "bn.pth"), "--output", str(out),
        "--calibration-images", "4", "--compare-images", "2", "--eval",
    ] + tiny_opts(tmp_path))
    assert numbers["converted_layers"] == 32 and numbers["centralized_convs"] == 32
    assert max(numbers["feature_distance_eval"].values()) < 1e-4
    assert numbers["converted_eval"]["bbox"]["AP50"] == pytest.approx(numbers["source_eval"]["bbox"]["AP50"], abs=1e-6)
    target = build_model(_cfg(MABN_CPU))
    loaded = target.load_state_dict(torch.load(out, weights_only=False)["model"], strict=False)
    assert not loaded.missing_keys and not loaded.unexpected_keys


@pytest.mark.slow
def test_sync_mabn_trains_in_two_processes_with_ddp(datasets_root, tmp_path):
    import subprocess
    import sys

    opts = tiny_opts(tmp_path, max_iter=3, **{
        "SOLVER.IMS_PER_BATCH": 4, "MODEL.RESNETS.NORM": "SyncMABN", "MODEL.FPN.NORM": "SyncMABN",
        "MODEL.ROI_BOX_HEAD.NORM": "SyncMABN", "BNSTATS.MABN.BUFFER_SIZE": 2, "BNSTATS.MABN.WARMUP_ITERS": 1,
        "BNSTATS.MABN.RENORM_START": 2,
    })
    env = dict(__import__("os").environ, DETECTRON2_DATASETS=datasets_root, PYTHONWARNINGS="ignore", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, f"{REPO}/tools/train_net.py", "--config", MABN_CPU, "--num-gpus", "2"] + opts,
        capture_output=True, text=True, cwd=REPO, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [m for m in _read_metrics(tmp_path) if "total_loss" in m]
    assert losses[-1]["iteration"] == 2 and all(math.isfinite(m["total_loss"]) for m in losses)
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert int(state["backbone.bottom_up.stem.conv1.norm.num_batches_tracked"]) == 3


R50_CONFIGS = [f"{REPO}/configs/{a}_r50_mabn_2img_{s}.yaml" for a in ("frcnn", "mrcnn") for s in ("scratch", "finetune")]


@pytest.mark.parametrize("path", R50_CONFIGS, ids=lambda p: p.rsplit("/", 1)[-1])
def test_r50_mabn_configs_build_with_the_authors_placement(path):
    cfg = load_config(path, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.MODEL.BACKBONE.FREEZE_AT == 0
    model = build_model(cfg)
    norms = [n for n, m in model.named_modules() if isinstance(m, MABN2d)]
    # stem 1 + 16 bottlenecks x 3 + 4 shortcuts; FPN 4 lateral + 4 output; 4 box-head convs; 4 mask-head convs
    assert len(norms) == 53 + 8 + 4 + (4 if cfg.MODEL.MASK_ON else 0)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert not any("rpn" in n for n in norms)
    assert sum(isinstance(m, CentralizedConv2d) for m in model.modules()) == len(norms)


@pytest.mark.slow
def test_r50_mask_rcnn_mabn_config_trains_a_step_at_small_size(datasets_root, tmp_path):
    from d2_bnstats.d2.train import argument_parser, main

    opts = tiny_opts(tmp_path, max_iter=2, **{
        "MODEL.WEIGHTS": "", "MODEL.DEVICE": "cpu", "SOLVER.IMS_PER_BATCH": 2, "MODEL.ROI_HEADS.NUM_CLASSES": 10,
        "INPUT.MIN_SIZE_TRAIN": "(128,)", "INPUT.MAX_SIZE_TRAIN": 128, "INPUT.MIN_SIZE_TEST": 128,
        "INPUT.MAX_SIZE_TEST": 128, "INPUT.MASK_FORMAT": "bitmask", "DATASETS.TEST": "()",
    })
    main(argument_parser().parse_args(["--config", R50_CONFIGS[2]] + opts))
    losses = [m for m in _read_metrics(tmp_path) if "total_loss" in m]
    assert losses and all(math.isfinite(m["total_loss"]) for m in losses)
    # each detectron2 step ended each MABN layer's step exactly once: within the warmup (t <= 2 <
    # min(m, WARMUP_ITERS)) R_t = rho R_{t-1} + (1 - rho) chi2_t from R_0 = 1, with chi2_t the ring
    # buffer's row t - 1, exactly as methods.md section 2 writes it
    cfg = load_config(R50_CONFIGS[2])
    rho, m = cfg.BNSTATS.MABN.DECAY, cfg.BNSTATS.MABN.BUFFER_SIZE
    assert min(m, cfg.BNSTATS.MABN.WARMUP_ITERS) > 2
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    layers = [k[: -len("chi2_buffer")] for k in state if k.endswith("chi2_buffer")]
    assert len(layers) == 53 + 8 + 4 + 4
    for p in layers:
        t = int(state[p + "num_batches_tracked"])
        assert t == 2 or ("mask_head" in p and t <= 2), p  # a step without foreground RoI skips the mask head
        R = torch.ones_like(state[p + "running_var"], dtype=torch.float64)
        for row in range(t):
            R = rho * R + (1 - rho) * state[p + "chi2_buffer"][row].double()
        torch.testing.assert_close(state[p + "running_var"].double(), R, rtol=1e-5, atol=1e-7, msg=p)
        assert not state[p + "chi2_buffer"][t:].any() and not state[p + "pending_count"]
