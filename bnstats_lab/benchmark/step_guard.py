"""Cost of the non-finite guard in a detector's training step: per layer call vs once per step.

One model and one detectron2 :class:`~detectron2.engine.SimpleTrainer` over in-memory batches
(:mod:`.models`), three ways of running a step, interleaved in rounds (:func:`~.timing.interleave`):

- ``unguarded``: the layers' per-call checks off and no step guard (the cost floor: what the layers
  cost without any guard);
- ``per call``: every layer checks its own update (the layers' default outside a training loop);
- ``per step``: the checks off, :class:`~d2_bnstats.layers.step_guard.StepStatisticsGuard`'s snapshot
  before and restore after each step (what the plug-in's trainers do).

Ratios are to ``unguarded`` in the same round (median over rounds); ``guard_us`` is the snapshot +
check of the step guard alone, timed over many calls.
"""
import statistics
import time
from typing import Callable, Dict, Optional

from d2_bnstats.layers.moments import GUARDED_PER_STEP
from d2_bnstats.layers.step_guard import StepStatisticsGuard

from .models import SYNTHETIC_ARCHS, build_trainer, load_batches, load_bench_config
from .timing import interleave, sync

MODES = ("unguarded", "per call", "per step")


def _set_per_call_checks(guard: StepStatisticsGuard, on: bool) -> None:
    for layer in guard.layers:
        if on:
            vars(layer).pop(GUARDED_PER_STEP, None)
        else:
            vars(layer)[GUARDED_PER_STEP] = True


def benchmark_step_guard(
    arch: str = "frcnn",
    ims_per_batch: int = 2,
    norm: str = "EvalNorm",
    repeats: int = 5,
    iters: int = 3,
    warmup: int = 2,
    num_batches: int = 4,
    guard_calls: int = 200,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Seconds per training step in each of :data:`MODES`, ratios to ``unguarded``, and the step
    guard's own cost; see the module docstring."""
    from detectron2.utils.events import EventStorage

    cfg = load_bench_config(arch, ims_per_batch, norm, "train")
    device = cfg.MODEL.DEVICE
    batches = load_batches(cfg, num_batches, synthetic=arch in SYNTHETIC_ARCHS)
    trainer = build_trainer(cfg, batches)
    guard = StepStatisticsGuard(trainer.model)

    def steps(mode: str) -> Callable[[], float]:
        def run() -> float:
            _set_per_call_checks(guard, on=mode == "per call")
            sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                if mode == "per step":
                    guard.snapshot()
                trainer.run_step()
                if mode == "per step":
                    guard.restore_nonfinite()
            sync(device)
            return (time.perf_counter() - start) / iters

        return run

    with EventStorage(0):
        for _ in range(warmup):
            trainer.run_step()
        times: Dict[str, list] = interleave({m: steps(m) for m in MODES}, repeats, progress)
    sync(device)
    start = time.perf_counter()
    for _ in range(guard_calls):
        guard.snapshot()
        guard.restore_nonfinite()
    sync(device)
    guard_us = (time.perf_counter() - start) / guard_calls * 1e6
    guard.close()
    ratios = {
        m: statistics.median(t / u for t, u in zip(times[m], times["unguarded"])) for m in MODES
    }
    return {
        "arch": arch, "ims_per_batch": ims_per_batch, "norm": norm, "device": device,
        "layers": len(guard.layers), "repeats": repeats, "iters": iters,
        "step_s": {m: statistics.median(times[m]) for m in MODES},
        "ratio_to_unguarded": ratios,
        "guard_us": guard_us,
    }  # fmt: skip


def format_report(result: dict) -> str:
    lines = [
        f"{result['arch']}, {result['ims_per_batch']} img/batch, {result['norm']}, {result['device']}: "
        f"{result['layers']} layers with running statistics",
        "",
        "| guard | s/step (median) | / unguarded |",
        "| --- | --- | --- |",
    ]
    for mode in MODES:
        lines.append(f"| {mode} | {result['step_s'][mode]:.4f} | {result['ratio_to_unguarded'][mode]:.4f}x |")
    lines += ["", f"step guard alone (snapshot + check, all finite): {result['guard_us']:.1f} µs per step"]
    return "\n".join(lines)
