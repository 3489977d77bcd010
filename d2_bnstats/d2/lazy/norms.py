"""Norm names in a LazyConfig's model: checked, and given their options from ``cfg.bnstats``.

A LazyConfig writes norms as arguments of the model's lazy calls: ``L(BasicStem)(norm="MABN")``,
``L(FPN)(norm=...)``, ``L(FastRCNNConvFCHead)(conv_norm=...)``. Every argument named ``norm`` or
ending in ``_norm`` whose value is a string is a norm value; the yacs path's ``MODEL.*.NORM`` keys
play the same part there. :func:`configure_lazy_norms` replaces, in place, each value that is a
registered name by a :class:`~d2_bnstats.registry.ConfiguredNorm` carrying the options that the
norm's registered reader takes from ``cfg.bnstats`` (through the :class:`~.view.LazyView`), exactly as
:func:`d2_bnstats.d2.build.configure_norms` does for a yacs config. ``instantiate(cfg.model)`` then
builds configured layers. The ``bnstats`` node is the one source of options: running it again
after changing ``cfg.bnstats`` updates every value (including one written as a ``ConfiguredNorm``).
``LazyConfig.save`` writes a configured value as a Python object; detectron2's scripts save the
config before the model is built, i.e. before this runs.
"""
import re
from typing import Iterator, List, Tuple

from ...registry import check_norm_name, registered_norms
from ..build import configure_norm
from .view import LazyView, walk

NORM_ARGUMENT = re.compile(r"^(norm|\w+_norm)$")


def norm_values(cfg) -> Iterator[Tuple[str, object, str, str]]:
    """``(field, container, key, value)`` for every string norm value in ``cfg.model``."""
    for field, container, key in walk(cfg.model, "model"):
        if isinstance(key, str) and NORM_ARGUMENT.match(key):
            value = container[key]
            if isinstance(value, str):
                yield field, container, key, value


def check_norm_names(cfg) -> None:
    """Every norm value in ``cfg.model`` is a known norm; else an UnknownNormError naming the field."""
    for field, _, _, value in norm_values(cfg):
        check_norm_name(value, where=field)


def configure_norm_values(cfg, view: LazyView) -> List[str]:
    """Give every registered norm value of ``cfg.model`` its options (in place); returns the fields."""
    registered = set(registered_norms())
    done = []
    with view.errors():
        for field, container, key, value in list(norm_values(cfg)):
            if value in registered:
                container[key] = configure_norm(view.cfg, str(value))
                done.append(field)
    return done


def check_configured(cfg, view: LazyView) -> None:
    """Each registered norm value of ``cfg.model`` carries the options ``cfg.bnstats`` gives it, i.e.
    :func:`configure_lazy_norms` ran on this config (after its last change of ``bnstats``); a model
    instantiated without it would build every layer with its defaults."""
    registered = set(registered_norms())
    with view.errors():
        for field, _, _, value in norm_values(cfg):
            if value not in registered:
                continue
            expected = getattr(configure_norm(view.cfg, str(value)), "options", {})
            if getattr(value, "options", {}) != expected:
                raise ValueError(
                    f"{field} = {str(value)!r} does not carry the options cfg.bnstats gives it ({expected}): call "
                    "d2_bnstats.configure_lazy_norms(cfg) before instantiate(cfg.model), or build the model with "
                    "d2_bnstats.build_lazy_model(cfg)"
                )
