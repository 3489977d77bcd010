"""Population statistics of normalisation layers: PreciseBN, frozen statistics, batch statistics at test.

Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021), §3 and Appendix; methods.md §3.

**PreciseBN.** With the weights fixed, the model runs in training mode on many batches. For every
population-statistics layer (below) and every call of it, the per-channel moments of the layer's
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
keeps its statistics. (For torch's own BatchNorm{1,2,3}d the per-call moments are read from the
layer's running buffers, updated with momentum 1 during the pass, instead of reducing the input a
second time; other layers' inputs are reduced by a forward pre-hook.) Everything else is left as it was: parameters are never written (no
gradient is taken), every registered buffer and every plain module attribute is restored after the
pass (EMA updates, counters, ring buffers), and so are the random number generators (torch, CUDA,
numpy, random) and each module's train/eval flag.

**Population-statistics layers** (the project's protocol): a module that implements
``set_population_statistics(mean, var, count)`` receives the mean and BIASED variance of its input
over the whole pass and the number of values N (a 0-dim float64 tensor); any other
``nn.modules.batchnorm._BatchNorm`` with running statistics gets ``running_mean = μ`` and, following
torch's convention that ``running_var`` is an unbiased estimate, ``running_var = σ²·N/(N−1)``
(N is 10⁵–10⁹ here, so this factor is 1 to within 1e-5). This covers BatchNorm{1,2,3}d, SyncBatchNorm,
detectron2's BatchNorm2d/NaiveSyncBatchNorm and every BN subclass (EvalNorm, GhostBN, ...), and each
per-level copy inside a per-level wrapper. Layers without running statistics (``track_running_stats
=False``), FrozenBatchNorm2d and GroupNorm are not population-statistics layers.

**FrozenBN late in training** (:func:`freeze_batch_statistics`): a frozen layer normalises with its
population statistics even when the model is in training mode (its forward runs with ``training =
False``, which also stops the EMA update), while its affine parameters keep their gradients. It
survives ``model.train()``/``model.eval()``; PreciseBN leaves frozen layers alone (their statistics are
those the rest of the network was trained with).

**Batch statistics at test** (:func:`batch_statistics`): in evaluation mode each call of a layer
normalises with the mean and biased variance of its own input batch, exactly as in training, and its
state is restored after the call (the population statistics are not touched).
"""
import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .sync import all_reduce_sum

PROTOCOL_METHOD = "set_population_statistics"
_FROZEN_ATTR = "_d2_bnstats_frozen_bn"
_FROZEN_RESTORE_ATTR = "_d2_bnstats_frozen_restore_training"
_BATCH_STATS_SAVED_ATTR = "_d2_bnstats_batch_stats_saved"


# --------------------------------------------------------------------------------------------------
# which layers have population statistics


def implements_protocol(module: nn.Module) -> bool:
    return callable(getattr(module, PROTOCOL_METHOD, None))


def is_population_layer(module: nn.Module) -> bool:
    """True for a layer whose inference uses statistics estimated from training batches."""
    if implements_protocol(module):
        return True
    return (
        isinstance(module, _BatchNorm)
        and getattr(module, "running_mean", None) is not None
        and getattr(module, "running_var", None) is not None
    )


def is_frozen(module: nn.Module) -> bool:
    """True for a layer frozen by :func:`freeze_batch_statistics`."""
    return getattr(module, _FROZEN_ATTR, None) is not None


def population_layers(model: nn.Module, include_frozen: bool = False) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every population-statistics layer of ``model``, in ``named_modules`` order.

    A layer reachable under several names is listed once; frozen layers only with ``include_frozen``.
    """
    seen, layers = set(), []
    for name, module in model.named_modules():
        if id(module) in seen or not is_population_layer(module):
            continue
        if is_frozen(module) and not include_frozen:
            continue
        seen.add(id(module))
        layers.append((name, module))
    return layers


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside (Distributed)DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _channel_dim(x: torch.Tensor) -> int:
    return 1 if x.dim() >= 2 else 0


def _layer_input(inputs) -> Optional[torch.Tensor]:
    x = inputs[0] if isinstance(inputs, tuple) and inputs else inputs
    return x if isinstance(x, torch.Tensor) else None


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


def shifted_moments(x: torch.Tensor, shift: Optional[torch.Tensor] = None):
    """(n, mean, biased variance) per channel (dim 1) of a non-empty ``x``, mean and variance in
    float64. One pass over x − shift and its square, reduced in float32 (or x's wider dtype): with a
    shift near the channel mean (the layer's running mean, or the first batch's mean) there is no
    cancellation, and it costs a quarter of ``torch.var_mean`` on CPU. ``shift=None`` uses x's mean."""
    c = _channel_dim(x)
    dims = [d for d in range(x.dim()) if d != c]
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if shift is None:
        shift = x.mean(dims)
    view = [1] * x.dim()
    view[c] = -1
    d = x - shift.to(x.dtype).reshape(view)
    s1 = d.sum(dims)
    d.mul_(d)
    s2 = d.sum(dims)
    n = x.numel() // x.shape[c]
    m = s1.double() / n
    return n, shift.double() + m, (s2.double() / n - m * m).clamp(min=0.0)


class _Accumulator:
    """Σn, Σn·m, Σn·(v+m²) of one layer's inputs, float64."""

    def __init__(self):
        self.count = None
        self.sum = None
        self.sum_sq = None
        self.shift = None  # the first call's channel means, for shifted_moments
        self.calls = 0
        self.empty_calls = 0

    def _init(self, channels: int, device) -> None:
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(channels, dtype=torch.float64, device=device)

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
        n, mean, var = shifted_moments(x, self.shift)
        self._add(torch.tensor(float(n), dtype=torch.float64, device=mean.device), mean, var)

    def add_moments(self, n: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Add moments computed elsewhere: n values per channel, mean, biased variance."""
        self.calls += 1
        if self.sum is None:
            self._init(mean.numel(), mean.device)
        self._add(torch.tensor(float(n), dtype=torch.float64, device=mean.device), mean, var)

    def _add(self, n, mean, var) -> None:
        n = n.to(torch.float64)
        mean = mean.detach().to(torch.float64)
        self.count += n
        self.sum += n * mean
        self.sum_sq += n * (var.detach().to(torch.float64) + mean * mean)


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
        """Layers that saw no value (N = 0) and kept their statistics."""
        return [s.name for s in self.layers if not s.updated]

    def __getitem__(self, name: str) -> LayerStatistics:
        for s in self.layers:
            if s.name == name:
                return s
        raise KeyError(f"no layer {name!r} in this PreciseBN report; layers: {[s.name for s in self.layers]}")


def _pre_hook_accumulate(accumulator: _Accumulator):
    def hook(module, inputs):
        x = _layer_input(inputs)
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
        x = _layer_input(inputs)
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
        accumulator.add_moments(n, module.running_mean, module.running_var * ((n - 1) / n))

    return hook


def _attach(module: nn.Module, accumulator: _Accumulator):
    if _reads_running_statistics(module):
        module.momentum = 1.0  # restored with the module's other attributes after the pass
        with torch.no_grad():  # torch computes (1 - m)·old + m·new: a NaN/inf old value would survive
            module.running_mean.zero_()
            module.running_var.fill_(1.0)
        return module.register_forward_hook(_post_hook_read_running(accumulator))
    return module.register_forward_pre_hook(_pre_hook_accumulate(accumulator))


def _default_forward(model, batch):
    return model(batch)


@torch.no_grad()
def set_population_statistics(layer: nn.Module, mean: torch.Tensor, var: torch.Tensor, count) -> None:
    """Give ``layer`` population statistics (mean and BIASED variance of N = ``count`` values) through
    the protocol: its own ``set_population_statistics`` if it has one, else torch's BN buffers
    (``running_var`` holds the unbiased value σ²·N/(N−1))."""
    count = torch.as_tensor(count, dtype=torch.float64)
    if implements_protocol(layer):
        getattr(layer, PROTOCOL_METHOD)(mean, var, count)
        return
    if not is_population_layer(layer):
        raise TypeError(
            f"{type(layer).__name__} has no population statistics: expected a _BatchNorm with running "
            f"statistics or a module implementing {PROTOCOL_METHOD}(mean, var, count)"
        )
    n = float(count)
    unbiased = var * (n / (n - 1.0)) if n > 1 else var
    layer.running_mean.copy_(mean.to(layer.running_mean))
    layer.running_var.copy_(unbiased.to(layer.running_var))


def precise_bn(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    *,
    forward: Callable[[nn.Module, Any], Any] = _default_forward,
    layers: Optional[Sequence[Tuple[str, nn.Module]]] = None,
    sync: bool = True,
    progress: Optional[Callable[[int, int], None]] = None,
) -> PreciseBNReport:
    """Recompute the population statistics of ``model``'s layers from ``num_batches`` batches.

    The model (unwrapped from DistributedDataParallel) runs in training mode (``forward(model,
    batch)``, default ``model(batch)``) with no gradient; ``layers`` defaults to every non-frozen population-statistics layer. With ``sync`` and
    an initialised process group the sums are added over processes (a collective: every process must
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
    # Every process packs [N, Σn·m, Σn·(v+m²)] of every layer into one float64 vector; one all-reduce.
    parts, shapes = [], []
    for (name, module), acc in zip(layers, accumulators):
        if acc.sum is None:  # never called on this process: channels from the layer itself
            channels = _num_channels(module)
            device = _module_device(module)
            acc.count = torch.zeros((), dtype=torch.float64, device=device)
            acc.sum = torch.zeros(channels, dtype=torch.float64, device=device)
            acc.sum_sq = torch.zeros(channels, dtype=torch.float64, device=device)
        shapes.append(acc.sum.numel())
        parts += [acc.count.reshape(1), acc.sum, acc.sum_sq]
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
        offset += 1 + 2 * channels
        stats = LayerStatistics(name, float(count), acc.calls)
        if float(count) > 0:
            mean = total / count
            var = (total_sq / count - mean * mean).clamp(min=0.0)
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


# --------------------------------------------------------------------------------------------------
# FrozenBN late in training


def _frozen_pre_hook(module, inputs):
    if module.training:
        module.training = False
        setattr(module, _FROZEN_RESTORE_ATTR, True)


def _frozen_post_hook(module, inputs, output):
    if getattr(module, _FROZEN_RESTORE_ATTR, False):
        module.training = True
        delattr(module, _FROZEN_RESTORE_ATTR)


def freeze_batch_statistics(model: nn.Module, layers: Optional[Sequence[Tuple[str, nn.Module]]] = None) -> List[str]:
    """From now on, ``layers`` (default: every population-statistics layer) normalise with their
    population statistics also in training mode; returns the names newly frozen. Affine parameters
    keep training. Idempotent; :func:`unfreeze_batch_statistics` undoes it."""
    inner = unwrap(model)
    if layers is None:
        layers = population_layers(inner, include_frozen=True)
    names = []
    for name, module in layers:
        if is_frozen(module):
            continue
        handles = (
            module.register_forward_pre_hook(_frozen_pre_hook),
            module.register_forward_hook(_frozen_post_hook),
        )
        setattr(module, _FROZEN_ATTR, handles)
        names.append(name)
    return names


def unfreeze_batch_statistics(model: nn.Module) -> List[str]:
    names = []
    for name, module in unwrap(model).named_modules():
        handles = getattr(module, _FROZEN_ATTR, None)
        if handles is None:
            continue
        for h in handles:
            h.remove()
        delattr(module, _FROZEN_ATTR)
        if getattr(module, _FROZEN_RESTORE_ATTR, False):
            module.training = True
            delattr(module, _FROZEN_RESTORE_ATTR)
        names.append(name)
    return names


def frozen_layers(model: nn.Module) -> List[str]:
    return [name for name, m in unwrap(model).named_modules() if is_frozen(m)]


# --------------------------------------------------------------------------------------------------
# batch statistics at test


def _save_buffers(module: nn.Module):
    return [(name, buf, buf.detach().clone()) for name, buf in module._buffers.items() if buf is not None]


def _restore_buffers(module: nn.Module) -> None:
    saved = getattr(module, _BATCH_STATS_SAVED_ATTR, None)
    if saved is None:
        return
    with torch.no_grad():
        for name, buf, value in saved:
            buf.copy_(value)
            module._buffers[name] = buf
    delattr(module, _BATCH_STATS_SAVED_ATTR)


def _batch_stats_pre_hook(module, inputs):
    if module.training:
        return  # training mode already normalises with batch statistics
    x = _layer_input(inputs)
    if x is None or x.numel() == 0:
        return
    _restore_buffers(module)  # a previous call that raised left its state behind
    shift = getattr(module, "running_mean", None)  # near the batch mean, so no cancellation
    if isinstance(shift, torch.Tensor):
        shift = torch.nan_to_num(shift, nan=0.0, posinf=0.0, neginf=0.0)
    n, mean, var = shifted_moments(x, shift if isinstance(shift, torch.Tensor) else None)
    setattr(module, _BATCH_STATS_SAVED_ATTR, _save_buffers(module))
    with torch.no_grad():
        if implements_protocol(module):
            getattr(module, PROTOCOL_METHOD)(mean.float(), var.float(), torch.tensor(float(n), dtype=torch.float64))
        else:
            # eval-mode BN divides by sqrt(running_var + eps): the biased batch variance, as in training
            module.running_mean.copy_(mean.to(module.running_mean))
            module.running_var.copy_(var.to(module.running_var))


def _batch_stats_post_hook(module, inputs, output):
    _restore_buffers(module)


@contextlib.contextmanager
def batch_statistics(model: nn.Module, layers: Optional[Sequence[Tuple[str, nn.Module]]] = None):
    """Inside the block, population-statistics layers in evaluation mode normalise every call with
    the statistics of that call's input (the test batch): mean and biased variance over all
    dimensions but the channel, per process. Their state is restored after every call. Frozen
    layers are included (at test every layer is in evaluation mode anyway)."""
    inner = unwrap(model)
    if layers is None:
        layers = population_layers(inner, include_frozen=True)
    handles = []
    try:
        for _, module in layers:
            handles.append(module.register_forward_pre_hook(_batch_stats_pre_hook))
            handles.append(module.register_forward_hook(_batch_stats_post_hook))
        yield [name for name, _ in layers]
    finally:
        for h in handles:
            h.remove()
        for _, module in layers:
            _restore_buffers(module)
