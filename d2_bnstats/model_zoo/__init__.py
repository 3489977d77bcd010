"""The plug-in's configs, shipped inside the package and found the way detectron2's model zoo finds its own.

    from d2_bnstats import model_zoo
    model_zoo.get_config_file("frcnn_r50_evalnorm_2img.yaml")          # R-50-FPN, COCO, 8 GPUs
    model_zoo.get_config_file("cpu/frcnn_r18_evalnorm_2img.yaml")      # CPU-sized R-18-FPN, fashion-scenes
    model_zoo.get_config_file("lazy/mask_rcnn_R_50_FPN_evalnorm.py")   # LazyConfig
    cfg = model_zoo.get_config("frcnn_r50_evalnorm_2img.yaml")         # a yacs CfgNode with BNSTATS keys

Names are paths relative to the folder ``configs`` of this package; a repository clone's ``configs/``
is that same folder, so ``configs/NAME`` in a clone and ``get_config_file(NAME)`` are one file, and
``_BASE_`` references (relative to the file that names them) resolve inside the package. Wherever the
plug-in takes a config path (every command's ``--config-file``, :func:`d2_bnstats.d2.train.load_config`,
the LazyConfig loader) ``bnstats://NAME`` names a packaged config.

The CPU configs train on the fashion-scenes data sets, which the repository's lab builds and registers;
elsewhere point them at data sets of your own (``--register-coco NAME JSON IMAGE_ROOT`` and
``DATASETS.TRAIN``/``DATASETS.TEST``). The R-50 configs use COCO as detectron2's own configs do.
"""
import difflib
import os
from typing import List

PREFIX = "bnstats://"
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
SUFFIXES = (".yaml", ".py")


def available_configs() -> List[str]:
    """Every packaged config name (``.yaml`` and LazyConfig ``.py``), sorted."""
    names = []
    for dirpath, dirnames, files in os.walk(CONFIG_DIR):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        rel = os.path.relpath(dirpath, CONFIG_DIR)
        for name in files:
            if name.endswith(SUFFIXES):
                names.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return sorted(names)


def get_config_file(config_path: str) -> str:
    """The absolute path of the packaged config ``config_path`` (e.g. ``"frcnn_r50_evalnorm_2img.yaml"``,
    ``"cpu/frcnn_r18_evalnorm_2img.yaml"``; a leading ``bnstats://`` is accepted). A name that is not
    packaged raises ``FileNotFoundError`` naming the closest packaged names."""
    name = str(config_path)
    if name.startswith(PREFIX):
        name = name[len(PREFIX):]
    name = name.lstrip("/")
    path = os.path.normpath(os.path.join(CONFIG_DIR, name))
    inside = os.path.commonpath([path, CONFIG_DIR]) == CONFIG_DIR
    if not name or not inside or not os.path.isfile(path) or not path.endswith(SUFFIXES):
        names = available_configs()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise FileNotFoundError(
            f"{PREFIX}{name} is not a packaged d2_bnstats config{hint} (d2_bnstats.model_zoo.available_configs() "
            f"lists the {len(names)} names, e.g. 'frcnn_r50_evalnorm_2img.yaml', 'cpu/frcnn_r18_evalnorm_2img.yaml')"
        )
    return path


def resolve_config_path(path):
    """``path`` itself, or for ``bnstats://NAME`` the packaged config's path (:func:`get_config_file`)."""
    if isinstance(path, str) and path.startswith(PREFIX):
        return get_config_file(path)
    return path


def get_config(config_path: str):
    """The packaged config ``config_path``: a yacs ``CfgNode`` (detectron2's defaults, the plug-in's
    ``BNSTATS`` keys, the file; not yet checked: :func:`d2_bnstats.d2.train.load_config` checks) for a
    ``.yaml``, the ``LazyConfig.load`` result for a ``.py``."""
    path = get_config_file(config_path)
    if path.endswith(".py"):
        from detectron2.config import LazyConfig

        return LazyConfig.load(path)
    from detectron2.config import get_cfg

    from ..d2.plugin import add_bnstats_config

    cfg = get_cfg()
    add_bnstats_config(cfg)
    cfg.merge_from_file(path)
    return cfg


__all__ = ["PREFIX", "CONFIG_DIR", "available_configs", "get_config", "get_config_file", "resolve_config_path"]
