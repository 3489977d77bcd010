"""The plug-in's own norms: one declaration (:class:`d2_bnstats.registry.Norm`) per module, named ``NORM``.

Each module of this package declares one method: its norm names and factories, its part of the
``BNSTATS`` config (defaults, checks, how a config becomes factory options), its model transform and
deployment conversion if any, and what its layers keep. :func:`builtin_norms` lists the declarations of
every module here, in the order of the module names; :func:`d2_bnstats.d2.plugin.install` registers
them with :func:`d2_bnstats.registry.register_norm`, the call third parties use. There is no other
list: adding a norm is adding its layer file and its module here. A module without ``NORM`` is an error.

Model transforms run by the declarations' ``transform_order`` and then in this order: EvalNorm's
auxiliary-loss hook collects its layers at every forward, so it sees copies made later; MABN's weight
centralization finds the convs that feed MABN layers before the per-level copies (order 10) wrap them.
"""
import importlib
import pkgutil
from typing import List

from ...registry import Norm


def builtin_norms() -> List[Norm]:
    """The declaration ``NORM`` of every module of this package, in the order of the module names."""
    norms = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        norm = getattr(module, "NORM", None)
        if not isinstance(norm, Norm):
            raise TypeError(
                f"{module.__name__} declares no norm: every module of {__name__} defines NORM = Norm(...) "
                "(d2_bnstats.registry.Norm)"
            )
        norms.append(norm)
    return norms


__all__ = ["builtin_norms"]
