"""Giving an existing convolution a subclass in place, as the weight transforms (centralization for
MABN, standardization) do: the module keeps its parameters, hooks and place in the model, and its
``forward`` becomes the subclass's.

This module imports torch only.
"""
from typing import Optional

from torch import nn


def give_conv_class(conv: nn.Conv2d, base: type, cls: Optional[type] = None) -> nn.Conv2d:
    """Make ``conv`` an instance of ``cls`` (default ``base``, for a plain ``nn.Conv2d`` only: another
    conv class has its own ``forward``), which must derive from ``base`` and ``type(conv)``; a conv
    that is a ``base`` already keeps its class. Returns ``conv``."""
    if isinstance(conv, base):
        return conv
    if cls is None:
        if type(conv) is not nn.Conv2d:
            raise TypeError(
                f"{type(conv).__name__} has its own forward: pass cls, a subclass of "
                f"{base.__name__} and {type(conv).__name__}"
            )
        cls = base
    if not (issubclass(cls, base) and issubclass(cls, type(conv))):
        raise TypeError(f"{cls.__name__} must derive from {base.__name__} and {type(conv).__name__}")
    conv.__class__ = cls
    return conv
