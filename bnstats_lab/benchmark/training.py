"""Training cost of every norm end to end: seconds per detectron2 training iteration, ratio to BN.

Each norm gets its own model and optimizer (:mod:`.models`) and a detectron2
:class:`~detectron2.engine.SimpleTrainer` over the same in-memory batches. After ``warmup`` untimed
iterations per norm, each of ``repeats`` rounds times ``iters`` iterations of every norm in turn
(:func:`~.timing.interleave`); a norm's figure is the median over rounds of the mean iteration time of
the round, its ratio the median over rounds of (norm / BN in the same round) (:func:`~.timing.summarize`).
On CUDA the blocks synchronise before and after (wall clock), and ``host_syncs``, if given a dict,
receives the number of synchronising CUDA calls of one training iteration per norm
(:func:`~.timing.count_host_syncs`: detectron2's own, e.g. one per logged loss, and any a norm adds).
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .models import (
    SYNTHETIC_ARCHS,
    TRAIN_NORMS,
    TRAIN_REFERENCE,
    TRAIN_RELATIVE_TO,
    TRAIN_TARGETS,
    build_trainer,
    load_batches,
    load_bench_config,
    unavailable_reason,
    with_references,
)
from .timing import TimingRow, clock_for, count_host_syncs, interleave, is_cuda, short_error, summarize, sync


def _trainers(arch: str, ims_per_batch: int, norms: Sequence[str], rows: Dict[str, TimingRow], warmup: int,
              num_batches: int, opts: Sequence[str]) -> Dict[str, Tuple[object, str]]:
    """norm -> (warmed-up trainer, device) for every norm that builds; the others' rows say why not."""
    trainers = {}
    batches = None
    for norm in norms:
        reason = unavailable_reason(norm)
        if reason:
            rows[norm].skipped = reason
            continue
        try:
            cfg = load_bench_config(arch, ims_per_batch, norm, "train", opts)
            if batches is None:  # the same batches for every norm
                batches = load_batches(cfg, num_batches, synthetic=arch in SYNTHETIC_ARCHS)
            trainer = build_trainer(cfg, batches)
            for _ in range(warmup):
                trainer.run_step()
            trainers[norm] = (trainer, cfg.MODEL.DEVICE)
        except Exception as e:
            if norm == TRAIN_REFERENCE:
                raise
            rows[norm].skipped = f"failed: {short_error(e)}"
    return trainers


def _timed_steps(trainer, device: str, iters: int, now: Callable[[], float]) -> Callable[[], float]:
    """A block that runs ``iters`` training steps and returns the seconds per step."""

    def run():
        sync(device)
        start = now()
        for _ in range(iters):
            trainer.run_step()
        sync(device)
        return (now() - start) / iters

    return run


def benchmark_training(
    arch: str = "frcnn",
    ims_per_batch: int = 2,
    norms: Sequence[str] = TRAIN_NORMS,
    repeats: int = 5,
    iters: int = 5,
    warmup: int = 2,
    num_batches: int = 4,
    opts: Sequence[str] = (),
    clock: str = "wall",
    progress: Optional[Callable[[str], None]] = None,
    targets: Optional[Dict[str, float]] = None,
    host_syncs: Optional[Dict[str, int]] = None,
) -> List[TimingRow]:
    """Seconds per training iteration of each norm, ratio to BN; see the module docstring.
    ``targets``: norm -> target ratio (default :data:`~.models.TRAIN_TARGETS`)."""
    from detectron2.utils.events import EventStorage

    norms = with_references(norms, TRAIN_REFERENCE, TRAIN_RELATIVE_TO)
    now = clock_for(clock)
    rows = {n: TimingRow("train", arch, ims_per_batch, n) for n in norms}
    with EventStorage(0):
        trainers = _trainers(arch, ims_per_batch, norms, rows, warmup, num_batches, opts)
        if progress is not None:
            progress(f"training {arch} {ims_per_batch} img/batch: {len(trainers)} norms, {repeats} rounds x {iters} iterations")
        entries = {n: _timed_steps(trainer, device, iters, now) for n, (trainer, device) in trainers.items()}
        times = interleave(entries, repeats, progress)
        if host_syncs is not None:
            for n, (trainer, device) in trainers.items():
                if is_cuda(device):
                    host_syncs[n] = count_host_syncs(trainer.run_step)
    summarize(rows, times, TRAIN_REFERENCE, TRAIN_TARGETS if targets is None else targets, TRAIN_RELATIVE_TO)
    return list(rows.values())
