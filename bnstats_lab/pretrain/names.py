"""Default names of the pre-trained checkpoints and the command that builds each.

``r18_fashion_mnist.pkl``, ``r18_gn_fashion_mnist.pkl``, ``r18_fashion_mnist_wc.pkl``, ... under
``output/pretrain/``: the names the CPU configs' ``MODEL.WEIGHTS`` use. :func:`missing_weights_hint`
turns such a name back into its ``tools/pretrain_backbone.py`` command; ``import bnstats_lab`` adds
it to the plug-in's missing-weights error.
"""
import os
import re
from typing import Optional

DEFAULT_DIR = os.path.join("output", "pretrain")


def default_checkpoint_name(depth: int = 18, norm: str = "BN", weight_centralization: bool = False) -> str:
    """``r18_fashion_mnist.pkl``, ``r18_gn_fashion_mnist.pkl``, ``r18_fashion_mnist_wc.pkl``, ..."""
    norm_part = "" if norm == "BN" else "_" + norm.lower()
    return f"r{depth}{norm_part}_fashion_mnist{'_wc' if weight_centralization else ''}.pkl"


def default_checkpoint_path(depth: int = 18, norm: str = "BN", weight_centralization: bool = False) -> str:
    return os.path.join(DEFAULT_DIR, default_checkpoint_name(depth, norm, weight_centralization))


_NAME_RE = re.compile(r"^r(?P<depth>18|34|50|101)(?:_(?P<norm>[a-z0-9]+))?_fashion_mnist(?P<wc>_wc)?\.pkl$")


def build_command_for(path: str) -> Optional[str]:
    """The command that builds a pre-trained checkpoint with a default name, or None."""
    match = _NAME_RE.match(os.path.basename(path))
    if match is None:
        return None
    args = ["python tools/pretrain_backbone.py", "--depth", match["depth"]]
    if match["norm"]:
        known = {"gn": "GN", "bn": "BN", "syncbn": "SyncBN", "mabn": "MABN", "evalnorm": "EvalNorm"}
        args += ["--norm", known.get(match["norm"], match["norm"])]
    if match["wc"]:
        args.append("--weight-centralization")
    args += ["--output", path]
    return " ".join(args)


def missing_weights_hint(path: str) -> Optional[str]:
    """The hint added to a missing ``MODEL.WEIGHTS`` error when the file is one of the pre-trained
    backbones of the CPU configs (see ``d2_bnstats.d2.weights.add_missing_weights_hint``), else None."""
    command = build_command_for(path)
    if command is None:
        return None
    return (
        f"It is a backbone pre-trained on Fashion-MNIST (the stand-in for ImageNet): build it with "
        f"`{command}` from the repository root, or `make pretrain` for all of them (configs/README.md)"
    )
