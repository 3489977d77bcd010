"""EvalNorm's auxiliary loss in a model's loss dict: the hook that makes a training loop learn
alpha_hat, beta_hat.

Every :class:`~d2_bnstats.layers.evalnorm.EvalNorm2d` computes its L_aux (eq. 9 of the EvalNorm
paper) in each training forward and keeps it in ``aux_loss``; :func:`attach_aux_loss_hook` adds
``weight`` x the sum over layers to the dict of losses the model returns, so any loop that
back-propagates the sum of that dict (detectron2's) trains alpha_hat, beta_hat with the rest of the
network. The network's own gradients are unchanged: L_aux reaches alpha_hat, beta_hat only.

This module imports torch only.
"""
import warnings
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .evalnorm import EvalNorm2d, evalnorm_layers

# The key of the auxiliary loss in the model's loss dict.
EVALNORM_LOSS_KEY = "loss_evalnorm"


class AuxLossHook:
    """Adds the EvalNorm auxiliary loss to a model's training loss dict.

    A forward pre-hook on the model clears every layer's ``aux_loss`` and starts collection (a
    layer called several times in one forward adds up its losses); the forward hook, when the
    model is in training mode with grad enabled and returns a dict, adds
    ``output[key] = weight * sum over layers of L_aux``. Each layer's alpha_hat, beta_hat only
    get gradient from their own term, so their effective step is lr * weight whatever the number
    of layers. ``callback(layers)``, if given, runs after every training forward (used to log
    alpha_hat, beta_hat).
    """

    def __init__(
        self,
        model: nn.Module,
        weight: float = 1.0,
        key: str = EVALNORM_LOSS_KEY,
        callback: Optional[Callable[[List[Tuple[str, EvalNorm2d]]], None]] = None,
    ):
        self.layers = evalnorm_layers(model)
        self.weight = float(weight)
        self.key = key
        self.callback = callback
        self._warned = False
        self.handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _pre(self, module, inputs):
        # Collected again every forward: later passes (per-level copies, conversions) may have
        # replaced or added layers since the hook was attached; a walk over modules is cheap.
        self.layers = evalnorm_layers(module)
        for _, layer in self.layers:
            layer.aux_loss = None
            layer._aux_collecting = True

    def _post(self, module, inputs, output):
        losses = []
        for _, layer in self.layers:
            layer._aux_collecting = False
            if layer.aux_loss is not None:
                losses.append(layer.aux_loss)
        if not (module.training and torch.is_grad_enabled()):
            return None
        if losses:
            if isinstance(output, dict):
                output[self.key] = torch.stack([l.reshape(()) for l in losses]).sum() * self.weight
            elif not self._warned:
                warnings.warn(
                    f"EvalNorm: the model returned {type(output).__name__}, not a dict of losses, so "
                    f"{self.key!r} was not added; alpha_hat/beta_hat are not learned",
                    stacklevel=2,
                )
                self._warned = True
        if self.callback is not None:
            self.callback(self.layers)
        return None


def attach_aux_loss_hook(model: nn.Module, weight: float = 1.0, key: str = EVALNORM_LOSS_KEY, callback=None) -> Optional[AuxLossHook]:
    """Attach :class:`AuxLossHook` to ``model`` once (None if it has no EvalNorm layer that learns)."""
    existing = getattr(model, "_evalnorm_aux_hook", None)
    if existing is not None:
        existing.remove()
    layers = evalnorm_layers(model)
    if not any(layer.learn for _, layer in layers):
        return None
    hook = AuxLossHook(model, weight=weight, key=key, callback=callback)
    object.__setattr__(model, "_evalnorm_aux_hook", hook)
    return hook
