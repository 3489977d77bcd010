"""End-to-end cost of every norm in real detectron2 models: what users feel, as ratios in ONE run.

Four measurements (``tools/benchmark.py`` is the CLI, ``make bench`` the full run):

* **Training** (:func:`benchmark_training`): seconds per iteration of the CPU-sized Faster R-CNN /
  Mask R-CNN (R-18-FPN, 128 px, fashion-scenes) for each norm, as a ratio to BN. Every norm gets its
  own model and optimizer, built from the same config with the norm set the way a user sets it (config
  keys, see :func:`norm_overrides`), and a detectron2 :class:`~detectron2.engine.SimpleTrainer`;
  the data loader's batches are read into memory once and cycled, so every norm trains on the same
  batches and data loading is not timed. After ``warmup`` untimed iterations per norm, each of
  ``repeats`` rounds times ``iters`` iterations of every norm in turn (round-robin, the starting norm
  rotating each round), so drift of the machine's load hits all norms alike; a norm's figure is the
  median over rounds of the mean iteration time of the round, its spread (max - min) / median, and its
  ratio the median over rounds of (norm / BN in the same round).
* **Peak memory** (:func:`benchmark_memory`): for each norm a fresh Python process builds the model,
  reads the batches, then resets the kernel's high-water mark of its resident set (``/proc/self/
  clear_refs`` = 5; ``VmHWM`` becomes the current ``VmRSS``), runs ``iters`` training iterations and
  reads ``VmHWM``. The figure is (peak - resident set before the first iteration): activations,
  gradients, optimizer state and allocator slack of training, not the model or the data. Where the
  reset is not possible, ``ru_maxrss`` before and after is used instead (then a peak reached while
  loading data hides the training peak; the row says which method it used). Limits on CPU: the
  resident set counts pages the allocator keeps after freeing (glibc arenas, torch's CPU caching is
  off by default), so it is an upper bound of the tensors alive at the peak, and it is page-granular
  and read once at the end; ratios between norms in the same configuration are meaningful, absolute
  MiB are not a GPU figure.
* **Inference** (:func:`benchmark_inference`): seconds per image, one image per call as detectron2's
  evaluation runs it, each model in eval mode on the same images, as a ratio to FrozenBN at every norm
  position (the model BN folds to). Each norm's model first trains ``train_steps`` iterations (EvalNorm
  records its batch size and learns alpha/beta, MABN fills its buffers). EvalNorm is timed in each of
  its evaluation modes; MABN also with its weight centralisation folded (deployment). To make every
  model do the same work whatever its weights, ``SCORE_THRESH_TEST`` is 0 (every model returns
  ``DETECTIONS_PER_IMAGE`` boxes, and Mask R-CNN runs its mask head on all of them).
* **PreciseBN** (:func:`benchmark_precise_bn_scaling`): the cost of recomputing population statistics
  over n images (a "sample" is an image; batches of ``SOLVER.IMS_PER_BATCH`` images from the training
  loader, cycled from a pool read into memory) as a ratio to plain training-mode forwards with no
  gradient over the same images, for growing n, with a least-squares line through (n, seconds) and its
  R^2 (linear growth: R^2 close to 1, intercept small). This reuses
  ``d2_bnstats.benchmark.precise_bn.benchmark_precise_bn`` (issue 6); without it the rows say
  "not available".

A norm that is not registered in this installation (its branch not merged, a plug-in not imported)
is reported as not available (``skipped``), not an error; so is one whose model fails to build or
train (the reason is kept).
"""
import copy
import dataclasses
import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..registry import available_norms
from .layers import _spread

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCH_CONFIGS = {
    "frcnn": os.path.join("configs", "cpu", "frcnn_r18_bn_2img.yaml"),
    "mrcnn": os.path.join("configs", "cpu", "mrcnn_r18_bn_2img.yaml"),
}
TRAIN_NORMS: Tuple[str, ...] = ("BN", "EvalNorm", "MABN", "SyncBN", "GhostBN", "GN", "FrozenBN")
INFERENCE_NORMS: Tuple[str, ...] = ("FrozenBN", "BN", "EvalNorm", "MABN", "SyncBN", "GhostBN", "GN")
EVALNORM_MODES: Tuple[str, ...] = ("learned", "rule", "exact", "fixed", "ema")
EVALNORM_FIXED_ALPHA = 0.25  # the "fixed" mode needs a value: 1/B^2 at B = 2
TRAIN_REFERENCE = "BN"
INFERENCE_REFERENCE = "FrozenBN"
# The box head of the CPU configs is 2fc, where ROI_BOX_HEAD.NORM is unused; the benchmark uses
# detectron2's 4conv1fc head (the GN/SyncBN papers' head, as the MABN configs) so that a norm in the
# box head is measured too. The same head for every norm, BN included.
BOX_HEAD_OPTS: Tuple[str, ...] = (
    "MODEL.ROI_BOX_HEAD.NUM_CONV", "4", "MODEL.ROI_BOX_HEAD.CONV_DIM", "128",
    "MODEL.ROI_BOX_HEAD.NUM_FC", "1", "MODEL.ROI_BOX_HEAD.FC_DIM", "512",
)
# Timing needs no learning: a small constant LR (no schedule) so that no norm diverges (FrozenBN and
# no norm in FPN/heads from random init would at 0.02 without warm-up); speed does not depend on it.
BENCH_OPTS: Tuple[str, ...] = ("SOLVER.BASE_LR", "0.001", "DATALOADER.NUM_WORKERS", "0")
# Targets of issue 8, drawn on the plot and checked in the tables.
TRAIN_TARGETS = {"EvalNorm": 1.10, "MABN": 1.15, "SyncBN": 1.02}
INFERENCE_TARGETS = {"EvalNorm": 1.10, "MABN": 1.02}
PRECISE_BN_TARGET = 1.2


def norm_overrides(norm: str, mask: bool, placement: str = "train") -> List[str]:
    """The config keys a user sets for ``norm``: backbone, FPN, box head (and mask head).

    FrozenBN in training is detectron2's default placement: the backbone only, FPN and heads with no
    norm (FrozenBN there would be a fixed affine map of random init). For inference (``placement =
    "inference"``) FrozenBN is the reference at EVERY norm position: what a BN model folds to, so
    the ratios isolate the cost of the norm's inference path.
    """
    if placement not in ("train", "inference"):
        raise ValueError(f"placement must be 'train' or 'inference', got {placement!r}")
    head = "" if (norm == "FrozenBN" and placement == "train") else norm
    opts = ["MODEL.RESNETS.NORM", norm, "MODEL.FPN.NORM", head, "MODEL.ROI_BOX_HEAD.NORM", head]
    if mask:
        opts += ["MODEL.ROI_MASK_HEAD.NORM", head]
    return opts


def load_bench_config(arch: str, ims_per_batch: int, norm: str, placement: str = "train",
                      opts: Sequence[str] = (), config_file: Optional[str] = None):
    from ..d2.train import load_config

    if config_file is None:
        if arch not in ARCH_CONFIGS:
            raise ValueError(f"unknown architecture {arch!r}; accepted: {', '.join(ARCH_CONFIGS)}")
        config_file = os.path.join(REPO, ARCH_CONFIGS[arch])
    all_opts = list(BOX_HEAD_OPTS) + list(BENCH_OPTS) + ["SOLVER.IMS_PER_BATCH", str(ims_per_batch)]
    all_opts += list(opts) + norm_overrides(norm, arch == "mrcnn", placement)
    if placement == "inference":
        all_opts += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    return load_config(config_file, all_opts)


def unavailable_reason(norm: str) -> Optional[str]:
    if norm not in available_norms():
        return f"not available: norm {norm!r} is not registered in this installation"
    return None


def load_batches(cfg, num_batches: int) -> List[list]:
    """``num_batches`` batches of the config's training loader, read into memory once."""
    from detectron2.data import build_detection_train_loader

    iterator = iter(build_detection_train_loader(cfg))
    return [next(iterator) for _ in range(num_batches)]


def build_trainer(cfg, batches: Sequence[list]):
    """A detectron2 SimpleTrainer for ``cfg``'s model over ``batches`` cycled (seeded model init)."""
    from detectron2.engine import SimpleTrainer
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer

    torch.manual_seed(0)
    model = build_model(cfg)  # routed through d2_bnstats (factories see cfg, model transforms run)
    model.train()
    return SimpleTrainer(model, itertools.cycle(batches), build_optimizer(cfg, model))


def _clock(name: str) -> Callable[[], float]:
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    if name not in clocks:
        raise ValueError(f"clock must be one of {sorted(clocks)}, got {name!r}")
    return clocks[name]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


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
    target: Optional[float] = None  # issue 8's target for the ratio, where there is one
    meets_target: Optional[bool] = None
    rounds: int = 0
    skipped: Optional[str] = None  # "not available: ..." or why it could not be measured


def _summarise(rows: Dict[str, TimingRow], times: Dict[str, List[float]], reference: str, targets: Dict[str, float]):
    ref = times.get(reference)
    for key, row in rows.items():
        t = times.get(key)
        if row.skipped or not t:
            continue
        row.median_s = statistics.median(t)
        row.spread = _spread(t)
        row.rounds = len(t)
        if ref:
            ratios = [a / b for a, b in zip(t, ref)]
            row.ratio = statistics.median(ratios)
            row.ratio_spread = _spread(ratios)
        base = key.split("/")[0].split(" ")[0]
        if base in targets:
            row.target = targets[base]
            row.meets_target = None if row.ratio is None else row.ratio <= row.target


def _interleave(entries: Dict[str, Callable[[], float]], repeats: int, progress=None) -> Dict[str, List[float]]:
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
) -> List[TimingRow]:
    """Seconds per training iteration of each norm, ratio to BN; see the module docstring."""
    from detectron2.utils.events import EventStorage

    if TRAIN_REFERENCE not in norms:
        norms = [TRAIN_REFERENCE] + list(norms)
    now = _clock(clock)
    rows = {n: TimingRow("train", arch, ims_per_batch, n) for n in norms}
    trainers = {}
    batches = None
    with EventStorage(0):
        for norm in norms:
            reason = unavailable_reason(norm)
            if reason:
                rows[norm].skipped = reason
                continue
            try:
                cfg = load_bench_config(arch, ims_per_batch, norm, "train", opts)
                if batches is None:  # the same batches for every norm
                    batches = load_batches(cfg, num_batches)
                trainer = build_trainer(cfg, batches)
                for _ in range(warmup):
                    trainer.run_step()
                trainers[norm] = (trainer, cfg.MODEL.DEVICE)
            except Exception as e:
                if norm == TRAIN_REFERENCE:
                    raise
                rows[norm].skipped = f"failed: {_short(e)}"
        if progress is not None:
            progress(f"training {arch} {ims_per_batch} img/batch: {len(trainers)} norms, {repeats} rounds x {iters} iterations")

        def block(trainer, device):
            def run():
                _sync(device)
                start = now()
                for _ in range(iters):
                    trainer.run_step()
                _sync(device)
                return (now() - start) / iters

            return run

        times = _interleave({n: block(*trainers[n]) for n in trainers}, repeats, progress)
    _summarise(rows, times, TRAIN_REFERENCE, TRAIN_TARGETS)
    return list(rows.values())


def _inference_inputs(batches: Sequence[list], num_images: int) -> List[dict]:
    images = [d for batch in batches for d in batch]
    if not images:
        raise ValueError("no images to run inference on")
    images = [images[i % len(images)] for i in range(num_images)]
    return [{"image": d["image"], "height": d["height"], "width": d["width"]} for d in images]


def benchmark_inference(
    arch: str = "frcnn",
    norms: Sequence[str] = INFERENCE_NORMS,
    evalnorm_modes: Sequence[str] = EVALNORM_MODES,
    repeats: int = 5,
    num_images: int = 8,
    train_steps: int = 2,
    ims_per_batch: int = 2,
    opts: Sequence[str] = (),
    clock: str = "wall",
    progress: Optional[Callable[[str], None]] = None,
) -> List[TimingRow]:
    """Seconds per image of each norm (and EvalNorm mode) in eval mode, ratio to FrozenBN."""
    from detectron2.utils.events import EventStorage

    if INFERENCE_REFERENCE not in norms:
        norms = [INFERENCE_REFERENCE] + list(norms)
    now = _clock(clock)
    rows: Dict[str, TimingRow] = {}
    entries: Dict[str, Callable[[], float]] = {}
    inputs = batches = None

    def add_entry(key, model, device, prepare=None):
        def run():
            if prepare is not None:
                prepare()
            model.eval()
            with torch.no_grad():
                _sync(device)
                start = now()
                for x in inputs:
                    model([x])
                _sync(device)
            return (now() - start) / len(inputs)

        entries[key] = run

    with EventStorage(0):
        for norm in norms:
            keys = [norm]
            if norm == "EvalNorm":
                keys = [f"EvalNorm/{m}" for m in evalnorm_modes] or [norm]
            elif norm == "MABN":
                keys = ["MABN", "MABN (folded)"]
            for k in keys:
                rows[k] = TimingRow("inference", arch, 1, k)
            reason = unavailable_reason(norm)
            if reason:
                for k in keys:
                    rows[k].skipped = reason
                continue
            try:
                cfg = load_bench_config(arch, ims_per_batch, norm, "inference", opts)
                if batches is None:  # the same batches and images for every norm
                    batches = load_batches(cfg, max(1, train_steps))
                    inputs = _inference_inputs(batches, num_images)
                trainer = build_trainer(cfg, batches)
                for _ in range(train_steps):
                    trainer.run_step()
                model, device = trainer.model, cfg.MODEL.DEVICE
                if norm == "EvalNorm":
                    import d2_bnstats

                    set_mode = getattr(d2_bnstats, "set_evalnorm_mode", None)
                    if set_mode is None:
                        raise RuntimeError("d2_bnstats.set_evalnorm_mode is missing")
                    for m in evalnorm_modes:
                        kw = {"alpha": EVALNORM_FIXED_ALPHA} if m == "fixed" else {}
                        set_mode(model, m, **kw)  # checks the mode now rather than mid-timing
                        add_entry(f"EvalNorm/{m}", model, device, prepare=lambda m=m, kw=kw: set_mode(model, m, **kw))
                elif norm == "MABN":
                    add_entry("MABN", model, device)
                    try:
                        from ..d2.norms_mabn import fold_weight_centralization

                        folded = copy.deepcopy(model)
                        fold_weight_centralization(folded)
                        add_entry("MABN (folded)", folded, device)
                    except Exception as e:
                        rows["MABN (folded)"].skipped = f"failed: {_short(e)}"
                else:
                    add_entry(norm, model, device)
            except Exception as e:
                if norm == INFERENCE_REFERENCE:
                    raise
                for k in keys:
                    rows[k].skipped = rows[k].skipped or f"failed: {_short(e)}"
        if progress is not None:
            progress(f"inference {arch}: {len(entries)} models/modes, {repeats} rounds x {num_images} images")
        for run in entries.values():  # warm-up
            run()
        times = _interleave(entries, repeats, progress)
    _summarise(rows, times, INFERENCE_REFERENCE, INFERENCE_TARGETS)
    return list(rows.values())


# ---------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_training_memory(arch: str, ims_per_batch: int, norm: str, iters: int, num_batches: int,
                            opts: Sequence[str] = ()) -> dict:
    """In THIS process (meant to be a fresh one): training peak resident set above the baseline."""
    from detectron2.utils.events import EventStorage

    cfg = load_bench_config(arch, ims_per_batch, norm, "train", opts)
    batches = load_batches(cfg, num_batches)
    trainer = build_trainer(cfg, batches)
    baseline_kib = _status_kib("VmRSS")
    reset = _reset_peak() and baseline_kib is not None and _status_kib("VmHWM") is not None
    rusage_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with EventStorage(0):
        for _ in range(iters):
            trainer.run_step()
    if reset:
        peak_kib = _status_kib("VmHWM")
        method = "VmHWM after reset - VmRSS before"
        delta = peak_kib - baseline_kib
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss after - ru_maxrss before"
        delta = peak_kib - rusage_before
    return {"peak_mib": peak_kib / 1024, "training_mib": delta / 1024, "method": method}


@dataclasses.dataclass
class MemoryRow:
    arch: str
    ims_per_batch: int
    norm: str
    training_mib: Optional[float] = None  # peak resident set during training minus before it
    peak_mib: Optional[float] = None  # the process's peak resident set
    ratio: Optional[float] = None  # training_mib / BN's
    method: Optional[str] = None
    skipped: Optional[str] = None


def benchmark_memory(
    arch: str = "frcnn",
    ims_per_batch: int = 2,
    norms: Sequence[str] = TRAIN_NORMS,
    iters: int = 3,
    num_batches: int = 2,
    opts: Sequence[str] = (),
    threads: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> List[MemoryRow]:
    """Training peak memory of each norm, each in a fresh Python process; ratio to BN."""
    if TRAIN_REFERENCE not in norms:
        norms = [TRAIN_REFERENCE] + list(norms)
    rows = []
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for norm in norms:
        row = MemoryRow(arch, ims_per_batch, norm)
        rows.append(row)
        row.skipped = unavailable_reason(norm)
        if row.skipped:
            continue
        args = json.dumps({"arch": arch, "ims_per_batch": ims_per_batch, "norm": norm, "iters": iters,
                           "num_batches": num_batches, "opts": list(opts), "threads": threads})
        proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "d2_bnstats.benchmark.e2e", "--memory-worker", args],
                              capture_output=True, text=True, env=env)
        result = None
        for line in proc.stdout.splitlines()[::-1]:
            if line.startswith("MEMORY_RESULT "):
                result = json.loads(line[len("MEMORY_RESULT "):])
                break
        if proc.returncode != 0 or result is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
            if norm == TRAIN_REFERENCE:
                raise RuntimeError(f"memory worker for {norm} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
            row.skipped = f"failed: {tail}"
            continue
        row.training_mib, row.peak_mib, row.method = result["training_mib"], result["peak_mib"], result["method"]
        if progress is not None:
            progress(f"memory {arch} {ims_per_batch} img/batch {norm}: +{row.training_mib:.0f} MiB (peak {row.peak_mib:.0f} MiB)")
    bn = next((r.training_mib for r in rows if r.norm == TRAIN_REFERENCE), None)
    for r in rows:
        if r.training_mib is not None and bn:
            r.ratio = r.training_mib / bn
    return rows


# ------------------------------------------------------------------------------------- PreciseBN


@dataclasses.dataclass
class PreciseBNRow:
    images: int  # n: images the pass runs over
    batches: int
    forward_s: Optional[float] = None  # plain training-mode forwards, no grad
    precise_bn_s: Optional[float] = None
    ratio: Optional[float] = None  # precise_bn / forward (median over repetitions)
    spread: Optional[float] = None
    repeats: int = 0
    skipped: Optional[str] = None


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


def _precise_bn_library():
    """popstats' benchmark function, or None where it is not in this installation."""
    try:
        from .precise_bn import benchmark_precise_bn
    except ImportError:
        return None
    return benchmark_precise_bn


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
    bench = _precise_bn_library()
    if bench is None:
        for r in rows:
            r.skipped = "not available: d2_bnstats.benchmark.precise_bn (issue 6, PreciseBN) is not in this installation"
        return rows, None, None
    from detectron2.utils.events import EventStorage

    cfg = load_bench_config(arch, ims_per_batch, TRAIN_REFERENCE, "train", opts)
    pool = load_batches(cfg, pool_batches)
    trainer = build_trainer(cfg, pool)
    with EventStorage(0):
        trainer.run_step()
    model = trainer.model
    for i, row in enumerate(rows):
        batches = [pool[b % len(pool)] for b in range(row.batches)]
        reps = max(1, round(repeats * num_images[0] / row.images))
        result = bench(model, batches, repeats=reps, warmup=1 if i == 0 else 0, fvcore=False, clock=clock)
        row.forward_s, row.precise_bn_s = result.forward_s, result.precise_bn_s
        row.ratio, row.spread, row.repeats = result.ratio, result.spread, reps
        if progress is not None:
            progress(f"PreciseBN over {row.images} images: forward {row.forward_s:.2f} s, PreciseBN {row.precise_bn_s:.2f} s, {row.ratio:.3f}x")
    done = [r for r in rows if r.precise_bn_s is not None]
    fit_p = linear_fit([r.images for r in done], [r.precise_bn_s for r in done])
    fit_f = linear_fit([r.images for r in done], [r.forward_s for r in done])
    return rows, fit_p, fit_f


# --------------------------------------------------------------------------------- whole run


@dataclasses.dataclass
class BenchmarkSettings:
    archs: Tuple[str, ...] = ("frcnn", "mrcnn")
    ims_per_batch: Tuple[int, ...] = (2, 8)
    norms: Tuple[str, ...] = TRAIN_NORMS
    repeats: int = 5
    iters: int = 3
    warmup: int = 2
    num_batches: int = 4
    memory: bool = True
    memory_norms: Optional[Tuple[str, ...]] = None  # default: the same as norms
    memory_iters: int = 3
    inference: bool = True
    inference_images: int = 8
    precise_bn: bool = True
    # images per PreciseBN pass; issue 8 asks for 100, 1000, 10000 (tools/benchmark.py
    # --precise-bn-images 100 1000 10000, ~1 h more on 2 cores); the default stays shorter
    precise_bn_images: Tuple[int, ...] = (100, 300, 1000)
    precise_bn_repeats: int = 3
    clock: str = "cpu"  # this process's CPU time; with 1 thread = wall time on an idle machine, steady on a busy one
    threads: Optional[int] = 1  # torch threads: 1 (several threads on a loaded machine spin: 8x slower, noisy)
    opts: Tuple[str, ...] = ()


TINY = dict(archs=("frcnn",), ims_per_batch=(2,), repeats=2, iters=1, warmup=1, num_batches=1, memory_iters=1,
            memory_norms=("BN", "FrozenBN", "EvalNorm"),
            inference_images=1, precise_bn_images=(2, 4, 6), precise_bn_repeats=1,
            opts=("MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
                  "MODEL.RPN.POST_NMS_TOPK_TEST", "32", "TEST.DETECTIONS_PER_IMAGE", "5",
                  "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
                  "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"))


def run_benchmark(settings: BenchmarkSettings, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Everything the settings ask for; returns a JSON-ready dict (see :func:`format_report`)."""
    import platform

    if settings.threads:
        torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    out = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "settings": dataclasses.asdict(settings),
        "targets": {"train": TRAIN_TARGETS, "inference": INFERENCE_TARGETS, "precise_bn": PRECISE_BN_TARGET},
        "train": [], "memory": [], "inference": [], "precise_bn": None,
    }
    opts = list(settings.opts)
    for arch in settings.archs:
        for ipb in settings.ims_per_batch:
            rows = benchmark_training(arch, ipb, settings.norms, settings.repeats, settings.iters, settings.warmup,
                                      settings.num_batches, opts, settings.clock, progress)
            out["train"] += [dataclasses.asdict(r) for r in rows]
            if settings.memory:
                mem = benchmark_memory(arch, ipb, settings.memory_norms or settings.norms, settings.memory_iters,
                                       min(settings.num_batches, settings.memory_iters), opts, settings.threads, progress)
                out["memory"] += [dataclasses.asdict(r) for r in mem]
        if settings.inference:
            inf_norms = [INFERENCE_REFERENCE] + [n for n in settings.norms if n != INFERENCE_REFERENCE]
            rows = benchmark_inference(arch, inf_norms, EVALNORM_MODES, settings.repeats, settings.inference_images,
                                       train_steps=settings.warmup, ims_per_batch=min(settings.ims_per_batch),
                                       opts=opts, clock=settings.clock, progress=progress)
            out["inference"] += [dataclasses.asdict(r) for r in rows]
    if settings.precise_bn:
        rows, fit_p, fit_f = benchmark_precise_bn_scaling(
            settings.archs[0], min(settings.ims_per_batch), settings.precise_bn_images,
            pool_batches=max(1, settings.num_batches), repeats=settings.precise_bn_repeats, opts=opts,
            clock=settings.clock, progress=progress)
        out["precise_bn"] = {
            "arch": settings.archs[0], "ims_per_batch": min(settings.ims_per_batch),
            "rows": [dataclasses.asdict(r) for r in rows],
            "fit_precise_bn": dataclasses.asdict(fit_p) if fit_p else None,
            "fit_forward": dataclasses.asdict(fit_f) if fit_f else None,
            "available": all(r.skipped is None for r in rows),
        }
    out["seconds"] = time.perf_counter() - start
    return out


# ------------------------------------------------------------------------------------- reporting


def _fmt(v, pattern):
    return "" if v is None else pattern.format(v)


def _target_cell(row: dict) -> str:
    if row.get("target") is None:
        return ""
    mark = "" if row.get("meets_target") is None else (" ok" if row["meets_target"] else " MISSED")
    return f"<= {row['target']:.2f}x{mark}"


def format_report(result: dict) -> str:
    """Markdown tables of a :func:`run_benchmark` result."""
    from tabulate import tabulate

    m = result["machine"]
    parts = [f"Machine: {m['processor']}, {m['cpus']} CPUs, torch {m['torch']}, {m['threads']} threads; "
             f"load average at start {m.get('load_average_at_start')}; clock: {result['settings']['clock']}; "
             f"{result.get('seconds', 0):.0f} s in all."]
    if result["train"]:
        parts.append("### Training: seconds per iteration, ratio to BN (same run, interleaved)")
        parts.append(tabulate([[r["arch"], r["ims_per_batch"], r["norm"], _fmt(r["median_s"], "{:.3f}"),
                                _fmt(r["ratio"], "{:.3f}x"), _fmt(r["spread"], "{:.0%}"), _target_cell(r), r["skipped"] or ""]
                               for r in result["train"]],
                              headers=["model", "img/batch", "norm", "s/iter", "/ BN", "spread", "target", "note"],
                              tablefmt="github"))
    if result["memory"]:
        parts.append("### Training peak memory (fresh process per norm), ratio to BN")
        parts.append(tabulate([[r["arch"], r["ims_per_batch"], r["norm"], _fmt(r["training_mib"], "{:.0f}"),
                                _fmt(r["peak_mib"], "{:.0f}"), _fmt(r["ratio"], "{:.2f}x"), r["skipped"] or ""]
                               for r in result["memory"]],
                              headers=["model", "img/batch", "norm", "training MiB", "process peak MiB", "/ BN", "note"],
                              tablefmt="github"))
    if result["inference"]:
        parts.append("### Inference: seconds per image, ratio to FrozenBN (same run, interleaved)")
        parts.append(tabulate([[r["arch"], r["norm"], _fmt(r["median_s"], "{:.4f}"), _fmt(r["ratio"], "{:.3f}x"),
                                _fmt(r["spread"], "{:.0%}"), _target_cell(r), r["skipped"] or ""]
                               for r in result["inference"]],
                              headers=["model", "norm / mode", "s/image", "/ FrozenBN", "spread", "target", "note"],
                              tablefmt="github"))
    pb = result.get("precise_bn")
    if pb:
        parts.append(f"### PreciseBN over n images ({pb['arch']}, BN, {pb['ims_per_batch']} img/batch), "
                     f"ratio to plain training-mode forwards (target <= {PRECISE_BN_TARGET}x, linear in n)")
        parts.append(tabulate([[r["images"], r["batches"], _fmt(r["forward_s"], "{:.3f}"), _fmt(r["precise_bn_s"], "{:.3f}"),
                                _fmt(r["ratio"], "{:.3f}x"), r["repeats"], r["skipped"] or ""] for r in pb["rows"]],
                              headers=["n images", "batches", "forward s", "PreciseBN s", "ratio", "reps", "note"],
                              tablefmt="github"))
        for label, fit in (("PreciseBN", pb.get("fit_precise_bn")), ("forward", pb.get("fit_forward"))):
            if fit:
                parts.append(f"{label}: {fit['slope_s_per_image'] * 1000:.2f} ms/image + {fit['intercept_s']:.3f} s, "
                             f"R^2 = {fit['r2']:.4f}")
    return "\n\n".join(parts)


def plot_report(result: dict, path: str) -> Optional[str]:
    """A PNG of the ratios with issue 8's targets drawn; returns the path (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))

    def bars(ax, rows, title, ref, targets):
        groups = sorted({(r["arch"], r["ims_per_batch"]) for r in rows})
        names = list(dict.fromkeys(r["norm"] for r in rows))
        width = 0.8 / max(1, len(groups))
        for g, group in enumerate(groups):
            vals = []
            for n in names:
                r = next((r for r in rows if (r["arch"], r["ims_per_batch"]) == group and r["norm"] == n), None)
                vals.append(r["ratio"] if r and r["ratio"] is not None else float("nan"))
            label = f"{group[0]}" + (f" {group[1]} img" if rows[0]["table"] == "train" else "")
            ax.bar([i + g * width for i in range(len(names))], vals, width, label=label)
        for n, t in targets.items():
            for i, name in enumerate(names):
                if name.split("/")[0].split(" ")[0] == n:
                    ax.hlines(t, i - 0.1, i + 0.8, colors="red", linestyles="--")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=45, ha="right")
        ax.set_ylabel(f"ratio to {ref}")
        ax.set_title(title + " (red dashes: targets)")
        ax.legend(fontsize=8)

    if result["train"]:
        bars(axes[0], result["train"], "training s/iter", TRAIN_REFERENCE, TRAIN_TARGETS)
    if result["inference"]:
        bars(axes[1], result["inference"], "inference s/image", INFERENCE_REFERENCE, INFERENCE_TARGETS)
    pb = result.get("precise_bn")
    ax = axes[2]
    if pb and pb.get("available"):
        xs = [r["images"] for r in pb["rows"]]
        ax.plot(xs, [r["ratio"] for r in pb["rows"]], "o-", label="PreciseBN / forward")
        ax.axhline(PRECISE_BN_TARGET, color="red", linestyle="--", label=f"target {PRECISE_BN_TARGET}x")
        ax.set_xscale("log")
        ax.set_xlabel("n images")
        ax.set_ylabel("ratio to plain training-mode forward")
        fit = pb.get("fit_precise_bn")
        ax.set_title("PreciseBN cost" + (f" (linear fit R^2 = {fit['r2']:.4f})" if fit else ""))
        ax.legend(fontsize=8)
    else:
        ax.set_title("PreciseBN: not available")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _memory_worker_main(arg: str) -> None:
    import d2_bnstats  # noqa: F401  (norms, data sets)

    a = json.loads(arg)
    if a.get("threads"):
        torch.set_num_threads(a["threads"])
    result = measure_training_memory(a["arch"], a["ims_per_batch"], a["norm"], a["iters"], a["num_batches"], a["opts"])
    print("MEMORY_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        _memory_worker_main(sys.argv[2])
    else:
        sys.exit("this module is a library; the benchmark's command line is tools/benchmark.py")
