"""Building a model from a LazyConfig with everything the plug-in does at a yacs build.

The yacs path does three things around detectron2's builder (d2/train.py ``load_config``,
d2/build.py ``build_model``): checks at config load, norm options into the norm values, model
transforms on the built model. Here they are three calls around ``instantiate``::

    configure_lazy_norms(cfg)              # checks, then norm values -> ConfiguredNorm (in place)
    model = instantiate(cfg.model)
    model = prepare_model(model, cfg)      # checks again, that the norms were configured, transforms

or :func:`build_lazy_model` for all of it. The view and the checks are made once: ``prepare_model``
reuses those of ``configure_lazy_norms`` when nothing they were made of (``bnstats``, the fields the
view reads, the norm values and their options) has changed since, and runs them again otherwise. The
transforms are the registered ones (EvalNorm's
auxiliary loss and projection hooks, MABN's weight centralization and step hook, per-level
statistics, third parties'), run with the :class:`~.view.LazyView`'s yacs config.
"""
import logging
import os
import weakref
from typing import Dict, Optional, Tuple

from detectron2.config import instantiate
from detectron2.utils import comm
from omegaconf import OmegaConf
from torch import nn

from ..build import apply_model_transforms
from ..config import check_batch_config, resolve_device
from ..plugin import check_bnstats_config
from ..weights import missing_weights_message
from .norms import check_configured, check_norm_names, configure_norm_values, norm_values
from .options import ROOT
from .view import FIELDS, LazyView, model_fields

# id(LazyConfig) -> (its fingerprint, its checked view) from the last configure_lazy_norms on it
_CONFIGURED: Dict[int, Tuple[str, LazyView]] = {}

logger = logging.getLogger(__name__)


def check_config(cfg, world_size: Optional[int] = None) -> LazyView:
    """The checks of the yacs path's ``load_config`` on a LazyConfig, with errors naming its fields:
    every ``bnstats`` value (whatever norms the model uses), the norm names in ``model``, the total
    batch ``dataloader.train.total_batch_size`` over ``world_size`` processes (default: this run's),
    ``train.init_checkpoint`` exists; and ``bnstats.CPU_FALLBACK`` (``train.device`` becomes "cpu"
    on a machine without a GPU). Returns the config's :class:`LazyView`."""
    view = LazyView(cfg)
    check_norm_names(cfg)
    with view.errors():
        _check_needs(view)
        check_bnstats_config(view.cfg)
        if view.has("SOLVER.IMS_PER_BATCH"):
            check_batch_config(view.cfg, comm.get_world_size() if world_size is None else world_size)
        if view.has("MODEL.DEVICE"):
            resolve_device(view.cfg)
            if view.cfg.MODEL.DEVICE != cfg.train.device:
                cfg.train.device = view.cfg.MODEL.DEVICE
        weights = view.cfg.MODEL.get("WEIGHTS", "")
        if weights and "://" not in weights and not os.path.isfile(weights):
            raise FileNotFoundError(missing_weights_message(weights))
    return view


def _check_needs(view: LazyView) -> None:
    """General options that need a field of the LazyConfig besides ``bnstats`` (a norm's own check
    says what its options need: its message names the yacs key, which the view translates)."""
    bnstats = view.cfg.BNSTATS
    if bnstats.FROZEN_BN.START_ITER >= 0 and not view.has("SOLVER.MAX_ITER"):
        raise ValueError(
            f"bnstats.FROZEN_BN.START_ITER = {bnstats.FROZEN_BN.START_ITER} needs the length of training: "
            "set train.max_iter"
        )


def _fingerprint(cfg) -> Optional[str]:
    """Everything a view and the configured norm values are made of, as one string (None when it cannot
    be read: then nothing is reused)."""
    try:
        parts = [repr(OmegaConf.to_container(cfg[ROOT], resolve=True)) if ROOT in cfg else ""]
        parts += [repr(OmegaConf.select(cfg, field, default=None)) for _, field in FIELDS]
        parts += [f"{field}={value!r}" for field, _, _, value in norm_values(cfg)]
        parts.append(repr(model_fields(cfg.model)))
    except Exception:  # an unresolvable interpolation, say: check everything again
        return None
    return "\n".join(parts)


def _remember(cfg, view: LazyView) -> None:
    key = id(cfg)
    if key not in _CONFIGURED:
        weakref.finalize(cfg, _CONFIGURED.pop, key, None)
    _CONFIGURED[key] = (_fingerprint(cfg), view)


def _remembered_view(cfg) -> Optional[LazyView]:
    """The view of the last :func:`configure_lazy_norms` on ``cfg`` if nothing it was made of changed."""
    remembered = _CONFIGURED.get(id(cfg))
    if remembered is None or remembered[1].lazy is not cfg or remembered[0] is None:
        return None
    return remembered[1] if remembered[0] == _fingerprint(cfg) else None


def configure_lazy_norms(cfg):
    """Check ``cfg`` (:func:`check_config`) and give every plug-in norm value in ``cfg.model`` its
    options from ``cfg.bnstats``, in place (see :mod:`.norms`). Returns ``cfg``; call it before
    ``instantiate(cfg.model)``."""
    view = check_config(cfg)
    fields = configure_norm_values(cfg, view)
    logger.debug("configured norms: %s", ", ".join(fields) or "none")
    _remember(cfg, view)
    return cfg


def prepare_model(model: nn.Module, cfg) -> nn.Module:
    """What the plug-in does to a model it builds, for a model instantiated from a LazyConfig: the
    checks (:func:`check_config`, and that :func:`configure_lazy_norms` ran), then every registered
    model transform with its hooks. Returns the model to use (a transform may replace it). The checks
    and the view of :func:`configure_lazy_norms` are reused when nothing they depend on changed since."""
    view = _remembered_view(cfg)
    if view is None:
        view = check_config(cfg)
        check_configured(cfg, view)
    with view.errors():
        return apply_model_transforms(model, view.cfg)


def build_lazy_model(cfg) -> nn.Module:
    """``instantiate(cfg.model)`` with everything the plug-in does: :func:`configure_lazy_norms`
    (``cfg`` is changed in place), ``instantiate``, :func:`prepare_model`."""
    configure_lazy_norms(cfg)
    return prepare_model(instantiate(cfg.model), cfg)
