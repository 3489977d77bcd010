"""Normalisation layers (the maths). Nothing here imports detectron2's trainer or config."""
