"""Per-layer cost of norms in a multi-process run (e.g. SyncBN, RoIShuffleBN vs BN), in ONE run.

Every process builds each norm and times forward + backward on its own input (shapes may differ per
process, as RoI counts do). The norms are interleaved within each repetition and all processes enter
each timing block together (a barrier), so machine drift affects all norms alike; figures are medians
over repetitions of the per-process times, and ratios are to ``nn.BatchNorm2d`` timed the same way
(plain BN communicates nothing). The cost per training iteration of replacing BN by a norm in a head
with L norm layers is L × (norm − BN).
"""
import dataclasses
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from d2_bnstats.registry import get_norm

Shape = Tuple[int, int, int, int]
BN_REFERENCE = "nn.BatchNorm2d"
# the CPU configs' box head input (128 RoIs x 2 images, CONV_DIM 128, 7x7) and an unequal mask-head batch
DEFAULT_SHAPES: Tuple[Tuple[Shape, ...], ...] = (
    ((256, 128, 7, 7), (256, 128, 7, 7)),
    ((24, 128, 14, 14), (9, 128, 14, 14)),
)


@dataclasses.dataclass
class DistributedTiming:
    norm: str
    shapes: Tuple[Shape, ...]  # per process
    train_ms: List[float]  # per process: median forward + backward
    train_ratio: List[float]  # per process: to nn.BatchNorm2d


def _time(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, iters: int) -> float:
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        inp = x.detach().requires_grad_(True)
        module(inp).backward(grad)
    return (time.perf_counter() - start) * 1000 / iters


def benchmark_in_process(
    names: Sequence[str], shapes: Sequence[Tuple[Shape, ...]], repeats: int = 5, iters: int = 10, warmup: int = 2
) -> List[DistributedTiming]:
    """Run in every process of an initialised process group; returns the rows on every process."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rows: List[DistributedTiming] = []
    for per_rank in shapes:
        shape = per_rank[rank % len(per_rank)]
        gen = torch.Generator().manual_seed(rank)
        x, grad = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
        builders = {BN_REFERENCE: nn.BatchNorm2d}
        builders.update({name: (lambda c, name=name: get_norm(name, c)) for name in names})
        modules = {name: build(shape[1]).train() for name, build in builders.items()}
        for module in modules.values():
            _time(module, x, grad, warmup)
        times: Dict[str, List[float]] = {name: [] for name in modules}
        for _ in range(repeats):
            for name, module in modules.items():
                times[name].append(_time(module, x, grad, iters))
        medians = {name: statistics.median(t) for name, t in times.items()}
        gathered: List[Optional[Dict[str, float]]] = [None] * world
        dist.all_gather_object(gathered, medians)
        all_shapes = tuple(per_rank[r % len(per_rank)] for r in range(world))
        for name in modules:
            ms = [g[name] for g in gathered]
            rows.append(DistributedTiming(name, all_shapes, ms, [m / g[BN_REFERENCE] for m, g in zip(ms, gathered)]))
    return rows


def format_table(rows: Sequence[DistributedTiming]) -> str:
    from tabulate import tabulate

    table = [
        [
            r.norm,
            " | ".join("x".join(map(str, s)) for s in r.shapes),
            " | ".join(f"{m:.2f}" for m in r.train_ms),
            " | ".join(f"{q:.2f}x" for q in r.train_ratio),
        ]
        for r in rows
    ]
    return tabulate(table, headers=["norm", "input per process", "fwd+bwd ms per process", "/ BN"], tablefmt="github")


@dataclasses.dataclass
class TrainingTiming:
    variant: str  # the KEY VALUE overrides of this variant
    iteration_ms: List[float]  # per process: median time of one training iteration
    delta_ms: List[float]  # per process: minus the first variant's


def benchmark_training_in_process(
    config_file: str, variants: Sequence[Sequence[str]], iters: int = 10, warmup: int = 2, opts: Sequence[str] = ()
) -> List[TrainingTiming]:
    """Per-iteration training time of config variants, interleaved in ONE run on the same batches.

    Each variant (a list of ``KEY VALUE`` overrides of ``config_file`` + ``opts``) gets its own model
    (DistributedDataParallel), optimizer and the same data; iteration i of every variant runs on batch
    i, one variant after the other, all processes starting each together (a barrier). Run in every
    process of an initialised process group; returns the rows on every process.
    """
    from detectron2.data import build_detection_train_loader
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage

    from d2_bnstats.d2.build import build_model
    from d2_bnstats.d2.train import load_config

    world = dist.get_world_size()
    cfgs = [load_config(config_file, list(opts) + list(v), world_size=world) for v in variants]
    runs = []
    for cfg in cfgs:
        torch.manual_seed(0)
        model = build_model(cfg)
        if world > 1:
            model = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        model.train()
        runs.append((model, build_optimizer(cfg, model)))
    loader = iter(build_detection_train_loader(cfgs[0]))
    times: List[List[float]] = [[] for _ in runs]
    with EventStorage():
        for it in range(warmup + iters):
            data = next(loader)
            for k, (model, optimizer) in enumerate(runs):
                dist.barrier()
                start = time.perf_counter()
                loss = sum(model(data).values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if it >= warmup:
                    times[k].append((time.perf_counter() - start) * 1000)
    medians = [statistics.median(t) for t in times]
    gathered: List[Optional[List[float]]] = [None] * world
    dist.all_gather_object(gathered, medians)
    return [
        TrainingTiming(" ".join(v) or "(config as is)", [g[k] for g in gathered], [g[k] - g[0] for g in gathered])
        for k, v in enumerate(variants)
    ]


def format_training_table(rows: Sequence[TrainingTiming]) -> str:
    from tabulate import tabulate

    table = [[r.variant, " | ".join(f"{m:.0f}" for m in r.iteration_ms), " | ".join(f"{d:+.0f}" for d in r.delta_ms)] for r in rows]
    return tabulate(table, headers=["variant", "ms per iteration per process", "vs first"], tablefmt="github")
