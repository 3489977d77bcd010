"""Interleaved timing and its summary, shared by the benchmarks.

Every benchmark of this package times its candidates in rounds, each round running every candidate
once in turn (:func:`interleave`; the starting candidate rotates), so drift of the machine's load hits
all candidates alike. A candidate's figure is the median over rounds, its spread (max - min) / median
(:func:`spread`), and its ratio to a reference the median over rounds of (candidate / reference in the
same round) (:func:`summarize`), which cancels drift between rounds that the ratio of the medians
would keep. Each ratio also gets a 95% confidence interval: Student's t interval of the mean of the
per-round log-ratios, exponentiated (:func:`ratio_interval`); a target is **met** when the whole
interval lies at or under it, **missed** when the whole interval lies over it, and **unresolved**
otherwise (:func:`target_status`), so a table never calls a target met on a difference the rounds
cannot resolve.

On CUDA every timed block is bracketed by synchronisation (:func:`sync`) or timed with CUDA events
(:func:`time_block`), so a block's time is that of its kernels, not of their queueing; before timing,
:func:`prepare_device` switches cuDNN's autotuner on (``torch.backends.cudnn.benchmark``, what a
training run with fixed-size inputs sets) and every benchmark warms up first, so autotuning and lazy
initialisation stay out of the figures. On CPU nothing of this changes anything.
"""
import dataclasses
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..intervals import mean_interval

CLOCKS: Dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def spread(values: Sequence[float]) -> float:
    """(max - min) / median of ``values`` (0 when the median is not positive)."""
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med > 0 else 0.0


def clock_for(name: str) -> Callable[[], float]:
    """``"wall"``: ``time.perf_counter``; ``"cpu"``: this process's CPU time (``time.process_time``)."""
    if name not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {name!r}")
    return CLOCKS[name]


def sync(device: str) -> None:
    """Wait for queued CUDA work, so that a timed block ends when its kernels do (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def prepare_device(device: str) -> None:
    """For a CUDA device: cuDNN's autotuner on (``torch.backends.cudnn.benchmark = True``). No-op on CPU."""
    if is_cuda(device):
        torch.backends.cudnn.benchmark = True


def time_block(run: Callable[[], None], iters: int, device: str) -> float:
    """Seconds per call of ``run`` over ``iters`` calls: ``time.perf_counter`` around the loop on CPU;
    on CUDA, CUDA events recorded around it after a synchronisation, read once the end event completed."""
    if not is_cuda(device):
        start = time.perf_counter()
        for _ in range(iters):
            run()
        return (time.perf_counter() - start) / iters
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        run()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000.0 / iters


def count_host_syncs(run: Callable[[], None]) -> int:
    """How many synchronising CUDA calls ``run`` makes (torch's sync debug mode "warn", warnings
    counted); the mode is back to "default" afterwards. CUDA only."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def short_error(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 160 characters), for a table cell."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


def interleave(entries: Dict[str, Callable[[], float]], repeats: int, progress=None) -> Dict[str, List[float]]:
    """Round-robin over ``entries`` (name -> timed block returning seconds), start rotating per round."""
    names = list(entries)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)] if names else []
        for name in order:
            times[name].append(entries[name]())
        if progress is not None:
            progress(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}" for n in names))
    return times


@dataclasses.dataclass
class TimingRow:
    """One norm (or norm/mode) in one configuration; times in seconds, ratios to the reference."""

    table: str  # "train" or "inference"
    arch: str
    ims_per_batch: int
    norm: str
    median_s: Optional[float] = None  # per iteration (train) or per image (inference)
    ratio: Optional[float] = None  # median over rounds of norm / reference in the same round
    spread: Optional[float] = None  # (max - min) / median of the per-round times
    ratio_spread: Optional[float] = None  # (max - min) / median of the per-round ratios
    target: Optional[float] = None  # the target for the ratio, where there is one
    meets_target: Optional[bool] = None  # True: met, False: missed, None: unresolved or no target
    ratio_low: Optional[float] = None  # 95% interval of the ratio (t interval of the per-round log-ratios)
    ratio_high: Optional[float] = None
    status: Optional[str] = None  # "met", "missed", "unresolved" (target_status); None without a target
    rounds: int = 0
    skipped: Optional[str] = None  # "not available: ..." or why it could not be measured
    note: Optional[str] = None  # measured, but with a caveat (e.g. inference: not comparable work)
    reference: Optional[str] = None  # the row the ratio is to (the table's reference unless said)
    round_s: List[float] = dataclasses.field(default_factory=list)  # per round, in round order: the raw data


def target_key(name: str) -> str:
    """The norm a row's name belongs to: ``"EvalNorm/learned"`` and ``"MABN (folded)"`` -> the norm."""
    return name.split("/")[0].split(" ")[0]


MET, MISSED, UNRESOLVED = "met", "missed", "unresolved"


def ratio_interval(ratios: Sequence[float], level: float = 0.95) -> Optional[tuple]:
    """The ``level`` confidence interval of a ratio measured once per round: the t interval of the
    mean of log(ratio) over rounds, exponentiated (the geometric mean's interval); None for fewer than
    2 rounds or a ratio that is not positive."""
    if len(ratios) < 2 or min(ratios) <= 0:
        return None
    fit = mean_interval([math.log(r) for r in ratios], level)
    return math.exp(fit["low"]), math.exp(fit["high"])


def target_status(interval: Optional[tuple], target: Optional[float]) -> Optional[str]:
    """"met" when the whole interval is at or under ``target``, "missed" when it is over it,
    "unresolved" otherwise (or without an interval); None without a target."""
    if target is None:
        return None
    if interval is None:
        return UNRESOLVED
    if interval[1] <= target:
        return MET
    return MISSED if interval[0] > target else UNRESOLVED


def summarize(rows: Dict[str, TimingRow], times: Dict[str, List[float]], reference: str,
              targets: Dict[str, float], references: Optional[Dict[str, str]] = None) -> None:
    """Fill each row's median, spread, same-round ratio to its reference with its 95% interval, and
    the target's status (in place). The reference is ``reference`` unless ``references`` names
    another row for the row (e.g. GN+WS against GN: what Weight Standardization adds); a target is
    looked up by the row's name, then by its norm (:func:`target_key`)."""
    references = references or {}
    for key, row in rows.items():
        t = times.get(key)
        if row.skipped or not t:
            continue
        row.median_s = statistics.median(t)
        row.spread = spread(t)
        row.rounds = len(t)
        row.round_s = list(t)
        row.reference = references.get(key, reference)
        ref = times.get(row.reference)
        interval = None
        if ref:
            ratios = [a / b for a, b in zip(t, ref)]
            row.ratio = statistics.median(ratios)
            row.ratio_spread = spread(ratios)
            interval = ratio_interval(ratios)
            if interval is not None:
                row.ratio_low, row.ratio_high = interval
        target = targets.get(key, targets.get(target_key(key)))
        if target is not None:
            row.target = target
            row.status = target_status(interval, row.target)
            row.meets_target = {MET: True, MISSED: False}.get(row.status)
