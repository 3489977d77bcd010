"""Batch statistics at test: evaluation-mode layers normalize with the statistics of the test batch.

Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021), §3 (evaluating with mini-batch statistics);
methods.md §3. Inside :func:`batch_statistics`, each call of a population-statistics layer
(:mod:`d2_bnstats.layers.population_protocol`) in evaluation mode normalizes with the mean and biased
variance of its own input over all dimensions but the channel, per process, exactly as in training;
its state is restored after the call, so the population statistics are not touched.

How: a forward pre-hook saves the layer's buffers and writes the batch moments into it (through the
protocol's ``set_population_statistics``, or for torch's BN into ``running_mean``/``running_var``
directly: eval-mode BN divides by sqrt(running_var + ε), so the *biased* variance goes there, as in
training); a forward hook restores the buffers.
"""
import contextlib
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .moments import shifted_moments
from .population_protocol import PROTOCOL_METHOD, implements_protocol, layer_input, population_layers, unwrap

_SAVED_ATTR = "_d2_bnstats_batch_stats_saved"


def _save_buffers(module: nn.Module):
    return [(name, buf, buf.detach().clone()) for name, buf in module._buffers.items() if buf is not None]


def _restore_buffers(module: nn.Module) -> None:
    saved = getattr(module, _SAVED_ATTR, None)
    if saved is None:
        return
    with torch.no_grad():
        for name, buf, value in saved:
            buf.copy_(value)
            module._buffers[name] = buf
    delattr(module, _SAVED_ATTR)


def _batch_stats_pre_hook(module, inputs):
    if module.training:
        return  # training mode already normalizes with batch statistics
    x = layer_input(inputs)
    if x is None or x.numel() == 0:
        return
    _restore_buffers(module)  # a previous call that raised left its state behind
    shift = getattr(module, "running_mean", None)  # near the batch mean, so no cancellation
    if isinstance(shift, torch.Tensor):
        shift = torch.nan_to_num(shift, nan=0.0, posinf=0.0, neginf=0.0)
    n, mean, var = shifted_moments(x, shift if isinstance(shift, torch.Tensor) else None)
    setattr(module, _SAVED_ATTR, _save_buffers(module))
    with torch.no_grad():
        if implements_protocol(module):
            getattr(module, PROTOCOL_METHOD)(mean.float(), var.float(), torch.tensor(float(n), dtype=torch.float64))
        else:
            module.running_mean.copy_(mean.to(module.running_mean))
            module.running_var.copy_(var.to(module.running_var))


def _batch_stats_post_hook(module, inputs, output):
    _restore_buffers(module)


@contextlib.contextmanager
def batch_statistics(model: nn.Module, layers: Optional[Sequence[Tuple[str, nn.Module]]] = None):
    """Inside the block, population-statistics layers in evaluation mode normalize every call with
    the statistics of that call's input (the test batch): mean and biased variance over all
    dimensions but the channel, per process. Their state is restored after every call. Frozen
    layers are included (at test every layer is in evaluation mode anyway). Yields the layer names."""
    inner = unwrap(model)
    if layers is None:
        layers = population_layers(inner, include_frozen=True)
    handles = []
    try:
        for _, module in layers:
            handles.append(module.register_forward_pre_hook(_batch_stats_pre_hook))
            handles.append(module.register_forward_hook(_batch_stats_post_hook))
        yield [name for name, _ in layers]
    finally:
        for h in handles:
            h.remove()
        for _, module in layers:
            _restore_buffers(module)
