"""Per-layer cost of every norm, as ratios to ``nn.BatchNorm2d`` (training) and
``FrozenBatchNorm2d`` (inference) measured in the same run.

Timings interleave the norms within each repetition so that drift of the machine (other load,
frequency changes) affects all of them alike; each figure is the median over repetitions.
"""
import dataclasses
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from d2_bnstats.registry import available_norms, get_norm

from .timing import spread

Shape = Tuple[int, int, int, int]

BACKBONE_SHAPES: Tuple[Shape, ...] = ((2, 64, 128, 128), (1, 256, 64, 64), (8, 128, 64, 64), (2, 256, 32, 32))
HEAD_SHAPES: Tuple[Shape, ...] = ((512, 256, 7, 7), (1024, 256, 7, 7))
QUICK_SHAPES: Tuple[Shape, ...] = ((2, 32, 8, 8), (16, 32, 3, 3))
BN_REFERENCE = "nn.BatchNorm2d"
FROZEN_REFERENCE = "FrozenBatchNorm2d"


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
    skipped: Optional[str] = None  # why this norm could not be measured here


def _builders(names: Sequence[str]) -> Dict[str, Callable[[int], nn.Module]]:
    builders: Dict[str, Callable[[int], nn.Module]] = {
        BN_REFERENCE: nn.BatchNorm2d,
        FROZEN_REFERENCE: FrozenBatchNorm2d,
    }
    for name in names:
        builders[name] = lambda c, name=name: get_norm(name, c)
    return builders


def _time_train(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, iters: int) -> float:
    module.train()
    start = time.perf_counter()
    for _ in range(iters):
        inp = x.detach().requires_grad_(True)
        out = module(inp)
        out.backward(grad)
    return (time.perf_counter() - start) * 1000 / iters


@torch.no_grad()
def _time_eval(module: nn.Module, x: torch.Tensor, iters: int) -> float:
    module.eval()
    start = time.perf_counter()
    for _ in range(iters):
        module(x)
    return (time.perf_counter() - start) * 1000 / iters


def benchmark_norms(
    names: Optional[Sequence[str]] = None,
    shapes: Sequence[Shape] = BACKBONE_SHAPES + HEAD_SHAPES,
    repeats: int = 5,
    iters: int = 10,
    warmup: int = 3,
    progress: Optional[Callable[[str], None]] = None,
) -> List[LayerTiming]:
    """Time every norm in ``names`` (default: all available) at each shape; see module docstring."""
    names = list(available_norms() if names is None else names)
    builders = _builders(names)
    rows: List[LayerTiming] = []
    for shape in shapes:
        n, c, h, w = shape
        x = torch.randn(n, c, h, w)
        grad = torch.randn(n, c, h, w)
        modules, skipped = {}, {}
        for name, build in builders.items():
            try:
                module = build(c)
                if module is None:
                    raise ValueError("builds no layer")
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
        bn_train = statistics.median(train_times[BN_REFERENCE])
        frozen_eval = statistics.median(eval_times[FROZEN_REFERENCE])
        for name in builders:
            if name in skipped:
                rows.append(LayerTiming(name, shape, skipped=skipped[name]))
                continue
            row = LayerTiming(name, shape)
            if train_times[name]:
                row.train_ms = statistics.median(train_times[name])
                row.train_ratio = row.train_ms / bn_train
                row.train_spread = spread(train_times[name])
            row.eval_ms = statistics.median(eval_times[name])
            row.eval_ratio = row.eval_ms / frozen_eval
            row.eval_spread = spread(eval_times[name])
            rows.append(row)
    return rows


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
            fmt(r.eval_ms, "{:.3f}"),
            fmt(r.eval_ratio, "{:.2f}x"),
            fmt(r.train_spread, "{:.0%}"),
            r.skipped or "",
        ]
        for r in rows
    ]
    headers = ["norm", "N x C x H x W", "train ms", "train / BN", "eval ms", "eval / FrozenBN", "train spread", "note"]
    return tabulate(table, headers=headers, tablefmt="github")
