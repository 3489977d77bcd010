"""FrozenBN late in training: population-statistics layers stop using batch statistics.

Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021), §3 ("FrozenBN" for the last part of training);
methods.md §3. A frozen layer normalizes with its population statistics even when the model is in
training mode: its forward runs with ``training = False`` (set by a forward pre-hook, restored by a
forward hook), which also stops the EMA update, while its affine parameters keep their gradients. It
survives ``model.train()``/``model.eval()``; PreciseBN leaves frozen layers alone (their statistics
are those the rest of the network was trained with). Which layers qualify:
:mod:`d2_bnstats.layers.population_protocol`.
"""
from typing import List, Optional, Sequence, Tuple

from torch import nn

from .population_protocol import FROZEN_ATTR, is_frozen, population_layers, unwrap

_RESTORE_ATTR = "_d2_bnstats_frozen_restore_training"


def _frozen_pre_hook(module, inputs):
    if module.training:
        module.training = False
        setattr(module, _RESTORE_ATTR, True)


def _frozen_post_hook(module, inputs, output):
    if getattr(module, _RESTORE_ATTR, False):
        module.training = True
        delattr(module, _RESTORE_ATTR)


def freeze_batch_statistics(model: nn.Module, layers: Optional[Sequence[Tuple[str, nn.Module]]] = None) -> List[str]:
    """From now on, ``layers`` (default: every population-statistics layer) normalize with their
    population statistics also in training mode; returns the names newly frozen. Affine parameters
    keep training. Idempotent; :func:`unfreeze_batch_statistics` undoes it."""
    inner = unwrap(model)
    if layers is None:
        layers = population_layers(inner, include_frozen=True)
    names = []
    for name, module in layers:
        if is_frozen(module):
            continue
        handles = (
            module.register_forward_pre_hook(_frozen_pre_hook),
            module.register_forward_hook(_frozen_post_hook),
        )
        setattr(module, FROZEN_ATTR, handles)
        names.append(name)
    return names


def unfreeze_batch_statistics(model: nn.Module) -> List[str]:
    """Undo :func:`freeze_batch_statistics` on every frozen layer of ``model``; returns their names."""
    names = []
    for name, module in unwrap(model).named_modules():
        handles = getattr(module, FROZEN_ATTR, None)
        if handles is None:
            continue
        for h in handles:
            h.remove()
        delattr(module, FROZEN_ATTR)
        if getattr(module, _RESTORE_ATTR, False):
            module.training = True
            delattr(module, _RESTORE_ATTR)
        names.append(name)
    return names


def frozen_layers(model: nn.Module) -> List[str]:
    return [name for name, m in unwrap(model).named_modules() if is_frozen(m)]
