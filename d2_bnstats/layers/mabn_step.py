"""When an MABN step ends: after the optimizer step that updates the layer, or :func:`end_step`.

MABN's step t counts optimizer steps (see :mod:`d2_bnstats.layers.mabn`). A layer records each call's
statistics when that call's backward runs; the step ends, for every layer that recorded something,
after the optimizer has updated the parameters: the step's count-weighted statistics become one
ring-buffer entry, R is updated and t advances.

Who ends the step:

* Any ``torch.optim.Optimizer`` that holds the layer's parameters: after its ``step()`` (torch's
  ``register_optimizer_step_post_hook``; one process-wide hook, installed the first time a layer
  records statistics, not when it is built) the step of every layer with recorded statistics whose
  weight or bias that optimizer holds ends. The layer needs nothing else, so a model trained in a
  plain PyTorch loop, a ``copy.deepcopy`` of a model or a whole module saved with ``torch.save`` and
  loaded again counts its steps as the original does; an optimizer of another model leaves it alone.
* :func:`attach_step_hook` ``(model)``: after every ``step()`` of any optimizer, the step of ``model``'s
  MABN layers ends, also of those whose parameters no optimizer holds (a frozen affine). One hook
  per model (attaching twice returns the same handle); the hook holds the model weakly, does nothing
  once the model is gone and is removed by ``handle.remove()`` (or, for a collected model, at the
  next attach). The plug-in's MABN model transform attaches it to the models it builds.
* :func:`end_step` ``()``: for loops without a torch optimizer, called after each update; it ends the
  step of every MABN layer that recorded statistics (or of one model's layers). A layer that has
  recorded :data:`PENDING_CALLS_WARNING` backward passes without its step ending warns, naming these
  calls (a loop that updates the parameters itself and never calls :func:`end_step` would otherwise
  keep t = 0 and R = 1 for ever).

An AMP step skipped by ``GradScaler`` does not call ``optimizer.step()``, so its statistics merge into
the next step.
"""
import threading
import warnings
import weakref
from typing import Dict, Optional

from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["PENDING_CALLS_WARNING", "StepHookHandle", "attach_step_hook", "end_step"]

# Backward passes recorded in one step before a layer warns that nothing ends its steps: far more
# than gradient accumulation times the calls of a shared head (e.g. 16 x 5 FPN levels = 80).
PENDING_CALLS_WARNING = 256

# Layers that recorded statistics (a backward ran) since their step last ended.
_PENDING: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_LOCK = threading.Lock()
# id(model) -> handle; an entry whose model was collected is purged at the next attach (a hook
# cannot remove itself: torch iterates the hooks while calling them).
_HANDLES: Dict[int, "StepHookHandle"] = {}
_PROCESS_WIDE = {"handle": None}
_WATCH = {"handle": None}


def _end_steps_updated_by(optimizer, args, kwargs) -> None:
    """After ``optimizer.step()``: end the step of the pending layers whose parameters it holds."""
    if not _PENDING:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer in list(_PENDING):
        if any(id(p) in held for p in layer.parameters(recurse=False)):
            layer._end_step()


def _watch_optimizer_steps() -> None:
    if _WATCH["handle"] is None:
        with _LOCK:
            if _WATCH["handle"] is None:
                _WATCH["handle"] = register_optimizer_step_post_hook(_end_steps_updated_by)


def mark_pending(layer: nn.Module) -> None:
    """``layer`` recorded statistics in the current step (called by the layer)."""
    _watch_optimizer_steps()
    _PENDING.add(layer)


def clear_pending(layer: nn.Module) -> None:
    """``layer``'s step ended, or its state was reset or loaded without pending statistics."""
    _PENDING.discard(layer)


def end_step(model: Optional[nn.Module] = None) -> None:
    """End the current step of every MABN layer that recorded statistics in it (only those of
    ``model``, if given). Layers that recorded nothing are left alone."""
    pending = list(_PENDING)
    if model is not None and pending:
        members = set(pending)
        pending = [m for m in model.modules() if m in members]
    for layer in pending:
        layer._end_step()


class StepHookHandle:
    """The optimizer-step hook of one model; :meth:`remove` takes it out."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)
        self._key = id(model)
        self._torch_handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        model = self._model()
        if model is not None:
            end_step(model)

    @property
    def model(self) -> Optional[nn.Module]:
        """The model, or None once it was collected."""
        return self._model()

    @property
    def attached(self) -> bool:
        return self._torch_handle is not None

    def remove(self) -> None:
        """Remove the hook (idempotent); the model's layers then end their steps only by :func:`end_step`."""
        with _LOCK:
            if self._torch_handle is not None:
                self._torch_handle.remove()
                self._torch_handle = None
            if _HANDLES.get(self._key) is self:
                del _HANDLES[self._key]


def attach_step_hook(model: nn.Module) -> StepHookHandle:
    """Make every ``optimizer.step()`` end the step of ``model``'s MABN layers (see the module
    docstring); idempotent per model. Returns the handle (``handle.remove()`` detaches it)."""
    with _LOCK:
        for key, handle in list(_HANDLES.items()):
            if handle.model is None:  # collected model: its hook does nothing; take it out
                handle._torch_handle.remove()
                handle._torch_handle = None
                del _HANDLES[key]
        handle = _HANDLES.get(id(model))
        if handle is not None and handle.model is model:
            return handle
        handle = StepHookHandle(model)
        _HANDLES[id(model)] = handle
        return handle


def _end_every_step(optimizer, args, kwargs) -> None:
    end_step()


def set_optimizer_step_hook(enabled: bool) -> None:
    """Deprecated: install (True) or remove (False) one process-wide hook that ends the step of every
    MABN layer after any optimizer step. Use :func:`attach_step_hook` per model instead; layers no
    longer install this hook themselves."""
    warnings.warn(
        "set_optimizer_step_hook is deprecated: use attach_step_hook(model) (per model) or end_step()",
        DeprecationWarning,
        stacklevel=2,
    )
    with _LOCK:
        if enabled and _PROCESS_WIDE["handle"] is None:
            _PROCESS_WIDE["handle"] = register_optimizer_step_post_hook(_end_every_step)
        elif not enabled and _PROCESS_WIDE["handle"] is not None:
            _PROCESS_WIDE["handle"].remove()
            _PROCESS_WIDE["handle"] = None
