"""Side-by-side comparison of inference-statistics strategies for one trained checkpoint.

For every strategy (EMA, PreciseBN over N images, batch statistics at test with k images per test
batch, EvalNorm learned / 1/B² / 1/B / offline, and any strategy registered with
:func:`register_strategy`) the checkpoint is COCO-evaluated from a fresh copy of the loaded model;
one table (bbox AP, AP50, AP75, APs, APm, APl; segm too with masks), a JSON file and a bar plot are
written. A strategy that cannot run on this model or build says why instead of a row of numbers.

**Train–test discrepancy** (EvalNorm paper, Figure 1): on the same images, the model runs once in
training mode (``SOLVER.IMS_PER_BATCH`` / processes images per batch, as in training) and the input
of every population-statistics layer is captured, every call. For each layer, the captured input is
normalised (affine removed: γ = 1, b = 0) the way training does (batch statistics, x̂_train) and the
way each strategy does at evaluation (x̂_eval); the report gives mean |x̂_train − x̂_eval| (the L1 of
EvalNorm's L_aux) and the RMS difference per layer and strategy, and histograms of x̂ for chosen
layers (one channel each: the channel with the median EMA discrepancy, a representative one). The
layer input is the same for train and eval, so each number is that layer's own inconsistency, not
drift accumulated upstream. For batch statistics at test with k images, each captured call is cut
into groups of k images (k ≤ the training batch; for RoI heads, groups of the same share of RoIs).

Used by ``tools/compare_bn_stats.py``; everything is importable (:func:`compare`).
"""
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import re
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_test_loader
from detectron2.data import transforms as T
from detectron2.data.common import DatasetFromList, MapDataset
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from torch import nn

from ..layers.evalnorm import evalnorm_layers, set_evalnorm_mode
from ..layers.population import batch_statistics, population_layers, preserved_state, unwrap
from .evalnorm_offline import convert_to_evalnorm, estimate_evalnorm
from .evaluation import build_coco_evaluator, coco_tasks
from .population import PreciseBNRunner, batched_loader, default_precise_bn_loader_factory

logger = logging.getLogger("d2_bnstats.compare")

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# --------------------------------------------------------------------------------------------------
# strategies


@dataclasses.dataclass
class CompareContext:
    """What strategies see: the config, the loaded model (never modified; strategies get copies),
    the trainer class (data loaders), and the tool's options."""

    cfg: object
    model: nn.Module
    trainer_cls: type
    options: Dict[str, object] = dataclasses.field(default_factory=dict)


class Strategy:
    """An inference-statistics strategy. Subclasses set ``name`` and override what they need:
    ``unavailable`` (None, or why the strategy cannot run here), ``prepare`` (put a fresh copy of
    the model into the strategy's state), ``inference`` (a context around evaluation forwards),
    ``test_batch_size`` (images per test batch and process)."""

    name = "?"
    description = ""
    test_batch_size = 1

    def unavailable(self, ctx: CompareContext) -> Optional[str]:
        return None

    def prepare(self, ctx: CompareContext, model: nn.Module) -> dict:
        """Returns extra facts for the JSON (e.g. PreciseBN's image count)."""
        set_evalnorm_ema_if_present(model)
        return {}

    def inference(self, model: nn.Module):
        return contextlib.nullcontext()

    def discrepancy_groups(self, x: torch.Tensor, images: int) -> Optional[List[torch.Tensor]]:
        """How one captured layer input (a training batch of ``images`` images) is cut into the
        inputs this strategy normalises together at evaluation; None if it cannot be emulated."""
        return [x]


class EMAStrategy(Strategy):
    name = "EMA"
    description = "running statistics of the checkpoint (torch's exponential moving average)"


class PreciseBNStrategy(Strategy):
    description = "population statistics recomputed over N training images (PreciseBN, all processes)"

    def __init__(self, num_images: int):
        if num_images < 1:
            raise ValueError(f"PreciseBN needs N >= 1 images, got {num_images}")
        self.num_images = num_images
        self.name = f"PreciseBN({num_images})"

    def prepare(self, ctx, model):
        super().prepare(ctx, model)
        cfg = ctx.cfg
        batches = max(1, math.ceil(self.num_images / cfg.SOLVER.IMS_PER_BATCH))
        runner = PreciseBNRunner(cfg, model, default_precise_bn_loader_factory(cfg, ctx.trainer_cls), batches)
        report = runner.run(f"PreciseBN({self.num_images})")
        if report is None:
            return {"images": 0, "layers_updated": 0}
        return {
            "images": batches * cfg.SOLVER.IMS_PER_BATCH,
            "layers_updated": len(report.updated),
            "layers_without_data": report.skipped,
            "seconds": round(report.seconds, 2),
        }


class BatchStatsStrategy(Strategy):
    description = "statistics of the test batch itself (k images per test batch and process)"

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"batch statistics at test need k >= 1 images per test batch, got {k}")
        self.test_batch_size = k
        self.name = f"batch stats (k={k})"

    def inference(self, model):
        return batch_statistics(model)

    def discrepancy_groups(self, x, images):
        k = self.test_batch_size
        if k == images:
            return [x]
        if k > images or x.shape[0] % images:
            return None
        per_image = x.shape[0] // images
        return list(x.split(per_image * k))


EVALNORM_MODES = {
    "evalnorm_learned": ("EvalNorm learned", "learned", "α̂, β̂ learned during training (L_aux)"),
    "evalnorm_rule": ("EvalNorm 1/B²", "rule", "α = β = 1/B², the paper's rule of thumb"),
    "evalnorm_exact": ("EvalNorm 1/B", "exact", "α = β = 1/B, exact algebra of the batch"),
}


def model_has_evalnorm(model: nn.Module) -> bool:
    return bool(evalnorm_layers(unwrap(model)))


def set_evalnorm_ema_if_present(model: nn.Module) -> None:
    """Non-EvalNorm strategies evaluate EvalNorm layers as plain BN (mode "ema")."""
    set_evalnorm_mode(unwrap(model), "ema")


def estimate_evalnorm_offline(cfg, model: nn.Module, num_images: int) -> List[str]:
    """Convert ``model``'s BN layers to EvalNorm (if it has none yet) and estimate α̂, β̂ on
    ``num_images`` training images with everything else frozen (:mod:`.evalnorm_offline`); in place.
    Returns the names of the converted layers."""
    from detectron2.data import build_detection_train_loader

    converted = [] if model_has_evalnorm(model) else convert_to_evalnorm(model)
    iterations = max(1, math.ceil(num_images / cfg.SOLVER.IMS_PER_BATCH))
    with EventStorage(0):  # detectron2's heads log to the storage in training mode
        estimate_evalnorm(model, build_detection_train_loader(cfg), iterations)
    return converted


class EvalNormStrategy(Strategy):
    def __init__(self, key: str):
        self.key = key
        self.name, self.mode, self.description = EVALNORM_MODES[key]

    def unavailable(self, ctx):
        if not model_has_evalnorm(ctx.model):
            return "the model has no EvalNorm layers (no MODEL.*.NORM is EvalNorm)"
        return None

    def prepare(self, ctx, model):
        set_evalnorm_mode(unwrap(model), self.mode)
        return {"mode": self.mode}

    def discrepancy_groups(self, x, images):
        return [x]


class EvalNormOfflineStrategy(EvalNormStrategy):
    """α̂, β̂ estimated after training; a model trained with BN is converted to EvalNorm first."""

    def __init__(self, num_images: int):
        self.key = "evalnorm_offline"
        self.num_images = num_images
        self.name = "EvalNorm offline"
        self.mode = "learned"
        self.description = f"α̂, β̂ estimated offline on {num_images} training images, everything else frozen"

    def unavailable(self, ctx):
        if model_has_evalnorm(ctx.model):
            return None
        if not any(isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and m.track_running_stats
                   for m in unwrap(ctx.model).modules()):
            return "the model has neither EvalNorm layers nor trainable BN layers to convert"
        return None

    def prepare(self, ctx, model):
        converted = estimate_evalnorm_offline(ctx.cfg, unwrap(model), self.num_images)
        set_evalnorm_mode(unwrap(model), "learned")
        return {"mode": "learned", "images": self.num_images, "converted_layers": len(converted)}


StrategyFactory = Callable[[Optional[str], Dict[str, object]], Strategy]
_STRATEGIES: Dict[str, StrategyFactory] = {}


def register_strategy(kind: str, factory: StrategyFactory, *, force: bool = False) -> StrategyFactory:
    """Register ``factory(argument, options) -> Strategy`` under ``kind``; a spec ``"kind:argument"``
    (e.g. ``"precise_bn:1000"``, ``"batch_stats:4"``) passes the text after the colon, or None."""
    if kind in _STRATEGIES and not force:
        raise ValueError(f"strategy {kind!r} is already registered; pass force=True to replace it")
    _STRATEGIES[kind] = factory
    return factory


def registered_strategies() -> List[str]:
    return list(_STRATEGIES)


def _int_argument(kind, argument, default):
    if argument is None:
        return int(default)
    try:
        return int(argument)
    except ValueError:
        raise ValueError(f"strategy {kind!r} takes an integer after the colon, got {argument!r}") from None


register_strategy("ema", lambda arg, opts: EMAStrategy())
register_strategy(
    "precise_bn", lambda arg, opts: PreciseBNStrategy(_int_argument("precise_bn", arg, opts["precise_bn_samples"]))
)
register_strategy(
    "batch_stats", lambda arg, opts: BatchStatsStrategy(_int_argument("batch_stats", arg, opts["test_batch_size"]))
)
for _key in EVALNORM_MODES:
    register_strategy(_key, lambda arg, opts, key=_key: EvalNormStrategy(key))
register_strategy(
    "evalnorm_offline",
    lambda arg, opts: EvalNormOfflineStrategy(_int_argument("evalnorm_offline", arg, opts["precise_bn_samples"])),
)


def build_strategy(spec: str, options: Dict[str, object]) -> Strategy:
    kind, _, argument = spec.partition(":")
    if kind not in _STRATEGIES:
        raise ValueError(f"unknown strategy {spec!r}; available: {', '.join(registered_strategies())} "
                         "(with an argument: precise_bn:N, batch_stats:K)")
    return _STRATEGIES[kind](argument or None, options)


def default_strategy_specs(options: Dict[str, object]) -> List[str]:
    """Every registered strategy once; batch statistics once per requested k."""
    specs = []
    for kind in registered_strategies():
        if kind == "batch_stats":
            specs += [f"batch_stats:{k}" for k in options["batch_sizes"]]
        else:
            specs.append(kind)
    return specs


# --------------------------------------------------------------------------------------------------
# evaluation


class _SubsetEvaluator(DatasetEvaluator):
    """Evaluate only the images that were run (COCOEvaluator scores the whole json otherwise)."""

    def __init__(self, inner, img_ids):
        self.inner, self.img_ids = inner, img_ids

    def reset(self):
        self.inner.reset()

    def process(self, inputs, outputs):
        self.inner.process(inputs, outputs)

    def evaluate(self):
        return self.inner.evaluate(img_ids=self.img_ids)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def evaluate_model(cfg, model, output_dir, *, test_batch_size=1, max_images=0, trainer_cls=None, inference=None):
    """COCO results per test data set: {dataset: {task: {metric: value}}}."""
    results = {}
    for dataset_name in cfg.DATASETS.TEST:
        base = trainer_cls.build_test_loader(cfg, dataset_name) if trainer_cls else build_detection_test_loader(cfg, dataset_name)
        loader = batched_loader(base, test_batch_size, max_images)
        evaluator = build_coco_evaluator(cfg, dataset_name, os.path.join(output_dir, dataset_name))
        if max_images:
            ids = [d["image_id"] for d in DatasetCatalog.get(dataset_name)[:max_images]]
            evaluator = _SubsetEvaluator(evaluator, ids)
        with (inference or contextlib.nullcontext()):
            res = inference_on_dataset(model, loader, evaluator)
        results[dataset_name] = {task: dict(res.get(task, {})) for task in coco_tasks(cfg)} if res else {}
    return results


# --------------------------------------------------------------------------------------------------
# train–test discrepancy


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


def _normaliser_copy(layer: nn.Module, training: bool) -> nn.Module:
    """A copy of ``layer`` whose affine is the identity, so its output is the normalised input."""
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


def discrepancy_report(ctx: CompareContext, strategies: Sequence[Strategy], prepared: Dict[str, nn.Module],
                       num_images: int, hist_layers: Sequence[str] = ()) -> dict:
    """See the module docstring. ``prepared`` maps strategy name -> model in that strategy's state."""
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
    layers = list(captured)  # in the order of the forward pass
    base = unwrap(ctx.model)
    rows = []
    hist_values: Dict[str, Dict[str, torch.Tensor]] = {}
    chosen_hist = list(hist_layers) or _default_hist_layers(layers)
    for name in layers:
        calls = [x for x in captured[name] if x.numel() > 0]
        row = {"name": name, "calls": len(calls), "values": int(sum(x.numel() for x in calls)), "l1": {}, "rms": {}}
        if not calls:
            row["note"] = "no data reached this layer"
            rows.append(row)
            continue
        with torch.no_grad():
            train_layer = _normaliser_copy(base.get_submodule(name), training=True)
            with EventStorage():
                train_out = [train_layer(x) for x in calls]
            per_strategy = {}
            for strategy in strategies:
                model = prepared.get(strategy.name)
                if model is None:
                    continue
                eval_layer = _normaliser_copy(unwrap(model).get_submodule(name), training=False)
                outs = []
                for x in calls:
                    groups = strategy.discrepancy_groups(x, images_per_batch)
                    if groups is None:
                        outs = None
                        break
                    with strategy.inference(eval_layer):
                        outs.append(torch.cat([eval_layer(g) for g in groups]))
                if outs is None:
                    row["l1"][strategy.name] = None
                    row["rms"][strategy.name] = None
                    continue
                l1 = sq = n = 0
                for a, b in zip(train_out, outs):
                    s1, s2, k = _stats_of_differences(a, b)
                    l1, sq, n = l1 + s1, sq + s2, n + k
                row["l1"][strategy.name] = l1 / n
                row["rms"][strategy.name] = math.sqrt(sq / n)
                per_strategy[strategy.name] = outs
        if name in chosen_hist:
            channel = _representative_channel(train_out, per_strategy)
            row["hist_channel"] = channel
            values = {"train (batch statistics)": torch.cat([_channel_values(t, channel) for t in train_out])}
            for sname, outs in per_strategy.items():
                values[sname] = torch.cat([_channel_values(t, channel) for t in outs])
            hist_values[name] = values
        rows.append(row)
    return {
        "dataset": dataset_name,
        "images": len(batches) * images_per_batch,
        "train_batch_images": images_per_batch,
        "layers": rows,
        "_hist_values": hist_values,
    }


def _default_hist_layers(layers: Sequence[str]) -> List[str]:
    if len(layers) <= 3:
        return list(layers)
    return [layers[0], layers[len(layers) // 2], layers[-1]]


def _representative_channel(train_out, per_strategy) -> int:
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


# --------------------------------------------------------------------------------------------------
# output: table, JSON, plots


def format_table(summary: dict) -> str:
    from tabulate import tabulate

    tables = []
    for dataset in summary["datasets"]:
        tasks = summary["tasks"]
        headers = ["strategy", "k"] + [f"{t} {m}" for t in tasks for m in METRICS] + ["note"]
        rows = []
        for s in summary["strategies"]:
            res = (s.get("results") or {}).get(dataset, {})
            values = []
            for t in tasks:
                for m in METRICS:
                    v = res.get(t, {}).get(m)
                    values.append("" if v is None else f"{v:.2f}")
            note = "" if s["available"] else f"unavailable: {s['reason']}"
            rows.append([s["name"], s["test_batch_size"] if s["available"] else ""] + values + [note])
        tables.append(f"COCO results on {dataset}" + (f" (first {summary['max_images']} images)" if summary["max_images"] else "")
                      + "\n" + tabulate(rows, headers=headers, tablefmt="github"))
    return "\n\n".join(tables)


def format_discrepancy(report: dict) -> str:
    from tabulate import tabulate

    rows = report.get("layers") or []
    if not rows:
        return f"train–test discrepancy: {report.get('note', 'no layers')}"
    names = []
    for r in rows:
        for k in r["l1"]:
            if k not in names:
                names.append(k)
    table = [[r["name"]] + ["n/a" if r["l1"].get(n) is None else f"{r['l1'][n]:.4f}" for n in names] for r in rows]
    means = []
    for n in names:
        vals = [r["l1"][n] for r in rows if r["l1"].get(n) is not None]
        means.append(f"{sum(vals) / len(vals):.4f}" if vals else "n/a")
    table.append(["(mean over layers)"] + means)
    return (f"train–test discrepancy: mean |x̂_train − x̂_eval| per layer, same inputs "
            f"({report['images']} images of {report['dataset']}, {report['train_batch_images']} per training batch)\n"
            + tabulate(table, headers=["layer"] + names, tablefmt="github"))


def _plot_ap(summary: dict, path: str) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in summary["strategies"] if s["available"] and s.get("results")]
    if not rows:
        return None
    dataset = summary["datasets"][0]
    tasks = summary["tasks"]
    metrics = ("AP", "AP50", "AP75")
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(6.0, 1.3 * len(rows) + 2) * len(tasks), 4.5), squeeze=False)
    width = 0.8 / len(metrics)
    for ax, task in zip(axes[0], tasks):
        xs = range(len(rows))
        for j, metric in enumerate(metrics):
            vals = [r["results"].get(dataset, {}).get(task, {}).get(metric, float("nan")) for r in rows]
            bars = ax.bar([x + (j - 1) * width for x in xs], vals, width, label=metric)
            for bar, v in zip(bars, vals):
                if v == v:
                    ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["name"] for r in rows], rotation=20, ha="right", fontsize=8)
        top = max([v for r in rows for v in r["results"].get(dataset, {}).get(task, {}).values() if v == v] + [1.0])
        ax.set_ylim(0, top * 1.15)
        ax.set_ylabel(f"{task} AP (COCO, %)")
        ax.set_title(f"{task}: inference statistics compared")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{os.path.basename(summary['weights'])} on {dataset}"
                 + (f" (first {summary['max_images']} images)" if summary["max_images"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_discrepancy_layers(report: dict, path: str) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.get("layers", []) if r["l1"]]
    if not rows:
        return None
    names = []
    for r in rows:
        names += [n for n in r["l1"] if n not in names]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.22 * len(rows) + 3), 4.5))
    for n in names:
        ys = [r["l1"].get(n) for r in rows]
        ys = [float("nan") if y is None else y for y in ys]
        ax.plot(range(len(rows)), ys, marker="o", markersize=3, label=n)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([short_layer_name(r["name"]) for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("mean |x̂_train − x̂_eval|")
    ax.set_xlabel("layer, in forward order")
    ax.set_title("train–test discrepancy per layer (same inputs)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def short_layer_name(name: str) -> str:
    return name.replace("backbone.bottom_up.", "").replace("backbone.", "").replace("roi_heads.", "")


def _plot_histograms(report: dict, out_dir: str) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    for layer, values in report.get("_hist_values", {}).items():
        train = values["train (batch statistics)"]
        lo, hi = torch.quantile(train.float()[:1_000_000], torch.tensor([0.005, 0.995])).tolist()
        span = max(hi - lo, 1e-3)
        lo, hi = lo - 0.25 * span, hi + 0.25 * span
        bins = torch.linspace(lo, hi, 61).tolist()
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for i, (label, v) in enumerate(values.items()):
            v = v.float().clamp(lo, hi).numpy()
            ax.hist(v, bins=bins, density=True, histtype="step", linewidth=2.2 if i == 0 else 1.4,
                    label=label, color="black" if i == 0 else None)
        row = next(r for r in report["layers"] if r["name"] == layer)
        ax.set_title(f"{layer}, channel {row.get('hist_channel', 0)}: normalised activations", fontsize=9)
        ax.set_xlabel("x̂ (γ = 1, b = 0)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"discrepancy_hist_{_slug(layer)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[layer] = path
    return paths


# --------------------------------------------------------------------------------------------------
# the whole comparison


def load_model(cfg, trainer_cls):
    model = trainer_cls.build_model(cfg)
    checkpoint = DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS, checkpointables=[])
    return model, checkpoint


def compare(
    cfg,
    output_dir: str,
    *,
    strategies: Optional[Sequence[str]] = None,
    max_images: int = 0,
    precise_bn_samples: int = 1000,
    batch_sizes: Sequence[int] = (2,),
    discrepancy_images: int = 8,
    hist_layers: Sequence[str] = (),
    trainer_cls=None,
    plots: bool = True,
) -> dict:
    """Evaluate ``cfg.MODEL.WEIGHTS`` under every strategy and write ``compare.json``, ``compare.md``,
    ``ap.png``, ``discrepancy_layers.png`` and ``discrepancy_hist_<layer>.png`` into ``output_dir``.
    Returns the summary (the JSON content)."""
    if trainer_cls is None:
        from .trainer import Trainer as trainer_cls
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("MODEL.WEIGHTS is empty: give the checkpoint to compare (MODEL.WEIGHTS path/to/model_final.pth)")
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: name the test set(s) to evaluate on, e.g. DATASETS.TEST \"('fashion_scenes_val',)\"")
    options = {"precise_bn_samples": precise_bn_samples, "test_batch_size": batch_sizes[0] if batch_sizes else 2,
               "batch_sizes": list(batch_sizes) or [2], "max_images": max_images}
    specs = list(strategies) if strategies else default_strategy_specs(options)
    built = [build_strategy(spec, options) for spec in specs]
    names = [s.name for s in built]
    if len(set(names)) != len(names):
        raise ValueError(f"strategies given twice: {names}")
    os.makedirs(output_dir, exist_ok=True)
    model, checkpoint = load_model(cfg, trainer_cls)
    ctx = CompareContext(cfg, model, trainer_cls, options)
    summary = {
        "weights": cfg.MODEL.WEIGHTS,
        "checkpoint_iteration": checkpoint.get("iteration"),
        "datasets": list(cfg.DATASETS.TEST),
        "tasks": list(coco_tasks(cfg)),
        "max_images": max_images,
        "world_size": comm.get_world_size(),
        "strategies": [],
    }
    prepared = {}
    for strategy in built:
        entry = {"name": strategy.name, "description": strategy.description,
                 "test_batch_size": strategy.test_batch_size, "available": True, "reason": None}
        why = strategy.unavailable(ctx)
        if why is not None:
            entry.update(available=False, reason=why)
            logger.info("strategy %s unavailable: %s", strategy.name, why)
            summary["strategies"].append(entry)
            continue
        logger.info("strategy %s: %s", strategy.name, strategy.description)
        start = time.perf_counter()
        candidate = copy.deepcopy(model)
        entry["prepare"] = strategy.prepare(ctx, candidate)
        entry["results"] = evaluate_model(
            cfg, candidate, os.path.join(output_dir, "inference", _slug(strategy.name)),
            test_batch_size=strategy.test_batch_size, max_images=max_images, trainer_cls=trainer_cls,
            inference=strategy.inference(candidate),
        )
        entry["seconds"] = round(time.perf_counter() - start, 1)
        prepared[strategy.name] = candidate
        summary["strategies"].append(entry)
    report = {"layers": [], "note": "skipped (--discrepancy-images 0)"}
    if discrepancy_images > 0:
        report = discrepancy_report(ctx, [s for s in built if s.name in prepared], prepared,
                                    discrepancy_images, hist_layers)
    hist_values = report.pop("_hist_values", {})
    summary["discrepancy"] = report
    summary["plots"] = {}
    if comm.is_main_process():
        if plots:
            ap = _plot_ap(summary, os.path.join(output_dir, "ap.png"))
            if ap:
                summary["plots"]["ap"] = ap
            layers_plot = _plot_discrepancy_layers(report, os.path.join(output_dir, "discrepancy_layers.png"))
            if layers_plot:
                summary["plots"]["discrepancy_layers"] = layers_plot
            summary["plots"]["histograms"] = _plot_histograms({**report, "_hist_values": hist_values}, output_dir)
        text = format_table(summary) + "\n\n" + format_discrepancy(report)
        with open(os.path.join(output_dir, "compare.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(output_dir, "compare.json"), "w") as f:
            json.dump(_finite(summary), f, indent=1, default=_json_default)
        summary["text"] = text
    return summary


def _finite(value):
    """NaN/inf (e.g. COCO's APs when a split has no small objects) -> None, so the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


# --------------------------------------------------------------------------------------------------
# command line (tools/compare_bn_stats.py)


def argument_parser():
    from .train import argument_parser as train_parser

    parser = train_parser(epilog="Strategies: " + ", ".join(registered_strategies()))
    parser.add_argument("--output", default=None, help="output folder (default: OUTPUT_DIR/compare_bn_stats)")
    parser.add_argument("--strategies", nargs="+", metavar="SPEC",
                        help="strategies to run (default: all): ema, precise_bn[:N], batch_stats[:K], "
                             "evalnorm_learned, evalnorm_rule, evalnorm_exact, evalnorm_offline[:N]")
    parser.add_argument("--max-images", type=int, default=0, help="evaluate only the first N test images (0: all)")
    parser.add_argument("--precise-bn-samples", type=int, default=1000,
                        help="training images for the PreciseBN strategy (default 1000)")
    parser.add_argument("--batch-sizes", nargs="+", default=None, metavar="K",
                        help="k for batch statistics at test (default: BNSTATS.TEST_BATCH_STATS.IMS_PER_BATCH)")
    parser.add_argument("--discrepancy-images", type=int, default=8,
                        help="test images for the train–test discrepancy report (0: skip; default 8)")
    parser.add_argument("--hist-layers", nargs="+", default=(), metavar="LAYER",
                        help="layers (module names) to draw histograms for (default: first, middle, last)")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG")
    parser.add_argument("--list-strategies", action="store_true", help="print the registered strategies and exit")
    # KEY VALUE overrides may come before or after the tool's own flags (parse_args below)
    for action in parser._actions:
        if action.dest == "opts":
            action.nargs = "*"
    return parser


_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*$")  # OUTPUT_DIR, MODEL.WEIGHTS, ...


def parse_args(argv=None):
    """The tool's arguments; config overrides and flags may be intermixed, e.g.
    ``--config-file C MODEL.WEIGHTS W --output DIR``. A list flag swallows what follows it, so
    config keys (``MODEL.WEIGHTS W``) found in a list flag's values go back to the overrides."""
    parser = argument_parser()
    args = parser.parse_intermixed_args(argv)
    for dest in ("strategies", "hist_layers", "batch_sizes"):
        values = getattr(args, dest)
        if not values:
            continue
        for i, value in enumerate(values):
            if _CONFIG_KEY.match(str(value)):
                args.opts = list(values[i:]) + list(args.opts)
                setattr(args, dest, list(values[:i]))
                break
    if args.batch_sizes is not None:
        try:
            args.batch_sizes = [int(v) for v in args.batch_sizes]
        except ValueError:
            parser.error(f"--batch-sizes takes integers (images per test batch), got {args.batch_sizes}")
    return args


def main(args) -> dict:
    from .train import load_config, setup

    output = args.output or os.path.join(load_config(args.config_file, args.opts).OUTPUT_DIR, "compare_bn_stats")
    # detectron2's set-up writes config.yaml and log.txt into OUTPUT_DIR: the comparison's own folder
    args = copy.copy(args)
    args.opts = list(args.opts) + ["OUTPUT_DIR", output]
    cfg = setup(args)
    for value, flag in ((args.max_images, "--max-images"), (args.discrepancy_images, "--discrepancy-images")):
        if value < 0:
            raise ValueError(f"{flag} = {value}: give a number of images >= 0 (0 = all / skip)")
    batch_sizes = args.batch_sizes or [cfg.BNSTATS.TEST_BATCH_STATS.IMS_PER_BATCH]
    summary = compare(
        cfg, output, strategies=args.strategies, max_images=args.max_images,
        precise_bn_samples=args.precise_bn_samples, batch_sizes=batch_sizes,
        discrepancy_images=args.discrepancy_images, hist_layers=args.hist_layers, plots=not args.no_plots,
    )
    if comm.is_main_process():
        print(summary["text"])
        print(f"\nwritten to {output}: compare.md, compare.json" + (", " + ", ".join(
            os.path.basename(p) for p in _plot_paths(summary)) if summary["plots"] else ""))
    return summary


def _plot_paths(summary):
    plots = summary.get("plots", {})
    paths = [plots[k] for k in ("ap", "discrepancy_layers") if k in plots]
    return paths + list(plots.get("histograms", {}).values())


def run(args) -> int:
    if args.list_strategies:
        for kind in registered_strategies():
            print(kind)
        return 0
    from .launch import launch

    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
    return 0
