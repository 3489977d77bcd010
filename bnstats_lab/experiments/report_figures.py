"""The report's figures: box AP against images per batch, the train–test discrepancy of EMA
statistics against scene diversity, box AP against PreciseBN's number of images, and the learned
EvalNorm weights per layer, per experiment, as PNG files (matplotlib, Agg backend); and across
experiments, the which-norm table as bars (:func:`plot_which_norm`).

Error bars are the sample standard deviation over seeds (see :func:`.report_stats.summarize`).
"""
import os
import re
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from d2_bnstats.outputs import save_figure

from .records import is_number
from .report_layout import REFERENCE, value_key, varying_factors
from .report_stats import paired_difference, summarize, trend

__all__ = ["make_figures", "make_trend_figures", "plot_which_norm"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str, rect=(0, 0, 1, 1)) -> str:
    fig.tight_layout(rect=rect)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def _errorbar(ax, points, **kwargs):
    """One line of (x, mean, std) points, sorted by x; a missing std draws no bar."""
    points = sorted(points, key=lambda p: p[0])
    ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] or 0.0 for p in points],
                marker="o", capsize=3, **kwargs)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _label(factors: Mapping[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={factors.get(k, '—')}" for k in keys)


def _grouping(factor_dicts: List[Mapping[str, Any]], axis: str) -> List[str]:
    """The varying factors that split a figure's lines or panels: all but the x-axis factor and the
    factors that only rename it (one value for each of its values and back, e.g. the scene set's
    name and its diversity), which would otherwise cut every line into single points."""
    def determines(a, b):
        seen = {}
        return all(seen.setdefault(repr(f.get(a)), repr(f.get(b))) == repr(f.get(b)) for f in factor_dicts)

    return [k for k in varying_factors(factor_dicts) if k != axis and not (determines(axis, k) and determines(k, axis))]


def _plot_ap_vs_images(summary: List[dict], experiment: str, path: str) -> str:
    plt = _pyplot()
    summary = [s for s in summary if "images_per_batch" in s["factors"] and s["n"]]
    panel_keys = _grouping([s["factors"] for s in summary], "images_per_batch")
    # one panel per combination of the other varying factors: {panel: (its factors, {strategy: points})}
    panels: Dict[tuple, Tuple[Mapping[str, Any], Dict[str, list]]] = {}
    for s in summary:
        panel = tuple(value_key(k, s["factors"].get(k)) for k in panel_keys)
        _, lines = panels.setdefault(panel, (s["factors"], {}))
        lines.setdefault(s["strategy"], []).append(
            (s["factors"]["images_per_batch"], s["bbox"]["mean"], s["bbox"]["std"] or 0.0))
    # a panel with one batch size has no line to draw (e.g. a checkpoint taken along a long run)
    panels = {k: v for k, v in panels.items()
              if len({p[0] for pts in v[1].values() for p in pts}) > 1} or panels
    sizes = sorted({s["factors"]["images_per_batch"] for s in summary})
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, sorted(panels)):
        factors, lines = panels[panel]
        for strategy, pts in lines.items():
            _errorbar(ax, pts, label=strategy)
        if all(x > 0 for x in sizes):
            ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(x) for x in sizes])
        ax.set_xlabel("images per batch")
        ax.set_ylabel("box AP (COCO, %)")
        ax.set_title(_label(factors, panel_keys) or experiment, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{experiment}: box AP against images per batch (mean ± std over seeds)", fontsize=10)
    return _save(plt, fig, path)


def _plot_discrepancy_vs_diversity(summary: List[dict], experiment: str, path: str) -> str:
    plt = _pyplot()
    summary = [s for s in summary if s["strategy"] == REFERENCE and "diversity" in s["factors"]
               and s["discrepancy_l1"]["n"]]
    line_keys = _grouping([s["factors"] for s in summary], "diversity")
    values = sorted({s["factors"]["diversity"] for s in summary}, key=lambda v: value_key("diversity", v))
    numeric = all(is_number(v) for v in values)
    position = {v: (float(v) if numeric else i) for i, v in enumerate(values)}
    lines: Dict[tuple, list] = {}
    for s in summary:
        key = tuple(value_key(k, s["factors"].get(k)) for k in line_keys)
        d = s["discrepancy_l1"]
        x = position[s["factors"]["diversity"]]
        lines.setdefault(key, []).append((x, d["mean"], d["std"] or 0.0, s["factors"]))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key in sorted(lines):
        pts = lines[key]
        _errorbar(ax, [p[:3] for p in pts], label=_label(pts[0][3], line_keys) or REFERENCE)
    ax.set_xticks([position[v] for v in values])
    ax.set_xticklabels([str(v) for v in values])
    ax.set_xlabel("scene diversity")
    ax.set_ylabel("train–test discrepancy (L1, EMA)")
    ax.set_title(f"{experiment}: discrepancy of EMA statistics (mean ± std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


PRECISE_BN = re.compile(r"^precise_bn:(\d+)$")


def _precise_bn_sizes(summary: List[dict]) -> List[int]:
    return sorted({int(m.group(1)) for s in summary if s["n"] for m in [PRECISE_BN.match(s["strategy"])] if m})


def _plot_ap_vs_precise_bn_images(summary: List[dict], experiment: str, path: str) -> str:
    """Box AP of PreciseBN(N) against N, one line per cell, each cell's EMA as a dashed line of the
    same colour with its ±std band."""
    plt = _pyplot()
    sizes = _precise_bn_sizes(summary)
    cells = sorted({s["cell"] for s in summary if s["n"]})
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for index, cell in enumerate(cells):
        color = f"C{index % 10}"
        pts = sorted((int(PRECISE_BN.match(s["strategy"]).group(1)), s["bbox"]["mean"], s["bbox"]["std"] or 0.0)
                     for s in summary if s["cell"] == cell and s["n"] and PRECISE_BN.match(s["strategy"]))
        if pts:
            _errorbar(ax, pts, color=color, label=f"{cell}: PreciseBN(N)")
        ema = next((s for s in summary if s["cell"] == cell and s["strategy"] == REFERENCE and s["n"]), None)
        if ema is not None:
            mean, std = ema["bbox"]["mean"], ema["bbox"]["std"] or 0.0
            ax.axhline(mean, color=color, linestyle="--", linewidth=1, label=f"{cell}: {REFERENCE}")
            if std:
                ax.axhspan(mean - std, mean + std, color=color, alpha=0.08)
    ax.set_xscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(n) for n in sizes])
    ax.set_xlabel("PreciseBN: training images")
    ax.set_ylabel("box AP (COCO, %)")
    ax.set_title(f"{experiment}: PreciseBN against EMA statistics (mean ± std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _short_layer(name: str) -> str:
    for prefix in ("backbone.bottom_up.", "backbone.", "roi_heads."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name[: -len(".norm")] if name.endswith(".norm") else name


def _trained_with_evalnorm(records: Sequence[dict]) -> List[dict]:
    """Records of trained (not only evaluated) checkpoints that list their EvalNorm layers."""
    return [r for r in records if r.get("evalnorm_layers") and not (r.get("train") or {}).get("checkpoint_of")]


def _plot_evalnorm_parameters(records: Sequence[dict], experiment: str, path: str) -> str:
    """α̂ and β̂ per layer (EvalNorm, Figure 3), one line per combination of the cells' varying
    factors, mean over seeds with the seeds' range as a band."""
    plt = _pyplot()
    factor_dicts = [r["factors"] for r in records]
    keys = [k for k in varying_factors(factor_dicts) if k != "diversity"] or ["images_per_batch"]
    groups: Dict[tuple, List[dict]] = {}
    for r in records:
        groups.setdefault(tuple(value_key(k, r["factors"].get(k)) for k in keys), []).append(r)
    layers = [e["layer"] for e in max(records, key=lambda r: len(r["evalnorm_layers"]))["evalnorm_layers"]]
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.28 * len(layers)), 6.4), sharex=True)
    for (ax, param) in zip(axes, ("alpha_hat", "beta_hat")):
        for index, key in enumerate(sorted(groups)):
            recs = groups[key]
            per_layer = [[e[param] for r in recs for e in r["evalnorm_layers"] if e["layer"] == name] for name in layers]
            xs = [i for i, v in enumerate(per_layer) if v]
            means = [sum(per_layer[i]) / len(per_layer[i]) for i in xs]
            color = f"C{index % 10}"
            label = f"{_label(recs[0]['factors'], keys)} ({len(recs)} seed{'s' if len(recs) != 1 else ''})"
            ax.plot(xs, means, marker="o", markersize=3, color=color, label=label)
            ax.fill_between(xs, [min(per_layer[i]) for i in xs], [max(per_layer[i]) for i in xs], color=color, alpha=0.15)
        ax.set_ylabel("α̂" if param == "alpha_hat" else "β̂")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].set_xticks(range(len(layers)))
    axes[1].set_xticklabels([_short_layer(n) for n in layers], rotation=90, fontsize=6)
    fig.suptitle(f"{experiment}: learned EvalNorm weights per layer (mean over seeds, band: range)", fontsize=10)
    return _save(plt, fig, path)


# The dose-response figure: the gains over EMA against the trend claims' factor
DOSE_STRATEGIES = ("evalnorm_learned", "batch_stats:2", "precise_bn:500")


def _differences_with_seeds(ax, by_x: Mapping[float, dict], shift: float, label: str) -> None:
    """One line of paired differences ({x: paired_difference}): the mean with its 95% t interval
    (no bar without one) and each seed's value as a dot, shifted by ``shift`` along x."""
    xs = sorted(by_x)
    means = [by_x[x]["mean"] for x in xs]
    low = [by_x[x]["mean"] - by_x[x]["ci95"][0] if by_x[x]["ci95"] else 0.0 for x in xs]
    high = [by_x[x]["ci95"][1] - by_x[x]["mean"] if by_x[x]["ci95"] else 0.0 for x in xs]
    line = ax.errorbar([x + shift for x in xs], means, yerr=[low, high], marker="o", capsize=3, label=label)
    for x in xs:
        ax.scatter([x + shift] * len(by_x[x]["values"]), by_x[x]["values"], s=9, alpha=0.5,
                   color=line[0].get_color())


def _plot_gain_vs_factor(records: Sequence[dict], claim: Any, cells: Sequence[str], path: str) -> str:
    """Per strategy of :data:`DOSE_STRATEGIES`, its paired difference to the claim's reference
    against the claim's factor: per-seed points and the mean with its 95% t interval."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.8, 3.9))
    offsets = {s: (i - 1) * 0.03 for i, s in enumerate(DOSE_STRATEGIES)}
    for strategy in DOSE_STRATEGIES:
        result = trend(records, claim.experiment, cells, claim.x, strategy, claim.strategy_b)
        levels = {}
        for cell, diff in result["per_cell"].items():
            level = next((r["factors"].get(claim.x) for r in records
                          if r["experiment"] == claim.experiment and r["cell"] == cell), None)
            if diff["n"] and is_number(level):
                levels[float(level)] = diff
        if not levels:
            continue
        _differences_with_seeds(ax, levels, offsets[strategy], f"{strategy} − {claim.strategy_b}")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel(f"{claim.x} (appearance diversity of the scenes)" if claim.x == "diversity" else claim.x)
    ax.set_ylabel(f"box AP difference to {claim.strategy_b}")
    where = ", ".join(f"{k} = {v}" for k, v in claim.factors.items())
    ax.set_title(f"{claim.experiment} ({where}): mean and 95% interval over seeds; dots: seeds", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _iteration(record: Mapping[str, Any]) -> Any:
    train = record.get("train")
    return train.get("iterations") if isinstance(train, dict) else None


def _runs_along_iterations(records: Sequence[dict], experiment: str) -> Dict[tuple, Dict[int, str]]:
    """The cells of ``experiment`` that are checkpoints of one training at several iterations:
    {the factors other than ``checkpoint``: {iterations: cell}}, groups with two iterations or more."""
    groups: Dict[tuple, Dict[int, str]] = {}
    for r in records:
        if r["experiment"] != experiment or "checkpoint" not in r["factors"] or not is_number(_iteration(r)):
            continue
        key = tuple(sorted((k, repr(v)) for k, v in r["factors"].items() if k != "checkpoint"))
        groups.setdefault(key, {})[int(_iteration(r))] = r["cell"]
    return {k: v for k, v in groups.items() if len(v) > 1}


def _plot_gain_vs_iterations(records: Sequence[dict], experiment: str, groups: Dict[tuple, Dict[int, str]],
                             path: str) -> str:
    """Per training evaluated along the way (one panel each): each strategy's paired difference to
    EMA against the iterations trained, per-seed points and the mean with its 95% t interval; the
    x labels carry EMA's mean box AP, so that the gain reads against how far the detector got."""
    plt = _pyplot()
    keys = sorted(groups)
    varying = [k for k, _ in keys[0] if len({dict(g)[k] for g in keys}) > 1] if len(keys) > 1 else []
    ema_ap = {s["cell"]: s["bbox"]["mean"] for s in summarize(records, experiment)
              if s["strategy"] == REFERENCE and s["n"]}
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.9), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        by_iteration = groups[key]
        xs = sorted(by_iteration)
        labels = [f"{x}\nEMA {ema_ap[by_iteration[x]]:.1f}" if by_iteration[x] in ema_ap else str(x) for x in xs]
        strategies = sorted({s["strategy"] for r in records if r["cell"] in by_iteration.values()
                             and r["experiment"] == experiment for s in r["strategies"]} - {REFERENCE})
        width = 0.04 * (max(xs) - min(xs))
        for i, strategy in enumerate(strategies):
            shift = (i - (len(strategies) - 1) / 2) * width
            diffs = {x: paired_difference(records, experiment, by_iteration[x], strategy, REFERENCE) for x in xs}
            shown = {x: d for x, d in diffs.items() if d["n"]}
            if shown:
                _differences_with_seeds(ax, shown, shift, f"{strategy} − {REFERENCE}")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_xlabel("iterations trained")
        ax.set_ylabel(f"box AP difference to {REFERENCE}")
        ax.set_title(", ".join(f"{k}={dict(key)[k]}" for k in varying).replace("'", "") or experiment, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{experiment}: gain over EMA as training goes on (mean, 95% interval over seeds; dots: seeds)",
                 fontsize=10)
    return _save(plt, fig, path)


def make_trend_figures(records: Sequence[dict], claims: Sequence[Any], experiments: Sequence[Any],
                       figures_dir: str) -> Dict[str, List[str]]:
    """Per trend claim whose cells have records at two levels or more of its factor,
    ``<experiment>_gain_vs_<factor>.png`` (:func:`_plot_gain_vs_factor`). Returns {experiment: [paths]}."""
    from .claims import TrendClaim
    from .report_layout import cell_rows

    out: Dict[str, List[str]] = {}
    for claim in claims:
        if not isinstance(claim, TrendClaim):
            continue
        recs = [r for r in records if r["experiment"] == claim.experiment]
        cells = [c for c, f, _ in cell_rows(recs, claim.experiment, experiments) if claim.matches(f)]
        levels = {r["factors"].get(claim.x) for r in recs if r["cell"] in cells}
        if len(levels) < 2:
            continue
        path = os.path.join(figures_dir, f"{_slug(claim.experiment)}_gain_vs_{_slug(claim.x)}.png")
        out.setdefault(claim.experiment, []).append(_plot_gain_vs_factor(recs, claim, cells, path))
    return out


def make_figures(records: Sequence[dict], figures_dir: str) -> Dict[str, List[str]]:
    """Per experiment, the figures its records support, written atomically into ``figures_dir``:
    ``<experiment>_ap_vs_images_per_batch.png`` (box AP against images per batch, one line per
    strategy, one panel per combination of the other varying factors, error bars the std over seeds)
    when the factor ``images_per_batch`` takes more than one value, and
    ``<experiment>_discrepancy_vs_diversity.png`` (``discrepancy_l1`` of EMA statistics against the
    factor ``diversity``) when that factor is present with a measured discrepancy, and
    ``<experiment>_ap_vs_precise_bn_images.png`` (PreciseBN(N) against N, EMA as a reference line) when
    PreciseBN was evaluated with more than one N, ``<experiment>_gain_vs_iterations.png`` (each strategy's
    paired difference to EMA against the iterations trained) when cells are checkpoints of one training
    at several iterations (factor ``checkpoint``), and ``<experiment>_evalnorm_alpha_beta.png`` (the learned
    α̂, β̂ per layer, EvalNorm's Figure 3) when trained records list their EvalNorm layers. Returns
    {experiment: [paths]}."""
    out: Dict[str, List[str]] = {}
    for experiment in sorted({r["experiment"] for r in records}):
        summary = summarize(records, experiment)
        paths = []
        sizes = {s["factors"]["images_per_batch"] for s in summary if "images_per_batch" in s["factors"] and s["n"]}
        if len(sizes) > 1:
            paths.append(_plot_ap_vs_images(
                summary, experiment, os.path.join(figures_dir, f"{_slug(experiment)}_ap_vs_images_per_batch.png")))
        if any(s["strategy"] == REFERENCE and "diversity" in s["factors"] and s["discrepancy_l1"]["n"]
               for s in summary):
            paths.append(_plot_discrepancy_vs_diversity(
                summary, experiment, os.path.join(figures_dir, f"{_slug(experiment)}_discrepancy_vs_diversity.png")))
        trained = _trained_with_evalnorm([r for r in records if r["experiment"] == experiment])
        if trained:
            paths.append(_plot_evalnorm_parameters(
                trained, experiment, os.path.join(figures_dir, f"{_slug(experiment)}_evalnorm_alpha_beta.png")))
        along = _runs_along_iterations(records, experiment)
        if along:
            paths.append(_plot_gain_vs_iterations(
                records, experiment, along, os.path.join(figures_dir, f"{_slug(experiment)}_gain_vs_iterations.png")))
        if len(_precise_bn_sizes(summary)) > 1:
            paths.append(_plot_ap_vs_precise_bn_images(
                summary, experiment, os.path.join(figures_dir, f"{_slug(experiment)}_ap_vs_precise_bn_images.png")))
        if paths:
            out[experiment] = paths
    return out


def plot_which_norm(entries: Sequence[Mapping[str, Any]], settings: Sequence[Tuple[str, str]], path: str,
                    title: str) -> str:
    """The which-norm table (:func:`.report_readme.which_norm_entries`) as horizontal bars, one panel
    per setting of ``settings`` ((setting, title) pairs): box AP mean, the seeds' std as error bar,
    each seed as a dot. Rows that are strategies on one checkpoint (``paired``) in one colour, other
    trainings in another, the large-batch reference (the last row) in grey and as a dashed line;
    an entry that was not measured is written out ("not run", "n/a", "—")."""
    plt = _pyplot()
    labels = [item["row"].label for item in entries]
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings) + 2.6, 0.42 * len(labels) + 1.4),
                             sharey=True, squeeze=False)
    for ax, (index, (_, setting_title)) in zip(axes.flat, enumerate(settings)):
        for y, item in enumerate(entries):
            entry = item["settings"][index]
            reference = y == len(entries) - 1
            if entry["status"] != "measured":
                ax.text(0.5, y, entry["status"], va="center", fontsize=7, color="0.4")
                continue
            stats = entry["bbox"]
            color = "0.6" if reference else ("C0" if item["row"].paired else "C1")
            ax.barh(y, stats["mean"], xerr=stats["std"] or 0.0, color=color, alpha=0.75, capsize=3,
                    hatch="//" if entry["unconverged"] else None)
            ax.plot(stats["values"], [y] * len(stats["values"]), "k.", markersize=4)
            if reference:
                ax.axvline(stats["mean"], color="0.4", linestyle="--", linewidth=1)
        ax.set_title(setting_title, fontsize=9)
        ax.set_xlabel("box AP (COCO, %)")
        ax.grid(axis="x", alpha=0.3)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color="C0", alpha=0.75, label="inference statistics, same checkpoints"),
                        Patch(color="C1", alpha=0.75, label="another training"),
                        Patch(color="0.6", alpha=0.75, label="large-batch reference")],
               fontsize=7, loc="lower center", ncol=3, frameon=False)
    axes[0][0].set_yticks(range(len(labels)))
    axes[0][0].set_yticklabels(labels, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path, rect=(0, 0.05, 1, 1))
