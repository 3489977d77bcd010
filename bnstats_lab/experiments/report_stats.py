"""The report's statistics: per-cell summaries over seeds, paired differences with their confidence
intervals, the verdict rule, the convergence check and the claims' evaluation.

Statistics: the mean and the sample standard deviation (ddof = 1) over seeds; one seed has no
standard deviation. A paired difference is taken per seed on one checkpoint (the two strategies
evaluated on the same weights), so the seed-to-seed variation of training cancels out of it; its
95% interval is Student's t interval of the mean of the per-seed differences. Two different
trainings share no checkpoint: their unpaired difference is the difference of the cells' means,
with Welch's t interval (:mod:`bnstats_lab.intervals`).

The verdict rule (docs/results.md, "Revision"): fewer than :data:`MIN_SEEDS` seeds is inconclusive; a
claimed sign holds when the 95% interval lies entirely on the claimed side of 0, does not hold when
it lies entirely on the other side, and is inconclusive otherwise; a claimed equality is judged by
two one-sided tests against ±:data:`EQUIVALENCE_MARGIN` box AP: it holds when the 90% interval lies
inside the margin, does not hold when the 95% interval lies entirely outside it, and is inconclusive
otherwise. :func:`spread_verdict` is the rule the page used before the revision (|mean| against the
sample standard deviation of the differences), kept to show both verdicts side by side.

Convergence check on the batch-size axis: a cell with more images per batch than the experiment's
smallest is compared with its counterpart at the smallest (the same other factors) by the final
detection loss (the training loss without the norms' auxiliary losses, each record's median of the
last logged values, averaged over seeds); above :data:`CONVERGENCE_RATIO` times the counterpart's it
is marked unconverged in the tables, and the claims judged on it are inconclusive. Before the
revision the check used the total loss, auxiliary losses included (``loss="total"``).
"""
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from d2_bnstats.d2.losses import AUXILIARY_LOSS_KEYS, DETECTION_LOSS_KEY

from ..intervals import mean_interval, slope_interval, welch_interval
from .claims import CLAIMS, Claim, TrainingsClaim, TrendClaim
from .records import is_number, metric_value, strategy_entry
from .report_layout import cell_rows, strategy_order

__all__ = [
    "HOLDS",
    "DOES_NOT_HOLD",
    "INCONCLUSIVE",
    "NOT_RUN",
    "CONVERGENCE_RATIO",
    "EQUIVALENCE_MARGIN",
    "MIN_SEEDS",
    "summarize",
    "paired_difference",
    "unpaired_difference",
    "verdict",
    "spread_verdict",
    "trend",
    "convergence",
    "evaluate_claims",
]

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
NOT_RUN = "not run"
CONVERGENCE_RATIO = 1.1
MIN_SEEDS = 3  # a verdict on fewer seeds is inconclusive
EQUIVALENCE_MARGIN = 0.5  # box AP; a claimed equality must be shown within ±0.5 (docs/results.md, "Revision")


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


def summarize(records: Iterable[dict], experiment: str) -> List[dict]:
    """Per cell and strategy of ``experiment``: ``n`` (seeds with a box AP), ``seeds``, and for
    ``bbox`` (box AP), ``segm`` (mask AP; None when no seed has one) and ``discrepancy_l1``: a dict
    with ``n``, ``mean``, sample ``std`` (ddof = 1, None for n = 1) and the per-seed ``values``.
    ``reasons``: why the strategy was unavailable on some seeds. Cells in table order."""
    recs = [r for r in records if r["experiment"] == experiment]
    cells = cell_rows(recs, experiment, [])
    out = []
    for cell, factors, _ in cells:
        cell_recs = sorted((r for r in recs if r["cell"] == cell), key=lambda r: r["seed"])
        for strategy in strategy_order(cell_recs):
            entries = [(r["seed"], strategy_entry(r, strategy)) for r in cell_recs]
            entries = [(s, e) for s, e in entries if e is not None]
            measured = [(s, metric_value(e, ("bbox", "AP"))) for s, e in entries]
            measured = [(s, v) for s, v in measured if v is not None]
            segm = [v for v in (metric_value(e, ("segm", "AP")) for _, e in entries) if v is not None]
            disc = [float(e["discrepancy_l1"]) for _, e in entries
                    if e.get("available") and is_number(e.get("discrepancy_l1"))]
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
        a = metric_value(strategy_entry(record, strategy_a), metric)
        b = metric_value(strategy_entry(record, strategy_b), metric)
        if a is not None and b is not None:
            seeds.append(record["seed"])
            values.append(a - b)
    mean, std = _mean_std(values)
    return {"experiment": experiment, "cell": cell, "strategy_a": strategy_a, "strategy_b": strategy_b,
            "metric": tuple(metric), "n": len(values), "mean": mean, "std": std, "seeds": seeds, "values": values,
            **_intervals(lambda level: mean_interval(values, level))}


def _intervals(interval) -> Dict[str, Any]:
    """``ci95`` and ``ci90`` (each (low, high), or None) and ``df`` of ``interval(level)``."""
    ci95, ci90 = interval(0.95), interval(0.90)
    return {"ci95": (ci95["low"], ci95["high"]) if ci95 else None,
            "ci90": (ci90["low"], ci90["high"]) if ci90 else None, "df": ci95["df"] if ci95 else None}


def _cell_values(records: Iterable[dict], experiment: str, cell: str, strategy: str,
                 metric: Tuple[str, str]) -> Tuple[List[int], List[float]]:
    seeds, values = [], []
    for record in sorted((r for r in records if r["experiment"] == experiment and r["cell"] == cell),
                         key=lambda r: r["seed"]):
        value = metric_value(strategy_entry(record, strategy), metric)
        if value is not None:
            seeds.append(record["seed"])
            values.append(value)
    return seeds, values


def unpaired_difference(records: Iterable[dict], a: Tuple[str, str, str], b: Tuple[str, str, str],
                        metric: Tuple[str, str] = ("bbox", "AP")) -> dict:
    """``metric`` of two different trainings, ``a`` and ``b`` each (experiment, cell, strategy): the
    difference of the cells' means over seeds, ``std`` = √(sd_a² + sd_b²) (the standard deviation of
    the difference of two independent trainings; None unless both cells have 2 seeds or more),
    Welch's ``ci95`` and ``ci90`` and ``n`` = the smaller number of seeds, with each side's ``seeds``
    and ``values``."""
    records = list(records)
    seeds_a, values_a = _cell_values(records, *a, metric)
    seeds_b, values_b = _cell_values(records, *b, metric)
    mean_a, std_a = _mean_std(values_a)
    mean_b, std_b = _mean_std(values_b)
    mean = None if mean_a is None or mean_b is None else mean_a - mean_b
    std = None if std_a is None or std_b is None else math.sqrt(std_a ** 2 + std_b ** 2)
    return {"a": tuple(a), "b": tuple(b), "metric": tuple(metric), "n": min(len(values_a), len(values_b)),
            "mean": mean, "std": std, "seeds_a": seeds_a, "values_a": values_a, "seeds_b": seeds_b,
            "values_b": values_b, **_intervals(lambda level: welch_interval(values_a, values_b, level))}


def verdict(difference: Mapping[str, Any], expected_sign: int, margin: float = EQUIVALENCE_MARGIN,
            min_seeds: int = MIN_SEEDS) -> str:
    """Whether a difference (:func:`paired_difference` or :func:`unpaired_difference`: ``n``, ``ci95``,
    ``ci90``) supports a claim.

    - ``n < min_seeds`` or no interval: "inconclusive".
    - ``expected_sign`` +1 or −1 (a difference of that sign is claimed): "holds" when the 95% interval
      lies entirely on the claimed side of 0, "does not hold" when entirely on the other side,
      "inconclusive" when it contains 0.
    - ``expected_sign`` 0 (no difference is claimed; two one-sided tests at 5% each): "holds" when the
      90% interval lies inside (−margin, +margin), "does not hold" when the 95% interval lies entirely
      outside [−margin, +margin], "inconclusive" otherwise.
    """
    if expected_sign not in (-1, 0, 1):
        raise ValueError(f"expected_sign must be -1, 0 or +1, got {expected_sign!r}")
    ci95, ci90 = difference.get("ci95"), difference.get("ci90")
    if difference.get("n", 0) < min_seeds or ci95 is None or ci90 is None or not all(map(math.isfinite, ci95 + ci90)):
        return INCONCLUSIVE
    low, high = ci95
    if expected_sign == 0:
        if -margin < ci90[0] and ci90[1] < margin:
            return HOLDS
        return DOES_NOT_HOLD if low > margin or high < -margin else INCONCLUSIVE
    if low > 0 or high < 0:
        return HOLDS if (low > 0) == (expected_sign > 0) else DOES_NOT_HOLD
    return INCONCLUSIVE


def spread_verdict(mean: Optional[float], std: Optional[float], n: int, expected_sign: int) -> str:
    """The verdict rule used before the revision, kept to show the old verdicts beside the new ones.

    - ``n < 2``, or a missing / non-finite mean or std: "inconclusive".
    - ``expected_sign`` +1 or −1: "inconclusive" if ``|mean| <= std``; otherwise "holds" when the sign
      of the mean is the expected one, "does not hold" when it is the opposite.
    - ``expected_sign`` 0: "holds" when ``|mean| <= std``, "does not hold" otherwise.
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


# ------------------------------------------------------------------------------------- convergence
def final_loss(record: dict, loss: str = "detection") -> Optional[float]:
    """A record's final training loss: ``"detection"`` (the logged ``detection_loss``; for records
    from before it was logged, the total minus the auxiliary losses' medians) or ``"total"``."""
    train = record.get("train")
    losses = train.get("final_losses") if isinstance(train, dict) else None
    if not isinstance(losses, dict):
        return None
    if loss == "total":
        value = losses.get("total_loss")
        return float(value) if is_number(value) else None
    if loss != "detection":
        raise ValueError(f"loss is 'detection' or 'total', got {loss!r}")
    if is_number(losses.get(DETECTION_LOSS_KEY)):
        return float(losses[DETECTION_LOSS_KEY])
    total = losses.get("total_loss")
    if not is_number(total):
        return None
    return float(total) - sum(float(losses[k]) for k in AUXILIARY_LOSS_KEYS if is_number(losses.get(k)))


def convergence(records: Iterable[dict], experiment: str, ratio: float = CONVERGENCE_RATIO,
                loss: str = "detection") -> Dict[str, dict]:
    """The protocol's convergence check on the batch-size axis, per cell of ``experiment`` with more
    images per batch than its smallest: ``loss`` (the mean over seeds of the records' final ``loss``,
    see :func:`final_loss`), ``reference_cell`` (the same other factors at the smallest images per
    batch) and its ``reference_loss``, their ``ratio`` and ``converged`` (ratio <= ``ratio``). Cells
    without a counterpart or without losses are left out."""
    recs = [r for r in records if r["experiment"] == experiment and is_number(r["factors"].get("images_per_batch"))]
    if not recs:
        return {}
    smallest = min(r["factors"]["images_per_batch"] for r in recs)
    losses: Dict[str, List[float]] = {}
    factors: Dict[str, Dict[str, Any]] = {}
    for r in recs:
        factors[r["cell"]] = r["factors"]
        value = final_loss(r, loss)
        if value is not None:
            losses.setdefault(r["cell"], []).append(value)
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
                     "ratio": value, "converged": value <= ratio, "kind": loss}
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
        if isinstance(claim, TrainingsClaim):
            out += _evaluate_trainings_claim(records, claim, experiments)
            continue
        if isinstance(claim, TrendClaim):
            out.append(_evaluate_trend_claim(records, claim, experiments))
            continue
        recs = [r for r in records if r["experiment"] == claim.experiment]
        checked = _convergence_checks(recs, claim.experiment)
        measured, waiting, unavailable = [], [], []
        for cell, factors, _ in cell_rows(recs, claim.experiment, experiments):
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
            measured.append(_measured_row(base, diff, claim, cell, checked))
        out += _chosen_rows(claim, measured, waiting, unavailable)
    return out


def _convergence_checks(records: Sequence[dict], experiment: str) -> Dict[str, Dict[str, dict]]:
    """The convergence check as revised (``"detection"`` loss) and as before the revision (``"total"``)."""
    return {kind: convergence(records, experiment, loss=kind) for kind in ("detection", "total")}


def _measured_row(base: dict, diff: dict, claim: Any, checked_cell: str, checks: Mapping[str, Mapping[str, dict]]) -> dict:
    """A claim's row with its difference, its ``verdict`` (the revised rule) and ``previous_verdict``
    (the rule before the revision, with its convergence check on the total loss); each inconclusive
    when its convergence check of ``checked_cell`` (the cell the batch-size axis compares) failed."""
    previous_verdict = None if getattr(claim, "declared_with_revision", False) else spread_verdict(
        diff["mean"], diff["std"], diff["n"], claim.expected_sign)
    row = dict(base, status="measured", difference=diff, verdict=verdict(diff, claim.expected_sign),
               previous_verdict=previous_verdict)
    check = checks["detection"].get(checked_cell)
    if check and not check["converged"]:
        row.update(verdict=INCONCLUSIVE, note=_unconverged(check))
    previous = checks["total"].get(checked_cell)
    if previous and not previous["converged"] and previous_verdict is not None:
        row.update(previous_verdict=INCONCLUSIVE)
    return row


def _chosen_rows(claim: Any, measured: List[dict], waiting: List[dict], unavailable: List[dict]) -> List[dict]:
    """The measured and not-yet-run rows; the unavailable ones only when there is neither; one
    "not run" row when no cell matches."""
    chosen = (measured + waiting) or unavailable
    return chosen or [{"claim": claim, "cell": None, "cell_b": None, "factors": None, "status": NOT_RUN}]


def _evaluate_trainings_claim(records: Sequence[dict], claim: TrainingsClaim, experiments: Sequence[Any]) -> List[dict]:
    """:func:`evaluate_claims`'s rows for a claim about two trainings; ``cell_b`` names the counterpart."""
    recs_a = [r for r in records if r["experiment"] == claim.experiment]
    recs_b = [r for r in records if r["experiment"] == claim.experiment_b]
    cells_b = cell_rows(recs_b, claim.experiment_b, experiments)
    checked = _convergence_checks(recs_b, claim.experiment_b)
    measured, waiting, unavailable = [], [], []
    for cell, factors, _ in cell_rows(recs_a, claim.experiment, experiments):
        if not claim.matches(factors):
            continue
        counterparts = [c for c, f, _ in cells_b if claim.matches_b(factors, f)]
        base = {"claim": claim, "cell": cell, "factors": factors,
                "cell_b": counterparts[0] if len(counterparts) == 1 else None}
        if len(counterparts) != 1:
            reason = (f"no cell of {claim.experiment_b} matches" if not counterparts
                      else f"{len(counterparts)} cells of {claim.experiment_b} match: {', '.join(counterparts)}")
            unavailable.append(dict(base, status="not available", reason=reason))
            continue
        cell_b = counterparts[0]
        if not any(r["cell"] == cell for r in recs_a) or not any(r["cell"] == cell_b for r in recs_b):
            waiting.append(dict(base, status=NOT_RUN))
            continue
        diff = unpaired_difference(records, (claim.experiment, cell, claim.strategy_a),
                                   (claim.experiment_b, cell_b, claim.strategy_b), claim.metric)
        if diff["mean"] is None:
            side = claim.strategy_a if not diff["values_a"] else claim.strategy_b
            unavailable.append(dict(base, status="not available", reason=f"no {'/'.join(claim.metric)} of {side}"))
            continue
        measured.append(_measured_row(base, diff, claim, cell_b, checked))
    return _chosen_rows(claim, measured, waiting, unavailable)


def trend(records: Sequence[dict], experiment: str, cells: Sequence[str], x: str, strategy_a: str, strategy_b: str,
          metric: Tuple[str, str] = ("bbox", "AP")) -> dict:
    """The paired differences ``strategy_a − strategy_b`` of ``cells`` (per seed, on the same
    checkpoints) against each cell's factor ``x``: ``points`` [(x, difference)], ``per_cell`` (each
    cell's :func:`paired_difference`) and the least-squares ``slope`` with its 95% interval ``ci95``
    (None for fewer than 3 points or a single level)."""
    per_cell = {cell: paired_difference(records, experiment, cell, strategy_a, strategy_b, metric) for cell in cells}
    points = []
    for cell, diff in per_cell.items():
        level = next((r["factors"].get(x) for r in records if r["experiment"] == experiment and r["cell"] == cell), None)
        if is_number(level):
            points += [(float(level), v) for v in diff["values"]]
    fit = slope_interval([p for p, _ in points], [v for _, v in points]) if points else None
    return {"points": points, "per_cell": per_cell, "slope": fit["mean"] if fit else None,
            "ci95": (fit["low"], fit["high"]) if fit else None}


def _evaluate_trend_claim(records: Sequence[dict], claim: TrendClaim, experiments: Sequence[Any]) -> dict:
    """One row: "not run" until every matching cell has a record; then the slope and its verdict
    (inconclusive while a cell has fewer than :data:`MIN_SEEDS` paired seeds)."""
    recs = [r for r in records if r["experiment"] == claim.experiment]
    cells = [cell for cell, factors, _ in cell_rows(recs, claim.experiment, experiments) if claim.matches(factors)]
    base = {"claim": claim, "cell": None, "cell_b": None, "factors": dict(claim.factors), "cells": cells}
    if not cells or any(not any(r["cell"] == c for r in recs) for c in cells):
        return dict(base, status=NOT_RUN)
    result = trend(recs, claim.experiment, cells, claim.x, claim.strategy_a, claim.strategy_b, claim.metric)
    seeds = min(d["n"] for d in result["per_cell"].values())
    ci = result["ci95"]
    if ci is None or seeds < MIN_SEEDS:
        outcome = INCONCLUSIVE
    elif ci[0] > 0 or ci[1] < 0:
        outcome = HOLDS if (ci[0] > 0) == (claim.expected_sign > 0) else DOES_NOT_HOLD
    else:
        outcome = INCONCLUSIVE
    row = dict(base, status="measured", trend=result, verdict=outcome, previous_verdict=None)
    if seeds < MIN_SEEDS:
        row["note"] = f"a cell has {seeds} seed(s), fewer than {MIN_SEEDS}"
    return row


def _unconverged(check: Mapping[str, Any]) -> str:
    return (f"unconverged: final {check['kind']} loss {check['loss']:.3f} is {check['ratio']:.3f}× that of {check['reference_cell']} "
            f"({check['reference_loss']:.3f}; at most {CONVERGENCE_RATIO}× allowed)")


def _why_unavailable(cell_recs: List[dict], claim: Claim) -> str:
    for strategy in (claim.strategy_a, claim.strategy_b):
        entries = [strategy_entry(r, strategy) for r in cell_recs]
        if all(e is None for e in entries):
            return f"{strategy} not evaluated"
        reasons = sorted({str(e.get("reason") or "no reason given") for e in entries
                          if e is not None and not e.get("available")})
        if reasons:
            return f"{strategy}: {'; '.join(reasons)}"
    return f"no {'/'.join(claim.metric)} for both strategies on one seed"
