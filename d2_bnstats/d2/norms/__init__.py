"""The plug-in's norms, one module per method, in the order their model transforms run.

Each module owns its norm factories (``NORMS``), its part of the ``BNSTATS`` config
(``add_config``), the checks of that part (``check_config``), how a config becomes factory options
(``layer_options``) and, where the method needs the finished model, its ``transform``.
:func:`d2_bnstats.d2.plugin.install` registers them; nothing registers itself on import.

Order matters for the transforms: EvalNorm's auxiliary-loss hook collects its layers at every
forward, so it sees copies made later; MABN's weight centralization finds the convs that feed MABN
layers before per-level copies wrap those layers.
"""
from . import evalnorm, ghost, mabn, per_level, roi_shuffle, sync

METHODS = (sync, ghost, roi_shuffle, evalnorm, mabn, per_level)

__all__ = ["METHODS"]
