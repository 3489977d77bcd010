"""The plug-in's options as a LazyConfig node (``cfg.bnstats``), and how that node is read.

:func:`bnstats_node` builds the node from the yacs defaults that :func:`d2_bnstats.add_bnstats_config`
declares (d2/config.py and each norm declaration's ``defaults`` in d2/norms/, where the comment above every
key says what it means): the same keys, the same spelling, the same defaults, no second list. The
one addition: detectron2's two yacs keys that switch PreciseBN on and size it,
``TEST.PRECISE_BN.ENABLED`` and ``TEST.PRECISE_BN.NUM_ITER``, live in this node as
``bnstats.PRECISE_BN.ENABLED`` and ``bnstats.PRECISE_BN.NUM_ITER`` (defaults: detectron2's), because a
LazyConfig has no ``TEST`` node and every option of the plug-in then sits in one place.

:func:`read_bnstats` turns a user's node (complete, partial or absent) into the yacs ``BNSTATS`` node
that the plug-in's readers take, after checking that every key exists and every value has the
default's type; errors name the LazyConfig field (``bnstats.GHOST_BN.VIRTUAL_BATCH_SIZE``).
"""
import difflib
from collections.abc import Mapping
from typing import Dict, Tuple

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from omegaconf import DictConfig, OmegaConf

from ..plugin import add_bnstats_config

ROOT = "bnstats"
# bnstats.PRECISE_BN.<key> -> detectron2's TEST.PRECISE_BN.<key>
DETECTRON2_PRECISE_BN_KEYS = ("ENABLED", "NUM_ITER")


def _yacs_defaults() -> CN:
    cfg = CN()
    add_bnstats_config(cfg)
    precise = get_cfg().TEST.PRECISE_BN
    for key in DETECTRON2_PRECISE_BN_KEYS:
        cfg.BNSTATS.PRECISE_BN[key] = precise[key]
    return cfg.BNSTATS


def _plain(node):
    """A yacs node as plain dicts and lists (what OmegaConf takes)."""
    if isinstance(node, Mapping):
        return {key: _plain(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(value) for value in node]
    return node


def bnstats_node() -> DictConfig:
    """A new ``bnstats`` node with every default, to assign to a LazyConfig: ``bnstats = bnstats_node()``
    in a config file, then e.g. ``bnstats.GHOST_BN.VIRTUAL_BATCH_SIZE = 16``."""
    return OmegaConf.create(_plain(_yacs_defaults()))


_KINDS = (  # (type of the default, accepted value types, words)
    (bool, (bool,), "True or False"),
    (int, (int,), "an integer"),
    (float, (int, float), "a number"),
    (str, (str,), "a string"),
    ((list, tuple), (list, tuple), "a list"),
)


def _checked(default, value, where: str):
    for kind, accepted, words in _KINDS:
        if isinstance(default, kind):
            if isinstance(value, bool) and kind is not bool or not isinstance(value, accepted):
                raise ValueError(f"{where} = {value!r}: expected {words} (default {default!r})")
            if kind is float:
                return float(value)
            return list(value) if kind == (list, tuple) else value
    return value


def _unknown_key(key: str, defaults: CN, where: str) -> ValueError:
    message = f"{where}.{key} is not an option of the plug-in; {where} has: {', '.join(sorted(defaults))}"
    close = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.6)
    return ValueError(message + (f". Did you mean {where}.{close[0]}?" if close else ""))


def _merge(defaults: CN, values: Mapping, where: str) -> None:
    for key, value in values.items():
        if key not in defaults:
            raise _unknown_key(key, defaults, where)
        default = defaults[key]
        if isinstance(default, CN):
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}.{key} = {value!r}: expected a node with keys {', '.join(sorted(default))}")
            _merge(default, value, f"{where}.{key}")
        else:
            defaults[key] = _checked(default, value, f"{where}.{key}")


def read_bnstats(node) -> Tuple[CN, Dict[str, object]]:
    """``(BNSTATS, TEST.PRECISE_BN)`` for a LazyConfig's ``bnstats`` node (None: every default):
    the yacs ``BNSTATS`` node with the user's values over the defaults, and detectron2's two
    PreciseBN keys. Unknown keys and values of the wrong type are errors naming the field."""
    bnstats = _yacs_defaults()
    if node is not None:
        if isinstance(node, DictConfig):
            node = OmegaConf.to_container(node, resolve=True)
        if not isinstance(node, Mapping):
            raise ValueError(f"{ROOT} = {node!r}: expected the plug-in's options node (d2_bnstats.lazy.bnstats_node())")
        _merge(bnstats, node, ROOT)
    precise = {key: bnstats.PRECISE_BN.pop(key) for key in DETECTRON2_PRECISE_BN_KEYS}
    return bnstats, precise
