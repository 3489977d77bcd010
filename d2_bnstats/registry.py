"""Norm names usable in detectron2 configs.

detectron2 has no norm registry: ``detectron2.layers.get_norm`` maps a fixed set of strings (BN,
GN, FrozenBN, SyncBN, ...) to modules. This module keeps the plug-in's names and resolves a norm
string the way ``get_norm`` does, with our names first and detectron2's own names unchanged:

    >>> import d2_bnstats
    >>> @d2_bnstats.register_norm("MyNorm")
    ... def build_my_norm(out_channels):
    ...     return MyNorm(out_channels)

A factory takes the channel count and returns an ``nn.Module``; it is called once per norm layer
(and, by detectron2's RetinaNet head, once more as a throw-away probe with 1 or 32 channels).
This module imports nothing of detectron2: names it does not know go to detectron2's own
``get_norm``, which the detectron2 glue hands over with :func:`set_detectron2_get_norm` when the plug-in
is installed (``d2_bnstats.d2.plugin.install``).

A name in a config reaches a factory in one of two forms: a plain string (the factory is called with
the channel count only and builds the layer with its defaults) or a :class:`ConfiguredNorm`, a string
equal to the name that also carries the factory's keyword options; ``d2_bnstats.d2.build`` turns
config values into the second form while it builds a model.
"""
import difflib
import threading
from typing import Callable, Dict, List, Optional, Union

from torch import nn

NormFactory = Callable[..., nn.Module]

_FACTORIES: Dict[str, NormFactory] = {}
_CONFIG_OPTIONS: Dict[str, Callable[[object, str], Dict[str, object]]] = {}
_LOCK = threading.Lock()
_DETECTRON2_GET_NORM: List[Callable] = []  # detectron2's own get_norm, once handed over


class ConfiguredNorm(str):
    """A norm name together with the keyword options its factory is called with.

    It *is* the name (``ConfiguredNorm("SyncBN", {}) == "SyncBN"``), so code that compares norm strings
    (detectron2's RetinaNet head does) behaves as for the plain name; :func:`get_norm` calls
    ``factory(out_channels, **options)``.
    """

    def __new__(cls, name: str, options: Optional[Dict[str, object]] = None):
        norm = super().__new__(cls, name)
        norm.options = dict(options or {})
        return norm

    def __reduce__(self):  # deep copies and pickles keep the options
        return (type(self), (str(self), self.options))

    def __repr__(self) -> str:
        return f"ConfiguredNorm({str(self)!r}, {self.options!r})"

# Names detectron2's get_norm may know, across versions; which ones the installed version really
# knows is probed once (see detectron2_norm_names).
_DETECTRON2_CANDIDATE_NAMES = (
    "BN",
    "SyncBN",
    "FrozenBN",
    "GN",
    "nnSyncBN",
    "naiveSyncBN",
    "naiveSyncBN_N",
    "LN",
)
_detectron2_names_cache: Optional[List[str]] = None


class UnknownNormError(ValueError):
    """A norm string that neither d2_bnstats nor detectron2 knows."""


def set_detectron2_get_norm(fn: Callable) -> None:
    """Hand over detectron2's own ``get_norm``: names not registered here are resolved by it."""
    _DETECTRON2_GET_NORM[:] = [fn]


def detectron2_get_norm() -> Callable:
    """detectron2's own ``get_norm`` (as handed over by :func:`set_detectron2_get_norm`)."""
    if not _DETECTRON2_GET_NORM:
        raise RuntimeError(
            "detectron2's get_norm has not been handed to d2_bnstats.registry; `import d2_bnstats` does it"
        )
    return _DETECTRON2_GET_NORM[0]


def detectron2_norm_names() -> List[str]:
    """The norm strings the installed detectron2's own ``get_norm`` accepts (probed once)."""
    global _detectron2_names_cache
    if _detectron2_names_cache is None:
        original = detectron2_get_norm()
        names = []
        for name in _DETECTRON2_CANDIDATE_NAMES:
            try:
                original(name, 32)
            except KeyError:
                continue
            except Exception:  # known name that cannot be built here (e.g. a CUDA-only layer)
                pass
            names.append(name)
        _detectron2_names_cache = names
    return list(_detectron2_names_cache)


def registered_norms() -> List[str]:
    """Names registered with :func:`register_norm` (the plug-in's and third parties')."""
    return sorted(_FACTORIES)


def available_norms() -> List[str]:
    """Every norm string a config may use: registered names and detectron2's own."""
    return sorted(set(_FACTORIES) | set(detectron2_norm_names()))


def register_norm(
    name: str,
    factory: Optional[NormFactory] = None,
    *,
    config_options: Optional[Callable[[object, str], Dict[str, object]]] = None,
    force: bool = False,
):
    """Register ``factory`` under ``name``; usable as ``register_norm("X", f)`` or as a decorator.

    A name that is already taken (by d2_bnstats, a third party, or detectron2's own ``get_norm``)
    is an error unless ``force=True``; forcing a detectron2 name makes every config that uses it
    build ``factory`` instead.

    ``config_options(cfg, name) -> dict``, if given, reads the factory's keyword options from the
    config of the model being built (see ``d2_bnstats.d2.build``); without it the factory is always
    called with the channel count only.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a norm name must be a non-empty string, got {name!r}")

    def _register(fn: NormFactory) -> NormFactory:
        if not callable(fn):
            raise TypeError(f"the factory for norm {name!r} must be callable, got {fn!r}")
        with _LOCK:
            if not force:
                if name in _FACTORIES:
                    raise ValueError(
                        f"norm {name!r} is already registered (by {_describe(_FACTORIES[name])}); "
                        "pass force=True to replace it"
                    )
                if name in detectron2_norm_names():
                    raise ValueError(
                        f"norm {name!r} is one of detectron2's built-in names; "
                        "pass force=True to override it for every config that uses it"
                    )
            _FACTORIES[name] = fn
            if config_options is None:
                _CONFIG_OPTIONS.pop(name, None)
            else:
                _CONFIG_OPTIONS[name] = config_options
        return fn

    if factory is None:
        return _register
    return _register(factory)


def unregister_norm(name: str) -> None:
    """Remove a registered name (detectron2's built-in names, if shadowed, work again)."""
    with _LOCK:
        if name not in _FACTORIES:
            raise UnknownNormError(f"norm {name!r} is not registered; registered: {registered_norms()}")
        del _FACTORIES[name]
        _CONFIG_OPTIONS.pop(name, None)


def config_options_reader(name: str) -> Optional[Callable[[object, str], Dict[str, object]]]:
    """The ``config_options`` function registered with norm ``name``, or None."""
    return _CONFIG_OPTIONS.get(name)


def _describe(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# Long spellings people type for detectron2's short names.
_SYNONYMS = {
    "batchnorm": "BN",
    "batchnorm2d": "BN",
    "groupnorm": "GN",
    "frozenbatchnorm": "FrozenBN",
    "frozenbatchnorm2d": "FrozenBN",
    "syncbatchnorm": "SyncBN",
    "layernorm": "LN",
}


def _normalize(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def suggest_norm(name: str) -> Optional[str]:
    """The closest available name to a misspelt one, or None."""
    names = available_norms()
    candidates = {_normalize(n): n for n in names}
    candidates.update({k: v for k, v in _SYNONYMS.items() if v in names and k not in candidates})
    key = _normalize(name)
    if key in candidates:
        return candidates[key]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if not close:
        close = [candidates[c] for c in difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)]
    return close[0] if close else None


def unknown_norm_message(name: str, where: Optional[str] = None) -> str:
    value = f"{where} = {name!r}" if where else f"{name!r}"
    message = f"unknown norm {value}. Available norms: {', '.join(available_norms())}."
    suggestion = suggest_norm(name)
    if suggestion is not None:
        message += f" Did you mean {suggestion!r}?"
    if not where:
        message += (
            " (The value comes from a config key that takes a norm: MODEL.RESNETS.NORM, MODEL.FPN.NORM,"
            " MODEL.ROI_BOX_HEAD.NORM, MODEL.ROI_MASK_HEAD.NORM, MODEL.RETINANET.NORM or"
            " MODEL.SEM_SEG_HEAD.NORM.)"
        )
    return message


def check_norm_name(name: Union[str, None, Callable], where: Optional[str] = None) -> None:
    """Raise :class:`UnknownNormError` unless ``name`` is a usable norm value."""
    if name is None or callable(name) or name == "":
        return
    if not isinstance(name, str):
        raise UnknownNormError(f"a norm must be a string, a callable or empty; got {where or ''} {name!r}")
    if name not in _FACTORIES and name not in detectron2_norm_names():
        raise UnknownNormError(unknown_norm_message(name, where))


def get_norm(norm: Union[str, None, Callable[[int], nn.Module]], out_channels: int) -> Optional[nn.Module]:
    """Drop-in replacement for ``detectron2.layers.get_norm`` that knows registered names.

    ``None``/``""`` -> no norm; a registered name -> its factory (with the options of a
    :class:`ConfiguredNorm`); one of detectron2's names -> the original ``get_norm``; a callable ->
    ``norm(out_channels)``; anything else -> :class:`UnknownNormError` (a ValueError) listing the
    available names.
    """
    if norm is None:
        return None
    if isinstance(norm, str):
        if len(norm) == 0:
            return None
        factory = _FACTORIES.get(norm)
        if factory is not None:
            return factory(out_channels, **getattr(norm, "options", {}))
        check_norm_name(norm)
        norm = str(norm)
    return detectron2_get_norm()(norm, out_channels)
