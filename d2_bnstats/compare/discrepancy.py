"""Train–test discrepancy per layer (EvalNorm paper, Singh & Shrivastava, ICCV 2019, Figure 1).

On the same images, the model runs once in training mode (``SOLVER.IMS_PER_BATCH`` / processes
images per batch, as in training) and the input of every population-statistics layer is captured,
every call. For each layer, the captured input is normalized (affine removed: γ = 1, b = 0) the way
training does (batch statistics, x̂_train) and the way each strategy does at evaluation (x̂_eval);
the report gives mean |x̂_train − x̂_eval| (the L1 of EvalNorm's L_aux, eq. 9) and the RMS difference
per layer and strategy, and the values behind histograms of x̂ for chosen layers (one channel each:
the channel with the median discrepancy under the first strategy, a representative one). The layer
input is the same for train and eval, so each number is that layer's own inconsistency, not drift
accumulated upstream. For batch statistics at test with k images, each captured call is cut into
groups of k images (k ≤ the training batch; for RoI heads, groups of the same share of RoIs).
"""
import copy
import math
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data import transforms as T
from detectron2.data.common import DatasetFromList, MapDataset
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from torch import nn

from .. import population_layers
from ..layers.population import preserved_state
from ..layers.population_protocol import unwrap
from .strategies import CompareContext, Strategy

TRAIN_LABEL = "train (batch statistics)"


def _discrepancy_loader(cfg, dataset_name, num_images, images_per_batch):
    """The first ``num_images`` images of a test set with their annotations (training-mode forwards
    need them), test-time resizing, no random augmentation, ``images_per_batch`` per batch."""
    dicts = DatasetCatalog.get(dataset_name)[:num_images]
    augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
    mapper = DatasetMapper(cfg, is_train=True, augmentations=augs)
    dataset = MapDataset(DatasetFromList(dicts, copy=False), mapper)
    batch = []
    for i in range(len(dataset)):
        batch.append(dataset[i])
        if len(batch) == images_per_batch:
            yield batch
            batch = []


def _normalizer_copy(layer: nn.Module, training: bool) -> nn.Module:
    """A copy of ``layer`` whose affine is the identity, so its output is the normalized input."""
    copied = copy.deepcopy(layer)
    with torch.no_grad():
        weight, bias = getattr(copied, "weight", None), getattr(copied, "bias", None)
        if isinstance(weight, torch.Tensor):
            weight.fill_(1.0)
        if isinstance(bias, torch.Tensor):
            bias.zero_()
    copied.train(training)
    return copied


def capture_layer_inputs(model, batches, layer_names: Sequence[str]) -> Dict[str, List[torch.Tensor]]:
    """Training-mode forwards of ``model`` (no gradient, state left as it was) on ``batches``; every
    call's input of every named layer. The dict is ordered by first call (layers never called last)."""
    inner = unwrap(model)
    captured = {name: [] for name in layer_names}
    order = []
    handles = []

    def hook_for(name):
        def hook(module, inputs):
            if not captured[name]:
                order.append(name)
            captured[name].append(inputs[0].detach().clone())

        return hook

    with preserved_state(inner), torch.no_grad(), EventStorage():
        inner.train()
        for name in layer_names:
            handles.append(inner.get_submodule(name).register_forward_pre_hook(hook_for(name)))
        try:
            for batch in batches:
                inner(batch)
        finally:
            for h in handles:
                h.remove()
    return {name: captured[name] for name in order + [n for n in layer_names if n not in order]}


def _stats_of_differences(a: torch.Tensor, b: torch.Tensor):
    d = (a.double() - b.double())
    return d.abs().sum().item(), (d * d).sum().item(), d.numel()


def _channel_values(x: torch.Tensor, channel: int) -> torch.Tensor:
    return x.select(1, channel).reshape(-1) if x.dim() >= 2 else x.reshape(-1)


def default_hist_layers(layers: Sequence[str]) -> List[str]:
    """First, middle and last layer."""
    if len(layers) <= 3:
        return list(layers)
    return [layers[0], layers[len(layers) // 2], layers[-1]]


def representative_channel(train_out, per_strategy) -> int:
    """The channel whose discrepancy under the first strategy is the median one."""
    if not per_strategy or train_out[0].dim() < 2:
        return 0
    outs = next(iter(per_strategy.values()))
    channels = train_out[0].shape[1]
    totals = torch.zeros(channels, dtype=torch.float64)
    for a, b in zip(train_out, outs):
        dims = [d for d in range(a.dim()) if d != 1]
        totals += (a.double() - b.double()).abs().sum(dims)
    order = torch.argsort(totals)
    return int(order[channels // 2])


def _eval_outputs(strategy: Strategy, eval_layer: nn.Module, calls, images_per_batch) -> Optional[List[torch.Tensor]]:
    """x̂_eval of every captured call under ``strategy``; None if it cannot be emulated."""
    outs = []
    for x in calls:
        groups = strategy.discrepancy_groups(x, images_per_batch)
        if groups is None:
            return None
        with strategy.inference(eval_layer):
            outs.append(torch.cat([eval_layer(g) for g in groups]))
    return outs


def _l1_and_rms(train_out, outs):
    l1 = sq = n = 0
    for a, b in zip(train_out, outs):
        s1, s2, k = _stats_of_differences(a, b)
        l1, sq, n = l1 + s1, sq + s2, n + k
    return l1 / n, math.sqrt(sq / n)


def _layer_row(name, calls, base, strategies, prepared, images_per_batch):
    """One layer's row of the report, x̂_train per call, and x̂_eval per call for each strategy."""
    row = {"name": name, "calls": len(calls), "values": int(sum(x.numel() for x in calls)), "l1": {}, "rms": {}}
    if not calls:
        row["note"] = "no data reached this layer"
        return row, None, {}
    per_strategy = {}
    with torch.no_grad():
        train_layer = _normalizer_copy(base.get_submodule(name), training=True)
        with EventStorage():
            train_out = [train_layer(x) for x in calls]
        for strategy in strategies:
            model = prepared.get(strategy.name)
            if model is None:
                continue
            eval_layer = _normalizer_copy(unwrap(model).get_submodule(name), training=False)
            outs = _eval_outputs(strategy, eval_layer, calls, images_per_batch)
            if outs is None:
                row["l1"][strategy.name] = row["rms"][strategy.name] = None
                continue
            row["l1"][strategy.name], row["rms"][strategy.name] = _l1_and_rms(train_out, outs)
            per_strategy[strategy.name] = outs
    return row, train_out, per_strategy


def _histogram_values(row: dict, train_out, per_strategy) -> Dict[str, torch.Tensor]:
    """The representative channel's x̂ values, training first; records the channel in ``row``."""
    channel = representative_channel(train_out, per_strategy)
    row["hist_channel"] = channel
    values = {TRAIN_LABEL: torch.cat([_channel_values(t, channel) for t in train_out])}
    for sname, outs in per_strategy.items():
        values[sname] = torch.cat([_channel_values(t, channel) for t in outs])
    return values


def discrepancy_report(ctx: CompareContext, strategies: Sequence[Strategy], prepared: Dict[str, nn.Module],
                       num_images: int, hist_layers: Sequence[str] = ()) -> dict:
    """See the module docstring. ``prepared`` maps strategy name -> model in that strategy's state.
    The histogram values are under ``"_hist_values"`` ({layer: {label: values}}), not JSON data."""
    cfg = ctx.cfg
    images_per_batch = max(1, cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())
    layers = [name for name, _ in population_layers(unwrap(ctx.model), include_frozen=True)]
    if not layers:
        return {"note": "the model has no population-statistics layers", "layers": []}
    dataset_name = cfg.DATASETS.TEST[0]
    batches = list(_discrepancy_loader(cfg, dataset_name, num_images, images_per_batch))
    if not batches:
        return {"note": f"fewer than {images_per_batch} images in {dataset_name}", "layers": []}
    captured = capture_layer_inputs(ctx.model, batches, layers)
    base = unwrap(ctx.model)
    rows = []
    hist_values: Dict[str, Dict[str, torch.Tensor]] = {}
    chosen_hist = list(hist_layers) or default_hist_layers(list(captured))  # in the order of the forward pass
    for name, inputs in captured.items():
        calls = [x for x in inputs if x.numel() > 0]
        row, train_out, per_strategy = _layer_row(name, calls, base, strategies, prepared, images_per_batch)
        if calls and name in chosen_hist:
            hist_values[name] = _histogram_values(row, train_out, per_strategy)
        rows.append(row)
    return {
        "dataset": dataset_name,
        "images": len(batches) * images_per_batch,
        "train_batch_images": images_per_batch,
        "layers": rows,
        "_hist_values": hist_values,
    }
