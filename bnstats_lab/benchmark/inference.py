"""Inference cost of every norm end to end: seconds per image in eval mode, ratio to FrozenBN.

One image per call, as detectron2's evaluation runs it, every model on the same images, in rounds
like training (:func:`~.timing.interleave`). FrozenBN is the reference at every norm position (what
a BN model folds to). Each norm's model first trains ``train_steps`` iterations (EvalNorm records
its batch size and learns alpha/beta, MABN fills its buffers). EvalNorm is timed in each of its
evaluation modes, each set on the EvalNorm model before its block runs; MABN and the Weight
Standardization norms also with their weight transform folded into the convs (deployment, :data:`FOLDS`). ``SCORE_THRESH_TEST`` is 0 (:func:`~.models.load_bench_config`),
so every model does the same post-processing and mask work whatever its weights.

That holds only while a model's outputs are finite: detectron2 drops boxes with non-finite scores,
and a model that returns no detections skips the mask head and most of the post-processing. After
two training steps the running statistics are still near their initial values; a BN model whose
convs are weight-standardized (unit-variance filters) then normalizes activations whose scale grows
with every layer, overflows and detects nothing. So every model with population statistics gets
them estimated on the training batches (:func:`d2_bnstats.precise_bn`) before it is timed, as a
deployed model has; and every timed block counts its detections: a row whose count differs from its
reference's is marked not comparable (:func:`mark_incomparable`) and gets no target status.
"""
import copy
import statistics
from typing import Callable, Dict, List, Optional, Sequence

import torch

from d2_bnstats import population_layers, precise_bn
from d2_bnstats.layers.evalnorm import set_evalnorm_mode
from d2_bnstats.layers.weight_centralization import fold_weight_centralization
from d2_bnstats.layers.weight_standardization import fold_weight_standardization

from .models import (
    EVALNORM_FIXED_ALPHA,
    EVALNORM_MODES,
    INFERENCE_NORMS,
    INFERENCE_REFERENCE,
    INFERENCE_RELATIVE_TO,
    INFERENCE_TARGETS,
    SYNTHETIC_ARCHS,
    build_trainer,
    load_batches,
    load_bench_config,
    unavailable_reason,
    with_references,
)
from .timing import TimingRow, clock_for, interleave, short_error, summarize, sync

Block = Callable[[], float]
# Healthy models all return DETECTIONS_PER_IMAGE boxes at score threshold 0, unless non-maximum
# suppression leaves fewer; a relative difference above this means the models did different work.
DETECTIONS_TOLERANCE = 0.1
# Norms whose deployed model differs from the trained one by a weight transform folded into the
# convs; each is timed as trained and folded.
FOLDS: Dict[str, Callable] = {"MABN": fold_weight_centralization, "GN+WS": fold_weight_standardization,
                              "BN+WS": fold_weight_standardization}


def _inference_inputs(batches: Sequence[list], num_images: int) -> List[dict]:
    images = [d for batch in batches for d in batch]
    if not images:
        raise ValueError("no images to run inference on")
    images = [images[i % len(images)] for i in range(num_images)]
    return [{"image": d["image"], "height": d["height"], "width": d["width"]} for d in images]


def _row_keys(norm: str, evalnorm_modes: Sequence[str]) -> List[str]:
    """The rows of one norm: EvalNorm one per mode, MABN as trained and folded."""
    if norm == "EvalNorm":
        return [f"EvalNorm/{m}" for m in evalnorm_modes] or [norm]
    if norm in FOLDS:
        return [norm, f"{norm} (folded)"]
    return [norm]


def _timed_inference(model, device: str, inputs: List[dict], now: Callable[[], float],
                     prepare: Optional[Callable[[], None]] = None,
                     detections: Optional[List[float]] = None) -> Block:
    """A block that runs ``model`` in eval mode on every input and returns the seconds per image;
    each run appends its detections per image to ``detections``."""

    def run():
        if prepare is not None:
            prepare()
        model.eval()
        found = 0
        with torch.no_grad():
            sync(device)
            start = now()
            for x in inputs:
                found += len(model([x])[0]["instances"])
            sync(device)
            elapsed = now() - start
        if detections is not None:
            detections.append(found / len(inputs))
        return elapsed / len(inputs)

    return run


def mark_incomparable(rows: Dict[str, TimingRow], detections: Dict[str, List[float]]) -> None:
    """Mark (in place) each timed row whose models returned another number of detections per image
    than its reference's: its ratio times different work, so it gets a note and no target status."""
    for key, row in rows.items():
        ref = row.reference
        if row.skipped or not ref or ref == key or key not in detections or ref not in detections:
            continue
        mine, theirs = statistics.mean(detections[key]), statistics.mean(detections[ref])
        if abs(mine - theirs) > DETECTIONS_TOLERANCE * max(theirs, 1.0):
            row.note = (f"not comparable: {mine:.3g} detections per image against {theirs:.3g} of "
                        f"{ref} (non-finite outputs?)")
            row.status, row.meets_target = None, None


def _model_blocks(norm: str, model, device: str, inputs: List[dict], now, evalnorm_modes: Sequence[str],
                  rows: Dict[str, TimingRow], detections: Dict[str, List[float]]) -> Dict[str, Block]:
    """The timed blocks of one trained model: EvalNorm per mode, MABN as trained and folded."""
    if norm == "EvalNorm":
        blocks = {}
        for m in evalnorm_modes:
            kw = {"alpha": EVALNORM_FIXED_ALPHA} if m == "fixed" else {}
            set_evalnorm_mode(model, m, **kw)  # checks the mode now rather than mid-timing
            blocks[f"EvalNorm/{m}"] = _timed_inference(
                model, device, inputs, now, prepare=lambda m=m, kw=kw, model=model: set_evalnorm_mode(model, m, **kw),
                detections=detections.setdefault(f"EvalNorm/{m}", []))
        return blocks
    blocks = {norm: _timed_inference(model, device, inputs, now, detections=detections.setdefault(norm, []))}
    if norm in FOLDS:
        try:  # MABN's fold raises while a conv's centralization ramp has not finished
            folded = copy.deepcopy(model)
            FOLDS[norm](folded)
            key = f"{norm} (folded)"
            blocks[key] = _timed_inference(folded, device, inputs, now, detections=detections.setdefault(key, []))
        except Exception as e:
            rows[f"{norm} (folded)"].skipped = f"failed: {short_error(e)}"
    return blocks


def _inference_blocks(arch, norms, evalnorm_modes, num_images, train_steps, ims_per_batch, opts, now,
                      rows: Dict[str, TimingRow], detections: Dict[str, List[float]]) -> Dict[str, Block]:
    """Train each norm's model ``train_steps`` iterations, estimate its population statistics on the
    training batches, and return all its timed blocks; a norm that is not available or fails gets
    the reason in its rows (the reference's failure is raised)."""
    blocks: Dict[str, Block] = {}
    inputs = batches = None
    for norm in norms:
        keys = _row_keys(norm, evalnorm_modes)
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
                batches = load_batches(cfg, max(1, train_steps), synthetic=arch in SYNTHETIC_ARCHS)
                inputs = _inference_inputs(batches, num_images)
            trainer = build_trainer(cfg, batches)
            for _ in range(train_steps):
                trainer.run_step()
            if population_layers(trainer.model):
                precise_bn(trainer.model, batches, len(batches))
            blocks.update(_model_blocks(norm, trainer.model, cfg.MODEL.DEVICE, inputs, now, evalnorm_modes, rows,
                                        detections))
        except Exception as e:
            if norm == INFERENCE_REFERENCE:
                raise
            for k in keys:
                rows[k].skipped = rows[k].skipped or f"failed: {short_error(e)}"
    return blocks


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
    targets: Optional[Dict[str, float]] = None,
) -> List[TimingRow]:
    """Seconds per image of each norm (and EvalNorm mode) in eval mode, ratio to FrozenBN
    (``targets``: default :data:`~.models.INFERENCE_TARGETS`)."""
    from detectron2.utils.events import EventStorage

    norms = with_references(norms, INFERENCE_REFERENCE, INFERENCE_RELATIVE_TO)
    rows: Dict[str, TimingRow] = {}
    detections: Dict[str, List[float]] = {}
    with EventStorage(0):
        entries = _inference_blocks(arch, norms, evalnorm_modes, num_images, train_steps, ims_per_batch, opts,
                                    clock_for(clock), rows, detections)
        if progress is not None:
            progress(f"inference {arch}: {len(entries)} models/modes, {repeats} rounds x {num_images} images")
        for run in entries.values():  # warm-up
            run()
        times = interleave(entries, repeats, progress)
    summarize(rows, times, INFERENCE_REFERENCE, INFERENCE_TARGETS if targets is None else targets,
              INFERENCE_RELATIVE_TO)
    mark_incomparable(rows, detections)
    return list(rows.values())
