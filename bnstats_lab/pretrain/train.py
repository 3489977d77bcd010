"""Pre-training itself: the SGD loop, the test accuracy, and :func:`pretrain`, which builds the model
(:mod:`.model`), trains it on composed Fashion-MNIST batches (:mod:`.inputs`) and exports the backbone
(:mod:`.checkpoint`).

Optimisation: SGD with Nesterov momentum, a linear warm-up from 0.1 x the base LR then cosine decay
to 0, weight decay on conv and linear weights only (not on norm parameters or biases). With weight
centralization the convs train centralized and are folded back to plain convs before the test and
the export, so the checkpoint holds the centred weights under the usual names.
"""
import dataclasses
import logging
import math
import time
from typing import Iterator, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from d2_bnstats.layers.weight_centralization import fold_weight_centralization

from ..data.fashion_mnist import load_fashion_mnist
from .checkpoint import export_backbone
from .inputs import compose_batch, subset
from .model import backbone_config, build_classifier, centralize_backbone
from .options import PretrainOptions

logger = logging.getLogger(__package__)


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


def _param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # conv/linear weights decay (a weight-centralized conv's stays centred: its gradient is centred
        # and decay scales it); norm affine parameters and biases do not
        (decay if p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(it: int, max_iter: int, options: PretrainOptions) -> float:
    if it < options.warmup_iters:
        return options.base_lr * (0.1 + 0.9 * it / max(1, options.warmup_iters))
    progress = (it - options.warmup_iters) / max(1, max_iter - options.warmup_iters)
    return options.base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _load_data(options: PretrainOptions):
    """((train images, labels), (test images, labels)), subsets applied, images writable."""
    train_images, train_labels = subset(*load_fashion_mnist("train", options.fashion_mnist_dir), options.train_subset)
    test_images, test_labels = subset(*load_fashion_mnist("test", options.fashion_mnist_dir), options.test_subset)
    # own, writable copies (the reader returns read-only views of the file's bytes)
    return (np.array(train_images), train_labels), (np.array(test_images), test_labels)


def _training_plan(options: PretrainOptions, num_images: int) -> Tuple[int, int, int]:
    """(batch size, iterations per epoch, iterations)."""
    batch = min(options.batch_size, num_images)
    iters_per_epoch = max(1, num_images // batch)
    max_iter = options.max_iter if options.max_iter is not None else max(1, round(options.epochs * iters_per_epoch))
    return batch, iters_per_epoch, max_iter


def _batches(images: np.ndarray, labels: np.ndarray, batch: int, options: PretrainOptions, cfg,
             generator: torch.Generator) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Endless augmented training batches (x, y): epochs of a fresh random order, a random side per batch."""
    order, cursor = torch.randperm(len(images), generator=generator), 0
    while True:
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        index = order[cursor : cursor + batch].numpy()
        cursor += batch
        side = int(torch.randint(options.train_sides[0], options.train_sides[1] + 1, (1,), generator=generator))
        x = compose_batch(
            torch.from_numpy(images[index]),
            image_size=options.image_size,
            side=side,
            train=True,
            pixel_mean=cfg.MODEL.PIXEL_MEAN,
            pixel_std=cfg.MODEL.PIXEL_STD,
            generator=generator,
        )
        yield x, torch.from_numpy(labels[index])


def _train(model: nn.Module, optimizer, batches, max_iter: int, options: PretrainOptions) -> float:
    """``max_iter`` SGD steps over ``batches``, logged every ``log_period``; returns the seconds."""
    start = time.perf_counter()
    seen_correct, seen, loss_sum = 0, 0, 0.0
    for it, (x, y) in zip(range(max_iter), batches):
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
                it + 1, max_iter, loss_sum / seen, seen_correct / seen, lr,
                elapsed / (it + 1), elapsed / (it + 1) * (max_iter - it - 1),
            )
            loss_sum, seen_correct, seen = 0.0, 0, 0
    return time.perf_counter() - start


def _record(cfg, options: PretrainOptions, num_train: int, num_test: int, batch: int, max_iter: int,
            accuracy: float, train_seconds: float) -> dict:
    """How the checkpoint was made: the ``pretrain`` entry of the checkpoint and the run's summary."""
    return {
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
        "train_images": int(num_train),
        "iterations": int(max_iter),
        "batch_size": int(batch),
        "epochs": max_iter * batch / num_train,
        "test_images": int(num_test),
        "test_accuracy": float(accuracy),
        "train_seconds": float(train_seconds),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(options).items()},
    }


def pretrain(options: PretrainOptions, output: str) -> dict:
    """Pre-train, evaluate on the Fashion-MNIST test split, export to ``output``; returns a summary."""
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    cfg = backbone_config(options)
    model = build_classifier(cfg)
    if options.weight_centralization:
        n = centralize_backbone(model.backbone)
        logger.info("weight centralisation on %d convs", n)
    model.train()
    (train_images, train_labels), (test_images, test_labels) = _load_data(options)
    batch, iters_per_epoch, max_iter = _training_plan(options, len(train_images))
    optimizer = torch.optim.SGD(
        _param_groups(model, options.weight_decay), lr=options.base_lr, momentum=options.momentum, nesterov=True
    )
    logger.info(
        "pre-training ResNet-%d (%s%s) on %d Fashion-MNIST images at %d px: %d iterations of %d (%.2f epochs)",
        cfg.MODEL.RESNETS.DEPTH, options.norm,
        ", weight-centralised convs" if options.weight_centralization else "",
        len(train_images), options.image_size, max_iter, batch, max_iter / iters_per_epoch,
    )
    batches = _batches(train_images, train_labels, batch, options, cfg, generator)
    train_seconds = _train(model, optimizer, batches, max_iter, options)
    if options.weight_centralization:
        fold_weight_centralization(model.backbone)  # plain convs holding the centred weights
    accuracy = evaluate(model, test_images, test_labels, options, cfg)
    logger.info("Fashion-MNIST test accuracy %.4f on %d images", accuracy, len(test_images))
    info = _record(cfg, options, len(train_images), len(test_images), batch, max_iter, accuracy, train_seconds)
    export_backbone(model.backbone, output, info)
    logger.info("wrote %s (MODEL.WEIGHTS for the transfer settings)", output)
    return dict(info, output=output)
