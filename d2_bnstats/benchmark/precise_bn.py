"""Cost of a PreciseBN pass relative to plain training-mode forwards over the same images.

The batches are read once into memory (data loading is not timed). Each repetition times, in turn,
(1) plain training-mode forwards of the model over all batches with no gradient (what PreciseBN
needs at least), (2) :func:`d2_bnstats.layers.population.precise_bn` over the same batches and
(3) fvcore's ``update_bn_stats`` (detectron2's stock hook) for reference and (4) PreciseBN as the
hooks run it: the backbone alone when every layer to update is in the backbone
(:func:`d2_bnstats.d2.population.backbone_only_forward`); interleaving makes machine load drift hit
all of them alike. Figures are medians over repetitions; ratios are to (1).

``clock="cpu"`` (the default) measures the CPU time of this process (``time.process_time``) instead
of wall time: on a machine shared with other jobs, wall time mostly measures the other jobs, while
the CPU time of a single-threaded run stays put (the tool runs with 1 thread unless told otherwise).
"""
import copy
import dataclasses
import statistics
import time
from typing import Callable, List, Optional

import torch
from detectron2.utils.events import EventStorage
from fvcore.nn.precise_bn import update_bn_stats

from ..layers.population import population_layers, precise_bn


@dataclasses.dataclass
class PreciseBNTiming:
    images: int
    batches: int
    layers: int
    forward_s: float
    precise_bn_s: float
    fvcore_s: Optional[float]
    ratio: float  # precise_bn / forward
    fvcore_ratio: Optional[float]
    backbone_only_s: Optional[float]  # PreciseBN as the hooks run it (None: not applicable)
    backbone_only_ratio: Optional[float]
    spread: float  # (max - min) / median of the per-repetition ratios
    clock: str = "cpu"


def _forward_all(model, batches):
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)


def benchmark_precise_bn(
    model: torch.nn.Module,
    batches: List,
    repeats: int = 5,
    warmup: int = 1,
    fvcore: bool = True,
    progress: Optional[Callable[[str], None]] = None,
    clock: str = "cpu",
) -> PreciseBNTiming:
    """Time PreciseBN over ``batches`` against plain training-mode forwards (see module docstring)."""
    clocks = {"cpu": time.process_time, "wall": time.perf_counter}
    if clock not in clocks:
        raise ValueError(f"clock must be one of {sorted(clocks)}, got {clock!r}")
    now = clocks[clock]
    images = sum(len(b) if isinstance(b, (list, tuple)) else int(b.shape[0]) for b in batches)
    from ..d2.population import backbone_only_forward

    stock = copy.deepcopy(model) if fvcore else None
    backbone_forward = backbone_only_forward(model, population_layers(model))
    times = {"forward": [], "precise": [], "fvcore": [], "backbone": []}
    with EventStorage():
        for rep in range(warmup + repeats):
            start = now()
            _forward_all(model, batches)
            t_forward = now() - start
            start = now()
            precise_bn(model, batches, len(batches))
            t_precise = now() - start
            t_fvcore = None
            if fvcore:
                stock.train()
                start = now()
                try:
                    update_bn_stats(stock, iter(batches), len(batches))
                    t_fvcore = now() - start
                except AssertionError:  # e.g. a BN layer called twice per forward
                    fvcore, t_fvcore = False, None
            t_backbone = None
            if backbone_forward is not None:
                start = now()
                precise_bn(model, batches, len(batches), forward=backbone_forward)
                t_backbone = now() - start
            if rep >= warmup:
                if t_backbone is not None:
                    times["backbone"].append(t_backbone)
                times["forward"].append(t_forward)
                times["precise"].append(t_precise)
                if t_fvcore is not None:
                    times["fvcore"].append(t_fvcore)
            if progress is not None:
                progress(f"repetition {rep + 1}/{warmup + repeats}: forward {t_forward:.2f} s, "
                         f"PreciseBN {t_precise:.2f} s" + (f", fvcore {t_fvcore:.2f} s" if t_fvcore else "")
                         + (f", backbone-only PreciseBN {t_backbone:.2f} s" if t_backbone else ""))
    ratios = [p / f for p, f in zip(times["precise"], times["forward"])]
    med = statistics.median(ratios)
    forward = statistics.median(times["forward"])
    fv = statistics.median(times["fvcore"]) if times["fvcore"] else None
    return PreciseBNTiming(
        images=images,
        batches=len(batches),
        layers=len(population_layers(model)),
        forward_s=forward,
        precise_bn_s=statistics.median(times["precise"]),
        fvcore_s=fv,
        ratio=med,
        fvcore_ratio=None if fv is None else statistics.median(
            [a / b for a, b in zip(times["fvcore"], times["forward"])]),
        spread=(max(ratios) - min(ratios)) / med if med > 0 else 0.0,
        backbone_only_s=statistics.median(times["backbone"]) if times["backbone"] else None,
        backbone_only_ratio=statistics.median([a / b for a, b in zip(times["backbone"], times["forward"])])
        if times["backbone"] else None,
        clock=clock,
    )


def load_batches(cfg, num_batches: int, trainer_cls=None) -> List:
    """``num_batches`` training batches (per process) read into memory."""
    from ..d2.population import default_precise_bn_loader_factory

    iterator = iter(default_precise_bn_loader_factory(cfg, trainer_cls)())
    return [next(iterator) for _ in range(num_batches)]
