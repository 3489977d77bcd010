"""A LazyConfig seen as the yacs config the plug-in's code reads, and its errors in LazyConfig terms.

The plug-in's option readers, checks, model transforms and hooks take a yacs config and read
``BNSTATS.*`` plus a few of detectron2's keys. On the LazyConfig path they get the
:class:`LazyView`'s ``cfg`` instead -- one adapter, so no reader has a LazyConfig branch. It holds
exactly these keys, each taken from the LazyConfig field in the same row (a field the LazyConfig
lacks leaves its key out, and whatever needs it says which field to set):

=============================  ===============================================================
yacs key                       LazyConfig field
=============================  ===============================================================
``BNSTATS.*``                  ``bnstats.*`` (:mod:`.options`; defaults where absent)
``TEST.PRECISE_BN.ENABLED``    ``bnstats.PRECISE_BN.ENABLED``
``TEST.PRECISE_BN.NUM_ITER``   ``bnstats.PRECISE_BN.NUM_ITER``
``SOLVER.IMS_PER_BATCH``       ``dataloader.train.total_batch_size``
``SOLVER.MAX_ITER``            ``train.max_iter``
``TEST.EVAL_PERIOD``           ``train.eval_period``
``MODEL.DEVICE``               ``train.device``
``MODEL.WEIGHTS``              ``train.init_checkpoint``
``OUTPUT_DIR``                 ``train.output_dir``
``MODEL.RESNETS.NORM``         ``<ResNet>.stages.norm`` (else ``<ResNet>.stem.norm``) of the first
                               ``L(ResNet)`` in ``model``
``MODEL.BACKBONE.FREEZE_AT``   ``<ResNet>.freeze_at`` (0 without a ResNet or the argument)
``MODEL.RETINANET.IN_FEATURES``  ``<node>.head_in_features`` of the first node in ``model`` that has it
=============================  ===============================================================

Errors raised inside :meth:`LazyView.errors` are re-raised with every yacs key of the table
replaced by its field, so a bad value reads ``bnstats.EVALNORM.MODE = 'x' ...`` on this path.
"""
import contextlib
import re
from typing import Dict, Iterator, Tuple

from detectron2.config import CfgNode as CN
from omegaconf import DictConfig, ListConfig, OmegaConf

from .options import ROOT, read_bnstats

FIELDS = (  # (yacs key, LazyConfig field) of the keys read from outside ``bnstats`` and ``model``
    ("SOLVER.IMS_PER_BATCH", "dataloader.train.total_batch_size"),
    ("SOLVER.MAX_ITER", "train.max_iter"),
    ("TEST.EVAL_PERIOD", "train.eval_period"),
    ("MODEL.DEVICE", "train.device"),
    ("MODEL.WEIGHTS", "train.init_checkpoint"),
    ("OUTPUT_DIR", "train.output_dir"),
)


def _set(cfg: CN, key: str, value) -> None:
    node = cfg
    *parents, leaf = key.split(".")
    for part in parents:
        if part not in node:
            node[part] = CN()
        node = node[part]
    node[leaf] = value


def walk(node, path: str) -> Iterator[Tuple[str, object, object]]:
    """``(path, container, key)`` for every entry below a LazyConfig node, depth first, parents
    before children (mandatory values still missing are skipped)."""
    if isinstance(node, DictConfig):
        entries = [(key, f"{path}.{key}") for key in node.keys()]
    elif isinstance(node, ListConfig):
        entries = [(i, f"{path}[{i}]") for i in range(len(node))]
    else:
        return
    for key, where in entries:
        if OmegaConf.is_missing(node, key):
            continue
        yield where, node, key
        yield from walk(node[key], where)


def _is_resnet(node) -> bool:
    target = node.get("_target_", None) if isinstance(node, DictConfig) else None
    name = target if isinstance(target, str) else getattr(target, "__qualname__", "")
    return name.rsplit(".", 1)[-1] == "ResNet" and "stages" in node


def model_fields(model) -> Dict[str, Tuple[str, object]]:
    """yacs key -> (field, value) for the keys read from the model's call tree."""
    found = {}
    for where, container, key in walk(model, "model"):
        value = container[key]
        if "MODEL.RESNETS.NORM" not in found and _is_resnet(value):
            for part in ("stages", "stem"):
                child = value.get(part, None)
                if isinstance(child, DictConfig) and isinstance(child.get("norm", None), str):
                    found["MODEL.RESNETS.NORM"] = (f"{where}.{part}.norm", child.norm)
                    break
            found["MODEL.BACKBONE.FREEZE_AT"] = (f"{where}.freeze_at", value.get("freeze_at", 0))
        if key == "head_in_features" and "MODEL.RETINANET.IN_FEATURES" not in found:
            found["MODEL.RETINANET.IN_FEATURES"] = (where, list(value))
    return found


class LazyView:
    """The yacs view of one LazyConfig (see the module docstring): ``cfg`` for the plug-in's
    readers, ``fields`` (yacs key -> LazyConfig field) for messages."""

    def __init__(self, lazy: DictConfig):
        if not isinstance(lazy, DictConfig) or "model" not in lazy:
            raise TypeError(
                f"expected a LazyConfig root with a `model` (an omegaconf DictConfig, as LazyConfig.load returns), "
                f"got {type(lazy).__name__}"
            )
        self.lazy = lazy
        self.fields: Dict[str, str] = {}
        self.cfg = CN()
        self.cfg.BNSTATS, precise = read_bnstats(lazy.get(ROOT, None))
        for key, value in precise.items():
            self.fields[f"TEST.PRECISE_BN.{key}"] = f"{ROOT}.PRECISE_BN.{key}"
            _set(self.cfg, f"TEST.PRECISE_BN.{key}", value)
        for key, field in FIELDS:
            self.fields[key] = field
            value = OmegaConf.select(lazy, field, default=None)
            if value is not None:
                _set(self.cfg, key, list(value) if isinstance(value, ListConfig) else value)
        # read by model transforms whatever the model (MODEL.RESNETS.NORM with FREEZE_AT); a model
        # without a ResNet has nothing frozen
        _set(self.cfg, "MODEL.RESNETS", CN())
        _set(self.cfg, "MODEL.BACKBONE.FREEZE_AT", 0)
        for key, (field, value) in model_fields(lazy.model).items():
            self.fields[key] = field
            _set(self.cfg, key, value)

    def has(self, key: str) -> bool:
        node = self.cfg
        for part in key.split("."):
            if not isinstance(node, CN) or part not in node:
                return False
            node = node[part]
        return True

    def translate(self, message: str) -> str:
        for key in sorted(self.fields, key=len, reverse=True):
            message = re.sub(rf"(?<![\w.]){re.escape(key)}(?!\w)", self.fields[key], message)
        return re.sub(r"(?<![\w.])BNSTATS\.", ROOT + ".", message)

    @contextlib.contextmanager
    def errors(self):
        """Re-raise ValueError/RuntimeError/OSError with LazyConfig fields in place of yacs keys."""
        try:
            yield
        except (ValueError, RuntimeError, OSError) as error:
            message = str(error)
            translated = self.translate(message)
            if translated == message:
                raise
            try:
                replacement = type(error)(translated)
            except Exception:  # an exception type with another constructor: keep it as it is
                raise error
            raise replacement from error
