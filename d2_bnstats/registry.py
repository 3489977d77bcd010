"""Norm names usable in detectron2 configs, and the one declaration of a norm.

detectron2 has no norm registry: ``detectron2.layers.get_norm`` maps a fixed set of strings (BN,
GN, FrozenBN, SyncBN, ...) to modules. This module keeps the plug-in's norms and resolves a norm
string the way ``get_norm`` does, with our names first and detectron2's own names unchanged.

**A norm is one declared object**, a :class:`Norm`: its names and factories, its config node (the
defaults, the checks, how options are read), its model transform and deployment conversion if any,
and what kind of statistics its layers keep. :func:`register_norm` registers it -- the same call
for the plug-in's own norms (``d2_bnstats/d2/norms/*.py``, one declaration per file) and for third
parties::

    import d2_bnstats
    d2_bnstats.register_norm(d2_bnstats.Norm(
        name="my_norm", factories={"MyNorm": MyNorm2d},
        config_key="MY_NORM", defaults=my_defaults, check=my_check, options=my_options,
        transform=my_transform, deploy=my_deploy, statistics="population"))

The short form ``register_norm("MyNorm", factory, config_options=...)`` declares a norm with one
name, a factory and an options reader only.

A factory takes the channel count and returns an ``nn.Module``; it is called once per norm layer
(and, by detectron2's RetinaNet head, once more as a throw-away probe with 1 or 32 channels).
This module imports nothing of detectron2: names it does not know go to detectron2's own
``get_norm``, which the detectron2 glue hands over with :func:`set_detectron2_get_norm` when the plug-in
is installed (``d2_bnstats.d2.plugin.install``).

A name in a config reaches a factory in one of two forms: a plain string (the factory is called with
the channel count only and builds the layer with its defaults) or a :class:`ConfiguredNorm`, a string
equal to the name that also carries the factory's keyword options; ``d2_bnstats.d2.build`` turns
config values into the second form while it builds a model, with the declaration's ``options``.
"""
import dataclasses
import difflib
import threading
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

from torch import nn

NormFactory = Callable[..., nn.Module]
OptionsReader = Callable[[object, str], Dict[str, object]]
ModelTransform = Callable[[nn.Module, object], Optional[nn.Module]]

# What a norm's layers keep, for the tools that act on population statistics (PreciseBN, FrozenBN
# late in training, batch statistics at test, the comparison tool) and offline EvalNorm:
STATISTICS_KINDS = (
    "batch",  # running statistics = the moving average of the batch mean and variance it normalizes
    #           with in training (BN's meaning: offline EvalNorm may convert such a layer)
    "population",  # statistics estimated from training batches used at inference, of another kind
    "none",  # no population statistics (per-sample norms such as GN)
)


@dataclasses.dataclass(frozen=True, eq=False)  # a declaration is itself: compared and hashed by identity
class Norm:
    """One norm method, declared once (see the module docstring); registered by :func:`register_norm`.

    - ``name``: the method's name (its model transform's name; messages), e.g. ``"ghost_bn"``.
    - ``factories``: config name -> ``factory(out_channels, **options) -> nn.Module``.
    - ``config_key``: its node ``BNSTATS.<config_key>``; ``defaults(node)`` fills an empty node with
      the documented defaults (a comment above each key says what it means).
    - ``check(cfg)``: validates its node (a ValueError naming key, value and what is accepted); run
      when a config is loaded, whatever norms the model uses. ``cfg`` may lack ``BNSTATS``.
    - ``options(cfg, name)``: the factory's keyword options for config name ``name``; ``cfg`` is the
      config of the model being built (yacs, or the LazyConfig path's yacs view).
    - ``transform(model, cfg)``: run on every built model (``cfg`` may be None: defaults); a returned
      module replaces the model. Transforms run by ``transform_order``, then registration order.
    - ``deploy(model)``: in place on the deployment copy, before norms become frozen: converts this
      method's modules to plain ones; returns the names of the modules it converted.
      ``keep_reason(module)``: why one of its modules stays as it is at deployment, or None.
    - ``statistics``: what its layers keep, one of :data:`STATISTICS_KINDS`; ``layer_types``: the
      classes its factories build (None for a short-form registration: undeclared).
    - ``overrides_detectron2``: names of detectron2's own ``get_norm`` that it replaces.
    """

    name: str
    factories: Mapping[str, NormFactory] = dataclasses.field(default_factory=dict)
    config_key: Optional[str] = None
    defaults: Optional[Callable[[object], None]] = None
    check: Optional[Callable[[object], None]] = None
    options: Optional[OptionsReader] = None
    transform: Optional[ModelTransform] = None
    transform_order: int = 0
    deploy: Optional[Callable[[nn.Module], List[str]]] = None
    keep_reason: Optional[Callable[[nn.Module], Optional[str]]] = None
    statistics: Optional[str] = None
    layer_types: Tuple[type, ...] = ()
    overrides_detectron2: Tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a norm declaration needs a non-empty name, got {self.name!r}")
        for key, fn in dict(self.factories).items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"norm {self.name!r}: a norm name must be a non-empty string, got {key!r}")
            if not callable(fn):
                raise TypeError(f"norm {self.name!r}: the factory for {key!r} must be callable, got {fn!r}")
        if (self.config_key is None) != (self.defaults is None):
            raise ValueError(f"norm {self.name!r}: config_key and defaults go together (the node and its defaults)")
        if self.statistics is not None and self.statistics not in STATISTICS_KINDS:
            raise ValueError(
                f"norm {self.name!r}: statistics = {self.statistics!r}; accepted: {', '.join(STATISTICS_KINDS)}"
            )
        for field in ("check", "options", "transform", "deploy", "keep_reason"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                raise TypeError(f"norm {self.name!r}: {field} must be callable or None, got {value!r}")
        object.__setattr__(self, "factories", dict(self.factories))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "overrides_detectron2", tuple(self.overrides_detectron2))


_DECLARED: Dict[str, Norm] = {}  # declaration name -> declaration, in registration order
_FACTORIES: Dict[str, NormFactory] = {}  # config name -> factory (of every declaration)
_OWNER: Dict[str, str] = {}  # config name -> declaration name
_LOCK = threading.RLock()
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
    norm: Union[Norm, str],
    factory: Optional[NormFactory] = None,
    *,
    config_options: Optional[OptionsReader] = None,
    force: bool = False,
):
    """Register a norm: ``register_norm(Norm(...))`` (the full declaration), or the short form
    ``register_norm("X", factory, config_options=...)`` (also usable as a decorator), which declares a
    norm named "X" with that factory and options reader.

    A taken name (a config name or the declaration's name, by d2_bnstats or a third party, or one of
    detectron2's own names not listed in ``overrides_detectron2``) is an error unless ``force=True``,
    which removes the declarations that held the taken names; forcing a detectron2 name makes every
    config that uses it build the new factory. Returns the declaration (the factory for the short form).
    """
    if isinstance(norm, Norm):
        if factory is not None or config_options is not None:
            raise TypeError("register_norm(Norm(...)) takes no factory or config_options: they are in the declaration")
        _register(norm, force)
        return norm
    if not isinstance(norm, str) or not norm:
        raise ValueError(f"a norm name must be a non-empty string, got {norm!r}")
    name = norm

    def _short(fn: NormFactory) -> NormFactory:
        if not callable(fn):
            raise TypeError(f"the factory for norm {name!r} must be callable, got {fn!r}")
        _register(Norm(name=name, factories={name: fn}, options=config_options), force)
        return fn

    if factory is None:
        return _short
    return _short(factory)


def _register(norm: Norm, force: bool) -> None:
    with _LOCK:
        taken = []
        if norm.name in _DECLARED:
            taken.append((norm.name, norm.name))
        for key in norm.factories:
            if key in _OWNER:
                taken.append((key, _OWNER[key]))
        if taken and not force:
            key, owner = taken[0]
            by = _describe(_FACTORIES[key]) if key in _FACTORIES else f"the declaration {owner!r}"
            raise ValueError(f"norm {key!r} is already registered (by {by}); pass force=True to replace it")
        if not force:
            for key in norm.factories:
                if key in norm.overrides_detectron2:
                    continue
                if key in detectron2_norm_names():
                    raise ValueError(
                        f"norm {key!r} is one of detectron2's built-in names; "
                        "pass force=True to override it for every config that uses it"
                    )
        for _, owner in taken:
            _remove(owner)
        _DECLARED[norm.name] = norm
        for key, fn in norm.factories.items():
            _FACTORIES[key] = fn
            _OWNER[key] = norm.name


def _remove(declaration: str) -> None:
    norm = _DECLARED.pop(declaration, None)
    if norm is None:
        return
    for key in norm.factories:
        if _OWNER.get(key) == declaration:
            del _FACTORIES[key]
            del _OWNER[key]


def unregister_norm(name: str) -> None:
    """Remove the declaration that holds config name (or declaration name) ``name``, with all its
    names; detectron2's built-in names, if shadowed, work again."""
    with _LOCK:
        owner = _OWNER.get(name, name if name in _DECLARED else None)
        if owner is None:
            raise UnknownNormError(f"norm {name!r} is not registered; registered: {registered_norms()}")
        _remove(owner)


def declared_norms() -> List[Norm]:
    """Every registered declaration, in registration order."""
    with _LOCK:
        return list(_DECLARED.values())


def norm_declaration(name: str) -> Optional[Norm]:
    """The declaration that holds config name ``name`` (None for detectron2's names and unknown ones)."""
    owner = _OWNER.get(str(name))
    return _DECLARED.get(owner) if owner is not None else None


def config_options_reader(name: str) -> Optional[OptionsReader]:
    """The ``options`` reader declared with norm ``name``, or None."""
    norm = norm_declaration(name)
    return norm.options if norm is not None else None


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
