"""Host-synchronisation checks of tests/test_cuda.py, tested on the CPU in tests/test_device_parity.py.

:func:`sync_errors`: torch's CUDA sync debug mode is "error" in the whole
block (a synchronising CUDA call raises a RuntimeError that names it), "default" after. For a layer
inside a bigger model whose other parts synchronise (detectron2's box sampling, loss logging):
:class:`LayerSyncGuard` sets "error" exactly while the chosen modules run their forward and while the
autograd nodes those forwards created run in the backward pass (found from the forward's outputs, the
outputs of every torch call made inside it and the tensors the module keeps as attributes, walking
back to the module's inputs and parameters; pre- and post-hooks on each node). The mode setter is a
parameter, so the bookkeeping is tested on CPU with a recording stand-in.
"""
import contextlib
from typing import Callable, Iterable, List, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


def set_cuda_sync_mode(mode: str) -> None:
    torch.cuda.set_sync_debug_mode(mode)


@contextlib.contextmanager
def sync_errors(set_mode: Callable[[str], None] = set_cuda_sync_mode):
    """Inside the block a synchronising CUDA call raises; afterwards the mode is "default"."""
    set_mode("error")
    try:
        yield
    finally:
        set_mode("default")


class _Boundary(torch.autograd.Function):
    """Identity marking where a guarded module's input enters its graph: the backward walk stops here."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


_BOUNDARY_NODE = f"{_Boundary.__name__}Backward"
_ACCUMULATE_NODE = "torch::autograd::AccumulateGrad"


class _Capture(TorchFunctionMode):
    """Collects every tensor with a ``grad_fn`` that a torch call inside the block returns."""

    def __init__(self):
        super().__init__()
        self.tensors: List[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.tensors.extend(t for t in _tensors(out) if t.grad_fn is not None)
        return out


def _tensors(value) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


class LayerSyncGuard:
    """Sync debug mode "error" while ``modules`` run forward and while their backward nodes run (see
    the module docstring); "default" elsewhere. A context manager; ``forward_calls`` and
    ``backward_nodes`` count what it guarded (``nodes_run``: guarded nodes that ran)."""

    def __init__(self, modules: Iterable[nn.Module], set_mode: Callable[[str], None] = set_cuda_sync_mode):
        self.modules = list(modules)
        self.set_mode = set_mode
        self.forward_calls = 0
        self.backward_nodes = 0
        self.nodes_run = 0
        self._depth = 0
        self._saved = []

    def __enter__(self):
        for module in self.modules:
            self._saved.append((module, module.__dict__.get("forward")))
            module.forward = self._guarded_forward(module, module.forward)
        return self

    def __exit__(self, *exc):
        for module, previous in self._saved:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._saved = []
        self.set_mode("default")
        return False

    def _guarded_forward(self, module: nn.Module, forward: Callable):
        def guarded(*args, **kwargs):
            args = tuple(_Boundary.apply(a) if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args)
            capture = _Capture()
            self._depth += 1
            if self._depth == 1:
                self.set_mode("error")
            try:
                with capture:
                    out = forward(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.set_mode("default")
            self.forward_calls += 1
            kept = [t for m in module.modules() for t in _tensors(list(vars(m).values()))]
            self._hook_nodes(_tensors(out) + capture.tensors + kept)
            return out

        return guarded

    def _hook_nodes(self, roots: Sequence[torch.Tensor]) -> None:
        seen = set()
        stack = [t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node is None or node in seen or node.name() in (_BOUNDARY_NODE, _ACCUMULATE_NODE):
                continue
            seen.add(node)
            node.register_prehook(self._enter_node)
            node.register_hook(self._leave_node)
            self.backward_nodes += 1
            stack.extend(next_node for next_node, _ in node.next_functions)

    def _enter_node(self, grad_outputs):
        self.nodes_run += 1
        self.set_mode("error")

    def _leave_node(self, grad_inputs, grad_outputs):
        self.set_mode("default")


@contextlib.contextmanager
def guarded_method(obj, name: str, set_mode: Callable[[str], None] = set_cuda_sync_mode):
    """``obj.name(...)`` runs under :func:`sync_errors` inside the block (e.g. an optimizer's step,
    with the post-step hooks of the plug-in's layers)."""
    original = getattr(obj, name)

    def guarded(*args, **kwargs):
        with sync_errors(set_mode):
            return original(*args, **kwargs)

    setattr(obj, name, guarded)
    try:
        yield
    finally:
        if vars(obj).get(name) is guarded:
            delattr(obj, name)


def norm_modules(model: nn.Module) -> List[nn.Module]:
    """The normalization layers of ``model`` and every module of the plug-in (weight-centralized
    convolutions, per-level wrappers): what :class:`LayerSyncGuard` guards in a detectron2 model.
    Outermost first; a plug-in module inside another is guarded too (nesting is allowed)."""
    from detectron2.layers import FrozenBatchNorm2d

    norm_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
                  FrozenBatchNorm2d)
    return [m for m in model.modules() if isinstance(m, norm_types) or type(m).__module__.startswith("d2_bnstats")]




def guarded_iteration(trainer, set_mode: Callable[[str], None] = set_cuda_sync_mode) -> LayerSyncGuard:
    """One ``trainer.run_step()`` (inside an EventStorage) with the model's norm and plug-in modules
    under :class:`LayerSyncGuard` and the optimizer step (with the plug-in's post-step hooks: MABN's
    step end, EvalNorm's projection) under :func:`sync_errors`."""
    with LayerSyncGuard(norm_modules(trainer.model), set_mode) as guard, \
            guarded_method(trainer.optimizer, "step", set_mode):
        trainer.run_step()
    return guard
