"""Model building with the plug-in: the config reaches norm factories, transforms run after.

A norm factory receives only a channel count (detectron2 calls ``get_norm(name, channels)``), yet
layers have options that live in the config (``BNSTATS.*``). While :func:`build_model` builds a
model, :func:`current_config` returns the config being built, so a factory registered by the
detectron2 glue can read its options; outside a build it returns ``None`` and factories fall back
to the documented defaults.

Some methods need the finished model: an auxiliary loss collected at the top of the model,
convolutions adapted to the norm that follows them, norms wrapped per FPN level. They register a
*model transform* ``fn(model, cfg) -> model or None`` that runs on every model built here, in
registration order. ``import d2_bnstats`` routes detectron2's own ``build_model`` (used by
``DefaultTrainer``) here, so plain detectron2 training scripts get all of this too.
"""
import contextlib
import threading
from typing import Callable, List, Optional, Tuple

from torch import nn

ModelTransform = Callable[[nn.Module, object], Optional[nn.Module]]

_local = threading.local()
_TRANSFORMS: List[Tuple[str, ModelTransform]] = []


def current_config():
    """The config whose model is being built by :func:`build_model`, else None."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def building(cfg):
    """Make ``cfg`` the :func:`current_config` inside the block (re-entrant, per thread)."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(cfg)
    try:
        yield cfg
    finally:
        stack.pop()


def register_model_transform(name: str, fn: ModelTransform) -> ModelTransform:
    """Run ``fn(model, cfg)`` on every model :func:`build_model` builds; its return value, if not
    None, replaces the model. Registering a name again replaces the earlier transform."""
    for i, (existing, _) in enumerate(_TRANSFORMS):
        if existing == name:
            _TRANSFORMS[i] = (name, fn)
            return fn
    _TRANSFORMS.append((name, fn))
    return fn


def model_transforms() -> List[str]:
    return [name for name, _ in _TRANSFORMS]


def apply_model_transforms(model: nn.Module, cfg) -> nn.Module:
    for _, fn in _TRANSFORMS:
        result = fn(model, cfg)
        if result is not None:
            model = result
    return model


def build_model(cfg):
    """detectron2's ``build_model`` with the config visible to norm factories and the registered
    model transforms applied. Replaces ``detectron2.modeling.build_model`` after ``import d2_bnstats``."""
    from .patch import original_build_model

    with building(cfg):
        model = original_build_model()(cfg)
        return apply_model_transforms(model, cfg)
