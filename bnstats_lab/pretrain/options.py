"""How to pre-train: :class:`PretrainOptions`, whose defaults are the recipe of ``make pretrain``
(docs/configs.md), checked when made."""
import dataclasses
import os
from typing import Optional, Tuple

# The CPU configs' base, in this source checkout (found from any working directory).
DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "configs", "cpu", "Base-R18-FPN-fashion.yaml",
)


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
