"""Device parity and host-synchronisation checks of normalization layers: the harness of
tests/test_cuda.py (a layer on CUDA against the same layer on CPU in float64), itself tested on CPU
(CPU against CPU float64) in tests/test_device_parity.py.

**Parity** (:func:`run_layer`, :func:`parity_failures`). A layer and a float64 CPU copy of it run the
same ``len(batches)`` training steps: forward, backward of sum(output · g) (plus the auxiliary loss
a layer keeps in ``aux_loss``, EvalNorm's), one SGD step, the end of the step for layers that have
one (MABN's :func:`~d2_bnstats.layers.mabn_step.end_step`) and the [0, 1] projection of EvalNorm's
alpha_hat, beta_hat; then, in eval mode, one forward and backward and one forward without gradient.
Inputs and output gradients are drawn in float64 and rounded to the run's precision first, and the
reference runs on exactly the rounded values, so what differs is the layer's arithmetic alone.
Recorded: per step the output, the input gradient, every parameter gradient and, after the step,
every buffer; then the eval outputs and input gradient. A difference is max |got − ref| / max |ref|
(``ref`` all zero: max |got|), integer buffers must be equal. Random permutations (RoI-shuffle BN)
are drawn from one CPU generator for both runs (:func:`same_permutations`).

Precisions (:data:`PRECISIONS`): ``float32`` (no autocast), ``bfloat16`` (autocast; the layer's input
in bfloat16, as a convolution under autocast hands it over), ``float16`` (autocast and a GradScaler of
constant scale 2^10: the input gradient is divided by the scale, parameter gradients are unscaled by
the scaler, and the scale must not change, i.e. no step was skipped, so that both runs took the same
steps). Tolerances are per precision and kind of quantity: outputs and gradients of a low-precision
run carry its rounding (2^-8 relative for bfloat16, 2^-11 for float16); statistics (buffers) must be
accumulated in float32 or wider whatever the input dtype (1e-3, well below bfloat16's rounding).

Also here: :func:`training_step` (one training step of a lone layer), :func:`norm_variants` and
:data:`SHAPES` (what the tests run), :data:`KNOWN_GAPS` (differences from the reference that are
findings about a layer), :func:`detectron2_trainer` (a small detectron2 model on synthetic data).
Host synchronisation: :mod:`.sync_guard`.
"""
import contextlib
import copy
import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple
from unittest import mock

import torch
from torch import nn

from d2_bnstats.layers.evalnorm_projection import attach_projection_hook
from d2_bnstats.layers.mabn_step import end_step


# --------------------------------------------------------------------------------------------------
# precisions and tolerances


@dataclasses.dataclass(frozen=True)
class Precision:
    name: str
    autocast: Optional[torch.dtype]  # None: no autocast; the layer's input is float32
    scaler: bool  # a GradScaler of constant scale SCALE
    tolerance: Dict[str, float]  # kind of quantity -> largest relative difference

    @property
    def input_dtype(self) -> torch.dtype:
        return self.autocast or torch.float32


SCALE = 2.0 ** 10
KINDS = ("output", "grad_input", "grad", "buffer", "eval")
PRECISIONS = {
    "float32": Precision("float32", None, False,
                         dict(output=1e-4, grad_input=1e-4, grad=1e-4, buffer=1e-5, eval=1e-4)),
    "bfloat16": Precision("bfloat16", torch.bfloat16, False,
                          dict(output=2e-2, grad_input=2e-2, grad=2e-2, buffer=1e-3, eval=2e-2)),
    "float16": Precision("float16", torch.float16, True,
                         dict(output=3e-3, grad_input=3e-3, grad=3e-3, buffer=1e-3, eval=3e-3)),
}
REFERENCE = Precision("float64", None, False, {})


def kind_of(key: str) -> str:
    """"step1/grad/weight" -> "grad"; "eval/output" -> "eval"."""
    first, second = key.split("/")[:2]
    return "eval" if first == "eval" else second


# --------------------------------------------------------------------------------------------------
# inputs


def make_inputs(shape: Sequence[int], steps: int, precision: Precision, seed: int = 0):
    """(training inputs, output gradients, eval input, eval gradient), float64 tensors already
    rounded to ``precision`` (the reference gets the same values). Inputs have a mean and a scale
    away from 0 and 1, so a wrong centring or scaling shows."""
    g = torch.Generator().manual_seed(seed)
    low = precision.input_dtype

    def draw(mean=0.0, std=1.0):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean
        return t.to(low).to(torch.float64)

    xs = [draw(0.5, 2.0) for _ in range(steps)]
    gs = [draw() for _ in range(steps)]
    return xs, gs, draw(0.5, 2.0), draw()


@contextlib.contextmanager
def same_permutations(seed: int = 0):
    """``torch.randperm`` drawn from one CPU generator and moved to the requested device, so two runs
    that make the same calls get the same permutations on any device."""
    real = torch.randperm
    gen = torch.Generator().manual_seed(seed)

    def randperm(n, *args, device=None, **kwargs):
        perm = real(n, generator=gen)
        return perm.to(device) if device is not None else perm

    with mock.patch.object(torch, "randperm", randperm):
        yield


# --------------------------------------------------------------------------------------------------
# one run


def _snapshot(layer: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: b.detach().to("cpu", copy=True) for name, b in layer.named_buffers() if b is not None}


def _as64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64, copy=True)


def _loss(layer: nn.Module, out: torch.Tensor, g: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    loss = (out.to(acc) * g.to(acc)).sum()
    aux = getattr(layer, "aux_loss", None)
    if isinstance(aux, torch.Tensor) and aux.requires_grad:
        loss = loss + aux.to(acc)
    return loss


def run_layer(layer: nn.Module, xs, gs, x_eval, g_eval, precision: Precision, device, lr: float = 0.05) -> Dict[str, torch.Tensor]:
    """Train ``layer`` (moved to ``device``; float64 for :data:`REFERENCE`) on ``xs``/``gs``, then
    evaluate it; returns the recorded quantities as float64 CPU tensors keyed "stepK/kind/name"
    and "eval/kind" (see the module docstring). ``layer`` itself is changed."""
    device = torch.device(device)
    reference = precision is REFERENCE
    acc = torch.float64 if reference else torch.float32
    layer = layer.to(device=device, dtype=torch.float64) if reference else layer.to(device)
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr) if params else None  # FrozenBN has no parameters
    projection = attach_projection_hook(layer)  # acts on EvalNorm layers only
    scaler = torch.amp.GradScaler(device.type, init_scale=SCALE, growth_interval=10**9) if precision.scaler else None
    autocast = (torch.autocast(device.type, dtype=precision.autocast) if precision.autocast
                else contextlib.nullcontext())
    in_dtype = torch.float64 if reference else precision.input_dtype
    record: Dict[str, torch.Tensor] = {}
    try:
        for step, (x64, g64) in enumerate(zip(xs, gs), start=1):
            layer.train()
            x = x64.to(device, in_dtype).requires_grad_(True)
            with autocast:
                out = layer(x)
                loss = _loss(layer, out, g64.to(device), acc)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler and opt is not None:
                scaler.unscale_(opt)
            record[f"step{step}/output/"] = _as64(out)
            record[f"step{step}/grad_input/"] = _as64(x.grad) / (SCALE if scaler else 1.0)
            for name, p in layer.named_parameters():
                if p.grad is not None:
                    record[f"step{step}/grad/{name}"] = _as64(p.grad)
            if scaler and opt is not None:
                scaler.step(opt)
                scaler.update()
                if scaler.get_scale() != SCALE:
                    raise AssertionError(f"step {step}: the GradScaler skipped the step (non-finite gradients)")
            elif opt is not None:
                opt.step()
            end_step(layer)
            for name, b in _snapshot(layer).items():
                record[f"step{step}/buffer/{name}"] = b.to(torch.float64) if b.is_floating_point() else b
        layer.eval()
        x = x_eval.to(device, in_dtype).requires_grad_(True)
        with autocast:
            out = layer(x)
            loss = (out.to(acc) * g_eval.to(device, acc)).sum()
        loss.backward()
        record["eval/output/with_grad"] = _as64(out)
        record["eval/grad_input/"] = _as64(x.grad)
        with torch.no_grad(), autocast:
            record["eval/output/no_grad"] = _as64(layer(x.detach()))
    finally:
        projection.remove()
    return record


def relative_difference(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got − ref| / max |ref| (max |got − ref| where ``ref`` is all zero); NaN if either has a
    non-finite value where the other has not."""
    if got.shape != ref.shape:
        return math.inf
    if got.numel() == 0:
        return 0.0
    if not torch.equal(torch.isfinite(got), torch.isfinite(ref)):
        return math.nan
    finite = torch.isfinite(ref)
    diff = (got[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0
    scale = ref[finite].abs().max().item() if finite.any() else 0.0
    return diff / scale if scale > 0 else diff


def parity_failures(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], precision: Precision) -> List[str]:
    """Every quantity whose difference exceeds ``precision``'s tolerance, as readable lines."""
    failures = []
    if set(got) != set(ref):
        failures.append(f"different quantities recorded: only in the run {sorted(set(got) - set(ref))}, "
                        f"only in the reference {sorted(set(ref) - set(got))}")
    for key in sorted(set(got) & set(ref)):
        a, b = got[key], ref[key]
        if not (a.is_floating_point() or b.is_floating_point()):
            if not torch.equal(a, b):
                failures.append(f"{key}: {a.tolist()} != reference {b.tolist()}")
            continue
        tol = precision.tolerance[kind_of(key)]
        d = relative_difference(a.to(torch.float64), b.to(torch.float64))
        if not d <= tol:
            failures.append(f"{key}: relative difference {d:.3g} > {tol:g}")
    return failures


def check_parity(build: Callable[[], nn.Module], shape: Sequence[int], precision: Precision, device,
                 steps: int = 3, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Build a layer, run it on ``device`` in ``precision`` and a float64 CPU copy on the same inputs;
    raise an AssertionError listing every quantity out of tolerance. Returns the run's record."""
    torch.manual_seed(seed)
    layer = build()
    twin = copy.deepcopy(layer)
    xs, gs, x_eval, g_eval = make_inputs(shape, steps, precision, seed)
    with same_permutations(seed):
        got = run_layer(layer, xs, gs, x_eval, g_eval, precision, device)
    with same_permutations(seed):
        ref = run_layer(twin, xs, gs, x_eval, g_eval, REFERENCE, "cpu")
    failures = parity_failures(got, ref, precision)
    assert not failures, f"{type(layer).__name__} on {device} in {precision.name} vs CPU float64:\n" + "\n".join(failures)
    return got


def training_step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, opt: Optional[torch.optim.Optimizer],
                  autocast_dtype: Optional[torch.dtype] = None) -> None:
    """One training step of a lone layer: forward, backward of sum(output · g) + its auxiliary loss,
    optimizer step (with the plug-in's post-step hooks), end of the MABN step."""
    ctx = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        out = layer(x.detach().requires_grad_(True))
        loss = _loss(layer, out, g, torch.float32)
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    if opt is not None:
        opt.step()
    end_step(layer)


class ConvThenCrossIterBN(nn.Sequential):
    """A 1x1 convolution (near the identity, fixed initial weights) and a Cross-Iteration BN bound to
    its weight: the smallest unit the layer is defined for."""

    def __init__(self, channels: int, window: int):
        from d2_bnstats.layers.cross_iteration_bn import CrossIterationBatchNorm2d

        conv = nn.Conv2d(channels, channels, 1, bias=False)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(channels)[:, :, None, None] + 0.1 * torch.randn(conv.weight.shape, generator=g))
        norm = CrossIterationBatchNorm2d(channels, window=window)
        norm.bind_weight(conv.weight)
        super().__init__(conv, norm)


def norm_variants(channels: int) -> Dict[str, Callable[[], nn.Module]]:
    """Every registered norm of the plug-in with its defaults, detectron2's BN, FrozenBN and GN as
    controls, and variants that reach the code paths the defaults do not at test sizes: Ghost BN with
    several (equal and unequal) sub-batches, RoI-shuffle BN with 3 groups, MABN past its warm-up
    (moving averages, renormalization), EvalNorm in its other evaluation modes."""
    from d2_bnstats.layers.batch_channel_norm import BatchChannelNorm2d, WSBatchChannelNorm2d
    from d2_bnstats.layers.cross_iteration_bn import CrossIterationBatchNorm2d
    from d2_bnstats.layers.evalnorm import EvalNorm2d
    from d2_bnstats.layers.ghost_bn import GhostBatchNorm2d
    from d2_bnstats.layers.mabn import MABN2d
    from d2_bnstats.layers.roi_shuffle import RoIShuffleBatchNorm2d
    from d2_bnstats.registry import get_norm, registered_norms

    variants: Dict[str, Callable[[], nn.Module]] = {
        name: (lambda name=name: get_norm(name, channels)) for name in ["BN", "FrozenBN", "GN"] + registered_norms()
    }
    variants.update({
        # Cross-Iteration BN compensates through the weight of the conv before it: alone it is BN
        # (window 1); its own variant is a 1x1 conv and the layer bound to it, trained together
        "CrossIterBN": lambda: CrossIterationBatchNorm2d(channels, window=1),
        "CrossIterBN(k=3) after a conv": lambda: ConvThenCrossIterBN(channels, window=3),
        "GhostBN(v=3)": lambda: GhostBatchNorm2d(channels, virtual_batch_size=3),
        "GhostBN(v=4)": lambda: GhostBatchNorm2d(channels, virtual_batch_size=4),
        "RoIShuffleBN(K=3)": lambda: RoIShuffleBatchNorm2d(channels, num_groups=3),
        "MABN(m=2,renorm)": lambda: MABN2d(channels, buffer_size=2, warmup_iters=0, renorm_start=0),
        "EvalNorm(rule)": lambda: EvalNorm2d(channels, mode="rule"),
        "EvalNorm(fixed)": lambda: EvalNorm2d(channels, mode="fixed", alpha=0.25, beta=0.5),
        "EvalNorm(ema)": lambda: EvalNorm2d(channels, mode="ema"),
        # Batch-Channel Norm's defaults (32 groups) at 32 channels make groups of one channel, whose
        # normalization cancels the batch part's per-channel affine: its gradients are exactly zero and
        # a comparison would weigh rounding noise. Groups of 4 channels, as the layer meets in a model
        # (256 channels, 32 groups: 8), keep every quantity meaningful.
        "BCN": lambda: BatchChannelNorm2d(channels, num_groups=max(1, channels // 4)),
        "BCN+WS": lambda: WSBatchChannelNorm2d(channels, num_groups=max(1, channels // 4)),
    })
    return variants


# Known differences from the float64 reference, each a finding about a layer (not the harness):
MABN_SCALED_PSI = (
    "MABN records Psi (the mean of gradient x normalized input) from the gradient as it arrives, i.e. "
    "multiplied by the GradScaler's loss scale: psi_buffer is in scaled units, so when the scale changes "
    "the moving average Psi-bar mixes entries of different scales for m steps (and a checkpoint's "
    "buffer depends on the scale)"
)
KNOWN_GAPS = {(v, "float16") for v in ("MABN", "SyncMABN", "MABN(m=2,renorm)")}

# (N, C, H, W): a backbone-like batch of 2 images, and a head-like batch of 8 RoIs (an even and an
# odd split for the group-normalising layers)
SHAPES: Dict[str, Tuple[int, int, int, int]] = {"images": (2, 32, 10, 12), "rois": (8, 32, 4, 4), "odd_rois": (7, 32, 3, 3)}


# --------------------------------------------------------------------------------------------------
# a small detectron2 model


# 64 px synthetic images, few proposals and RoIs (32 per image: 64 RoIs, two Ghost BN sub-batches)
SMALL_MODEL_OPTS = ("INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
                    "INPUT.MAX_SIZE_TEST", "96", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
                    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.POST_NMS_TOPK_TEST", "32",
                    "TEST.DETECTIONS_PER_IMAGE", "8")


def detectron2_trainer(norm: str, device: str, arch: str = "frcnn"):
    """A detectron2 SimpleTrainer of the benchmark's R-18-FPN Faster R-CNN (4conv1fc box head) with
    ``norm`` placed as a user places it (:func:`bnstats_lab.benchmark.models.norm_overrides`), on
    ``device``, over one batch of 2 synthetic 64 px images (no data set needed)."""
    from bnstats_lab.benchmark.models import build_trainer, load_bench_config
    from bnstats_lab.benchmark.synthetic import synthetic_batches

    cfg = load_bench_config(arch, 2, norm, "train", list(SMALL_MODEL_OPTS) + ["MODEL.DEVICE", device])
    return build_trainer(cfg, synthetic_batches(cfg, 1))
