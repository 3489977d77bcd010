"""Population-statistics layers: which layers normalize at inference with statistics estimated from
training batches, and how such statistics are written into them (the project's protocol).

Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021), §3; methods.md §3. PreciseBN
(:mod:`~d2_bnstats.layers.population`), FrozenBN late in training (:mod:`~d2_bnstats.layers.frozen_bn`)
and batch statistics at test (:mod:`~d2_bnstats.layers.test_batch_stats`) act on these layers.

A module that implements ``set_population_statistics(mean, var, count)`` receives the mean and BIASED
variance of its input over a set of N = ``count`` values (a 0-dim float64 tensor); any other torch
BatchNorm (``nn.BatchNorm{1,2,3}d``, ``nn.SyncBatchNorm`` and their subclasses: detectron2's
BatchNorm2d/NaiveSyncBatchNorm, EvalNorm, GhostBN, ...) with running statistics gets ``running_mean =
μ`` and, following torch's convention that ``running_var`` is an unbiased estimate, ``running_var =
σ²·N/(N−1)`` (Bessel's correction, :func:`~d2_bnstats.layers.moments.bessel_correction`). Layers
without running statistics (``track_running_stats=False``), FrozenBatchNorm2d and GroupNorm are not
population-statistics layers. A layer frozen by :func:`~d2_bnstats.layers.frozen_bn.freeze_batch_statistics`
carries a marker attribute (:func:`is_frozen`) so that PreciseBN leaves it alone.
"""
from typing import List, Optional, Tuple

import torch
from torch import nn

from .moments import bessel_correction

PROTOCOL_METHOD = "set_population_statistics"
FROZEN_ATTR = "_d2_bnstats_frozen_bn"  # set by frozen_bn.freeze_batch_statistics: the hook handles
BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def implements_protocol(module: nn.Module) -> bool:
    return callable(getattr(module, PROTOCOL_METHOD, None))


def is_population_layer(module: nn.Module) -> bool:
    """True for a layer whose inference uses statistics estimated from training batches."""
    if implements_protocol(module):
        return True
    return (
        isinstance(module, BATCH_NORM_TYPES)
        and getattr(module, "running_mean", None) is not None
        and getattr(module, "running_var", None) is not None
    )


def is_frozen(module: nn.Module) -> bool:
    """True for a layer frozen by :func:`~d2_bnstats.layers.frozen_bn.freeze_batch_statistics`."""
    return getattr(module, FROZEN_ATTR, None) is not None


def population_layers(model: nn.Module, include_frozen: bool = False) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every population-statistics layer of ``model``, in ``named_modules`` order.

    A layer reachable under several names is listed once; frozen layers only with ``include_frozen``.
    """
    seen, layers = set(), []
    for name, module in model.named_modules():
        if id(module) in seen or not is_population_layer(module):
            continue
        if is_frozen(module) and not include_frozen:
            continue
        seen.add(id(module))
        layers.append((name, module))
    return layers


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside (Distributed)DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def layer_input(inputs) -> Optional[torch.Tensor]:
    """The input tensor of a forward (pre-)hook's ``inputs``, or None."""
    x = inputs[0] if isinstance(inputs, tuple) and inputs else inputs
    return x if isinstance(x, torch.Tensor) else None


@torch.no_grad()
def set_population_statistics(layer: nn.Module, mean: torch.Tensor, var: torch.Tensor, count) -> None:
    """Give ``layer`` population statistics (mean and BIASED variance of N = ``count`` values) through
    the protocol: its own ``set_population_statistics`` if it has one, else torch's BN buffers
    (``running_var`` holds the unbiased value σ²·N/(N−1))."""
    count = torch.as_tensor(count, dtype=torch.float64)
    if implements_protocol(layer):
        getattr(layer, PROTOCOL_METHOD)(mean, var, count)
        return
    if not is_population_layer(layer):
        raise TypeError(
            f"{type(layer).__name__} has no population statistics: expected a BatchNorm with running "
            f"statistics or a module implementing {PROTOCOL_METHOD}(mean, var, count)"
        )
    layer.running_mean.copy_(mean.to(layer.running_mean))
    layer.running_var.copy_((var * bessel_correction(float(count))).to(layer.running_var))
