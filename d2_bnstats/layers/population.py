"""PreciseBN: population statistics of normalization layers recomputed from many training batches.

Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021), §3 and Appendix; methods.md §3.

**PreciseBN.** With the weights fixed, the model runs in training mode on many batches. For every
population-statistics layer and every call of it, the per-channel moments of the layer's
*input* are taken over all dimensions but the channel: n values, mean m, biased variance v. The
population statistics weight each call by its number of values and undo nothing else (the biased
variance is already the second central moment of those n values):

    N = Σ n,   μ = Σ n·m / N,   σ² = Σ n·(v + m²) / N − μ²        (E[x²] per call = v + m²)

which is exactly the mean and biased variance of the union of all values. (Per-batch *unbiased*
variances, as torch's BN produces, need the Bessel correction undone first: v = v_unbiased·(n−1)/n;
fvcore's ``update_bn_stats`` does that per batch.) The sums Σn, Σn·m, Σn·(v+m²) are kept in float64
and, with several processes, summed over processes once at the end, so every process gets the
statistics of the union of all processes' data, bit-identical on every process. A layer called
several times per forward (a shared head) accumulates every call; a layer that saw no value (N = 0)
keeps its statistics. A call whose mean or variance is not finite (a NaN or Inf in the layer's
input) is left out of the sums and counted (``LayerStatistics.nonfinite_calls``,
``PreciseBNReport.nonfinite``, summed over processes); decided with tensors, no host synchronisation
per call. (For torch's own BatchNorm{1,2,3}d the per-call moments are read from the
layer's running buffers, updated with momentum 1 during the pass, instead of reducing the input a
second time; other layers' inputs are reduced by a forward pre-hook.) Everything else is left as it
was: parameters are never written (no gradient is taken), every registered buffer and every plain module attribute is restored after the
pass (EMA updates, counters, ring buffers), and so are the random number generators (torch, CUDA,
numpy, random) and each module's train/eval flag.

Which layers are population-statistics layers and how their statistics are written:
:mod:`d2_bnstats.layers.population_protocol`. FrozenBN late in training: :mod:`d2_bnstats.layers.frozen_bn`;
batch statistics at test: :mod:`d2_bnstats.layers.test_batch_stats`.
"""
import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .moments import all_finite, all_reduce_sum, bessel_correction, moments_from_power_sums, power_sums, shifted_moments
from .population_protocol import layer_input, population_layers, set_population_statistics, unwrap


def _channel_dim(x: torch.Tensor) -> int:
    return 1 if x.dim() >= 2 else 0


# --------------------------------------------------------------------------------------------------
# leaving everything but the statistics as it was


def _rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules"})


@contextlib.contextmanager
def preserved_state(model: nn.Module, rng: bool = True) -> Iterator[None]:
    """Inside the block anything may run; on exit every registered buffer of every submodule gets its
    value back (same tensor object), every plain attribute in a module's ``__dict__`` that was rebound,
    added or removed is put back (this includes the ``training`` flags), and with ``rng`` the random
    number generators are restored. Parameters are not saved: code inside must not write them."""
    modules = list(model.modules())
    buffers = []
    attrs = []
    for module in modules:
        for name, buf in module._buffers.items():
            buffers.append((module, name, buf, None if buf is None else buf.detach().clone()))
        attrs.append((module, {k: v for k, v in module.__dict__.items() if k not in _MODULE_INTERNALS}))
    rng_state = _rng_state() if rng else None
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buf, value in buffers:
                if buf is not None:
                    buf.copy_(value)
                module._buffers[name] = buf
        for module, saved in attrs:
            current = module.__dict__
            for key in [k for k in current if k not in _MODULE_INTERNALS and k not in saved]:
                del current[key]
            for key, value in saved.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value
        if rng_state is not None:
            _set_rng_state(rng_state)


_MISSING = object()


# --------------------------------------------------------------------------------------------------
# PreciseBN


class _Accumulator:
    """Σn, Σn·m, Σn·(v+m²) of one layer's inputs, float64, and the number of non-finite calls left out."""

    def __init__(self):
        self.count = None
        self.sum = None
        self.sum_sq = None
        self.nonfinite = None  # calls whose moments were not finite (float64, 0-dim)
        self.shift = None  # channel means of the first call (refreshed where not finite), for shifted_moments
        self.calls = 0
        self.empty_calls = 0

    def _init(self, channels: int, device) -> None:
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(channels, dtype=torch.float64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Add the moments of a layer input (channels on dim 1)."""
        self.calls += 1
        if self.sum is None:
            self._init(x.shape[_channel_dim(x)], x.device)
        if x.numel() == 0:
            self.empty_calls += 1
            return
        if self.shift is None:
            self.shift = x.detach().float().mean([d for d in range(x.dim()) if d != _channel_dim(x)])
        # a shift from a non-finite call would make every later call non-finite: use 0 there until a
        # finite call provides its mean
        n, mean, var = shifted_moments(x, torch.nan_to_num(self.shift, nan=0.0, posinf=0.0, neginf=0.0))
        self.shift = torch.where(torch.isfinite(self.shift), self.shift, mean.to(self.shift.dtype))
        self._add(torch.tensor(float(n), dtype=torch.float64, device=mean.device), mean, var)

    def add_moments(self, n: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Add moments computed elsewhere: n values per channel, mean, biased variance."""
        self.calls += 1
        if self.sum is None:
            self._init(mean.numel(), mean.device)
        self._add(torch.tensor(float(n), dtype=torch.float64, device=mean.device), mean, var)

    def _add(self, n, mean, var) -> None:
        n, total, total_sq = power_sums(n, mean, var)
        ok = all_finite(total, total_sq)
        self.count += torch.where(ok, n, 0.0)
        self.sum += torch.where(ok, total, 0.0)
        self.sum_sq += torch.where(ok, total_sq, 0.0)
        self.nonfinite += (~ok).to(self.nonfinite.dtype)


@dataclass
class LayerStatistics:
    """What PreciseBN found for one layer: N (total number of values over all processes), calls
    (this process), the mean and biased variance over the union (None if N = 0), and whether the
    layer was updated."""

    name: str
    count: float
    calls: int
    mean: Optional[torch.Tensor] = None
    var: Optional[torch.Tensor] = None
    updated: bool = False
    nonfinite_calls: int = 0  # calls left out because their statistics were not finite (all processes)


@dataclass
class PreciseBNReport:
    layers: List[LayerStatistics] = field(default_factory=list)
    num_batches: int = 0
    seconds: float = 0.0

    @property
    def updated(self) -> List[str]:
        return [s.name for s in self.layers if s.updated]

    @property
    def skipped(self) -> List[str]:
        """Layers that saw no (finite) value, N = 0, and kept their statistics."""
        return [s.name for s in self.layers if not s.updated]

    @property
    def nonfinite(self) -> Dict[str, int]:
        """{layer: calls left out because their statistics were not finite}, for layers with any."""
        return {s.name: s.nonfinite_calls for s in self.layers if s.nonfinite_calls}

    def __getitem__(self, name: str) -> LayerStatistics:
        for s in self.layers:
            if s.name == name:
                return s
        raise KeyError(f"no layer {name!r} in this PreciseBN report; layers: {[s.name for s in self.layers]}")


def _pre_hook_accumulate(accumulator: _Accumulator):
    def hook(module, inputs):
        x = layer_input(inputs)
        if x is not None:
            accumulator.add(x)

    return hook


# torch's own BN classes (exact types: a subclass may normalise or update differently) update
# running_mean/running_var with the batch mean and unbiased batch variance of their input in
# training mode; with momentum 1 the buffers hold exactly those after each call, so PreciseBN reads
# them instead of reducing the input a second time (what makes the pass cost ~ a plain forward).
_TORCH_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _reads_running_statistics(module: nn.Module) -> bool:
    return type(module) in _TORCH_BN_TYPES and module.track_running_stats


def _post_hook_read_running(accumulator: _Accumulator):
    def hook(module, inputs, output):
        x = layer_input(inputs)
        if x is None:
            return
        if not module.training:  # something switched it to eval inside the forward: no update
            accumulator.add(x)
            return
        if x.numel() == 0:
            accumulator.calls += 1
            accumulator.empty_calls += 1
            if accumulator.sum is None:
                accumulator._init(x.shape[_channel_dim(x)], x.device)
            return
        n = x.numel() // x.shape[_channel_dim(x)]
        accumulator.add_moments(n, module.running_mean, module.running_var / bessel_correction(n))
        _reset_running(module)  # with momentum 1 torch still keeps 0·old: a NaN batch would poison the next

    return hook


def _reset_running(module: nn.Module) -> None:
    with torch.no_grad():
        module.running_mean.zero_()
        module.running_var.fill_(1.0)


def _attach(module: nn.Module, accumulator: _Accumulator):
    if _reads_running_statistics(module):
        module.momentum = 1.0  # restored with the module's other attributes after the pass
        _reset_running(module)  # torch computes (1 - m)·old + m·new: a NaN/inf old value would survive
        return module.register_forward_hook(_post_hook_read_running(accumulator))
    return module.register_forward_pre_hook(_pre_hook_accumulate(accumulator))


def default_forward(model: nn.Module, batch: Any) -> Any:
    """What PreciseBN runs per batch unless told otherwise: ``model(batch)``."""
    return model(batch)


def precise_bn(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    *,
    forward: Callable[[nn.Module, Any], Any] = default_forward,
    layers: Optional[Sequence[Tuple[str, nn.Module]]] = None,
    sync: bool = True,
    progress: Optional[Callable[[int, int], None]] = None,
) -> PreciseBNReport:
    """Recompute the population statistics of ``model``'s layers from ``num_batches`` batches.

    The model (unwrapped from DistributedDataParallel) runs in training mode (``forward(model,
    batch)``, default ``model(batch)``) with no gradient; ``layers`` defaults to every non-frozen
    population-statistics layer. With ``sync`` and an initialised process group the sums are added over processes (a collective: every process must
    call this with the same ``num_batches``). ``progress(done, total)`` is called after every batch.
    Returns a :class:`PreciseBNReport`; see the module docstring for what is and is not changed.
    """
    if num_batches < 1:
        raise ValueError(f"PreciseBN needs at least one batch, got num_batches={num_batches}")
    inner = unwrap(model)
    if layers is None:
        layers = population_layers(inner)
    accumulators = [_Accumulator() for _ in layers]
    start = time.perf_counter()
    done = 0
    handles = []
    try:
        with preserved_state(inner), torch.no_grad():
            handles = [_attach(m, a) for (_, m), a in zip(layers, accumulators)]
            inner.train()
            iterator = iter(batches)
            for done in range(1, num_batches + 1):
                try:
                    batch = next(iterator)
                except StopIteration:
                    raise ValueError(
                        f"PreciseBN was asked for {num_batches} batches but the data ran out after {done - 1}"
                    ) from None
                forward(inner, batch)
                if progress is not None:
                    progress(done, num_batches)
    finally:
        for h in handles:
            h.remove()
    report = PreciseBNReport(num_batches=done)
    _finish(layers, accumulators, report, sync)
    report.seconds = time.perf_counter() - start
    return report


def _finish(layers, accumulators, report: PreciseBNReport, sync: bool) -> None:
    # Every process packs [N, Σn·m, Σn·(v+m²), non-finite calls] of every layer into one float64
    # vector; one all-reduce.
    parts, shapes = [], []
    for (name, module), acc in zip(layers, accumulators):
        if acc.sum is None:  # never called on this process: channels from the layer itself
            acc._init(_num_channels(module), _module_device(module))
        shapes.append(acc.sum.numel())
        parts += [acc.count.reshape(1), acc.sum, acc.sum_sq, acc.nonfinite.reshape(1)]
    if not parts:
        return
    device = parts[0].device
    flat = torch.cat([p.to(device) for p in parts])
    if sync:
        all_reduce_sum([flat])
    offset = 0
    for ((name, module), acc), channels in zip(zip(layers, accumulators), shapes):
        count = flat[offset]
        total = flat[offset + 1 : offset + 1 + channels]
        total_sq = flat[offset + 1 + channels : offset + 1 + 2 * channels]
        nonfinite = flat[offset + 1 + 2 * channels]
        offset += 2 + 2 * channels
        stats = LayerStatistics(name, float(count), acc.calls, nonfinite_calls=int(nonfinite))
        if float(count) > 0:
            mean, var = moments_from_power_sums(count, total, total_sq)
            stats.mean, stats.var = mean.float(), var.float()
            set_population_statistics(module, mean.float().to(_module_device(module)),
                                      var.float().to(_module_device(module)), count.detach().cpu())
            stats.updated = True
        report.layers.append(stats)


def _num_channels(module: nn.Module) -> int:
    for attr in ("num_features", "num_channels"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    for attr in ("running_mean", "weight"):
        t = getattr(module, attr, None)
        if isinstance(t, torch.Tensor):
            return t.numel()
    raise TypeError(f"cannot tell the number of channels of {type(module).__name__}")


def _module_device(module: nn.Module) -> torch.device:
    for t in list(module.buffers()) + list(module.parameters()):
        return t.device
    return torch.device("cpu")

