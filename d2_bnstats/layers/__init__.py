"""Normalisation layers (the maths). Nothing here imports detectron2's trainer or config."""
from .mabn import MABN2d  # noqa: F401,E402
