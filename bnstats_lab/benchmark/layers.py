"""Per-layer cost of every norm, as ratios to ``nn.BatchNorm2d`` (training) and
``FrozenBatchNorm2d`` (inference) measured in the same run.

Timings interleave the norms within each repetition (round) so that drift of the machine (other
load, frequency changes) affects all of them alike; a time is the median over rounds, a ratio the
median over rounds of (norm / reference in the same round) with the 95% interval of
:func:`~.timing.ratio_interval` (the t interval of the mean log-ratio), as in the end-to-end tables. On CUDA
(``device="cuda"``) the layers and tensors live on the GPU, cuDNN's autotuner is on and each block of
``iters`` calls is timed with CUDA events after the warm-up (:func:`.timing.time_block`).

Shape sets: :data:`BACKBONE_SHAPES` + :data:`HEAD_SHAPES` (the CPU-sized models), :data:`R50_SHAPES`
(Faster R-CNN R-50-FPN at 800 x 1067 px, 2 images: the inputs of the norms of each ResNet stage, of
FPN and of the 4conv1fc box head with 512 RoIs per image), :data:`QUICK_SHAPES` (smoke runs).
"""
import dataclasses
import statistics
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from d2_bnstats.layers.evalnorm import EvalNorm2d
from d2_bnstats.layers.step_guard import StepStatisticsGuard
from d2_bnstats.registry import available_norms, get_norm

from .timing import prepare_device, ratio_interval, spread, time_block

Shape = Tuple[int, int, int, int]

BACKBONE_SHAPES: Tuple[Shape, ...] = ((2, 64, 128, 128), (1, 256, 64, 64), (8, 128, 64, 64), (2, 256, 32, 32))
HEAD_SHAPES: Tuple[Shape, ...] = ((512, 256, 7, 7), (1024, 256, 7, 7))
QUICK_SHAPES: Tuple[Shape, ...] = ((2, 32, 8, 8), (16, 32, 3, 3))
# 800 x 1067 input, 2 images, padded to 800 x 1088 (FPN's size divisibility 32): the bottleneck
# width and the output of res2 (stride 4; the stem's and FPN's 256-channel maps at stride 4 are the
# same sizes), res3 (8), res4 (16), res5 (32); the box head's 1024 RoIs of 7 x 7.
R50_SHAPES: Tuple[Shape, ...] = (
    (2, 64, 200, 272), (2, 256, 200, 272), (2, 128, 100, 136), (2, 512, 100, 136),
    (2, 256, 50, 68), (2, 1024, 50, 68), (2, 512, 25, 34), (2, 2048, 25, 34), (1024, 256, 7, 7),
)
BN_REFERENCE = "nn.BatchNorm2d"
FROZEN_REFERENCE = "FrozenBatchNorm2d"
# Norms whose method acts through the convolution before the layer (Cross-Iteration BN compensates its
# statistics through the conv's weight; Weight Standardization rewrites the conv): a layer alone
# measures a different computation, so they are timed end to end (tools/benchmark.py) only.
CONV_COUPLED = {
    "CrossIterBN": "compensates through the preceding conv's weight: timed end to end (tools/benchmark.py)",
    "GN+WS": "standardizes the preceding conv's weight: timed end to end (tools/benchmark.py)",
    "BN+WS": "standardizes the preceding conv's weight: timed end to end (tools/benchmark.py)",
    "BCN+WS": "standardizes the preceding conv's weight: timed end to end (tools/benchmark.py)",
}
# EvalNorm's inference interpolation weights in the per-layer rows: those of "rule" at 2 images
# (1/B² = 0.25). A new layer's learned alpha_hat = beta_hat = 0 is plain BN inference, which would time
# BN's path, not the per-sample one a trained layer takes.
EVALNORM_ALPHA_BETA = 0.25


@dataclasses.dataclass
class LayerTiming:
    norm: str
    shape: Shape
    train_ms: Optional[float] = None  # forward + backward, training mode
    eval_ms: Optional[float] = None  # forward, inference mode
    train_ratio: Optional[float] = None  # to nn.BatchNorm2d train
    eval_ratio: Optional[float] = None  # to FrozenBatchNorm2d eval
    train_spread: Optional[float] = None  # (max - min) / median over repetitions
    eval_spread: Optional[float] = None
    train_interval: Optional[Tuple[float, float]] = None  # 95% interval of train_ratio
    eval_interval: Optional[Tuple[float, float]] = None  # 95% interval of eval_ratio
    train_round_ms: List[float] = dataclasses.field(default_factory=list)  # per round: the raw data
    eval_round_ms: List[float] = dataclasses.field(default_factory=list)
    skipped: Optional[str] = None  # why this norm could not be measured here


def _builders(names: Sequence[str]) -> Dict[str, Callable[[int], nn.Module]]:
    builders: Dict[str, Callable[[int], nn.Module]] = {
        BN_REFERENCE: nn.BatchNorm2d,
        FROZEN_REFERENCE: FrozenBatchNorm2d,
    }
    for name in names:
        builders[name] = lambda c, name=name: _representative(get_norm(name, c))
    return builders


def _representative(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """The layer in the state whose cost is measured (see :data:`EVALNORM_ALPHA_BETA`)."""
    if isinstance(module, EvalNorm2d):
        with torch.no_grad():
            module.alpha_hat.fill_(EVALNORM_ALPHA_BETA)
            module.beta_hat.fill_(EVALNORM_ALPHA_BETA)
    return module


def _time_train(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, iters: int) -> float:
    module.train()

    def step():
        out = module(x.detach().requires_grad_(True))
        out.backward(grad)

    return time_block(step, iters, str(x.device)) * 1000


@torch.no_grad()
def _time_eval(module: nn.Module, x: torch.Tensor, iters: int) -> float:
    module.eval()
    return time_block(lambda: module(x), iters, str(x.device)) * 1000


def _same_round_ratio(times: Sequence[float], reference: Sequence[float]):
    """The median over rounds of times / reference in the same round, and its 95% interval."""
    ratios = [a / b for a, b in zip(times, reference)]
    return statistics.median(ratios), ratio_interval(ratios)


def benchmark_norms(
    names: Optional[Sequence[str]] = None,
    shapes: Sequence[Shape] = BACKBONE_SHAPES + HEAD_SHAPES,
    repeats: int = 5,
    iters: int = 10,
    warmup: int = 3,
    progress: Optional[Callable[[str], None]] = None,
    device: str = "cpu",
    guard: str = "call",
) -> List[LayerTiming]:
    """Time every norm in ``names`` (default: all available) at each shape on ``device``; see module
    docstring. ``guard``: ``"call"``, each layer checks its own running-statistics update (its
    default); ``"step"``, the checks are off, as under the trainers' once-per-step guard, whose cost
    is per step (:mod:`.step_guard`)."""
    if guard not in ("call", "step"):
        raise ValueError(f"guard must be 'call' or 'step', got {guard!r}")
    names = list(available_norms() if names is None else names)
    builders = _builders(names)
    prepare_device(device)
    rows: List[LayerTiming] = []
    for shape in shapes:
        n, c, h, w = shape
        x = torch.randn(n, c, h, w).to(device)
        grad = torch.randn(n, c, h, w).to(device)
        modules, skipped = {}, {}
        for name, build in builders.items():
            if name in CONV_COUPLED:
                skipped[name] = CONV_COUPLED[name]
                continue
            try:
                module = build(c)
                if module is None:
                    raise ValueError("builds no layer")
                module = module.to(device)
                if guard == "step" and name not in (BN_REFERENCE, FROZEN_REFERENCE):
                    StepStatisticsGuard(module)  # turns the layer's own checks off
                if name != FROZEN_REFERENCE:  # FrozenBN has no training mode to time
                    _time_train(module, x, grad, warmup)
                _time_eval(module, x, warmup)
                modules[name] = module
            except Exception as e:  # e.g. nn.SyncBatchNorm needs CUDA/a process group
                skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        train_times: Dict[str, List[float]] = {k: [] for k in modules}
        eval_times: Dict[str, List[float]] = {k: [] for k in modules}
        for _ in range(repeats):
            for name, module in modules.items():
                if name != FROZEN_REFERENCE:
                    train_times[name].append(_time_train(module, x, grad, iters))
                eval_times[name].append(_time_eval(module, x, iters))
        if progress is not None:
            progress(f"shape {shape}: {len(modules)} norms timed, {len(skipped)} skipped")
        for name in builders:
            if name in skipped:
                rows.append(LayerTiming(name, shape, skipped=skipped[name]))
                continue
            row = LayerTiming(name, shape)
            if train_times[name]:
                row.train_ms = statistics.median(train_times[name])
                row.train_ratio, row.train_interval = _same_round_ratio(train_times[name], train_times[BN_REFERENCE])
                row.train_spread = spread(train_times[name])
                row.train_round_ms = train_times[name]
            row.eval_ms = statistics.median(eval_times[name])
            row.eval_ratio, row.eval_interval = _same_round_ratio(eval_times[name], eval_times[FROZEN_REFERENCE])
            row.eval_spread = spread(eval_times[name])
            row.eval_round_ms = eval_times[name]
            rows.append(row)
    return rows


def _interval(interval) -> str:
    return "" if interval is None else f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def format_table(rows: Sequence[LayerTiming]) -> str:
    from tabulate import tabulate

    def fmt(v, pattern):
        return "" if v is None else pattern.format(v)

    table = [
        [
            r.norm,
            "x".join(map(str, r.shape)),
            fmt(r.train_ms, "{:.3f}"),
            fmt(r.train_ratio, "{:.2f}x"),
            _interval(r.train_interval),
            fmt(r.eval_ms, "{:.3f}"),
            fmt(r.eval_ratio, "{:.2f}x"),
            _interval(r.eval_interval),
            r.skipped or "",
        ]
        for r in rows
    ]
    headers = ["norm", "N x C x H x W", "train ms", "train / BN", "95% interval", "eval ms", "eval / FrozenBN",
               "95% interval", "note"]
    return tabulate(table, headers=headers, tablefmt="github")
