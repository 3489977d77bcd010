"""Pre-train detectron2's ResNet backbone as a Fashion-MNIST classifier: the stand-in for ImageNet.

No ImageNet weights can be downloaded on the machines this project targets, yet three of the four
training settings of the config matrix start from a pre-trained backbone (frozen BN, fine-tuned BN,
re-initialised BN statistics). This module trains exactly the backbone the detection configs build
(``build_resnet_backbone`` from a detectron2 config: depth 18/34/50, its ``RES2_OUT_CHANNELS``,
``STRIDE_IN_1X1``, norm) with a global-average-pool + linear classifier on the 60,000 Fashion-MNIST
training images, and writes the backbone as a checkpoint in detectron2's model-zoo format — the
layout of ``tools/convert-torchvision-to-d2.py``'s output, e.g. ImageNet R-50 from torchvision:

    {"model": {"stem.conv1.weight": ndarray, "stem.conv1.norm.running_mean": ndarray,
               "res2.0.conv1.weight": ndarray, ...},
     "__author__": "...", "matching_heuristics": True, "pretrain": {...how it was made...}}

so ``MODEL.WEIGHTS: output/pretrain/r18_fashion_mnist.pkl`` loads it through
``DetectionCheckpointer`` exactly as an ImageNet checkpoint: the "Reading a file from ..." and
"Following weights matched with submodule backbone.bottom_up" messages, every backbone parameter and
BN statistic loaded (FrozenBN or trainable BN alike), and only the layers ImageNet weights lack too
(FPN, RPN, RoI heads) reported missing. The classifier layer and ``num_batches_tracked`` counters
are not exported (a counter missing from a checkpoint is filled in silently by torch's BN).

Input: a 28x28 item resized to ``side`` pixels and pasted on a ``image_size`` canvas, three
channels, normalised with the detection config's ``MODEL.PIXEL_MEAN``/``PIXEL_STD`` so that the
backbone sees the same input scale in pre-training and detection (as ImageNet models and their
detection configs share theirs). Training augmentation is light and mirrors how fashion-scenes
draws items: a random side in ``train_sides``, random position, horizontal flip, a random colour
tint (90..255 per channel) over a dim random background (0..70 plus Gaussian noise, sigma 8). The
test accuracy is measured on the clean test images: grey on black, centred, side ``test_side``.

Weight centralisation (the MABN variant, methods.md section 2): with ``weight_centralization`` every
conv of the backbone computes with its filters centred (each output filter's weights minus their
mean over input channels and kernel positions) during pre-training, and the exported weights are
the centred ones, :func:`centralize_conv_weights`.
"""
import dataclasses
import logging
import math
import os
import pickle
import re
import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

logger = logging.getLogger(__name__)

# The CPU configs' base, in this source checkout (found from any working directory).
DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "cpu", "Base-R18-FPN-fashion.yaml"
)
DEFAULT_DIR = os.path.join("output", "pretrain")
AUTHOR = "d2_bnstats.pretrain (ResNet backbone pre-trained on Fashion-MNIST)"
NUM_CLASSES = 10


# --------------------------------------------------------------------------------------------
# Weight centralisation: the one definition used by pre-training and checkpoint export.
# (The MABN layer issue ships its own weight-centralised convs; dedupe at merge.)
# --------------------------------------------------------------------------------------------
def centralize_weight(weight: torch.Tensor) -> torch.Tensor:
    """A conv weight [out, in, kh, kw] with each output filter's mean over (in, kh, kw) removed."""
    if weight.dim() != 4:
        raise ValueError(f"weight centralisation applies to conv weights [out, in, kh, kw], got shape {tuple(weight.shape)}")
    return weight - weight.mean(dim=(1, 2, 3), keepdim=True)


def centralize_conv_weights(state_dict: Dict[str, object]) -> Dict[str, object]:
    """A copy of ``state_dict`` whose conv weights (4-D ``*.weight`` entries, numpy or torch) are
    centralised with :func:`centralize_weight`; every other entry is passed through unchanged."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".weight") and getattr(value, "ndim", 0) == 4:
            if isinstance(value, np.ndarray):
                value = centralize_weight(torch.from_numpy(value)).numpy()
            else:
                value = centralize_weight(value)
        out[key] = value
    return out


class _Centralize(nn.Module):
    """Parametrisation: the conv computes with the centralised version of its stored weight."""

    def forward(self, weight):
        return centralize_weight(weight)


def add_weight_centralization(module: nn.Module) -> int:
    """Make every ``nn.Conv2d`` in ``module`` compute with centralised weights; returns the count."""
    count = 0
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and not parametrize.is_parametrized(conv, "weight"):
            parametrize.register_parametrization(conv, "weight", _Centralize())
            count += 1
    return count


def remove_weight_centralization(module: nn.Module) -> None:
    """Bake the centralised weights in and restore plain ``weight`` parameters (original key names)."""
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and parametrize.is_parametrized(conv, "weight"):
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)


# --------------------------------------------------------------------------------------------
# Options, default file names
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PretrainOptions:
    """How to pre-train. The defaults are the recipe of ``make pretrain`` (see docs/configs.md)."""

    config_file: str = DEFAULT_CONFIG  # detection config whose backbone is pre-trained
    opts: Tuple[str, ...] = ()  # KEY VALUE overrides of that config
    depth: Optional[int] = None  # MODEL.RESNETS.DEPTH; None keeps the config's
    norm: str = "BN"  # MODEL.RESNETS.NORM during pre-training (FrozenBN is not trainable)
    weight_centralization: bool = False
    image_size: int = 48  # canvas side (res5 is 2x2; at 32 px it is 1x1 and accuracy drops ~8 points)
    train_sides: Tuple[int, int] = (36, 48)  # random item side in training (inclusive)
    test_side: int = 42  # item side at test: the middle of the training range
    batch_size: int = 64
    epochs: float = 2.0  # passes over the training images (ignored when max_iter is set)
    max_iter: Optional[int] = None
    base_lr: float = 0.05  # SGD, Nesterov momentum 0.9, linear warm-up then cosine decay to 0
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on conv/linear weights only, not on norm parameters or biases
    warmup_iters: int = 50
    train_subset: Optional[int] = None  # use only the first N training images
    test_subset: Optional[int] = None  # evaluate on the first N test images
    seed: int = 0
    log_period: int = 50
    fashion_mnist_dir: Optional[str] = None

    def __post_init__(self):
        if self.norm == "FrozenBN":
            raise ValueError("norm 'FrozenBN' has nothing to train; pre-train with 'BN' (FrozenBN configs load its statistics)")
        lo, hi = self.train_sides
        if not 8 <= lo <= hi <= self.image_size or not 8 <= self.test_side <= self.image_size:
            raise ValueError(
                f"item sides must satisfy 8 <= min <= max <= image_size ({self.image_size}); "
                f"got train_sides={self.train_sides}, test_side={self.test_side}"
            )
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 (the backbone's stride), got {self.image_size}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 for batch statistics, got {self.batch_size}")


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


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
def backbone_config(options: PretrainOptions):
    """The detectron2 config of the backbone to pre-train (from ``options.config_file``)."""
    from detectron2.config import get_cfg

    from .d2.config import add_bnstats_config, check_norm_keys

    cfg = get_cfg()
    add_bnstats_config(cfg)
    if options.config_file:
        if not os.path.isfile(options.config_file):
            raise FileNotFoundError(f"config file {options.config_file} does not exist")
        cfg.merge_from_file(options.config_file)
    if options.opts:
        if len(options.opts) % 2:
            raise ValueError(f"overrides must come as KEY VALUE pairs, got {list(options.opts)}")
        cfg.merge_from_list(list(options.opts))
    if options.depth is not None:
        if options.depth not in (18, 34, 50, 101, 152):
            raise ValueError(f"ResNet depth must be one of 18, 34, 50, 101, 152; got {options.depth}")
        cfg.MODEL.RESNETS.DEPTH = options.depth
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if options.depth in (18, 34) else 256
    cfg.MODEL.RESNETS.NORM = options.norm
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    check_norm_keys(cfg)
    return cfg


class BackboneClassifier(nn.Module):
    """detectron2's ResNet backbone + global average pooling + a linear layer."""

    def __init__(self, backbone: nn.Module, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.backbone = backbone
        channels = backbone.output_shape()["res5"].channels
        self.fc = nn.Linear(channels, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(self.backbone(x)["res5"].mean(dim=(2, 3)))


def build_classifier(cfg) -> BackboneClassifier:
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    from .d2.build import building

    with building(cfg):  # norm factories see the config, as in a detection build
        backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    return BackboneClassifier(backbone)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def compose_batch(
    items: torch.Tensor,
    *,
    image_size: int,
    side: int,
    train: bool,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Normalised input [B, 3, image_size, image_size] from uint8 items [B, 28, 28] (see module doc)."""
    b = items.shape[0]
    alpha = items.float().div(255.0).unsqueeze(1)
    if side != alpha.shape[-1]:
        alpha = F.interpolate(alpha, size=(side, side), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    full = torch.zeros(b, 1, image_size, image_size)
    if train:
        flip = torch.rand(b, generator=generator) < 0.5
        alpha[flip] = alpha[flip].flip(-1)
        offsets = torch.randint(0, image_size - side + 1, (b, 2), generator=generator).tolist()
        colour = torch.empty(b, 3, 1, 1).uniform_(90.0, 255.0, generator=generator)
        background = torch.empty(b, 3, 1, 1).uniform_(0.0, 70.0, generator=generator)
        background = background + 8.0 * torch.randn(b, 3, image_size, image_size, generator=generator)
    else:
        offsets = [((image_size - side) // 2, (image_size - side) // 2)] * b
        colour = torch.full((b, 3, 1, 1), 255.0)
        background = torch.zeros(b, 3, image_size, image_size)
    for i, (y, x) in enumerate(offsets):
        full[i, :, y : y + side, x : x + side] = alpha[i]
    canvas = background * (1.0 - full) + colour * full
    mean = torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1)
    if mean.shape[1] != 3 or std.shape[1] != 3:
        raise ValueError(f"PIXEL_MEAN/PIXEL_STD must have 3 values, got {list(pixel_mean)}, {list(pixel_std)}")
    return (canvas - mean) / std


def _subset(images: np.ndarray, labels: np.ndarray, n: Optional[int]):
    if n is None:
        return images, labels
    if n < 1:
        raise ValueError(f"a subset must hold at least 1 image, got {n}")
    return images[:n], labels[:n]


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, options: PretrainOptions, cfg) -> float:
    """Top-1 accuracy on clean, centred test images (eval mode: the running statistics)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), 512):
        x = compose_batch(
            torch.from_numpy(images[start : start + 512]),
            image_size=options.image_size,
            side=options.test_side,
            train=False,
            pixel_mean=cfg.MODEL.PIXEL_MEAN,
            pixel_std=cfg.MODEL.PIXEL_STD,
        )
        pred = model(x).argmax(dim=1)
        correct += int((pred == torch.from_numpy(labels[start : start + 512])).sum())
    model.train(was_training)
    return correct / max(1, len(images))


# --------------------------------------------------------------------------------------------
# Training and export
# --------------------------------------------------------------------------------------------
def _param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # conv/linear weights (also a parametrised conv's "original") decay; norm affine and biases do not
        (decay if p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(it: int, max_iter: int, options: PretrainOptions) -> float:
    if it < options.warmup_iters:
        return options.base_lr * (0.1 + 0.9 * it / max(1, options.warmup_iters))
    progress = (it - options.warmup_iters) / max(1, max_iter - options.warmup_iters)
    return options.base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def export_backbone(backbone: nn.Module, path: str, info: dict, weight_centralization: bool = False) -> dict:
    """Write ``backbone``'s state in detectron2's model-zoo ``.pkl`` format (see module doc).

    Returns the exported ``{key: ndarray}``."""
    state = {
        k: v.detach().cpu().numpy().copy()
        for k, v in backbone.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    if weight_centralization:
        state = centralize_conv_weights(state)
    payload = {"model": state, "__author__": AUTHOR, "matching_heuristics": True, "pretrain": dict(info)}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(payload, f)
    os.replace(tmp, path)  # never leave a half-written checkpoint under the final name
    return state


def read_pretrain_info(path: str) -> dict:
    """The ``pretrain`` record of a checkpoint written by :func:`pretrain` (how it was made)."""
    with open(path, "rb") as f:
        data = pickle.load(f, encoding="latin1")
    return dict(data.get("pretrain", {}))


def pretrain(options: PretrainOptions, output: str) -> dict:
    """Pre-train, evaluate on the Fashion-MNIST test split, export to ``output``; returns a summary."""
    from .data.fashion_mnist import load_fashion_mnist

    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    cfg = backbone_config(options)
    model = build_classifier(cfg)
    if options.weight_centralization:
        n = add_weight_centralization(model.backbone)
        logger.info("weight centralisation on %d convs", n)
    model.train()

    train_images, train_labels = _subset(*load_fashion_mnist("train", options.fashion_mnist_dir), options.train_subset)
    test_images, test_labels = _subset(*load_fashion_mnist("test", options.fashion_mnist_dir), options.test_subset)
    # own, writable copies (the reader returns read-only views of the file's bytes)
    train_images, test_images = np.array(train_images), np.array(test_images)
    batch = min(options.batch_size, len(train_images))
    iters_per_epoch = max(1, len(train_images) // batch)
    max_iter = options.max_iter if options.max_iter is not None else max(1, round(options.epochs * iters_per_epoch))
    optimizer = torch.optim.SGD(
        _param_groups(model, options.weight_decay), lr=options.base_lr, momentum=options.momentum, nesterov=True
    )
    logger.info(
        "pre-training ResNet-%d (%s%s) on %d Fashion-MNIST images at %d px: %d iterations of %d (%.2f epochs)",
        cfg.MODEL.RESNETS.DEPTH,
        options.norm,
        ", weight-centralised convs" if options.weight_centralization else "",
        len(train_images),
        options.image_size,
        max_iter,
        batch,
        max_iter / iters_per_epoch,
    )
    start = time.perf_counter()
    order = torch.randperm(len(train_images), generator=generator)
    cursor, seen_correct, seen, loss_sum = 0, 0, 0, 0.0
    for it in range(max_iter):
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(train_images), generator=generator), 0
        index = order[cursor : cursor + batch].numpy()
        cursor += batch
        side = int(torch.randint(options.train_sides[0], options.train_sides[1] + 1, (1,), generator=generator))
        x = compose_batch(
            torch.from_numpy(train_images[index]),
            image_size=options.image_size,
            side=side,
            train=True,
            pixel_mean=cfg.MODEL.PIXEL_MEAN,
            pixel_std=cfg.MODEL.PIXEL_STD,
            generator=generator,
        )
        y = torch.from_numpy(train_labels[index])
        lr = _lr_at(it, max_iter, options)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pre-training diverged at iteration {it}: loss {float(loss)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * len(y)
        seen_correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        if (it + 1) % options.log_period == 0 or it + 1 == max_iter:
            elapsed = time.perf_counter() - start
            logger.info(
                "iter %d/%d  loss %.4f  train acc %.4f  lr %.4f  %.2f s/iter  eta %.0f s",
                it + 1,
                max_iter,
                loss_sum / seen,
                seen_correct / seen,
                lr,
                elapsed / (it + 1),
                elapsed / (it + 1) * (max_iter - it - 1),
            )
            loss_sum, seen_correct, seen = 0.0, 0, 0
    train_seconds = time.perf_counter() - start
    if options.weight_centralization:
        remove_weight_centralization(model.backbone)
    accuracy = evaluate(model, test_images, test_labels, options, cfg)
    logger.info("Fashion-MNIST test accuracy %.4f on %d images", accuracy, len(test_images))
    info = {
        "dataset": "Fashion-MNIST",
        "depth": int(cfg.MODEL.RESNETS.DEPTH),
        "res2_out_channels": int(cfg.MODEL.RESNETS.RES2_OUT_CHANNELS),
        "stride_in_1x1": bool(cfg.MODEL.RESNETS.STRIDE_IN_1X1),
        "norm": options.norm,
        "weight_centralization": bool(options.weight_centralization),
        "image_size": options.image_size,
        "train_sides": list(options.train_sides),
        "test_side": options.test_side,
        "pixel_mean": [float(v) for v in cfg.MODEL.PIXEL_MEAN],
        "pixel_std": [float(v) for v in cfg.MODEL.PIXEL_STD],
        "input_format": cfg.INPUT.FORMAT,
        "train_images": int(len(train_images)),
        "iterations": int(max_iter),
        "batch_size": int(batch),
        "epochs": max_iter * batch / len(train_images),
        "test_images": int(len(test_images)),
        "test_accuracy": float(accuracy),
        "train_seconds": float(train_seconds),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(options).items()},
    }
    export_backbone(model.backbone, output, info, weight_centralization=options.weight_centralization)
    logger.info("wrote %s (MODEL.WEIGHTS for the transfer settings)", output)
    return dict(info, output=output)
