"""The comparison's figures (matplotlib, Agg): COCO AP per strategy (``ap.png``), the train–test
discrepancy per layer in forward order (``discrepancy_layers.png``), and histograms of the normalized
activations of chosen layers (``discrepancy_hist_<layer>.png``); each written atomically."""
import os
from typing import Dict, Optional

import torch

from ..outputs import save_figure
from .discrepancy import TRAIN_LABEL
from .report import slug, strategy_names


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, rows, dataset, task, metrics):
    """Grouped bars (one group per strategy, one bar per metric) with their values written on top."""
    width = 0.8 / len(metrics)
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


def plot_ap(summary: dict, path: str) -> Optional[str]:
    plt = _pyplot()
    rows = [s for s in summary["strategies"] if s["available"] and s.get("results")]
    if not rows:
        return None
    dataset = summary["datasets"][0]
    tasks = summary["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(6.0, 1.3 * len(rows) + 2) * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        _bars(ax, rows, dataset, task, ("AP", "AP50", "AP75"))
        ax.set_ylabel(f"{task} AP (COCO, %)")
        ax.set_title(f"{task}: inference statistics compared")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{os.path.basename(summary['weights'])} on {dataset}"
                 + (f" (first {summary['max_images']} images)" if summary["max_images"] else ""), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def short_layer_name(name: str) -> str:
    return name.replace("backbone.bottom_up.", "").replace("backbone.", "").replace("roi_heads.", "")


def plot_discrepancy_layers(report: dict, path: str) -> Optional[str]:
    plt = _pyplot()
    rows = [r for r in report.get("layers", []) if r["l1"]]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(7.0, 0.22 * len(rows) + 3), 4.5))
    for n in strategy_names(rows):
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
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def _histogram(plt, values: Dict[str, torch.Tensor], title: str, path: str) -> None:
    train = values[TRAIN_LABEL]
    lo, hi = torch.quantile(train.float()[:1_000_000], torch.tensor([0.005, 0.995])).tolist()
    span = max(hi - lo, 1e-3)
    lo, hi = lo - 0.25 * span, hi + 0.25 * span
    bins = torch.linspace(lo, hi, 61).tolist()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (label, v) in enumerate(values.items()):
        v = v.float().clamp(lo, hi).numpy()
        ax.hist(v, bins=bins, density=True, histtype="step", linewidth=2.2 if i == 0 else 1.4,
                label=label, color="black" if i == 0 else None)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("x̂ (γ = 1, b = 0)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_histograms(report: dict, hist_values: Dict[str, Dict[str, torch.Tensor]], out_dir: str) -> Dict[str, str]:
    """One histogram per layer of ``hist_values`` ({layer: {label: x̂ values}}, training first)."""
    plt = _pyplot()
    paths = {}
    for layer, values in hist_values.items():
        row = next(r for r in report["layers"] if r["name"] == layer)
        path = os.path.join(out_dir, f"discrepancy_hist_{slug(layer)}.png")
        _histogram(plt, values, f"{layer}, channel {row.get('hist_channel', 0)}: normalised activations", path)
        paths[layer] = path
    return paths


def write_plots(summary: dict, hist_values: Dict[str, Dict[str, torch.Tensor]], output_dir: str) -> dict:
    """All figures of a comparison; returns {"ap": path, "discrepancy_layers": path, "histograms": {...}}
    (the first two only when there is something to draw)."""
    report = summary["discrepancy"]
    written = {}
    ap = plot_ap(summary, os.path.join(output_dir, "ap.png"))
    if ap:
        written["ap"] = ap
    layers_plot = plot_discrepancy_layers(report, os.path.join(output_dir, "discrepancy_layers.png"))
    if layers_plot:
        written["discrepancy_layers"] = layers_plot
    written["histograms"] = plot_histograms(report, hist_values, output_dir)
    return written


def plot_paths(summary: dict) -> list:
    """The figures a comparison wrote, in the order they were drawn."""
    plots = summary.get("plots", {})
    paths = [plots[k] for k in ("ap", "discrepancy_layers") if k in plots]
    return paths + list(plots.get("histograms", {}).values())
