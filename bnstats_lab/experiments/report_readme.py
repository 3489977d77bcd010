"""The README's "Which norm at 2 images per GPU" table, generated from the result records.

One row per choice a user makes at 2 images per batch on the benchmark scenes
(:data:`~bnstats_lab.experiments.catalog.BENCHMARK_SCENES`), a column each for random init and
fine-tuned, each entry box AP "mean ± std (n)" over seeds, as in a model zoo's table; the full tables
are in ``docs/results.md``. The rows of ``e1`` are one checkpoint (EvalNorm layers, 2 images)
evaluated under several inference strategies, so their last column is the paired difference to EMA
statistics on those same checkpoints; the rows of ``e2`` are other trainings and have none. ``e1``'s
8-image cell under EMA is the large-batch reference.

:func:`which_norm_entries` gives its data (also drawn by :mod:`.report_figures`),
:func:`render_which_norm` renders the table; :func:`splice_readme` and :func:`write_readme` put it
between :data:`BEGIN` and :data:`END` of the README and leave a README without them untouched.
"""
import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from d2_bnstats.outputs import write_text

from .catalog import BENCHMARK_SCENES, DIVERSITY
from .report_layout import cell_rows, fmt_interval
from .report_stats import NOT_RUN, convergence, paired_difference, summarize

__all__ = ["BEGIN", "END", "ROWS", "Row", "which_norm_entries", "render_which_norm", "has_markers", "splice_readme",
           "write_readme"]

BEGIN = "<!-- which-norm:begin -->"
END = "<!-- which-norm:end -->"
NOT_AVAILABLE, NOT_APPLICABLE = "n/a", "—"
REFERENCE = "ema"
SETTINGS = (("scratch", "random init"), ("finetune", "fine-tuned"))


@dataclasses.dataclass(frozen=True)
class Row:
    """One choice: per column of :data:`SETTINGS`, the cell of ``experiment`` whose factors contain
    ``factors`` and that column's entry of ``settings`` as its setting (None where the choice does not
    exist, e.g. FrozenBN from random init), evaluated under ``strategy``. ``paired``: the row is a
    strategy on the reference row's checkpoints, so it gets the paired difference to :data:`REFERENCE`."""

    label: str
    experiment: str
    factors: Tuple[Tuple[str, Any], ...]
    strategy: str = REFERENCE
    paired: bool = False
    settings: Tuple[Optional[str], ...] = ("scratch", "finetune")


def _benchmark(images: int = 2, **factors) -> Tuple[Tuple[str, Any], ...]:
    return (("images_per_batch", images), ("scenes", BENCHMARK_SCENES)) + tuple(factors.items())


def _e2(label: str, norm: str, **kwargs) -> Row:
    return Row(label, "e2", _benchmark(norm=norm, arch="frcnn"), **kwargs)


ROWS: Tuple[Row, ...] = (
    Row("BN + EMA statistics", "e1", _benchmark(), "ema", paired=True),
    Row("BN + PreciseBN", "e1", _benchmark(), "precise_bn:500", paired=True),
    Row("EvalNorm (learned)", "e1", _benchmark(), "evalnorm_learned", paired=True),
    Row("EvalNorm offline", "e1", _benchmark(), "evalnorm_offline:500", paired=True),
    Row("batch statistics at test", "e1", _benchmark(), "batch_stats:2", paired=True),
    _e2("MABN", "MABN"),
    _e2("GN", "GN"),
    _e2("SyncBN 2×1", "SyncBN"),
    _e2("GhostBN head", "GhostBN (box head)"),
    _e2("FrozenBN late", "BN, FrozenBN late"),
    _e2("FrozenBN (frozen setting)", "FrozenBN", settings=(None, "frozen")),
    _e2("Batch Renormalization", "BatchRenorm"),
    _e2("Cross-Iteration BN", "CrossIterBN"),
    _e2("GN + Weight Standardization", "GN+WS", settings=("scratch", None)),
    _e2("BN + Weight Standardization", "BN+WS", settings=("scratch", None)),
    _e2("Batch-Channel Normalization", "BCN", settings=("scratch", None)),
    Row("8 images per batch, BN + EMA (large-batch reference)", "e1", _benchmark(8)),
)


def _experiment_list(experiments: Union[Mapping[str, Any], Sequence[Any], None]) -> List[Any]:
    if not experiments:
        return []
    return list(experiments.values()) if isinstance(experiments, Mapping) else list(experiments)


def _cell(cells: List[Tuple[str, Dict[str, Any], Any]], factors: Mapping[str, Any], row: Row) -> Optional[str]:
    """The one declared or recorded cell with all of ``factors``; None when there is none."""
    matches = [name for name, f, _ in cells if all(k in f and f[k] == v for k, v in factors.items())]
    if len(matches) > 1:
        # two cells would give one entry two meanings: a declaration error, not a table to guess at
        raise ValueError(f"README table row {row.label!r}: cells {matches} of {row.experiment} all match "
                         f"{dict(factors)}; make the row's factors select one")
    return matches[0] if matches else None


def _fmt(stats: Optional[Mapping[str, Any]], signed: bool = False) -> Optional[str]:
    """ "mean ± std (n)"; "mean (1)" for one seed; None without values."""
    if not stats or not stats["n"]:
        return None
    mean = format(stats["mean"], "+.2f" if signed else ".2f")
    return f"{mean} ({stats['n']})" if stats["std"] is None else f"{mean} ± {stats['std']:.2f} ({stats['n']})"


def _iterations(experiments: List[Any], records: List[dict], where: List[Tuple[str, str]]) -> List[int]:
    """The training iterations of the ``(experiment, cell)`` pairs: as recorded, else as declared
    (``SOLVER.MAX_ITER`` among the cell's overrides)."""
    out = set()
    for experiment, cell in where:
        recorded = {r["train"]["iterations"] for r in records
                    if (r["experiment"], r["cell"]) == (experiment, cell) and isinstance(r.get("train"), dict)
                    and isinstance(r["train"].get("iterations"), int)}
        if recorded:
            out |= recorded
            continue
        for exp in experiments:
            for c in getattr(exp, "cells", ()) if exp.name == experiment else ():
                keys = list(c.overrides[::2])
                if c.name == cell and "SOLVER.MAX_ITER" in keys:
                    out.add(int(c.overrides[2 * keys.index("SOLVER.MAX_ITER") + 1]))
    return sorted(out)


def which_norm_entries(records: Sequence[dict], experiments: Union[Mapping[str, Any], Sequence[Any], None] = (),
                       rows: Sequence[Row] = ROWS) -> List[dict]:
    """The data of the which-norm table: per row of ``rows``, ``{"row": Row, "settings": [...]}`` with
    per entry of :data:`SETTINGS` a dict: ``setting``, ``cell`` (None: none declared or recorded),
    ``status`` ("measured", :data:`NOT_RUN`, :data:`NOT_AVAILABLE` for a strategy that does not
    apply, :data:`NOT_APPLICABLE` for no such setting), ``bbox`` (:func:`.report_stats.summarize`'s
    box AP statistics), ``unconverged`` and ``difference`` (the paired difference to
    :data:`REFERENCE` on the same checkpoints; None unless the row is ``paired``), and ``experiment``."""
    records = list(records)
    declared = _experiment_list(experiments)
    by_experiment = {name: [r for r in records if r["experiment"] == name] for name in {row.experiment for row in rows}}
    cells = {name: cell_rows(recs, name, declared) for name, recs in by_experiment.items()}
    summary = {name: {(s["cell"], s["strategy"]): s for s in summarize(recs, name)}
               for name, recs in by_experiment.items()}
    checked = {name: convergence(recs, name) for name, recs in by_experiment.items()}
    out = []
    for row in rows:
        entries = []
        for setting in row.settings:
            entry = {"setting": setting, "experiment": row.experiment, "cell": None, "bbox": None,
                     "unconverged": False, "difference": None}
            entries.append(entry)
            if setting is None:
                entry["status"] = NOT_APPLICABLE
                continue
            cell = _cell(cells[row.experiment], dict(row.factors, setting=setting), row)
            entry["cell"] = cell
            if not cell or not any(r["cell"] == cell for r in by_experiment[row.experiment]):
                entry["status"] = NOT_RUN
                continue
            bbox = (summary[row.experiment].get((cell, row.strategy)) or {}).get("bbox")
            entry["status"] = "measured" if bbox and bbox["n"] else NOT_AVAILABLE
            entry["bbox"] = bbox if entry["status"] == "measured" else None
            check = checked[row.experiment].get(cell)
            entry["unconverged"] = bool(check and not check["converged"])
            if row.paired and row.strategy != REFERENCE:
                entry["difference"] = paired_difference(records, row.experiment, cell, row.strategy, REFERENCE)
        out.append({"row": row, "settings": entries})
    return out


def render_which_norm(records: Sequence[dict], experiments: Union[Mapping[str, Any], Sequence[Any], None] = (),
                      results_link: Optional[str] = "docs/results.md", rows: Sequence[Row] = ROWS) -> str:
    """The table of :data:`ROWS` (at most 14) and the line under it, as markdown (without the markers).

    ``experiments``: the declared experiments (a dict or a sequence of ``spec.Experiment``-like
    objects); a declared cell without records shows "not run", as does a row no cell matches.
    ``results_link``: the link to the full report, relative to the README (None: no link)."""
    records = list(records)
    declared = _experiment_list(experiments)
    used: Dict[Any, List[Tuple[str, str]]] = {}  # images per batch -> the (experiment, cell) shown
    body = []
    seed_counts = set()
    for item in which_norm_entries(records, declared, rows):
        row = item["row"]
        entries, differences = [], []
        for entry in item["settings"]:
            if entry["cell"]:
                used.setdefault(dict(row.factors).get("images_per_batch"), []).append((row.experiment, entry["cell"]))
            status = entry["status"]
            if status in (NOT_APPLICABLE, NOT_RUN):
                entries.append(status)
                differences.append(status)
                continue
            if entry["bbox"]:
                seed_counts.add(entry["bbox"]["n"])
            text = _fmt(entry["bbox"]) or NOT_AVAILABLE
            entries.append(text + (" (unconverged)" if entry["unconverged"] else ""))
            differences.append(fmt_interval(entry["difference"]) or NOT_AVAILABLE)
        paired = row.paired and row.strategy != REFERENCE
        body.append([row.label] + entries + [" / ".join(differences) if paired else ""])

    header = ["choice at 2 images per GPU"] + [title for _, title in SETTINGS] + [
        f"Δ to BN + EMA ({' / '.join(title for _, title in SETTINGS)})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(lines) + "\n\n" + _footnote(records, declared, rows, used, results_link, sorted(seed_counts)) + "\n"


def _footnote(records: List[dict], declared: List[Any], rows: Sequence[Row], used: Mapping[Any, list],
              results_link: Optional[str], seed_counts: Sequence[int] = ()) -> str:
    names = {row.experiment for row in rows}
    seeds = sorted({s for exp in declared if exp.name in names for s in exp.seeds}
                   or {r["seed"] for r in records if r["experiment"] in names})
    schedule = []
    for images in sorted(used, key=lambda k: (k != 2, str(k))):
        iterations = _iterations(declared, records, used[images])
        if iterations:
            schedule.append(f"{'/'.join(map(str, iterations))} iterations at {images} images")
    schedule = ", ".join(schedule) if schedule else "the declared schedules"
    diversity = DIVERSITY.get(BENCHMARK_SCENES)
    scenes = f"scenes {BENCHMARK_SCENES}" + (f" (appearance diversity {diversity:g})" if diversity is not None else "")
    low, high = (min(seed_counts), max(seed_counts)) if seed_counts else (None, None)
    seeds_text = (f"{len(seeds)} seeds declared, " + (f"{low}" if low == high else f"{low} to {high}")
                  + " run per entry: (n) gives each" if seed_counts else f"{len(seeds)} seeds declared")
    return (f"Box AP (COCO, %), mean ± std over seeds (n); Faster R-CNN R-18-FPN on the benchmark {scenes}, "
            f"{schedule}, {seeds_text}; Δ: the row minus BN + EMA per seed on the same checkpoint, its mean "
            f"[95% interval] (n); an interval that contains 0, or fewer than 3 seeds, is inconclusive. "
            f"\"{NOT_RUN}\": not trained yet, \"{NOT_AVAILABLE}\": does not apply to that model, "
            f"\"{NOT_APPLICABLE}\": no such setting."
            + (f" Full tables, protocol and claims: [{results_link}]({results_link})." if results_link else ""))


# ------------------------------------------------------------------------------------------ writing
def has_markers(text: str) -> bool:
    return BEGIN in text or END in text


def splice_readme(existing: str, generated: str, path: str) -> Optional[str]:
    """``existing`` with ``generated`` between the markers (text outside them kept); None when it
    has no markers; ValueError when they are not one :data:`BEGIN` followed by one :data:`END`."""
    begins, ends = existing.count(BEGIN), existing.count(END)
    if begins == 0 and ends == 0:
        return None
    if begins == 1 and ends == 1 and existing.index(BEGIN) < existing.index(END):
        start, stop = existing.index(BEGIN) + len(BEGIN), existing.index(END)
        return existing[:start] + "\n" + generated.rstrip("\n") + "\n" + existing[stop:]
    raise ValueError(f"{path}: expected one {BEGIN} followed by one {END}, found {begins} and {ends} "
                     "(in that order or not); fix the markers by hand, the table goes between them")


def write_readme(path: str, generated: str) -> bool:
    """Rewrite the part of the README at ``path`` between the markers with ``generated``, atomically;
    False (the file untouched) when it has no markers."""
    with open(path, encoding="utf-8") as f:
        existing = f.read()
    text = splice_readme(existing, generated, path)
    if text is None:
        return False
    if text != existing:
        write_text(path, text)
    return True
