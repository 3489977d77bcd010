"""Rebinding detectron2's ``get_norm`` and ``build_model`` to replacements, everywhere they are bound.

yacs configs can only hold strings, and detectron2's ``get_norm`` maps strings with a dict built
inside the function, so new names need ``get_norm`` itself replaced. Every caller imported it by
name (``from detectron2.layers import get_norm``), so rebinding ``detectron2.layers.get_norm``
alone changes nothing for modules that are already loaded. :func:`install` therefore rebinds the
attribute of every loaded module where it *is* detectron2's original function (a module that kept
the original under another name, e.g. a wrapper of its own, is left alone); modules imported later
pick up the replacement from the package that re-exports it. ``build_model`` gets the same
treatment (``DefaultTrainer`` calls it through ``detectron2.engine.defaults``).

This module knows nothing of the replacements: :func:`d2_bnstats.d2.plugin.install` passes them in.
"""
import sys
import threading
from typing import Callable, Dict

from detectron2.layers import batch_norm as _d2_batch_norm
from detectron2.modeling.meta_arch import build as _d2_build

_LOCK = threading.Lock()
_OWN_PACKAGE = __name__.split(".")[0]
_DEFINING_MODULE = {"get_norm": _d2_batch_norm, "build_model": _d2_build}
# attribute -> detectron2's original (a dict, so no module attribute of ours ever holds an original)
_ORIGINALS: Dict[str, Callable] = {}
_REPLACEMENTS: Dict[str, Callable] = {}

PATCHED_ATTRIBUTES = tuple(_DEFINING_MODULE)


def original(attr: str) -> Callable:
    """detectron2's own function for ``attr`` ("get_norm" or "build_model")."""
    if attr not in _DEFINING_MODULE:
        raise KeyError(f"{attr!r} is not patched; patched attributes: {', '.join(PATCHED_ATTRIBUTES)}")
    if attr not in _ORIGINALS:
        current = getattr(_DEFINING_MODULE[attr], attr)
        _ORIGINALS[attr] = getattr(current, "__d2_bnstats_original__", current)
    return _ORIGINALS[attr]


def original_get_norm() -> Callable:
    return original("get_norm")


def original_build_model() -> Callable:
    return original("build_model")


def _rebind_loaded_modules(attr: str, old, new) -> int:
    count = 0
    for name, module in list(sys.modules.items()):
        if name == _OWN_PACKAGE or name.startswith(_OWN_PACKAGE + "."):
            continue  # our own functions *are* the replacements; never rebind them
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get(attr) is old:
            setattr(module, attr, new)
            count += 1
    return count


def install(replacements: Dict[str, Callable]) -> int:
    """Rebind each attribute in ``replacements`` ({"get_norm": f, "build_model": g}) in every loaded
    module that holds detectron2's original. Idempotent; returns how many bindings changed."""
    count = 0
    with _LOCK:
        for attr, new in replacements.items():
            old = original(attr)
            new.__d2_bnstats_original__ = old
            _REPLACEMENTS[attr] = new
            count += _rebind_loaded_modules(attr, old, new)
    return count


def uninstall() -> int:
    """Restore detectron2's originals everywhere (for tests and debugging); :func:`reinstall` undoes it."""
    with _LOCK:
        return sum(_rebind_loaded_modules(attr, new, original(attr)) for attr, new in _REPLACEMENTS.items())


def reinstall() -> int:
    """Install the replacements of the last :func:`install` again."""
    return install(dict(_REPLACEMENTS))


def is_installed() -> bool:
    return bool(_REPLACEMENTS) and all(
        getattr(_DEFINING_MODULE[attr], attr) is new for attr, new in _REPLACEMENTS.items()
    )
