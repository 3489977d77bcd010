"""Normalisation layers (the maths). Nothing here imports detectron2's trainer or config."""

from .evalnorm import EvalNorm2d  # noqa: E402,F401
