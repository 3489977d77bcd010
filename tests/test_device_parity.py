"""The device-parity and host-synchronisation harness of tests/test_cuda.py, run where it can run:
on the CPU, a layer in float32 (and under CPU autocast) against the same layer in float64. The
harness must pass torch's own BatchNorm and catch layers that are wrong in a way a device or a
precision can make them wrong; the synchronisation guard must switch the mode exactly around the
guarded layers' forward and backward, with a recording stand-in for torch's CUDA sync debug mode."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.utils.events import EventStorage
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import device_checks as checks
from . import device_parity as dp
from . import sync_guard as sg


# --------------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("shape", sorted(dp.SHAPES))
@pytest.mark.parametrize("variant", sorted(dp.norm_variants(32)))
def test_every_norm_in_float32_matches_float64(variant, shape):
    dp.check_parity(dp.norm_variants(32)[variant], dp.SHAPES[shape], dp.PRECISIONS["float32"], "cpu")


AUTOCAST_CASES = [
    pytest.param(v, p, marks=[pytest.mark.xfail(strict=True, reason=dp.MABN_SCALED_PSI)] if (v, p) in dp.KNOWN_GAPS else [])
    for v in ("BN", "GhostBN(v=3)", "EvalNorm", "MABN(m=2,renorm)", "RoIShuffleBN(K=3)") for p in ("bfloat16", "float16")
]


@pytest.mark.parametrize("variant, precision", AUTOCAST_CASES)
def test_autocast_runs_go_through_the_same_harness(variant, precision):
    """CPU autocast: the rounding of inputs, the GradScaler path and the low-precision tolerances."""
    record = dp.check_parity(dp.norm_variants(32)[variant], dp.SHAPES["rois"], dp.PRECISIONS[precision], "cpu")
    assert {"step3/output/", "step3/grad_input/", "eval/output/no_grad"} <= set(record)


def _below_float64(t: torch.Tensor) -> bool:
    """True in the run under test, False in the float64 reference: the layers below are wrong only
    there, as a layer can be wrong on one device or in one precision."""
    return t.dtype != torch.float64


class BNWrongGradient(nn.BatchNorm2d):
    """BN whose input gradient is 1% too large below float64."""

    def forward(self, x):
        out = super().forward(x)
        return _ScaleGradient.apply(out, 1.01) if _below_float64(x) else out


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


class BNLowPrecisionStatistics(nn.BatchNorm2d):
    """BN whose running variance is kept rounded to bfloat16 below float64 (a low-precision
    accumulation; rounded at the next training forward, before BN reads it)."""

    def forward(self, x):
        if self.training and _below_float64(self.running_var):
            with torch.no_grad():
                self.running_var.copy_(self.running_var.to(torch.bfloat16))
        return super().forward(x)


class BNEvalShift(nn.BatchNorm2d):
    """BN whose eval output is off by 1e-3 of its scale below float64."""

    def forward(self, x):
        out = super().forward(x)
        if self.training or not _below_float64(x):
            return out
        return out + 1e-3 * out.detach().abs().max()


@pytest.mark.parametrize("layer, quantity", [
    (BNWrongGradient, "grad_input"),
    (BNLowPrecisionStatistics, "buffer/running_var"),
    (BNEvalShift, "eval/output"),
])
def test_the_harness_catches_a_wrong_layer(layer, quantity):
    with pytest.raises(AssertionError) as caught:
        dp.check_parity(lambda: layer(32), dp.SHAPES["images"], dp.PRECISIONS["float32"], "cpu")
    assert quantity in str(caught.value)


def test_relative_difference_and_tolerances():
    ref = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    assert dp.relative_difference(ref + torch.tensor([0.0, 0.0, 0.04], dtype=torch.float64), ref) == pytest.approx(0.01)
    assert dp.relative_difference(torch.zeros(2), torch.zeros(2)) == 0.0
    assert dp.relative_difference(torch.tensor([1e-3, 0.0]), torch.zeros(2)) == pytest.approx(1e-3)  # all-zero reference
    assert dp.relative_difference(torch.tensor([float("nan"), 1.0]), torch.ones(2)) != dp.relative_difference(ref, ref)
    assert dp.relative_difference(torch.ones(3), torch.ones(2)) == float("inf")
    assert [dp.kind_of(k) for k in ("step2/grad/weight", "step1/buffer/running_var", "eval/grad_input/")] == ["grad", "buffer", "eval"]
    got = {"step1/buffer/num_batches_tracked": torch.tensor(2), "step1/output/": torch.ones(2)}
    ref = {"step1/buffer/num_batches_tracked": torch.tensor(1), "step1/output/": torch.ones(2)}
    assert dp.parity_failures(got, ref, dp.PRECISIONS["float32"]) == ["step1/buffer/num_batches_tracked: 2 != reference 1"]


def test_the_grad_scaler_run_refuses_a_skipped_step():
    class Overflow(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 1e30  # infinite gradients in float16 once scaled

    with pytest.raises(AssertionError, match="skipped the step"):
        dp.check_parity(lambda: Overflow(32), dp.SHAPES["rois"], dp.PRECISIONS["float16"], "cpu")


def test_same_permutations_repeat_across_runs_and_devices():
    with dp.same_permutations(3):
        a = [torch.randperm(5), torch.randperm(7, device="cpu")]
    with dp.same_permutations(3):
        b = [torch.randperm(5), torch.randperm(7, device="cpu")]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and sorted(a[1].tolist()) == list(range(7))


# --------------------------------------------------------------------------------------------------
# host synchronisation guard (a recording stand-in for torch.cuda.set_sync_debug_mode)


class FakeMode:
    def __init__(self):
        self.mode = "default"
        self.log = []

    def __call__(self, mode):
        assert mode in ("default", "error")
        self.mode = mode

    def probe(self, tag, phase):
        self.log.append((tag, phase, self.mode))


class _Probe(torch.autograd.Function):
    """Identity that records the mode when its forward and its backward run."""

    @staticmethod
    def forward(ctx, x, tag, state):
        ctx.tag, ctx.state = tag, state
        state.probe(tag, "forward")
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        ctx.state.probe(ctx.tag, "backward")
        return g, None, None


class ProbedNorm(nn.BatchNorm2d):
    """BN with probes inside its graph and a side loss kept as an attribute (like EvalNorm's)."""

    def __init__(self, channels, state):
        super().__init__(channels)
        self.state = state

    def forward(self, x):
        out = super().forward(_Probe.apply(x * 1.0, "norm-input", self.state))
        self.aux_loss = _Probe.apply((x * x).mean() * self.weight.sum(), "norm-aux", self.state)
        return _Probe.apply(out, "norm-output", self.state)


class Wrapper(nn.Module):
    """A guarded module around a guarded norm (weight-centralized convs around MABN are so)."""

    def __init__(self, channels, state):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = ProbedNorm(channels, state)
        self.state = state

    def forward(self, x):
        y = self.norm(self.conv(x))
        return _Probe.apply(y, "wrapper-after-norm", self.state)


class Net(nn.Module):
    def __init__(self, state):
        super().__init__()
        self.state = state
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Wrapper(8, state)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.block(_Probe.apply(self.stem(x), "outside-before", self.state))
        y = F.relu_(y)  # in place on a guarded module's output, as detectron2's blocks do
        return _Probe.apply(self.head(y), "outside-after", self.state).sum() + self.block.norm.aux_loss


def test_layer_guard_switches_exactly_around_the_guarded_forward_and_backward():
    state = FakeMode()
    net = Net(state)
    with sg.LayerSyncGuard([net.block, net.block.norm], set_mode=state) as guard:
        net(torch.randn(2, 3, 6, 6)).backward()
        assert state.mode == "default"
    seen = {(tag, phase): mode for tag, phase, mode in state.log}
    for tag in ("norm-input", "norm-aux", "norm-output", "wrapper-after-norm"):
        assert seen[(tag, "forward")] == "error" and seen[(tag, "backward")] == "error", tag
    for tag in ("outside-before", "outside-after"):
        assert seen[(tag, "forward")] == "default" and seen[(tag, "backward")] == "default", tag
    assert guard.forward_calls == 2 and guard.backward_nodes > 0 and guard.nodes_run > 0
    assert "forward" not in vars(net.block) and "forward" not in vars(net.block.norm)  # restored
    assert state.mode == "default"


def test_layer_guard_resets_the_mode_when_a_guarded_forward_raises():
    state = FakeMode()

    class Raising(nn.Module):
        def forward(self, x):
            raise RuntimeError("called a synchronizing CUDA operation")

    layer = Raising()
    with pytest.raises(RuntimeError, match="synchronizing"):
        with sg.LayerSyncGuard([layer], set_mode=state):
            layer(torch.ones(1))
    assert state.mode == "default" and "forward" not in vars(layer)


def test_sync_errors_and_guarded_method_scope_the_mode():
    state = FakeMode()
    with sg.sync_errors(state):
        assert state.mode == "error"
    assert state.mode == "default"
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
    modes = []
    handle = register_optimizer_step_post_hook(lambda *a: modes.append(state.mode))
    try:
        with sg.guarded_method(opt, "step", state):
            opt.step()
        opt.step()
    finally:
        handle.remove()
    assert modes == ["error", "default"] and "step" not in vars(opt) and state.mode == "default"


def test_training_step_of_a_lone_layer_under_the_guard():
    state = FakeMode()
    layer = dp.norm_variants(32)["EvalNorm"]()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with sg.sync_errors(state):
        dp.training_step(layer, torch.randn(2, 32, 4, 4), torch.randn(2, 32, 4, 4), opt)
    assert layer.alpha_hat.grad is not None and state.mode == "default"


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["EvalNorm", "MABN", "GhostBN"])
def test_detectron2_iteration_under_the_layer_guard(norm):
    """The instrumentation of the CUDA test on a real detectron2 model (CPU, recording stand-in):
    the iteration runs (in-place activations after guarded norms, weight-centralized convs around
    MABN, EvalNorm's auxiliary loss), every guarded module ran, their backward nodes ran."""
    state = FakeMode()
    trainer = dp.detectron2_trainer(norm, "cpu")
    with EventStorage(0):
        trainer.run_step()
        guard = sg.guarded_iteration(trainer, set_mode=state)
    modules = sg.norm_modules(trainer.model)
    assert guard.forward_calls >= len(modules) > 0
    assert guard.nodes_run > 0 and state.mode == "default"
    assert all("forward" not in vars(m) for m in modules)


# --------------------------------------------------------------------------------------------------
# the device-generic checks of tests/test_cuda.py, on the CPU


@pytest.mark.parametrize("variant", ["BN", "EvalNorm", "MABN", "RoIShuffleBN(K=3)"])
def test_precise_bn_check_on_cpu(variant):
    checks.precise_bn_parity(variant, "cpu", set_mode=FakeMode())


@pytest.mark.parametrize("variant", sorted(dp.norm_variants(32)))
def test_layer_checkpoint_check_on_cpu(variant):
    checks.layer_checkpoint_roundtrip(variant, "cpu")


@pytest.mark.slow
def test_detectron2_checkpoint_check_on_cpu(tmp_path):
    checks.detectron2_checkpoint_roundtrip("MABN", "cpu", tmp_path)


@pytest.mark.slow
def test_synchronised_norms_check_on_cpu():
    checks.synchronised_norms_parity("cpu")


@pytest.mark.slow
def test_compare_tool_check_on_cpu(datasets_root, tmp_path):
    checks.compare_tool_run("cpu", datasets_root, tmp_path)
