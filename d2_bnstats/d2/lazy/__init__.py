"""The plug-in on detectron2's LazyConfig path (``LazyConfig.load`` + ``instantiate``).

A config value's path, e.g. ``bnstats.GHOST_BN.VIRTUAL_BATCH_SIZE = 16`` with
``model.roi_heads.box_head.conv_norm = "GhostBN"``:

1. **Declared.** ``bnstats = d2_bnstats.lazy.bnstats_node()`` in the config file: the ``BNSTATS``
   keys and defaults of :func:`d2_bnstats.add_bnstats_config` as an OmegaConf node (:mod:`.options`).
2. **Read and checked.** :func:`configure_lazy_norms` reads the node into the yacs view that the
   plug-in's code takes (:mod:`.view`: ``BNSTATS`` plus the few detectron2 keys it reads, each from
   its LazyConfig field) and runs the yacs path's checks; errors name LazyConfig fields.
3. **Resolved.** It then replaces every plug-in norm value in ``cfg.model`` by a ``ConfiguredNorm``
   carrying ``{"virtual_batch_size": 16}`` (:mod:`.norms`), in place.
4. **Built.** ``instantiate(cfg.model)``: ``FastRCNNConvFCHead`` calls ``get_norm(conv_norm, 256)``,
   the registry calls ``GhostBatchNorm2d(256, virtual_batch_size=16)``.
5. **Transformed.** :func:`prepare_model` runs the model transforms with the yacs view (:mod:`.model`):
   the view and checks of step 2 when nothing they depend on changed since, otherwise it checks again
   and checks that step 3 ran; :func:`build_lazy_model` does 2-5.

Training loops add the plug-in's hooks with :func:`build_hooks` and evaluate with :func:`evaluate`
(:mod:`.loop`). :mod:`.train` is such a loop, detectron2's ``tools/lazyconfig_train_net.py`` with
the plug-in's calls, behind ``tools/lazyconfig_train_net.py`` (not imported here: import
``d2_bnstats.d2.lazy.train``).
"""
from .loop import after_loading_weights, build_hooks, evaluate, prepare_for_evaluation, test_loader, train_loader_factory
from .model import build_lazy_model, check_config, configure_lazy_norms, prepare_model
from .options import bnstats_node
from .view import LazyView

__all__ = [
    "after_loading_weights",
    "bnstats_node",
    "build_hooks",
    "build_lazy_model",
    "check_config",
    "configure_lazy_norms",
    "evaluate",
    "LazyView",
    "prepare_for_evaluation",
    "prepare_model",
    "test_loader",
    "train_loader_factory",
]
