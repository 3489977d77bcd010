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
from typing import Callable, Dict, List, Optional

import torch
from detectron2.utils.events import EventStorage
from fvcore.nn.precise_bn import update_bn_stats

from d2_bnstats.layers.population import population_layers, precise_bn

from .timing import clock_for, spread


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


def _time(now: Callable[[], float], fn, *args, **kwargs) -> float:
    start = now()
    fn(*args, **kwargs)
    return now() - start


def _repetition(model, batches, now, stock, backbone_forward) -> Dict[str, Optional[float]]:
    """Seconds of one repetition: forwards, PreciseBN, fvcore (None when not run or when it refuses
    the model, e.g. a BN layer called twice per forward) and PreciseBN as the hooks run it (None when
    not applicable)."""
    t = {"forward": _time(now, _forward_all, model, batches),
         "precise": _time(now, precise_bn, model, batches, len(batches)),
         "fvcore": None, "backbone": None}
    if stock is not None:
        stock.train()
        start = now()
        try:
            update_bn_stats(stock, iter(batches), len(batches))
            t["fvcore"] = now() - start
        except AssertionError:
            pass
    if backbone_forward is not None:
        t["backbone"] = _time(now, precise_bn, model, batches, len(batches), forward=backbone_forward)
    return t


def _progress_line(rep: int, total: int, t: Dict[str, Optional[float]]) -> str:
    return (f"repetition {rep + 1}/{total}: forward {t['forward']:.2f} s, "
            f"PreciseBN {t['precise']:.2f} s" + (f", fvcore {t['fvcore']:.2f} s" if t["fvcore"] else "")
            + (f", backbone-only PreciseBN {t['backbone']:.2f} s" if t["backbone"] else ""))


def _median_ratio(times: List[float], reference: List[float]) -> Optional[float]:
    return statistics.median([a / b for a, b in zip(times, reference)]) if times else None


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
    now = clock_for(clock)
    images = sum(len(b) if isinstance(b, (list, tuple)) else int(b.shape[0]) for b in batches)
    from d2_bnstats.d2.population import backbone_only_forward

    stock = copy.deepcopy(model) if fvcore else None
    backbone_forward = backbone_only_forward(model, population_layers(model))
    times: Dict[str, List[float]] = {"forward": [], "precise": [], "fvcore": [], "backbone": []}
    with EventStorage():
        for rep in range(warmup + repeats):
            t = _repetition(model, batches, now, stock, backbone_forward)
            if stock is not None and t["fvcore"] is None:
                stock = None  # fvcore refused this model: not tried again
            if rep >= warmup:
                for key, value in t.items():
                    if value is not None:
                        times[key].append(value)
            if progress is not None:
                progress(_progress_line(rep, warmup + repeats, t))
    ratios = [p / f for p, f in zip(times["precise"], times["forward"])]
    return PreciseBNTiming(
        images=images,
        batches=len(batches),
        layers=len(population_layers(model)),
        forward_s=statistics.median(times["forward"]),
        precise_bn_s=statistics.median(times["precise"]),
        fvcore_s=statistics.median(times["fvcore"]) if times["fvcore"] else None,
        ratio=statistics.median(ratios),
        fvcore_ratio=_median_ratio(times["fvcore"], times["forward"]),
        spread=spread(ratios),
        backbone_only_s=statistics.median(times["backbone"]) if times["backbone"] else None,
        backbone_only_ratio=_median_ratio(times["backbone"], times["forward"]),
        clock=clock,
    )


def load_batches(cfg, num_batches: int, trainer_cls=None) -> List:
    """``num_batches`` training batches (per process) read into memory."""
    from d2_bnstats.d2.population import default_precise_bn_loader_factory

    iterator = iter(default_precise_bn_loader_factory(cfg, trainer_cls)())
    return [next(iterator) for _ in range(num_batches)]
