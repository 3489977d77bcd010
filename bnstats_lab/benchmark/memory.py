"""Training peak memory of every norm end to end, each in a fresh Python process; ratio to BN.

For each norm a fresh process (``python -m bnstats_lab.benchmark.memory --memory-worker ARGS``)
builds the model, reads the batches, then resets the kernel's high-water mark of its resident set
(``/proc/self/clear_refs`` = 5; ``VmHWM`` becomes the current ``VmRSS``), runs ``iters`` training
iterations and reads ``VmHWM``. The figure is (peak - resident set before the first iteration):
activations, gradients, optimizer state and allocator slack of training, not the model or the data.
Where the reset is not possible, ``ru_maxrss`` before and after is used instead (then a peak reached
while loading data hides the training peak; the row says which method it used). Limits on CPU: the
resident set counts pages the allocator keeps after freeing (glibc arenas, torch's CPU caching is
off by default), so it is an upper bound of the tensors alive at the peak, and it is page-granular
and read once at the end; ratios between norms in the same configuration are meaningful, absolute
MiB are not a GPU figure.

On CUDA (:func:`benchmark_cuda_memory`) the figure is the allocator's: in this process, one norm at a
time, ``torch.cuda.max_memory_allocated`` above what was allocated before the model was built, over
``iters`` training iterations after ``warmup`` ones (so cuDNN's autotuning workspaces stay out):
parameters, gradients, optimizer state, activations and temporaries of training, the model's and its
batches' device copies included. The model is deleted and the cache emptied before the next norm.
"""
import dataclasses
import json
import os
import resource
import subprocess
import sys
from typing import Callable, List, Optional, Sequence

import torch

from .models import (
    SYNTHETIC_ARCHS,
    TRAIN_NORMS,
    TRAIN_REFERENCE,
    build_trainer,
    load_batches,
    load_bench_config,
    unavailable_reason,
)

RESULT_PREFIX = "MEMORY_RESULT "
WORKER_MODULE = "bnstats_lab.benchmark.memory"  # this module, also when it runs as __main__


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
    batches = load_batches(cfg, num_batches, synthetic=arch in SYNTHETIC_ARCHS)
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


def _worker_env() -> dict:
    """The environment of a worker: this checkout first on ``PYTHONPATH`` (it runs ``-m``)."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _run_worker(args: dict, env: dict):
    """(completed process, the worker's result dict or None)."""
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", WORKER_MODULE, "--memory-worker", json.dumps(args)],
                          capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_PREFIX):
            return proc, json.loads(line[len(RESULT_PREFIX):])
    return proc, None


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
    env = _worker_env()
    for norm in norms:
        row = MemoryRow(arch, ims_per_batch, norm)
        rows.append(row)
        row.skipped = unavailable_reason(norm)
        if row.skipped:
            continue
        proc, result = _run_worker({"arch": arch, "ims_per_batch": ims_per_batch, "norm": norm, "iters": iters,
                                    "num_batches": num_batches, "opts": list(opts), "threads": threads}, env)
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


def measure_cuda_training_memory(arch: str, ims_per_batch: int, norm: str, iters: int, num_batches: int,
                                 opts: Sequence[str] = (), warmup: int = 1) -> dict:
    """In this process, on the config's CUDA device: the allocator's training peak of one norm's model
    above what was allocated before it was built (see the module docstring)."""
    from detectron2.utils.events import EventStorage

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    cfg = load_bench_config(arch, ims_per_batch, norm, "train", opts)
    batches = load_batches(cfg, num_batches, synthetic=arch in SYNTHETIC_ARCHS)
    trainer = build_trainer(cfg, batches)
    with EventStorage(0):
        for _ in range(warmup):
            trainer.run_step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(iters):
            trainer.run_step()
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del trainer
    torch.cuda.empty_cache()
    mib = 1024.0 ** 2
    return {"peak_mib": peak / mib, "training_mib": (peak - before) / mib,
            "method": "CUDA max_memory_allocated during training - memory_allocated before the model"}


def benchmark_cuda_memory(
    arch: str = "frcnn",
    ims_per_batch: int = 2,
    norms: Sequence[str] = TRAIN_NORMS,
    iters: int = 3,
    num_batches: int = 2,
    opts: Sequence[str] = (),
    progress: Optional[Callable[[str], None]] = None,
) -> List[MemoryRow]:
    """Training peak GPU memory of each norm, one norm at a time in this process; ratio to BN."""
    if TRAIN_REFERENCE not in norms:
        norms = [TRAIN_REFERENCE] + list(norms)
    rows = []
    for norm in norms:
        row = MemoryRow(arch, ims_per_batch, norm)
        rows.append(row)
        row.skipped = unavailable_reason(norm)
        if row.skipped:
            continue
        try:
            result = measure_cuda_training_memory(arch, ims_per_batch, norm, iters, num_batches, opts)
        except Exception as e:
            if norm == TRAIN_REFERENCE:
                raise
            row.skipped = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
            continue
        row.training_mib, row.peak_mib, row.method = result["training_mib"], result["peak_mib"], result["method"]
        if progress is not None:
            progress(f"GPU memory {arch} {ims_per_batch} img/batch {norm}: {row.training_mib:.0f} MiB")
    bn = next((r.training_mib for r in rows if r.norm == TRAIN_REFERENCE), None)
    for r in rows:
        if r.training_mib is not None and bn:
            r.ratio = r.training_mib / bn
    return rows


def _memory_worker_main(arg: str) -> None:
    import bnstats_lab  # noqa: F401  (the plug-in's norms, the fashion-scenes data sets)

    a = json.loads(arg)
    if a.get("threads"):
        torch.set_num_threads(a["threads"])
    result = measure_training_memory(a["arch"], a["ims_per_batch"], a["norm"], a["iters"], a["num_batches"], a["opts"])
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        _memory_worker_main(sys.argv[2])
    else:
        sys.exit("this module is a library; the benchmark's command line is tools/benchmark.py")
