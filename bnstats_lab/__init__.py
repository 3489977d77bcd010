"""bnstats_lab: the experiment lab around the d2_bnstats plug-in.

What the project's experiments need and a plug-in user does not: the fashion-scenes data set
(``data/``), backbones pre-trained on Fashion-MNIST as the stand-in for ImageNet (``pretrain/``),
the config matrix that generates ``configs/`` (the table ``config_matrix.py``; the linear scaling
rule ``config_scaling.py``; leaves, descriptions, writing and checking ``config_leaves.py``,
``config_describe.py``, ``config_generate.py``) and the benchmarks (``benchmark/``). The lab imports
the plug-in; the plug-in never imports the lab.

``import bnstats_lab`` imports ``d2_bnstats`` (norms registered, detectron2 patched), registers the
fashion-scenes data sets with detectron2's catalogs under ``$DETECTRON2_DATASETS`` and makes a
missing pre-trained backbone's error name the command that builds it, and a missing data set's
error suggest the CPU configs on fashion-scenes.
"""
import d2_bnstats  # noqa: F401  (the plug-in: norms registered, detectron2 patched)
from d2_bnstats.d2.datasets import MISSING_DATA_HINTS
from d2_bnstats.d2.weights import add_missing_weights_hint

from .data import register_fashion_scenes
from .pretrain import missing_weights_hint

register_fashion_scenes()
add_missing_weights_hint(missing_weights_hint)
CPU_DATA_HINT = (
    "Without COCO, the CPU configs run on fashion-scenes (built from Fashion-MNIST in a minute): `make data`, "
    "then e.g. tools/train_net.py --config configs/cpu/frcnn_r18_evalnorm_2img.yaml."
)
if CPU_DATA_HINT not in MISSING_DATA_HINTS:
    MISSING_DATA_HINTS.append(CPU_DATA_HINT)

__all__ = ["register_fashion_scenes", "missing_weights_hint"]
