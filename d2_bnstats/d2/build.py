"""Model building with the plug-in: config options reach norm factories, transforms run after.

The path of one config value, e.g. ``BNSTATS.GHOST_BN.VIRTUAL_BATCH_SIZE: 16`` in a yaml file:

1. ``add_bnstats_config(cfg)`` declared the key (default 32) and ``cfg.merge_from_file`` set it;
   ``check_bnstats_config(cfg)`` validated it when the config was loaded.
2. :func:`build_model` (what detectron2's ``build_model`` is after ``import d2_bnstats``) calls
   :func:`configure_norms`: in a copy of ``cfg`` every config value under a key named ``NORM`` that is
   a registered norm name (``MODEL.ROI_BOX_HEAD.NORM: "GhostBN"``) becomes a
   :class:`~d2_bnstats.registry.ConfiguredNorm` -- the same string, carrying the options that the
   norm's registered ``config_options(cfg, name)`` reads from ``cfg`` (``{"virtual_batch_size": 16}``).
3. detectron2's own builder runs on the copy and passes the value to ``get_norm(norm, channels)``;
   :func:`d2_bnstats.registry.get_norm` calls ``factory(channels, **norm.options)``.
4. The model transforms run on the built model in their declared order (the methods' transforms
   first, in the order of :data:`d2_bnstats.d2.norms.METHODS`, then third parties' in registration
   order), each with the original ``cfg``.

Nothing is global or thread-local: a factory called outside a build (a plain name) builds the
layer with its documented defaults.
"""
import threading
from typing import Callable, List, Optional, Tuple

from torch import nn

from ..registry import ConfiguredNorm, config_options_reader, registered_norms
from . import patch
from .config import resolve_device

ModelTransform = Callable[[nn.Module, object], Optional[nn.Module]]

_LOCK = threading.Lock()
_TRANSFORMS: List[Tuple[str, ModelTransform]] = []


def configure_norm(cfg, name: str) -> str:
    """``name`` as a :class:`ConfiguredNorm` with the options ``cfg`` gives it (the plain name when the
    norm reads no options, or is not registered)."""
    reader = config_options_reader(name)
    if cfg is None or reader is None:
        return name
    return ConfiguredNorm(name, reader(cfg, name))


def _configure_node(node, cfg, registered) -> None:
    for key in list(node.keys()):
        value = node[key]
        if hasattr(value, "keys"):
            _configure_node(value, cfg, registered)
        elif key == "NORM" and isinstance(value, str) and value in registered:
            node[key] = configure_norm(cfg, value)


def configure_norms(cfg):
    """A copy of ``cfg`` whose norm values carry their options (see the module docstring), on the CPU
    when it names a CUDA device that torch does not see (``BNSTATS.CPU_FALLBACK``, default True; False:
    a one-line error saying which key to set)."""
    configured = cfg.clone()
    frozen = configured.is_frozen()
    configured.defrost()
    resolve_device(configured)  # MODEL.DEVICE cuda without a GPU: the CPU (BNSTATS.CPU_FALLBACK), or one line
    _configure_node(configured, cfg, set(registered_norms()))
    if frozen:
        configured.freeze()
    return configured


def register_model_transform(name: str, fn: ModelTransform, *, force: bool = False) -> ModelTransform:
    """Run ``fn(model, cfg)`` on every model :func:`build_model` builds, after the transforms registered
    before it; a returned module replaces the model. A taken name is an error unless ``force`` (which
    replaces that transform in place)."""
    with _LOCK:
        for i, (existing, _) in enumerate(_TRANSFORMS):
            if existing == name:
                if not force:
                    raise ValueError(f"model transform {name!r} is already registered; pass force=True to replace it")
                _TRANSFORMS[i] = (name, fn)
                return fn
        _TRANSFORMS.append((name, fn))
    return fn


def unregister_model_transform(name: str) -> None:
    with _LOCK:
        if name not in model_transforms():
            raise KeyError(f"no model transform {name!r}; registered: {model_transforms()}")
        _TRANSFORMS[:] = [(n, fn) for n, fn in _TRANSFORMS if n != name]


def model_transforms() -> List[str]:
    """Names of the registered model transforms, in the order they run."""
    return [name for name, _ in _TRANSFORMS]


def apply_model_transforms(model: nn.Module, cfg) -> nn.Module:
    """Run every registered transform on ``model`` (``cfg`` may be None: defaults)."""
    for _, fn in list(_TRANSFORMS):
        result = fn(model, cfg)
        if result is not None:
            model = result
    return model


def build_model(cfg):
    """detectron2's ``build_model`` with norm options from ``cfg`` and the model transforms applied.
    Replaces ``detectron2.modeling.build_model`` after ``import d2_bnstats``."""
    model = patch.original_build_model()(configure_norms(cfg))
    return apply_model_transforms(model, cfg)

