"""Make detectron2 resolve norm strings through :mod:`d2_bnstats.registry`.

yacs configs can only hold strings, and detectron2's ``get_norm`` maps strings with a dict built
inside the function, so new names need ``get_norm`` itself replaced. Every caller imported it by
name (``from detectron2.layers import get_norm``), so rebinding ``detectron2.layers.get_norm``
alone changes nothing for modules that are already loaded. :func:`install` therefore rebinds the
``get_norm`` attribute of every loaded module where it *is* the original function (a module that
kept the original under another name, e.g. a wrapper of its own, is left alone); modules imported
later pick up the replacement from ``detectron2.layers``. The replacement delegates everything it
does not know to the original, so detectron2's own names behave exactly as before.
"""
import sys
import threading

_LOCK = threading.Lock()
_ATTR = "get_norm"
_OWN_PACKAGE = __name__.split(".")[0]
_state = {"original": None}  # a dict, so no module attribute ever holds the original


def original_get_norm():
    """detectron2's own ``get_norm`` (the one in ``detectron2.layers.batch_norm``)."""
    if _state["original"] is None:
        from detectron2.layers import batch_norm

        current = batch_norm.get_norm
        _state["original"] = getattr(current, "__d2_bnstats_original__", current)
    return _state["original"]


def _rebind_loaded_modules(old, new) -> int:
    count = 0
    for name, module in list(sys.modules.items()):
        if name == _OWN_PACKAGE or name.startswith(_OWN_PACKAGE + "."):
            continue  # our registry.get_norm *is* the replacement; never rebind it
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get(_ATTR) is old:
            setattr(module, _ATTR, new)
            count += 1
    return count


def install() -> int:
    """Route detectron2's ``get_norm`` through the registry. Idempotent.

    Returns how many module attributes were rebound by this call (0 when already installed and no
    newly loaded module still holds the original).
    """
    from .. import registry

    with _LOCK:
        original = original_get_norm()
        replacement = registry.get_norm
        replacement.__d2_bnstats_original__ = original
        return _rebind_loaded_modules(original, replacement)


def uninstall() -> int:
    """Restore detectron2's original ``get_norm`` everywhere (for tests and debugging)."""
    from .. import registry

    with _LOCK:
        return _rebind_loaded_modules(registry.get_norm, original_get_norm())


def is_installed() -> bool:
    from detectron2.layers import batch_norm

    from .. import registry

    return batch_norm.get_norm is registry.get_norm
