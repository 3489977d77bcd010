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
4. The model transforms run on the built model, each with the original ``cfg``: those of the
   registered norm declarations (by ``transform_order``, then registration order), then those
   registered alone with :func:`register_model_transform`, in registration order.

Nothing is global or thread-local: a factory called outside a build (a plain name) builds the
layer with its documented defaults.
"""
import contextlib
import copy
import threading
from typing import List, Tuple

import torch
from torch import nn

from ..registry import ConfiguredNorm, ModelTransform, config_options_reader, declared_norms, registered_norms
from . import patch
from .config import resolve_device

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


def _norm_values(node, registered) -> bool:
    """Whether some value under a key named ``NORM`` in ``node`` is a registered name."""
    for key in list(node.keys()):
        value = node[key]
        if hasattr(value, "keys"):
            if _norm_values(value, registered):
                return True
        elif key == "NORM" and isinstance(value, str) and value in registered:
            return True
    return False


def _needs_device_fallback(cfg) -> bool:
    """Whether ``cfg`` names a CUDA device torch does not see (what :func:`resolve_device` acts on)."""
    model = cfg.get("MODEL", None) if hasattr(cfg, "get") else None
    device = model.get("DEVICE", None) if model is not None and hasattr(model, "get") else None
    return str(device).startswith("cuda") and not torch.cuda.is_available()


def configure_norms(cfg):
    """A copy of ``cfg`` whose norm values carry their options (see the module docstring), on the CPU
    when it names a CUDA device that torch does not see (``BNSTATS.CPU_FALLBACK``, default True; False:
    a one-line error saying which key to set); ``cfg`` itself when neither applies.

    ``cfg`` is any config detectron2's ``build_model`` takes: a yacs ``CfgNode`` (copied with
    ``clone``), or another mapping with attribute access such as an OmegaConf ``DictConfig`` made
    from one (copied with ``copy.deepcopy``; a ``DictConfig`` copy allows objects, so the values keep
    their options)."""
    registered = set(registered_norms())
    if cfg is None or not (_norm_values(cfg, registered) or _needs_device_fallback(cfg)):
        return cfg
    if hasattr(cfg, "clone") and hasattr(cfg, "is_frozen"):
        configured = cfg.clone()
        frozen = configured.is_frozen()
        configured.defrost()
        resolve_device(configured)  # MODEL.DEVICE cuda without a GPU: the CPU (BNSTATS.CPU_FALLBACK), or one line
        _configure_node(configured, cfg, registered)
        if frozen:
            configured.freeze()
        return configured
    configured = copy.deepcopy(cfg)
    with _writable(configured):
        resolve_device(configured)
        _configure_node(configured, cfg, registered)
    return configured


@contextlib.contextmanager
def _writable(cfg):
    """An OmegaConf config open for object values (and writes) inside; other mappings as they are."""
    try:
        from omegaconf import DictConfig, flag_override
    except ImportError:  # no OmegaConf: not one of its configs
        yield
        return
    if not isinstance(cfg, DictConfig):
        yield
        return
    with flag_override(cfg, ["readonly", "struct"], False):
        cfg._set_flag("allow_objects", True)
        yield


def register_model_transform(name: str, fn: ModelTransform, *, force: bool = False) -> ModelTransform:
    """Run ``fn(model, cfg)`` on every model :func:`build_model` builds, after the transforms registered
    before it; a returned module replaces the model. A taken name is an error unless ``force`` (which
    replaces that transform in place)."""
    with _LOCK:
        if any(norm.name == name and norm.transform is not None for norm in declared_norms()):
            raise ValueError(f"model transform {name!r} is the transform of the norm declaration {name!r}; choose another name")
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
        if name not in [n for n, _ in _TRANSFORMS]:
            raise KeyError(
                f"no model transform {name!r} registered alone; registered: {model_transforms()} "
                "(a norm's transform goes with its declaration: unregister_norm)"
            )
        _TRANSFORMS[:] = [(n, fn) for n, fn in _TRANSFORMS if n != name]


def _all_transforms() -> List[Tuple[str, ModelTransform]]:
    declared = [n for n in declared_norms() if n.transform is not None]
    ordered = sorted(enumerate(declared), key=lambda item: (item[1].transform_order, item[0]))
    with _LOCK:
        alone = list(_TRANSFORMS)
    return [(norm.name, norm.transform) for _, norm in ordered] + alone


def model_transforms() -> List[str]:
    """Names of the model transforms, in the order they run: those of the norm declarations, then
    those registered alone."""
    return [name for name, _ in _all_transforms()]


def apply_model_transforms(model: nn.Module, cfg) -> nn.Module:
    """Run every model transform on ``model`` (``cfg`` may be None: defaults)."""
    for _, fn in _all_transforms():
        result = fn(model, cfg)
        if result is not None:
            model = result
    return model


def build_model(cfg):
    """detectron2's ``build_model`` with norm options from ``cfg`` and the model transforms applied.
    Replaces ``detectron2.modeling.build_model`` after ``import d2_bnstats``."""
    model = patch.original_build_model()(configure_norms(cfg))
    return apply_model_transforms(model, cfg)

