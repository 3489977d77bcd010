"""The results report: the experiments' records as the papers' tables, paired differences, claims, figures.

Reads every ``<results>/<experiment>/<cell>/seed<k>.json`` (one record per trained checkpoint; the
schema is in ``docs/results.md``) and writes the generated part of ``docs/results.md`` between the
markers ``<!-- results:begin -->`` and ``<!-- results:end -->``; text outside them (the protocol,
the discussion) is kept. Per experiment: a table with one row per cell (ordered by its factors, e.g.
setting then images per batch) and one column per inference strategy, each entry "mean ± std (n)"
over seeds; the paired differences to a reference strategy (default EMA) on the same checkpoints;
figures (AP against images per batch, the train–test discrepancy against scene diversity). Then the
claims of :mod:`bnstats_lab.experiments.claims`, each with our measurement and a verdict.

Statistics: the mean and the sample standard deviation (ddof = 1) over seeds; one seed has no
standard deviation. A paired difference is taken per seed on one checkpoint (the two strategies
evaluated on the same weights), so the seed-to-seed variation of training cancels out of it.
A cell that has not been run yet is shown as "not run": the report renders at every stage.

Convergence check on the batch-size axis (the protocol of ``docs/results.md``): a cell with more
images per batch than the experiment's smallest is compared with its counterpart at the smallest
(the same other factors) by the final total training loss (each record's median of the last logged
values, averaged over seeds); above :data:`CONVERGENCE_RATIO` times the counterpart's it is marked
unconverged in the tables, and the claims judged on it are inconclusive.

    python -m bnstats_lab.experiments.report --results results --output docs/results.md --figures docs/results
"""
import argparse
import fnmatch
import json
import math
import os
import re
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from d2_bnstats.outputs import save_figure, write_text

from ..config_matrix import ALL_SETTINGS
from .catalog import load_experiments
from .claims import CLAIMS, Claim

__all__ = [
    "BEGIN",
    "END",
    "RecordError",
    "load_records",
    "rows",
    "summarize",
    "paired_difference",
    "verdict",
    "convergence",
    "evaluate_claims",
    "make_figures",
    "render_markdown",
    "write_report",
    "main",
]

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
FORMAT = 1
REFERENCE = "ema"
REQUIRED = ("format", "experiment", "cell", "seed", "factors", "strategies")
HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
NOT_RUN, NOT_AVAILABLE, NOT_PLANNED = "not run", "n/a", "—"
# Factors first in this order in tables (then the rest alphabetically): the papers' layout groups by
# setting, then images per batch. Records are written with sorted keys, so their own order says nothing.
FACTOR_ORDER = ("setting", "images_per_batch", "scenes", "diversity", "norm")
VALUE_ORDER = {"setting": ALL_SETTINGS}
METRICS = ("AP", "AP50", "AP75")
CONVERGENCE_RATIO = 1.1
TASK_LABEL = {"bbox": "box AP", "segm": "mask AP"}


class RecordError(ValueError):
    """A result record that cannot be used; the message names the file."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"result record {path}: {problem}")
        self.path = path


# ------------------------------------------------------------------------------------------ loading
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _problems(record) -> List[str]:
    if not isinstance(record, dict):
        return [f"not a JSON object but {type(record).__name__}"]
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        return [f"lacks required keys: {', '.join(missing)}"]
    out = []
    if record["format"] != FORMAT:
        out.append(f"format {record['format']!r}; this report reads format {FORMAT}")
    for key in ("experiment", "cell"):
        if not isinstance(record[key], str) or not record[key]:
            out.append(f"{key} must be a non-empty string, got {record[key]!r}")
    if not isinstance(record["seed"], int) or isinstance(record["seed"], bool):
        out.append(f"seed must be an integer, got {record['seed']!r}")
    factors = record["factors"]
    if not isinstance(factors, dict):
        out.append(f"factors must be an object, got {type(factors).__name__}")
    else:
        out += [f"factor {k} must be a string or a number, got {v!r}" for k, v in factors.items()
                if not isinstance(v, (str, int, float)) or v is None]
    strategies = record["strategies"]
    if not isinstance(strategies, list):
        return out + [f"strategies must be a list, got {type(strategies).__name__}"]
    names = []
    for i, entry in enumerate(strategies):
        if not isinstance(entry, dict) or "strategy" not in entry or "available" not in entry:
            out.append(f"strategies[{i}] lacks required keys: strategy, available")
            continue
        name = entry["strategy"]
        names.append(name)
        if entry["available"] and not (isinstance(entry.get("bbox"), dict) and _is_number(entry["bbox"].get("AP"))):
            out.append(f"strategy {name} is available but has no numeric bbox AP")
        for task in ("bbox", "segm"):
            values = entry.get(task)
            if values is not None and not (isinstance(values, dict) and all(
                    v is None or _is_number(v) for v in values.values())):
                out.append(f"strategy {name}: {task} must map metric names to numbers, got {values!r}")
        if not (entry.get("discrepancy_l1") is None or _is_number(entry["discrepancy_l1"])):
            out.append(f"strategy {name}: discrepancy_l1 must be a number or null, got {entry['discrepancy_l1']!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        out.append(f"strategies listed twice: {', '.join(map(str, duplicates))}")
    return out


def _read_record(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except ValueError as e:
        raise RecordError(path, f"not valid JSON ({e})") from None
    except OSError as e:
        raise RecordError(path, f"cannot be read ({e.strerror or e})") from None
    problems = _problems(record)
    if problems:
        raise RecordError(path, "; ".join(problems))
    # the place is the key the runner uses to skip finished cells: a record copied into the wrong
    # folder would make the runner skip a cell and the report count one checkpoint twice
    folder = os.path.dirname(os.path.abspath(path))
    place = (os.path.basename(os.path.dirname(folder)), os.path.basename(folder), os.path.basename(path))
    content = (record["experiment"], record["cell"], f"seed{record['seed']}.json")
    if place != content:
        raise RecordError(path, f"says experiment {record['experiment']}, cell {record['cell']}, "
                                f"seed {record['seed']}, so it belongs at <results>/{'/'.join(content)}, "
                                f"not at .../{'/'.join(place)}")
    return record


def load_records(root: str = "results") -> List[dict]:
    """Every ``seed*.json`` under ``root`` (``<root>/<experiment>/<cell>/seed<k>.json``), sorted by
    experiment, cell and seed. A file that is not valid JSON, lacks a required key (``format``,
    ``experiment``, ``cell``, ``seed``, ``factors``, ``strategies``) or lies in a folder other than its
    experiment/cell raises :class:`RecordError` naming the file."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no results folder {root}")
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        paths += [os.path.join(folder, n) for n in sorted(files) if fnmatch.fnmatch(n, "seed*.json")]
    records = [_read_record(p) for p in paths]
    return sorted(records, key=lambda r: (r["experiment"], r["cell"], r["seed"]))


# --------------------------------------------------------------------------------------- statistics
def _entry(record: dict, strategy: str) -> Optional[dict]:
    for entry in record["strategies"]:
        if entry["strategy"] == strategy:
            return entry
    return None


def _value(entry: Optional[dict], metric: Tuple[str, str]) -> Optional[float]:
    """The metric of an available strategy entry, None when absent or unavailable."""
    if entry is None or not entry.get("available"):
        return None
    task, name = metric
    value = (entry.get(task) or {}).get(name)
    return float(value) if _is_number(value) else None


def _mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (ddof = 1); std None for fewer than 2 values."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _stats(values: List[float]) -> Dict[str, Any]:
    mean, std = _mean_std(values)
    return {"n": len(values), "mean": mean, "std": std, "values": values}


def rows(records: Iterable[dict]) -> List[dict]:
    """One flat row per (experiment, cell, seed, strategy): the cell's ``factors`` (a dict), whether
    the strategy was available (and why not), box AP / AP50 / AP75 (``bbox_AP``, ...), mask AP
    (``segm_AP``, ..., None for Faster R-CNN) and ``discrepancy_l1``."""
    out = []
    for record in records:
        for entry in record["strategies"]:
            row = {"experiment": record["experiment"], "cell": record["cell"], "seed": record["seed"],
                   "factors": dict(record["factors"]), "strategy": entry["strategy"],
                   "available": bool(entry["available"]), "reason": entry.get("reason"),
                   "test_batch_size": entry.get("test_batch_size")}
            for task in ("bbox", "segm"):
                for name in METRICS:
                    row[f"{task}_{name}"] = _value(entry, (task, name))
            row["discrepancy_l1"] = entry.get("discrepancy_l1")
            out.append(row)
    return out


def _strategies(records: Iterable[dict], planned: Iterable[str] = (), reference: str = REFERENCE) -> List[str]:
    """Strategy names in the order the records list them, the reference first."""
    names: List[str] = []
    for name in list(planned) + [e["strategy"] for r in records for e in r["strategies"]]:
        if name not in names:
            names.append(name)
    return sorted(names, key=lambda n: n != reference)  # stable: the rest keep their order


def summarize(records: Iterable[dict], experiment: str) -> List[dict]:
    """Per cell and strategy of ``experiment``: ``n`` (seeds with a box AP), ``seeds``, and for
    ``bbox`` (box AP), ``segm`` (mask AP; None when no seed has one) and ``discrepancy_l1``: a dict
    with ``n``, ``mean``, sample ``std`` (ddof = 1, None for n = 1) and the per-seed ``values``.
    ``reasons``: why the strategy was unavailable on some seeds. Cells in table order."""
    recs = [r for r in records if r["experiment"] == experiment]
    cells = _cell_rows(recs, experiment, [])
    out = []
    for cell, factors, _ in cells:
        cell_recs = sorted((r for r in recs if r["cell"] == cell), key=lambda r: r["seed"])
        for strategy in _strategies(cell_recs):
            entries = [(r["seed"], _entry(r, strategy)) for r in cell_recs]
            entries = [(s, e) for s, e in entries if e is not None]
            measured = [(s, _value(e, ("bbox", "AP"))) for s, e in entries]
            measured = [(s, v) for s, v in measured if v is not None]
            segm = [v for v in (_value(e, ("segm", "AP")) for _, e in entries) if v is not None]
            disc = [float(e["discrepancy_l1"]) for _, e in entries
                    if e.get("available") and _is_number(e.get("discrepancy_l1"))]
            out.append({
                "experiment": experiment, "cell": cell, "factors": factors, "strategy": strategy,
                "n": len(measured), "seeds": [s for s, _ in measured],
                "bbox": _stats([v for _, v in measured]),
                "segm": _stats(segm) if segm else None,
                "discrepancy_l1": _stats(disc),
                "reasons": sorted({str(e.get("reason") or "no reason given")
                                   for _, e in entries if not e.get("available")}),
            })
    return out


def paired_difference(records: Iterable[dict], experiment: str, cell: str, strategy_a: str, strategy_b: str,
                      metric: Tuple[str, str] = ("bbox", "AP")) -> dict:
    """Per seed, ``metric`` of ``strategy_a`` minus that of ``strategy_b`` on the same checkpoint
    (seeds where either is unavailable are left out); then ``n``, ``mean`` and sample ``std``
    (ddof = 1, None for n < 2) of those differences, with the per-seed ``seeds`` and ``values``."""
    seeds, values = [], []
    for record in sorted((r for r in records if r["experiment"] == experiment and r["cell"] == cell),
                         key=lambda r: r["seed"]):
        a, b = _value(_entry(record, strategy_a), metric), _value(_entry(record, strategy_b), metric)
        if a is not None and b is not None:
            seeds.append(record["seed"])
            values.append(a - b)
    mean, std = _mean_std(values)
    return {"experiment": experiment, "cell": cell, "strategy_a": strategy_a, "strategy_b": strategy_b,
            "metric": tuple(metric), "n": len(values), "mean": mean, "std": std, "seeds": seeds, "values": values}


def verdict(mean: Optional[float], std: Optional[float], n: int, expected_sign: int) -> str:
    """Whether a paired difference (mean and sample std over ``n`` seeds) supports a claim.

    - ``n < 2`` (no spread to compare with), or a missing / non-finite mean or std: "inconclusive".
    - ``expected_sign`` +1 or −1 (a difference of that sign is claimed): if ``|mean| <= std`` the
      difference is no larger than the seeds' spread: "inconclusive"; otherwise "holds" when the
      sign of the mean is the expected one, "does not hold" when it is the opposite.
    - ``expected_sign`` 0 (no difference is claimed): "holds" when ``|mean| <= std`` (the difference
      lies within the seeds' spread), "does not hold" otherwise.

    The spread is the standard deviation of the per-seed differences, not the standard error of
    their mean: a deliberately cautious rule for the few seeds the experiments afford.
    """
    if expected_sign not in (-1, 0, 1):
        raise ValueError(f"expected_sign must be -1, 0 or +1, got {expected_sign!r}")
    if n < 2 or mean is None or std is None or not (math.isfinite(mean) and math.isfinite(std)):
        return INCONCLUSIVE
    within = abs(mean) <= std
    if expected_sign == 0:
        return HOLDS if within else DOES_NOT_HOLD
    if within:
        return INCONCLUSIVE
    return HOLDS if (mean > 0) == (expected_sign > 0) else DOES_NOT_HOLD


# ------------------------------------------------------------------------------- cells and planning
def _planned_cells(experiments: Sequence[Any], experiment: str) -> List[Tuple[str, Dict[str, Any], Tuple[str, ...]]]:
    """(cell, factors, strategies) of an experiment's declaration (objects with ``name`` and
    ``cells``, each cell with ``name``, ``factors`` and ``strategies``, as in ``spec.Experiment``)."""
    for exp in experiments:
        if exp.name == experiment:
            return [(c.name, dict(c.factors), tuple(c.strategies)) for c in exp.cells]
    return []


def _factor_order(factor_dicts: Iterable[Mapping[str, Any]]) -> List[str]:
    keys = sorted({k for f in factor_dicts for k in f})
    return [k for k in FACTOR_ORDER if k in keys] + [k for k in keys if k not in FACTOR_ORDER]


def _value_key(factor: str, value, declared: Mapping[str, List[Any]] = None) -> tuple:
    """Sort key of a factor's value: the settings in the config matrix's order, numbers by value,
    other strings in the order the experiment declares them, then alphabetically."""
    order = VALUE_ORDER.get(factor, ())
    if value in order:
        return (0, order.index(value), "")
    if _is_number(value):
        return (1, float(value), "")
    listed = (declared or {}).get(factor, [])
    if value in listed:
        return (2, listed.index(value), "")
    return (3, 0.0, str(value))


def _cell_rows(recs: List[dict], experiment: str, experiments: Sequence[Any]):
    """(cell, factors, planned strategies or None) of every recorded or planned cell, in table order."""
    cells: Dict[str, Tuple[Dict[str, Any], Optional[Tuple[str, ...]]]] = {}
    declared: Dict[str, List[Any]] = {}
    for name, factors, strategies in _planned_cells(experiments, experiment):
        cells[name] = (factors, strategies)
        for k, v in factors.items():
            if v not in declared.setdefault(k, []):
                declared[k].append(v)
    for r in recs:
        if r["cell"] not in cells:
            cells[r["cell"]] = (dict(r["factors"]), None)
    order = _factor_order(f for f, _ in cells.values())

    def key(item):
        name, (factors, _) = item
        return tuple((0, _value_key(k, factors[k], declared)) if k in factors else (1, ()) for k in order) + (name,)

    return [(name, factors, strategies) for name, (factors, strategies) in sorted(cells.items(), key=key)]


# ------------------------------------------------------------------------------------- convergence
def _final_loss(record: dict) -> Optional[float]:
    train = record.get("train")
    losses = train.get("final_losses") if isinstance(train, dict) else None
    value = losses.get("total_loss") if isinstance(losses, dict) else None
    return float(value) if _is_number(value) else None


def convergence(records: Iterable[dict], experiment: str, ratio: float = CONVERGENCE_RATIO) -> Dict[str, dict]:
    """The protocol's convergence check on the batch-size axis, per cell of ``experiment`` with more
    images per batch than its smallest: ``loss`` (the mean over seeds of the records' final total
    loss), ``reference_cell`` (the same other factors at the smallest images per batch) and its
    ``reference_loss``, their ``ratio`` and ``converged`` (ratio <= ``ratio``). Cells without a
    counterpart or without losses are left out."""
    recs = [r for r in records if r["experiment"] == experiment and _is_number(r["factors"].get("images_per_batch"))]
    if not recs:
        return {}
    smallest = min(r["factors"]["images_per_batch"] for r in recs)
    losses: Dict[str, List[float]] = {}
    factors: Dict[str, Dict[str, Any]] = {}
    for r in recs:
        factors[r["cell"]] = r["factors"]
        loss = _final_loss(r)
        if loss is not None:
            losses.setdefault(r["cell"], []).append(loss)
    mean = {cell: sum(v) / len(v) for cell, v in losses.items()}

    def others(f):
        return {k: v for k, v in f.items() if k != "images_per_batch"}

    out = {}
    for cell, f in sorted(factors.items()):
        if f["images_per_batch"] == smallest or cell not in mean:
            continue
        references = [c for c, g in factors.items()
                      if g["images_per_batch"] == smallest and others(g) == others(f) and c in mean]
        if len(references) != 1 or mean[references[0]] <= 0:
            continue
        reference = references[0]
        value = mean[cell] / mean[reference]
        out[cell] = {"loss": mean[cell], "reference_cell": reference, "reference_loss": mean[reference],
                     "ratio": value, "converged": value <= ratio}
    return out


# ------------------------------------------------------------------------------------------- claims
def evaluate_claims(records: Sequence[dict], claims: Sequence[Claim] = CLAIMS,
                    experiments: Sequence[Any] = ()) -> List[dict]:
    """One row per (claim, matching cell): ``status`` "measured" (with the paired difference and
    its ``verdict``; "inconclusive" with a ``note`` when the cell failed the convergence check),
    "not run" (no record of a cell, or no cell matches) or "not available" (the cell's records do
    not have both strategies; kept only when no cell of the claim is measured or waiting to run)."""
    out = []
    for claim in claims:
        recs = [r for r in records if r["experiment"] == claim.experiment]
        checked = convergence(recs, claim.experiment)
        measured, waiting, unavailable = [], [], []
        for cell, factors, _ in _cell_rows(recs, claim.experiment, experiments):
            if not claim.matches(factors):
                continue
            base = {"claim": claim, "cell": cell, "factors": factors}
            cell_recs = [r for r in recs if r["cell"] == cell]
            if not cell_recs:
                waiting.append(dict(base, status=NOT_RUN))
                continue
            diff = paired_difference(recs, claim.experiment, cell, claim.strategy_a, claim.strategy_b, claim.metric)
            if diff["n"] == 0:
                unavailable.append(dict(base, status="not available", reason=_why_unavailable(cell_recs, claim)))
                continue
            row = dict(base, status="measured", difference=diff,
                       verdict=verdict(diff["mean"], diff["std"], diff["n"], claim.expected_sign))
            check = checked.get(cell)
            if check and not check["converged"]:
                row.update(verdict=INCONCLUSIVE, note=_unconverged(check))
            measured.append(row)
        chosen = (measured + waiting) or unavailable
        out += chosen or [{"claim": claim, "cell": None, "factors": None, "status": NOT_RUN}]
    return out


def _unconverged(check: Mapping[str, Any]) -> str:
    return (f"unconverged: final loss {check['loss']:.3f} is {check['ratio']:.3f}× that of {check['reference_cell']} "
            f"({check['reference_loss']:.3f}; at most {CONVERGENCE_RATIO}× allowed)")


def _why_unavailable(cell_recs: List[dict], claim: Claim) -> str:
    for strategy in (claim.strategy_a, claim.strategy_b):
        entries = [_entry(r, strategy) for r in cell_recs]
        if all(e is None for e in entries):
            return f"{strategy} not evaluated"
        reasons = sorted({str(e.get("reason") or "no reason given") for e in entries
                          if e is not None and not e.get("available")})
        if reasons:
            return f"{strategy}: {'; '.join(reasons)}"
    return f"no {'/'.join(claim.metric)} for both strategies on one seed"


# ------------------------------------------------------------------------------------------ figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _label(factors: Mapping[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={factors.get(k, '—')}" for k in keys)


def _varying(factor_dicts: List[Mapping[str, Any]]) -> List[str]:
    return [k for k in _factor_order(factor_dicts) if len({repr(f.get(k)) for f in factor_dicts}) > 1]


def _grouping(factor_dicts: List[Mapping[str, Any]], axis: str) -> List[str]:
    """The varying factors that split a figure's lines or panels: all but the x-axis factor and the
    factors that only rename it (one value for each of its values and back, e.g. the scene set's
    name and its diversity), which would otherwise cut every line into single points."""
    def determines(a, b):
        seen = {}
        return all(seen.setdefault(repr(f.get(a)), repr(f.get(b))) == repr(f.get(b)) for f in factor_dicts)

    return [k for k in _varying(factor_dicts) if k != axis and not (determines(axis, k) and determines(k, axis))]


def _plot_ap_vs_images(summary: List[dict], experiment: str, path: str) -> str:
    plt = _pyplot()
    summary = [s for s in summary if "images_per_batch" in s["factors"] and s["n"]]
    panel_keys = _grouping([s["factors"] for s in summary], "images_per_batch")
    # one panel per combination of the other varying factors: {panel: (its factors, {strategy: points})}
    panels: Dict[tuple, Tuple[Mapping[str, Any], Dict[str, list]]] = {}
    for s in summary:
        panel = tuple(_value_key(k, s["factors"].get(k)) for k in panel_keys)
        _, lines = panels.setdefault(panel, (s["factors"], {}))
        lines.setdefault(s["strategy"], []).append(
            (s["factors"]["images_per_batch"], s["bbox"]["mean"], s["bbox"]["std"] or 0.0))
    sizes = sorted({s["factors"]["images_per_batch"] for s in summary})
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, sorted(panels)):
        factors, lines = panels[panel]
        for strategy, pts in lines.items():
            pts = sorted(pts)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                        marker="o", capsize=3, label=strategy)
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
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def _plot_discrepancy_vs_diversity(summary: List[dict], experiment: str, path: str) -> str:
    plt = _pyplot()
    summary = [s for s in summary if s["strategy"] == REFERENCE and "diversity" in s["factors"]
               and s["discrepancy_l1"]["n"]]
    line_keys = _grouping([s["factors"] for s in summary], "diversity")
    values = sorted({s["factors"]["diversity"] for s in summary}, key=lambda v: _value_key("diversity", v))
    numeric = all(_is_number(v) for v in values)
    position = {v: (float(v) if numeric else i) for i, v in enumerate(values)}
    lines: Dict[tuple, list] = {}
    for s in summary:
        key = tuple(_value_key(k, s["factors"].get(k)) for k in line_keys)
        d = s["discrepancy_l1"]
        x = position[s["factors"]["diversity"]]
        lines.setdefault(key, []).append((x, d["mean"], d["std"] or 0.0, s["factors"]))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key in sorted(lines):
        pts = sorted(lines[key], key=lambda p: p[0])
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=_label(pts[0][3], line_keys) or REFERENCE)
    ax.set_xticks([position[v] for v in values])
    ax.set_xticklabels([str(v) for v in values])
    ax.set_xlabel("scene diversity")
    ax.set_ylabel("train–test discrepancy (L1, EMA)")
    ax.set_title(f"{experiment}: discrepancy of EMA statistics (mean ± std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def make_figures(records: Sequence[dict], figures_dir: str) -> Dict[str, List[str]]:
    """Per experiment, the figures its records support, written atomically into ``figures_dir``:
    ``<experiment>_ap_vs_images_per_batch.png`` (box AP against images per batch, one line per
    strategy, one panel per combination of the other varying factors, error bars the std over seeds)
    when the factor ``images_per_batch`` takes more than one value, and
    ``<experiment>_discrepancy_vs_diversity.png`` (``discrepancy_l1`` of EMA statistics against the
    factor ``diversity``) when that factor is present with a measured discrepancy. Returns
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
        if paths:
            out[experiment] = paths
    return out


# ----------------------------------------------------------------------------------------- markdown
def _fmt(stats: Optional[Mapping[str, Any]], signed: bool = False, spec: str = ".2f") -> Optional[str]:
    """ "mean ± std (n)"; "mean (1)" for one seed; None without values."""
    if not stats or not stats["n"]:
        return None
    mean = format(stats["mean"], ("+" if signed else "") + spec)
    if stats["std"] is None:
        return f"{mean} ({stats['n']})"
    return f"{mean} ± {format(stats['std'], spec)} ({stats['n']})"


def _escape(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: List[str], body: List[List[str]]) -> str:
    lines = ["| " + " | ".join(map(_escape, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(_escape, row)) + " |" for row in body]
    return "\n".join(lines)


def _missing(cell_recs: List[dict], planned: Optional[Tuple[str, ...]], strategy: str) -> str:
    """What an empty table entry means: not run yet, not planned for the cell, or unavailable."""
    if not cell_recs:
        return NOT_RUN
    entries = [e for e in (_entry(r, strategy) for r in cell_recs) if e is not None]
    if entries:
        return NOT_AVAILABLE
    if planned is not None and strategy not in planned:
        return NOT_PLANNED
    return NOT_RUN


def _experiment_section(records: List[dict], experiment: str, experiments: Sequence[Any], reference: str,
                        figures: Sequence[str], markdown_dir: str) -> List[str]:
    recs = [r for r in records if r["experiment"] == experiment]
    cells = _cell_rows(recs, experiment, experiments)
    parts = [f"### Experiment {experiment}"]
    for exp in experiments:
        if exp.name == experiment and getattr(exp, "description", ""):
            parts.append(exp.description)
    if not cells:
        parts.append(f"{experiment}: {NOT_RUN}.")
        return parts
    factor_dicts = [f for _, f, _ in cells]
    varying = _varying(factor_dicts)
    constant = {k: factor_dicts[0][k] for k in _factor_order(factor_dicts)
                if k not in varying and all(k in f for f in factor_dicts)}
    seeds = sorted({r["seed"] for r in recs})
    commits = sorted({str(r.get("commit", "unknown"))[:10] for r in recs})
    dirty = sum(1 for r in recs if r.get("dirty"))
    parts.append(
        f"{len(recs)} records: {len({r['cell'] for r in recs})} of {len(cells)} cells run"
        + (f", seeds {', '.join(map(str, seeds))}" if seeds else "")
        + (f"; commit {', '.join(commits)}" if commits else "")
        + (f"; {dirty} from a tree with uncommitted changes" if dirty else "") + "."
        + (" Same in every cell: " + ", ".join(f"{k} = {v}" for k, v in constant.items()) + "." if constant else ""))
    planned = [s for _, _, p in cells for s in (p or ())]
    strategies = _strategies(recs, planned, reference)
    summary = {(s["cell"], s["strategy"]): s for s in summarize(recs, experiment)}
    checked = convergence(recs, experiment)

    def table(columns: List[str], entry, headers: Optional[List[str]] = None) -> str:
        """Rows: cells (marked when unconverged) and their varying factors; then ``entry(cell,
        cell's records, planned strategies, column)`` per column."""
        body = []
        for cell, factors, plan in cells:
            cell_recs = [r for r in recs if r["cell"] == cell]
            unconverged = cell in checked and not checked[cell]["converged"]
            body.append([f"{cell} (unconverged)" if unconverged else cell]
                        + [str(factors.get(k, "—")) for k in varying]
                        + [entry(cell, cell_recs, plan, column) for column in columns])
        return _table(["cell"] + varying + (headers or columns), body)

    tasks = ["bbox"] + (["segm"] if any(s["segm"] for s in summary.values()) else [])
    for task in tasks:
        parts.append(f"{TASK_LABEL[task]} (COCO, %): mean ± std over seeds (number of seeds)")
        parts.append(table(strategies, lambda cell, cell_recs, plan, strategy: (
            _fmt(summary.get((cell, strategy), {}).get(task)) or _missing(cell_recs, plan, strategy))))
    others = [s for s in strategies if s != reference]
    if reference in strategies and others:
        for task in tasks:
            parts.append(f"Paired difference to {reference}, {TASK_LABEL[task]}: per seed on the same checkpoint, "
                         f"strategy − {reference}, then mean ± std (number of seeds)")
            parts.append(table(others, lambda cell, cell_recs, plan, strategy: (
                _fmt(paired_difference(recs, experiment, cell, strategy, reference, (task, "AP")), signed=True)
                or _missing(cell_recs, plan, strategy)), [f"{s} − {reference}" for s in others]))
    with_discrepancy = [s for s in strategies
                        if any(v["strategy"] == s and v["discrepancy_l1"]["n"] for v in summary.values())]
    if with_discrepancy:
        parts.append("Train–test discrepancy (discrepancy_l1: mean over layers of mean |x̂_train − x̂_eval|, the "
                     "layer input normalized with batch statistics and with the strategy's): mean ± std "
                     "(number of seeds)")
        parts.append(table(with_discrepancy, lambda cell, cell_recs, plan, strategy: (
            _fmt(summary.get((cell, strategy), {}).get("discrepancy_l1"), spec=".4g")
            or _missing(cell_recs, plan, strategy))))
    if checked:
        parts.append(f"Convergence check (final total loss against the smallest images per batch, at most "
                     f"{CONVERGENCE_RATIO}×):\n" + "\n".join(
                         f"- {cell}: {c['loss']:.3f} vs {c['reference_cell']} {c['reference_loss']:.3f}, "
                         f"{c['ratio']:.3f}×: {'converged' if c['converged'] else '**unconverged**'}"
                         for cell, c in ((cell, checked[cell]) for cell, _, _ in cells if cell in checked)))
    notes = [f"{cell}, {strategy}: {'; '.join(summary[(cell, strategy)]['reasons'])}"
             for cell, _, _ in cells for strategy in strategies if summary.get((cell, strategy), {}).get("reasons")]
    if notes:
        parts.append(f"{NOT_AVAILABLE}: the strategy could not be applied to that model:\n"
                     + "\n".join(f"- {_escape(n)}" for n in notes))
    for path in figures:
        rel = os.path.relpath(path, markdown_dir).replace(os.sep, "/")
        name = os.path.splitext(os.path.basename(path))[0]
        parts.append(f"![{name}]({rel})")
    return parts


def _claims_section(records: List[dict], claims: Sequence[Claim], experiments: Sequence[Any]) -> List[str]:
    expected = {1: "a > b", -1: "a < b", 0: "a ≈ b"}
    body = []
    described = set()
    for row in evaluate_claims(records, claims, experiments):
        claim = row["claim"]
        # a claim checked in several cells is described on its first row only
        text = f"**{claim.id}**" if claim.id in described else f"**{claim.id}**: {claim.text} ({claim.paper})"
        described.add(claim.id)
        comparison = f"a = {claim.strategy_a}, b = {claim.strategy_b} ({' '.join(claim.metric)})"
        where = f"{claim.experiment}/{row['cell']}" if row["cell"] else (
            f"{claim.experiment}: " + ", ".join(f"{k} = {v}" for k, v in claim.factors.items()))
        if row["status"] == "measured":
            measurement, result = _fmt(row["difference"], signed=True), row["verdict"]
            if row.get("note"):
                result = f"{result} ({row['note']})"
        elif row["status"] == NOT_RUN:
            measurement, result = NOT_RUN, NOT_RUN
        else:
            measurement, result = f"{NOT_AVAILABLE}: {row['reason']}", NOT_AVAILABLE
        body.append([text, where, comparison,
                     expected[claim.expected_sign], measurement, result])
    return [
        "### Claims",
        "Per claim and cell: the paired difference a − b per seed, then mean ± std (number of seeds). "
        "A claimed sign holds when the mean has that sign and |mean| > std, is inconclusive when "
        "|mean| <= std or with fewer than 2 seeds; a claimed equality (≈) holds when |mean| <= std.",
        _table(["claim (paper)", "cell", "comparison", "expected", "ours: a − b", "verdict"], body),
    ]


def render_markdown(records: Sequence[dict], claims: Sequence[Claim] = CLAIMS, figures_dir: Optional[str] = None,
                    markdown_dir: str = "docs", experiments: Sequence[Any] = (), reference: str = REFERENCE,
                    figures: Optional[Mapping[str, Sequence[str]]] = None) -> str:
    """The generated part of the report (without the markers) for ``records``.

    Per experiment (recorded, declared in ``experiments`` (``spec.Experiment``-like objects, whose
    cells without records show as "not run") or named by a claim): the AP table (rows: cells in
    factor order; columns: strategies; "mean ± std (n)"), the paired differences to ``reference``,
    and links to its figures; then the claims table. Figures are written into ``figures_dir`` by
    :func:`make_figures` unless ``figures`` ({experiment: paths}) is given; links are relative to
    ``markdown_dir``, the folder of the markdown file."""
    records = list(records)
    if figures is None:
        figures = make_figures(records, figures_dir) if figures_dir else {}
    names = sorted({r["experiment"] for r in records} | {e.name for e in experiments} | {c.experiment for c in claims})
    parts = [f"Generated from {len(records)} result records by `python -m bnstats_lab.experiments.report`; "
             "edit the text outside the markers, not this part. Entries: mean ± sample std over seeds "
             f"(number of seeds); \"{NOT_RUN}\": not trained yet; \"{NOT_AVAILABLE}\": the strategy does not apply "
             f"to that model; \"{NOT_PLANNED}\": not planned for that cell."]
    for name in names:
        parts += _experiment_section(records, name, experiments, reference, figures.get(name, ()), markdown_dir)
    parts += _claims_section(records, claims, experiments)
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------ writing
HEADER = """# Results

The protocol and the discussion are written by hand above and below the markers;
`python -m bnstats_lab.experiments.report` rewrites only what lies between them.

"""


def _splice(existing: str, generated: str, path: str) -> str:
    begins, ends = existing.count(BEGIN), existing.count(END)
    if begins == 0 and ends == 0:
        return existing.rstrip("\n") + "\n\n" + generated + "\n"
    if begins == 1 and ends == 1 and existing.index(BEGIN) < existing.index(END):
        start, stop = existing.index(BEGIN), existing.index(END) + len(END)
        return existing[:start] + generated + existing[stop:]
    raise ValueError(f"{path}: expected one {BEGIN} followed by one {END}, found {begins} and {ends} "
                     "(in that order or not); fix the markers by hand, the generated part goes between them")


def write_report(results_root: str = "results", output_md: str = "docs/results.md",
                 figures_dir: str = "docs/results", claims: Sequence[Claim] = CLAIMS,
                 experiments: Sequence[Any] = ()) -> Tuple[str, List[str], int]:
    """Write the report: the figures, then ``output_md`` atomically, its generated part between
    :data:`BEGIN` and :data:`END` (the rest of an existing file is kept; a file without markers gets
    them appended; a new file gets a short header). Without ``results_root`` every cell is "not
    run". Returns (``output_md``, figure paths, number of records)."""
    records = load_records(results_root) if os.path.isdir(results_root) else []
    figures = make_figures(records, figures_dir)
    markdown_dir = os.path.dirname(os.path.abspath(output_md))
    figures = {k: [os.path.abspath(p) for p in v] for k, v in figures.items()}
    body = render_markdown(records, claims, figures_dir, markdown_dir, experiments, figures=figures)
    generated = f"{BEGIN}\n{body}{END}"
    if os.path.exists(output_md):
        with open(output_md, encoding="utf-8") as f:
            text = _splice(f.read(), generated, output_md)
    else:
        text = HEADER + generated + "\n"
    write_text(output_md, text)
    return output_md, [p for paths in figures.values() for p in paths], len(records)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnstats_lab.experiments.report",
                                     description="Write the experiments' tables, claims and figures into the "
                                                 "generated part of the results page.")
    parser.add_argument("--results", default="results", help="folder of <experiment>/<cell>/seed<k>.json records")
    parser.add_argument("--output", default="docs/results.md",
                        help="the markdown page (text outside the markers is kept)")
    parser.add_argument("--figures", default="docs/results", help="folder for the figures (PNG)")
    parser.add_argument("--catalog", default=None,
                        help="a module or .py file declaring EXPERIMENTS, whose cells without records show as "
                             f"'{NOT_RUN}' (default: the lab's)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.results):
        print(f"no results folder {args.results}: every cell is reported as {NOT_RUN}")
    try:
        experiments = list(load_experiments(args.catalog).values())
        path, figure_paths, n = write_report(args.results, args.output, args.figures, experiments=experiments)
    except (ImportError, FileNotFoundError, ValueError) as e:  # RecordError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({n} records)")
    for p in figure_paths:
        rel = os.path.relpath(p)
        print(f"wrote {p if rel.startswith('..') else rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
