"""Installing the plug-in into detectron2, and the plug-in's config as a whole.

``import d2_bnstats`` calls :func:`install`, which does exactly three things, in this order:

1. hands detectron2's own ``get_norm`` to :mod:`d2_bnstats.registry` (names it does not know go there);
2. registers each method's norms (with the function that reads their options from a config) and its
   model transform, in the order of :data:`d2_bnstats.d2.norms.METHODS`;
3. rebinds detectron2's ``get_norm`` and ``build_model`` to :func:`d2_bnstats.registry.get_norm` and
   :func:`d2_bnstats.d2.build.build_model` in every loaded module (:mod:`d2_bnstats.d2.patch`).
"""
from detectron2.config import CfgNode as CN

from .. import registry
from . import build, patch
from .config import add_general_config
from .norms import METHODS
from .population import check_population_config

_INSTALLED = []


def add_bnstats_config(cfg) -> None:
    """Add the ``BNSTATS`` node with every documented default to ``cfg`` (in place); calling it twice
    is harmless."""
    if "BNSTATS" in cfg:
        return
    cfg.BNSTATS = CN()
    add_general_config(cfg.BNSTATS)
    for method in METHODS:
        method.add_config(cfg.BNSTATS)


def check_bnstats_config(cfg) -> None:
    """Validate every ``BNSTATS`` value of ``cfg``, whatever norms its model uses (a ValueError naming
    the key, the value and what is accepted)."""
    if bnstats_missing(cfg):
        return
    check_population_config(cfg)
    for method in METHODS:
        method.check_config(cfg)


def bnstats_missing(cfg) -> bool:
    return cfg is None or "BNSTATS" not in cfg


def _register_methods() -> None:
    for method in METHODS:
        overrides = set(getattr(method, "OVERRIDES_DETECTRON2", ()))
        for name, factory in method.NORMS.items():
            registry.register_norm(name, factory, config_options=method.layer_options, force=name in overrides)
        transform = getattr(method, "transform", None)
        if transform is not None:
            build.register_model_transform(method.__name__.rsplit(".", 1)[-1], transform)


def install() -> None:
    """Make detectron2 use the plug-in (see the module docstring). Idempotent."""
    if not _INSTALLED:
        registry.set_detectron2_get_norm(patch.original_get_norm())
        _register_methods()
        _INSTALLED.append(True)
    patch.install({"get_norm": registry.get_norm, "build_model": build.build_model})
