"""The end-to-end benchmark's result as markdown tables and as a PNG of the ratios with the targets.

Both read the JSON-ready dict of :func:`bnstats_lab.benchmark.e2e.run_benchmark` (the same dict
``tools/benchmark.py`` writes to ``results.json``), so a saved result can be reported again.
"""
import os
from typing import Dict, List, Optional

from .models import INFERENCE_REFERENCE, INFERENCE_TARGETS, PRECISE_BN_TARGET, TRAIN_REFERENCE, TRAIN_TARGETS
from .timing import target_key


def _fmt(v, pattern):
    return "" if v is None else pattern.format(v)


def _target_cell(row: dict) -> str:
    """``<= 1.10x met`` / ``missed`` / ``unresolved`` (the 95% interval against the target)."""
    if row.get("target") is None:
        return ""
    status = row.get("status")
    if status is None:  # a result saved before the intervals: the point ratio only
        status = "" if row.get("meets_target") is None else ("ok" if row["meets_target"] else "MISSED")
    return f"<= {row['target']:.2f}x {status}".rstrip()


def _ratio_cell(row: dict, reference: str) -> str:
    """The ratio, naming its reference where it is not the table's (e.g. ``1.031x / GN``)."""
    if row.get("ratio") is None:
        return ""
    other = row.get("reference")
    return f"{row['ratio']:.3f}x" + (f" / {other}" if other and other != reference else "")


def _interval_cell(row: dict) -> str:
    if row.get("ratio_low") is None:
        return ""
    return f"[{row['ratio_low']:.3f}, {row['ratio_high']:.3f}]"


def _timing_tables(result: dict, tabulate) -> List[str]:
    parts = []
    if result["train"]:
        parts.append("### Training: seconds per iteration, ratio to BN (same run, interleaved)")
        parts.append(tabulate([[r["arch"], r["ims_per_batch"], r["norm"], _fmt(r["median_s"], "{:.3f}"),
                                _ratio_cell(r, TRAIN_REFERENCE), _interval_cell(r), _target_cell(r), r["skipped"] or ""]
                               for r in result["train"]],
                              headers=["model", "img/batch", "norm", "s/iter", "/ BN", "95% interval", "target",
                                       "note"],
                              tablefmt="github"))
    if result["memory"]:
        on_gpu = any(str(r.get("method") or "").startswith("CUDA") for r in result["memory"])
        parts.append("### Training peak GPU memory (CUDA allocator, one norm at a time), ratio to BN" if on_gpu
                     else "### Training peak memory (fresh process per norm), ratio to BN")
        parts.append(tabulate([[r["arch"], r["ims_per_batch"], r["norm"], _fmt(r["training_mib"], "{:.0f}"),
                                _fmt(r["peak_mib"], "{:.0f}"), _fmt(r["ratio"], "{:.2f}x"), r["skipped"] or ""]
                               for r in result["memory"]],
                              headers=["model", "img/batch", "norm", "training MiB", "process peak MiB", "/ BN", "note"],
                              tablefmt="github"))
    if result["inference"]:
        parts.append("### Inference: seconds per image, ratio to FrozenBN (same run, interleaved)")
        parts.append(tabulate([[r["arch"], r["norm"], _fmt(r["median_s"], "{:.4f}"), _ratio_cell(r, INFERENCE_REFERENCE),
                                _interval_cell(r), _target_cell(r), r["skipped"] or r.get("note") or ""]
                               for r in result["inference"]],
                              headers=["model", "norm / mode", "s/image", "/ FrozenBN", "95% interval", "target",
                                       "note"],
                              tablefmt="github"))
    return parts


def _precise_bn_tables(pb: dict, tabulate) -> List[str]:
    parts = [f"### PreciseBN over n images ({pb['arch']}, BN, {pb['ims_per_batch']} img/batch), "
             f"ratio to plain training-mode forwards (target <= {PRECISE_BN_TARGET}x, linear in n)"]
    parts.append(tabulate([[r["images"], r["batches"], _fmt(r["forward_s"], "{:.3f}"), _fmt(r["precise_bn_s"], "{:.3f}"),
                            _fmt(r["ratio"], "{:.3f}x"), r["repeats"]] for r in pb["rows"]],
                          headers=["n images", "batches", "forward s", "PreciseBN s", "ratio", "reps"],
                          tablefmt="github"))
    for label, fit in (("PreciseBN", pb.get("fit_precise_bn")), ("forward", pb.get("fit_forward"))):
        if fit:
            parts.append(f"{label}: {fit['slope_s_per_image'] * 1000:.2f} ms/image + {fit['intercept_s']:.3f} s, "
                         f"R^2 = {fit['r2']:.4f}")
    return parts


def format_report(result: dict) -> str:
    """Markdown tables of a :func:`~bnstats_lab.benchmark.e2e.run_benchmark` result."""
    from tabulate import tabulate

    m = result["machine"]
    parts = [f"Machine: {m['processor']}, {m['cpus']} CPUs, torch {m['torch']}, {m['threads']} threads; "
             f"load average at start {m.get('load_average_at_start')}; clock: {result['settings']['clock']}; "
             f"{result.get('seconds', 0):.0f} s in all."]
    if m.get("gpu"):
        parts.append(f"GPU: {m['gpu']}, CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')} "
                     f"(benchmark mode {'on' if m.get('cudnn_benchmark') else 'off'}).")
    parts += _timing_tables(result, tabulate)
    if result.get("host_syncs"):
        parts.append("### Synchronising CUDA calls per training iteration (detectron2's and the norm's)")
        parts.append(tabulate([[r["arch"], r["ims_per_batch"], r["norm"], r["per_iteration"]] for r in result["host_syncs"]],
                              headers=["model", "img/batch", "norm", "syncs / iteration"], tablefmt="github"))
    pb = result.get("precise_bn")
    if pb:
        parts += _precise_bn_tables(pb, tabulate)
    return "\n\n".join(parts)


def _ratio_bars(ax, rows: List[dict], title: str, ref: str, targets: Dict[str, float]) -> None:
    """Grouped bars of the rows' ratios (one group per model and batch size), targets as red dashes."""
    groups = sorted({(r["arch"], r["ims_per_batch"]) for r in rows})
    names = list(dict.fromkeys(r["norm"] for r in rows))
    width = 0.8 / max(1, len(groups))
    for g, group in enumerate(groups):
        vals = []
        for n in names:
            r = next((r for r in rows if (r["arch"], r["ims_per_batch"]) == group and r["norm"] == n), None)
            vals.append(r["ratio"] if r and r["ratio"] is not None else float("nan"))
        label = f"{group[0]}" + (f" {group[1]} img" if rows[0]["table"] == "train" else "")
        ax.bar([i + g * width for i in range(len(names))], vals, width, label=label)
    for n, t in targets.items():
        for i, name in enumerate(names):
            if name == n or target_key(name) == n:
                ax.hlines(t, i - 0.1, i + 0.8, colors="red", linestyles="--")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    others = {r["norm"]: r.get("reference") for r in rows if r.get("reference") not in (None, ref)}
    ax.set_xticklabels([f"{n} / {others[n]}" if n in others else n for n in names], rotation=45, ha="right")
    ax.set_ylabel(f"ratio to {ref}")
    ax.set_title(title + " (red dashes: targets)")
    ax.legend(fontsize=8)


def _precise_bn_panel(ax, pb: Optional[dict]) -> None:
    if not pb:
        ax.set_title("PreciseBN: not measured")
        return
    xs = [r["images"] for r in pb["rows"]]
    ax.plot(xs, [r["ratio"] for r in pb["rows"]], "o-", label="PreciseBN / forward")
    ax.axhline(PRECISE_BN_TARGET, color="red", linestyle="--", label=f"target {PRECISE_BN_TARGET}x")
    ax.set_xscale("log")
    ax.set_xlabel("n images")
    ax.set_ylabel("ratio to plain training-mode forward")
    fit = pb.get("fit_precise_bn")
    ax.set_title("PreciseBN cost" + (f" (linear fit R^2 = {fit['r2']:.4f})" if fit else ""))
    ax.legend(fontsize=8)


def plot_report(result: dict, path: str) -> Optional[str]:
    """A PNG of the ratios with the targets drawn; returns the path (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    targets = result.get("targets") or {}
    if result["train"]:
        _ratio_bars(axes[0], result["train"], "training s/iter", TRAIN_REFERENCE, targets.get("train", TRAIN_TARGETS))
    if result["inference"]:
        _ratio_bars(axes[1], result["inference"], "inference s/image", INFERENCE_REFERENCE,
                    targets.get("inference", INFERENCE_TARGETS))
    _precise_bn_panel(axes[2], result.get("precise_bn"))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
