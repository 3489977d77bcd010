"""Installing the plug-in into detectron2, and the plug-in's config as a whole.

``import d2_bnstats`` calls :func:`install`, which does exactly three things, in this order:

1. hands detectron2's own ``get_norm`` to :mod:`d2_bnstats.registry` (names it does not know go there);
2. registers the declaration of each of the plug-in's norms
   (:func:`d2_bnstats.d2.norms.builtin_norms`) with :func:`d2_bnstats.registry.register_norm`, the call
   third parties use;
3. rebinds detectron2's ``get_norm`` and ``build_model`` to :func:`d2_bnstats.registry.get_norm` and
   :func:`d2_bnstats.d2.build.build_model` in every loaded module (:mod:`d2_bnstats.d2.patch`).
"""
from detectron2.config import CfgNode as CN

from .. import registry
from . import build, patch
from .config import add_general_config
from .norms import builtin_norms
from .population import check_population_config

_INSTALLED = []


def add_bnstats_config(cfg) -> None:
    """Add the ``BNSTATS`` node with every documented default to ``cfg`` (in place): the general keys
    and the node of every registered norm that declares one (``BNSTATS.<config_key>``). Calling it
    again adds only what is missing (the node of a norm registered since), even to a frozen config."""
    missing = "BNSTATS" not in cfg
    nodes = [n for n in registry.declared_norms() if n.config_key and (missing or n.config_key not in cfg.BNSTATS)]
    if not missing and not nodes:
        return
    frozen = cfg.is_frozen()
    cfg.defrost()
    try:
        if missing:
            cfg.BNSTATS = CN()
            add_general_config(cfg.BNSTATS)
        for norm in nodes:
            node = CN()
            norm.defaults(node)
            cfg.BNSTATS[norm.config_key] = node
    finally:
        if frozen:
            cfg.freeze()


def check_bnstats_config(cfg) -> None:
    """Validate every ``BNSTATS`` value of ``cfg``, whatever norms its model uses (a ValueError naming
    the key, the value and what is accepted)."""
    if bnstats_missing(cfg):
        return
    check_population_config(cfg)
    for norm in registry.declared_norms():
        if norm.check is not None:
            norm.check(cfg)


def bnstats_missing(cfg) -> bool:
    return cfg is None or "BNSTATS" not in cfg


def install() -> None:
    """Make detectron2 use the plug-in (see the module docstring). Idempotent."""
    if not _INSTALLED:
        registry.set_detectron2_get_norm(patch.original_get_norm())
        for norm in builtin_norms():
            registry.register_norm(norm)
        _INSTALLED.append(True)
    patch.install({"get_norm": registry.get_norm, "build_model": build.build_model})
