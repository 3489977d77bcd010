"""The pre-trained backbone's checkpoint: detectron2's model-zoo ``.pkl`` format.

The layout of ``tools/convert-torchvision-to-d2.py``'s output, e.g. ImageNet R-50 from torchvision:

    {"model": {"stem.conv1.weight": ndarray, "stem.conv1.norm.running_mean": ndarray,
               "res2.0.conv1.weight": ndarray, ...},
     "__author__": "...", "matching_heuristics": True, "pretrain": {...how it was made...}}

so ``MODEL.WEIGHTS: output/pretrain/r18_fashion_mnist.pkl`` loads it through
``DetectionCheckpointer`` exactly as an ImageNet checkpoint: the "Reading a file from ..." and
"Following weights matched with submodule backbone.bottom_up" messages, every backbone parameter and
BN statistic loaded (FrozenBN or trainable BN alike), and only the layers ImageNet weights lack too
(FPN, RPN, RoI heads) reported missing. The classifier layer and ``num_batches_tracked`` counters
are not exported (a counter missing from a checkpoint is filled in silently by torch's BN).
"""
import pickle

from torch import nn

from d2_bnstats.outputs import save_pickle

AUTHOR = "bnstats_lab.pretrain (ResNet backbone pre-trained on Fashion-MNIST)"


def export_backbone(backbone: nn.Module, path: str, info: dict) -> dict:
    """Write ``backbone``'s state in detectron2's model-zoo ``.pkl`` format (see module doc).

    Returns the exported ``{key: ndarray}``."""
    state = {
        k: v.detach().cpu().numpy().copy()
        for k, v in backbone.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    payload = {"model": state, "__author__": AUTHOR, "matching_heuristics": True, "pretrain": dict(info)}
    save_pickle(payload, path)  # atomic: never a half-written checkpoint under the final name
    return state


def read_pretrain_info(path: str) -> dict:
    """The ``pretrain`` record of a checkpoint written by :func:`~bnstats_lab.pretrain.pretrain`."""
    with open(path, "rb") as f:
        data = pickle.load(f, encoding="latin1")
    return dict(data.get("pretrain", {}))
