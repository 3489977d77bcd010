"""The layout of the report's tables: which cells an experiment shows, in which order, and which
strategies, the reference first.

An experiment's cells are the declared ones (objects with ``name`` and ``cells``, each cell with
``name``, ``factors`` and ``strategies``, as in ``spec.Experiment``) and the recorded ones. They are
ordered by their factors: first those of :data:`FACTOR_ORDER` in that order (the papers' layout
groups by setting, then images per batch), then the rest alphabetically; a factor's values in the
config matrix's order for settings, by value for numbers, else in the order the experiment declares
them. Records are written with sorted keys, so their own order says nothing.
"""
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..config_matrix import ALL_SETTINGS
from .records import is_number

__all__ = ["REFERENCE", "FACTOR_ORDER", "cell_rows", "factor_order", "strategy_order", "value_key", "varying_factors"]

REFERENCE = "ema"
FACTOR_ORDER = ("setting", "images_per_batch", "scenes", "diversity", "norm")
VALUE_ORDER = {"setting": ALL_SETTINGS}


def strategy_order(records: Iterable[dict], planned: Iterable[str] = (), reference: str = REFERENCE) -> List[str]:
    """Strategy names in the order the records list them, the reference first."""
    names: List[str] = []
    for name in list(planned) + [e["strategy"] for r in records for e in r["strategies"]]:
        if name not in names:
            names.append(name)
    return sorted(names, key=lambda n: n != reference)  # stable: the rest keep their order


def _planned_cells(experiments: Sequence[Any], experiment: str) -> List[Tuple[str, Dict[str, Any], Tuple[str, ...]]]:
    """(cell, factors, strategies) of an experiment's declaration."""
    for exp in experiments:
        if exp.name == experiment:
            return [(c.name, dict(c.factors), tuple(c.strategies)) for c in exp.cells]
    return []


def factor_order(factor_dicts: Iterable[Mapping[str, Any]]) -> List[str]:
    keys = sorted({k for f in factor_dicts for k in f})
    return [k for k in FACTOR_ORDER if k in keys] + [k for k in keys if k not in FACTOR_ORDER]


def value_key(factor: str, value, declared: Mapping[str, List[Any]] = None) -> tuple:
    """Sort key of a factor's value: the settings in the config matrix's order, numbers by value,
    other strings in the order the experiment declares them, then alphabetically."""
    order = VALUE_ORDER.get(factor, ())
    if value in order:
        return (0, order.index(value), "")
    if is_number(value):
        return (1, float(value), "")
    listed = (declared or {}).get(factor, [])
    if value in listed:
        return (2, listed.index(value), "")
    return (3, 0.0, str(value))


def cell_rows(recs: List[dict], experiment: str, experiments: Sequence[Any]):
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
    order = factor_order(f for f, _ in cells.values())

    def key(item):
        name, (factors, _) = item
        return tuple((0, value_key(k, factors[k], declared)) if k in factors else (1, ()) for k in order) + (name,)

    return [(name, factors, strategies) for name, (factors, strategies) in sorted(cells.items(), key=key)]


def varying_factors(factor_dicts: List[Mapping[str, Any]]) -> List[str]:
    """The factors that take more than one value across the cells, in table order."""
    return [k for k in factor_order(factor_dicts) if len({repr(f.get(k)) for f in factor_dicts}) > 1]


def fmt_interval(diff: Mapping[str, Any]) -> Optional[str]:
    """ "mean [95% interval] (n)" of a paired difference ("n_a vs n_b seeds" for two trainings);
    "mean (n)" without an interval; None without values."""
    if not diff or diff.get("mean") is None:
        return None
    ci = diff.get("ci95")
    interval = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
    seeds = f"{len(diff['values_a'])} vs {len(diff['values_b'])} seeds" if "values_a" in diff else str(diff["n"])
    return f"{diff['mean']:+.2f}{interval} ({seeds})"
