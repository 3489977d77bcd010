"""How a 28x28 Fashion-MNIST item becomes the backbone's input.

The item is resized to ``side`` pixels and pasted on an ``image_size`` canvas, three channels,
normalised with the detection config's ``MODEL.PIXEL_MEAN``/``PIXEL_STD`` so that the backbone sees
the same input scale in pre-training and detection (as ImageNet models and their detection configs
share theirs). Training augmentation is light and mirrors how fashion-scenes draws items: a random
side in ``train_sides``, random position, horizontal flip, a random colour tint (90..255 per channel)
over a dim random background (0..70 plus Gaussian noise, sigma 8). Test images are clean: grey on
black, centred, side ``test_side``.
"""
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


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


def subset(images: np.ndarray, labels: np.ndarray, n: Optional[int]):
    """The first ``n`` images and labels (all of them when ``n`` is None)."""
    if n is None:
        return images, labels
    if n < 1:
        raise ValueError(f"a subset must hold at least 1 image, got {n}")
    return images[:n], labels[:n]
