"""How PreciseBN's cost grows with the number of images, end to end in the BN Faster R-CNN.

The cost of recomputing population statistics over n images (a "sample" is an image; batches of
``SOLVER.IMS_PER_BATCH`` images from the training loader, cycled from a pool read into memory) as a
ratio to plain training-mode forwards with no gradient over the same images, for growing n, with a
least-squares line through (n, seconds) and its R^2 (linear growth: R^2 close to 1, intercept
small). Each n reuses :func:`bnstats_lab.benchmark.precise_bn.benchmark_precise_bn`.
"""
import dataclasses
import math
import statistics
from typing import Callable, List, Optional, Sequence, Tuple

from .models import SYNTHETIC_ARCHS, TRAIN_REFERENCE, build_trainer, load_batches, load_bench_config
from .precise_bn import benchmark_precise_bn


@dataclasses.dataclass
class PreciseBNRow:
    images: int  # n: images the pass runs over
    batches: int
    forward_s: Optional[float] = None  # plain training-mode forwards, no grad
    precise_bn_s: Optional[float] = None
    ratio: Optional[float] = None  # precise_bn / forward (median over repetitions)
    spread: Optional[float] = None
    repeats: int = 0


@dataclasses.dataclass
class LinearFit:
    slope_s_per_image: float
    intercept_s: float
    r2: float


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> Optional[LinearFit]:
    """Least-squares line y = a x + b and its R^2 (None with fewer than 2 distinct x)."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return LinearFit(slope, intercept, r2)


def benchmark_precise_bn_scaling(
    arch: str = "frcnn",
    ims_per_batch: int = 2,
    num_images: Sequence[int] = (100, 1000, 10000),
    pool_batches: int = 8,
    repeats: int = 3,
    opts: Sequence[str] = (),
    clock: str = "wall",
    progress: Optional[Callable[[str], None]] = None,
) -> Tuple[List[PreciseBNRow], Optional[LinearFit], Optional[LinearFit]]:
    """PreciseBN over n images vs plain training-mode forwards, for each n; linear fits of both.

    Uses the BN model of ``arch`` after one training step. The n images are ceil(n / IMS_PER_BATCH)
    batches cycled from ``pool_batches`` batches in memory (the cost does not depend on which images).
    Repetitions shrink with n (``repeats`` at the smallest n, at least 1: max(1, round(repeats *
    n_min / n))); only the first n gets a warm-up pass. Returns (rows, fit of PreciseBN seconds,
    fit of forward seconds).
    """
    num_images = sorted(int(n) for n in num_images)
    rows = [PreciseBNRow(n, math.ceil(n / ims_per_batch)) for n in num_images]
    from detectron2.utils.events import EventStorage

    cfg = load_bench_config(arch, ims_per_batch, TRAIN_REFERENCE, "train", opts)
    pool = load_batches(cfg, pool_batches, synthetic=arch in SYNTHETIC_ARCHS)
    trainer = build_trainer(cfg, pool)
    with EventStorage(0):
        trainer.run_step()
    model = trainer.model
    for i, row in enumerate(rows):
        batches = [pool[b % len(pool)] for b in range(row.batches)]
        reps = max(1, round(repeats * num_images[0] / row.images))
        result = benchmark_precise_bn(model, batches, repeats=reps, warmup=1 if i == 0 else 0, fvcore=False,
                                      clock=clock)
        row.forward_s, row.precise_bn_s = result.forward_s, result.precise_bn_s
        row.ratio, row.spread, row.repeats = result.ratio, result.spread, reps
        if progress is not None:
            progress(f"PreciseBN over {row.images} images: forward {row.forward_s:.2f} s, PreciseBN {row.precise_bn_s:.2f} s, {row.ratio:.3f}x")
    done = [r for r in rows if r.precise_bn_s is not None]
    fit_p = linear_fit([r.images for r in done], [r.precise_bn_s for r in done])
    fit_f = linear_fit([r.images for r in done], [r.forward_s for r in done])
    return rows, fit_p, fit_f
