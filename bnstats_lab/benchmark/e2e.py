"""End-to-end cost of every norm in real detectron2 models: what users feel, as ratios in ONE run.

Four measurements (``tools/benchmark.py`` is the CLI, ``make bench`` the full run), each in its own
module; this one holds the settings and runs them all (:func:`run_benchmark`):

* **Training** (:mod:`.training`): seconds per iteration of the CPU-sized Faster R-CNN /
  Mask R-CNN (R-18-FPN, 128 px, fashion-scenes) for each norm, as a ratio to BN. Every norm gets its
  own model and optimizer, built from the same config with the norm set the way a user sets it (config
  keys, :func:`.models.norm_overrides`), and a detectron2 :class:`~detectron2.engine.SimpleTrainer`;
  the data loader's batches are read into memory once and cycled, so every norm trains on the same
  batches and data loading is not timed. After ``warmup`` untimed iterations per norm, each of
  ``repeats`` rounds times ``iters`` iterations of every norm in turn (round-robin, the starting norm
  rotating each round), so drift of the machine's load hits all norms alike; a norm's figure is the
  median over rounds of the mean iteration time of the round, its spread (max - min) / median, and its
  ratio the median over rounds of (norm / BN in the same round) (:mod:`.timing`).
* **Peak memory** (:mod:`.memory`): for each norm a fresh Python process builds the model, reads the
  batches, resets the kernel's high-water mark of its resident set and reads it again after ``iters``
  training iterations: activations, gradients, optimizer state and allocator slack of training, not
  the model or the data (method and limits on CPU: that module's docstring).
* **Inference** (:mod:`.inference`): seconds per image, one image per call as detectron2's
  evaluation runs it, each model in eval mode on the same images, as a ratio to FrozenBN at every norm
  position (the model BN folds to). Each norm's model first trains ``train_steps`` iterations (EvalNorm
  records its batch size and learns alpha/beta, MABN fills its buffers), then gets population
  statistics estimated on the training batches (PreciseBN), as a deployed model has; a row whose
  number of detections differs from its reference's is marked as not comparable. EvalNorm is timed in each of
  its evaluation modes; MABN also with its weight centralization folded (deployment). To make every
  model do the same work whatever its weights, ``SCORE_THRESH_TEST`` is 0 (every model returns
  ``DETECTIONS_PER_IMAGE`` boxes, and Mask R-CNN runs its mask head on all of them).
* **PreciseBN** (:mod:`.precise_bn_scaling`): the cost of recomputing population statistics over n
  images as a ratio to plain training-mode forwards with no gradient over the same images, for growing
  n, with a least-squares line through (n, seconds) and its R^2 (linear growth: R^2 close to 1,
  intercept small). This reuses :func:`bnstats_lab.benchmark.precise_bn.benchmark_precise_bn`.

**On a GPU** (``device="cuda"``, ``tools/benchmark.py --device cuda``): the models are built on the
device, cuDNN's autotuner is on, timed blocks synchronise before and after and use the wall clock,
peak memory is the CUDA allocator's (:func:`.memory.benchmark_cuda_memory`, one norm at a time in
this process), the GPU targets apply (:data:`.models.GPU_TRAIN_TARGETS`, ...) and the result also
holds the synchronising CUDA calls of one training iteration per norm (``host_syncs``). The GPU model
is ``frcnn_r50`` (:mod:`.models`), on synthetic batches.

A norm name that is not registered in this installation (e.g. a third-party norm whose plug-in is
not imported) is reported as not available (``skipped``), not an error; so is a norm whose model
fails to build or train (the reason is kept). Tables and plot: :mod:`.report`.
"""
import dataclasses
import os
import time
from typing import Callable, Optional, Tuple

import torch

from .inference import benchmark_inference
from .memory import benchmark_cuda_memory, benchmark_memory
from .models import (
    EVALNORM_MODES,
    GPU_INFERENCE_TARGETS,
    GPU_MEMORY_TARGET,
    GPU_TRAIN_TARGETS,
    INFERENCE_REFERENCE,
    INFERENCE_TARGETS,
    PRECISE_BN_TARGET,
    SYNTHETIC_ARCHS,
    TRAIN_NORMS,
    TRAIN_TARGETS,
)
from .precise_bn_scaling import benchmark_precise_bn_scaling
from .timing import is_cuda, prepare_device
from .training import benchmark_training


@dataclasses.dataclass
class BenchmarkSettings:
    archs: Tuple[str, ...] = ("frcnn", "mrcnn")
    ims_per_batch: Tuple[int, ...] = (2, 8)
    norms: Tuple[str, ...] = TRAIN_NORMS
    repeats: int = 5
    iters: int = 2  # per round; with the rounds' interleaving this keeps `make bench` near an hour
    warmup: int = 2
    num_batches: int = 4
    training: bool = True
    memory: bool = True
    memory_norms: Optional[Tuple[str, ...]] = None  # default: the same as norms
    memory_iters: int = 3
    inference: bool = True
    inference_images: int = 32  # fixed images per round: enough work for a ratio known to a few %
    precise_bn: bool = True
    # images per PreciseBN pass; the full sizes are 100, 1000, 10000 (tools/benchmark.py
    # --precise-bn-images 100 1000 10000, ~1 h more on 2 cores); the default stays shorter
    precise_bn_images: Tuple[int, ...] = (100, 300, 1000)
    precise_bn_repeats: int = 3
    clock: str = "cpu"  # this process's CPU time; with 1 thread = wall time on an idle machine, steady on a busy one
    threads: Optional[int] = 1  # torch threads: 1 (several threads on a loaded machine spin: 8x slower, noisy)
    opts: Tuple[str, ...] = ()
    device: str = "cpu"  # MODEL.DEVICE of every model; "cuda": see the module docstring


TINY = dict(archs=("frcnn",), ims_per_batch=(2,), repeats=2, iters=1, warmup=1, num_batches=1, memory_iters=1,
            memory_norms=("BN", "FrozenBN", "EvalNorm"),
            inference_images=1, precise_bn_images=(2, 4, 6), precise_bn_repeats=1,
            opts=("MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
                  "MODEL.RPN.POST_NMS_TOPK_TEST", "32", "TEST.DETECTIONS_PER_IMAGE", "5",
                  "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
                  "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"))


def _machine(device: str = "cpu") -> dict:
    import platform

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if is_cuda(device):
        machine.update(gpu=torch.cuda.get_device_name(torch.device(device)), cuda=torch.version.cuda,
                       cudnn=torch.backends.cudnn.version(), cudnn_benchmark=torch.backends.cudnn.benchmark)
    return machine


def _targets(settings: BenchmarkSettings) -> dict:
    if is_cuda(settings.device):
        return {"train": GPU_TRAIN_TARGETS, "inference": GPU_INFERENCE_TARGETS, "memory": GPU_MEMORY_TARGET,
                "precise_bn": PRECISE_BN_TARGET}
    return {"train": TRAIN_TARGETS, "inference": INFERENCE_TARGETS, "precise_bn": PRECISE_BN_TARGET}


def _arch_opts(settings: BenchmarkSettings, arch: str) -> list:
    """The overrides of ``arch``'s models: the settings' and the device (the CPU configs say "cpu"
    already; the R-50 config leaves detectron2's default, "cuda")."""
    opts = list(settings.opts)
    if settings.device != "cpu" or arch in SYNTHETIC_ARCHS:
        opts += ["MODEL.DEVICE", settings.device]
    return opts


def _run_memory(settings: BenchmarkSettings, arch: str, ipb: int, opts: list, progress) -> list:
    norms = settings.memory_norms or settings.norms
    if is_cuda(settings.device):
        return benchmark_cuda_memory(arch, ipb, norms, settings.memory_iters, min(settings.num_batches, settings.memory_iters),
                                     opts, progress)
    return benchmark_memory(arch, ipb, norms, settings.memory_iters, min(settings.num_batches, settings.memory_iters),
                            opts, settings.threads, progress)


def _run_arch(settings: BenchmarkSettings, arch: str, out: dict, progress) -> None:
    """Training (and memory) at every batch size, then inference, of one architecture, into ``out``."""
    opts = _arch_opts(settings, arch)
    targets = _targets(settings)
    for ipb in settings.ims_per_batch:
        if settings.training:
            syncs = {} if is_cuda(settings.device) else None
            rows = benchmark_training(arch, ipb, settings.norms, settings.repeats, settings.iters, settings.warmup,
                                      settings.num_batches, opts, settings.clock, progress, targets["train"], syncs)
            out["train"] += [dataclasses.asdict(r) for r in rows]
            if syncs is not None:
                out.setdefault("host_syncs", []).extend(
                    {"arch": arch, "ims_per_batch": ipb, "norm": n, "per_iteration": c} for n, c in syncs.items())
        if settings.memory:
            out["memory"] += [dataclasses.asdict(r) for r in _run_memory(settings, arch, ipb, opts, progress)]
    if settings.inference:
        inf_norms = [INFERENCE_REFERENCE] + [n for n in settings.norms if n != INFERENCE_REFERENCE]
        rows = benchmark_inference(arch, inf_norms, EVALNORM_MODES, settings.repeats, settings.inference_images,
                                   train_steps=settings.warmup, ims_per_batch=min(settings.ims_per_batch),
                                   opts=opts, clock=settings.clock, progress=progress, targets=targets["inference"])
        out["inference"] += [dataclasses.asdict(r) for r in rows]


def _run_precise_bn(settings: BenchmarkSettings, progress) -> dict:
    rows, fit_p, fit_f = benchmark_precise_bn_scaling(
        settings.archs[0], min(settings.ims_per_batch), settings.precise_bn_images,
        pool_batches=max(1, settings.num_batches), repeats=settings.precise_bn_repeats, opts=_arch_opts(settings, settings.archs[0]),
        clock=settings.clock, progress=progress)
    return {
        "arch": settings.archs[0], "ims_per_batch": min(settings.ims_per_batch),
        "rows": [dataclasses.asdict(r) for r in rows],
        "fit_precise_bn": dataclasses.asdict(fit_p) if fit_p else None,
        "fit_forward": dataclasses.asdict(fit_f) if fit_f else None,
    }


def run_benchmark(settings: BenchmarkSettings, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Everything the settings ask for; returns a JSON-ready dict (see :func:`.report.format_report`)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if is_cuda(settings.device) and settings.clock != "wall":
        raise ValueError("on CUDA the benchmark times with the wall clock (clock='wall'): CPU time does not see the GPU")
    prepare_device(settings.device)
    start = time.perf_counter()
    out = {
        "machine": _machine(settings.device),
        "settings": dataclasses.asdict(settings),
        "targets": _targets(settings),
        "train": [], "memory": [], "inference": [], "precise_bn": None,
    }
    for arch in settings.archs:
        _run_arch(settings, arch, out, progress)
    if settings.precise_bn:
        out["precise_bn"] = _run_precise_bn(settings, progress)
    out["seconds"] = time.perf_counter() - start
    return out
