"""Make detectron2 resolve norm strings through :mod:`d2_bnstats.registry` and build models
through :func:`d2_bnstats.d2.build.build_model`.

yacs configs can only hold strings, and detectron2's ``get_norm`` maps strings with a dict built
inside the function, so new names need ``get_norm`` itself replaced. Every caller imported it by
name (``from detectron2.layers import get_norm``), so rebinding ``detectron2.layers.get_norm``
alone changes nothing for modules that are already loaded. :func:`install` therefore rebinds the
``get_norm`` attribute of every loaded module where it *is* the original function (a module that
kept the original under another name, e.g. a wrapper of its own, is left alone); modules imported
later pick up the replacement from ``detectron2.layers``. The replacement delegates everything it
does not know to the original, so detectron2's own names behave exactly as before.

``build_model`` gets the same treatment: the replacement gives norm factories the config being
built and runs the registered model transforms (see :mod:`d2_bnstats.d2.build`); for a model
without plug-in layers it returns exactly what detectron2's builder returns.
"""
import sys
import threading

_LOCK = threading.Lock()
_OWN_PACKAGE = __name__.split(".")[0]
# attribute -> (module holding detectron2's original, replacement's "module:attr")
_TARGETS = {
    "get_norm": ("detectron2.layers.batch_norm", "d2_bnstats.registry:get_norm"),
    "build_model": ("detectron2.modeling.meta_arch.build", "d2_bnstats.d2.build:build_model"),
}
_originals = {}  # a dict, so no module attribute of ours ever holds an original


def _import(dotted: str):
    __import__(dotted)
    return sys.modules[dotted]


def _replacement(attr: str):
    module, name = _TARGETS[attr][1].split(":")
    return getattr(_import(module), name)


def original(attr: str):
    """detectron2's own function for ``attr`` ("get_norm" or "build_model")."""
    if attr not in _originals:
        current = getattr(_import(_TARGETS[attr][0]), attr)
        _originals[attr] = getattr(current, "__d2_bnstats_original__", current)
    return _originals[attr]


def original_get_norm():
    return original("get_norm")


def original_build_model():
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


def install() -> int:
    """Route detectron2's ``get_norm`` and ``build_model`` through the plug-in. Idempotent.

    Returns how many module attributes were rebound by this call (0 when already installed and no
    newly loaded module still holds an original).
    """
    count = 0
    with _LOCK:
        for attr in _TARGETS:
            old, new = original(attr), _replacement(attr)
            new.__d2_bnstats_original__ = old
            count += _rebind_loaded_modules(attr, old, new)
    return count


def uninstall() -> int:
    """Restore detectron2's originals everywhere (for tests and debugging)."""
    with _LOCK:
        return sum(_rebind_loaded_modules(attr, _replacement(attr), original(attr)) for attr in _TARGETS)


def is_installed() -> bool:
    return all(getattr(_import(_TARGETS[attr][0]), attr) is _replacement(attr) for attr in _TARGETS)
