"""Non-finite running-statistics updates skipped once per training step instead of at every layer call.

Every statistics layer of the package guards its own update (:mod:`.moments`, "Non-finite batches"):
a copy and a finiteness test at each call, about 20 µs on CPU, which is +13–16% of a BatchNorm on tiny
maps. A training loop can make the same decision once per step for the whole model instead:

    guard = StepStatisticsGuard(model)       # from now on the layers leave the decision to the guard
    for batch in loader:
        guard.snapshot()                     # before the forward pass
        ...forward, backward, optimizer step...
        guard.restore_nonfinite()            # after it
    guard.close()                            # the layers guard themselves again

**Rule.** After the step, every *covered layer* — a module with ``running_mean`` and ``running_var``
buffers: the package's layers and torch's own BatchNorm, whose update torch does not guard — whose
running statistics contain a value that is not finite gets back the running statistics and the
``num_batches_tracked`` it had at :meth:`~StepStatisticsGuard.snapshot`, and its ``nonfinite_skips``
counter grows by one (the counter :mod:`.moments` defines; torch's layers get one). A layer called
once per step therefore ends exactly as under its own guard.

**Layers called several times in one step** (a head shared by the FPN levels) would lose all of that
step's updates when any one is not finite (measured: one NaN in one of 5 FPN-like levels of different
scales left torch BN's running mean off by up to 2.9 from the run on the 4 finite levels, momentum
0.1, after one such step). So during the first step
after the guard is built, each covered layer's calls are counted (a forward pre-hook, removed at
the end of that step), and from a layer's second call on it is guarded per call for the rest of the
guard's life: the package's layers by their own guard, others (torch's BatchNorm) by a pair of
forward hooks that put back the statistics of a call that left them non-finite (``torch.where``, no
host read). Such a layer then ends every step as if it had seen only the finite calls, except in
that first step when its first call is the non-finite one (then the step's updates are undone as
above). Per-level statistics (``PerLevelNorm``, ``BNSTATS.PER_LEVEL``) avoid shared layers
altogether: each level is a layer called once per step.

**Cost.** One concatenation of the covered statistics at the snapshot, one at the check and one
finiteness reduction read on the host: tens of µs per step on CPU, a fraction of a per mille of a
detector's step. On a GPU the read is one synchronisation per step (detectron2's loop already makes
one to log the losses); the layers make none.

Layers that keep other statistics (MABN's ring buffers) keep their own guard; the rule above still
covers their ``running_mean``/``running_var``.
"""
import math
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from .moments import GUARDED_PER_STEP, SKIP_COUNTER, add_skip_counter, count_skips


def keeps_running_stats(module: nn.Module) -> bool:
    """Whether ``module`` has ``running_mean`` and ``running_var`` tensors (a BatchNorm that tracks them)."""
    return isinstance(getattr(module, "running_mean", None), torch.Tensor) and isinstance(
        getattr(module, "running_var", None), torch.Tensor
    )


def _statistics(layer: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    return layer.running_mean, layer.running_var


class _Group(NamedTuple):
    """The covered layers of one (device, dtype) as read at a snapshot: their statistics tensors
    (mean, var of each layer in turn), their values then as one vector, and their
    ``num_batches_tracked`` tensors and values (None unless every layer has one)."""

    layers: List[nn.Module]
    tensors: List[torch.Tensor]
    values: torch.Tensor
    tracked: Optional[List[torch.Tensor]]
    tracked_values: Optional[torch.Tensor]


def _concat(tensors: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors if all(t.dim() == 1 for t in tensors) else [t.reshape(-1) for t in tensors])


def _read_group(layers: List[nn.Module]) -> _Group:
    tensors: List[torch.Tensor] = []
    tracked: Optional[List[torch.Tensor]] = []
    for layer in layers:
        tensors += _statistics(layer)
        count = getattr(layer, "num_batches_tracked", None)
        if count is None:
            tracked = None
        elif tracked is not None:
            tracked.append(count)
    return _Group(layers, tensors, _concat(tensors), tracked, None if tracked is None else torch.stack(tracked))


def _all_finite(values: torch.Tensor) -> bool:
    """Every value of the vector is finite: one dot product read on the host (a non-finite value makes
    it non-finite); only a non-finite product (or finite values whose squares overflow) is decided
    value by value."""
    return math.isfinite(torch.dot(values, values).item()) or bool(torch.isfinite(values).all())


class StepStatisticsGuard:
    """Skip, once per step, the updates that left a layer's running statistics non-finite (see the
    module docstring). ``model``: any module (a ``DistributedDataParallel`` wrapper included); its
    covered layers are listed at construction, and their own per-call guards are off until
    :meth:`close`."""

    def __init__(self, model: nn.Module):
        self.layers: List[nn.Module] = [m for m in model.modules() if keeps_running_stats(m)]
        # layers grouped by (device, dtype), so that each group is one concatenation
        self._groups: Dict[Tuple[torch.device, torch.dtype], List[nn.Module]] = {}
        # the package's layers have a skip counter from construction and guard themselves per call
        self._self_guarding = set()
        for layer in self.layers:
            if isinstance(getattr(layer, SKIP_COUNTER, None), torch.Tensor):
                self._self_guarding.add(id(layer))
            else:
                add_skip_counter(layer)
            vars(layer)[GUARDED_PER_STEP] = True
            key = (layer.running_mean.device, layer.running_mean.dtype)
            self._groups.setdefault(key, []).append(layer)
        self._before: Optional[List[_Group]] = None
        # the first step's call counts (module docstring), then the per-call guards of shared layers
        self._calls: Dict[int, int] = {}
        self._counting = [layer.register_forward_pre_hook(self._count_call) for layer in self.layers]
        self._per_call: Dict[int, "_PerCallGuard"] = {}

    def _count_call(self, layer: nn.Module, inputs) -> None:
        if not layer.training:
            return
        calls = self._calls.get(id(layer), 0) + 1
        self._calls[id(layer)] = calls
        if calls == 2:  # a layer shared within the step: guard it per call from now on
            self.guard_each_call(layer)
            guard = self._per_call.get(id(layer))
            if guard is not None:
                guard.before(layer, inputs)  # this call's hooks were collected before it was added

    def guard_each_call(self, layer: nn.Module) -> None:
        """Guard ``layer``'s updates call by call from now on (module docstring), as for a layer
        called several times in one step."""
        if id(layer) in self._per_call or GUARDED_PER_STEP not in vars(layer):
            return
        if id(layer) in self._self_guarding:
            vars(layer).pop(GUARDED_PER_STEP, None)
        else:
            self._per_call[id(layer)] = _PerCallGuard(layer)

    def _stop_counting(self) -> None:
        for handle in self._counting:
            handle.remove()
        self._counting = []

    def snapshot(self) -> None:
        """Remember every covered layer's running statistics and ``num_batches_tracked``."""
        with torch.no_grad():
            self._before = [_read_group(layers) for layers in self._groups.values()]
        self._calls = {}

    def restore_nonfinite(self) -> int:
        """Give every covered layer whose running statistics are not all finite its values at the last
        :meth:`snapshot` back and count a skip in it; returns the number of such layers. One finiteness
        read per (device, dtype) group when everything is finite. The statistics tensors are those
        read at the snapshot (a buffer rebound in between is not seen)."""
        if self._before is None:
            raise RuntimeError("StepStatisticsGuard.restore_nonfinite() needs a snapshot() before the step")
        restored = 0
        with torch.no_grad():
            for group in self._before:
                if _all_finite(_concat(group.tensors)):
                    continue
                offset = 0
                for index, layer in enumerate(group.layers):
                    mean, var = group.tensors[2 * index], group.tensors[2 * index + 1]
                    n_mean, n_var = mean.numel(), var.numel()
                    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all())):
                        mean.copy_(group.values[offset : offset + n_mean].view_as(mean))
                        var.copy_(group.values[offset + n_mean : offset + n_mean + n_var].view_as(var))
                        if group.tracked is not None:
                            group.tracked[index].copy_(group.tracked_values[index])
                        count_skips(layer, 1)
                        restored += 1
                    offset += n_mean + n_var
        self._before = None
        self._stop_counting()
        return restored

    def close(self) -> None:
        """Hand the decision back to the layers (each guards its own updates again)."""
        self._stop_counting()
        for guard in self._per_call.values():
            guard.remove()
        self._per_call = {}
        for layer in self.layers:
            vars(layer).pop(GUARDED_PER_STEP, None)
        self._before = None


class _PerCallGuard:
    """For a layer without a guard of its own (torch's BatchNorm): the statistics before each
    training call, put back after it where the call left them non-finite (a skip counted). Tensor
    operations only: no value is read on the host."""

    def __init__(self, layer: nn.Module):
        self._saved = None
        self._handles = [layer.register_forward_pre_hook(self.before), layer.register_forward_hook(self.after)]

    def before(self, layer: nn.Module, inputs) -> None:
        if not layer.training:
            return
        tracked = getattr(layer, "num_batches_tracked", None)
        with torch.no_grad():
            self._saved = (layer.running_mean.clone(), layer.running_var.clone(),
                           tracked.clone() if isinstance(tracked, torch.Tensor) else None)

    def after(self, layer: nn.Module, inputs, output) -> None:
        if self._saved is None:
            return
        mean, var, tracked = self._saved
        self._saved = None
        with torch.no_grad():
            finite = torch.isfinite(layer.running_mean).all() & torch.isfinite(layer.running_var).all()
            # through .data: torch's BatchNorm keeps the running statistics among the tensors its
            # backward checks for changes (they are not used in training mode); a write through the
            # tensor itself would make the step's backward refuse to run
            layer.running_mean.data.copy_(torch.where(finite, layer.running_mean, mean))
            layer.running_var.data.copy_(torch.where(finite, layer.running_var, var))
            if tracked is not None:
                layer.num_batches_tracked.data.copy_(torch.where(finite, layer.num_batches_tracked, tracked))
            count_skips(layer, ~finite)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
