"""Normalisation layers (the maths). Nothing here imports detectron2's trainer or config."""

from .evalnorm import EvalNorm2d  # noqa: F401
from .mabn import MABN2d  # noqa: F401
