"""The results report: the experiments' records as the papers' tables, paired differences, claims, figures.

Reads every ``<results>/<experiment>/<cell>/seed<k>.json`` (one record per trained checkpoint; the
schema is in ``docs/results.md``) and writes the generated part of ``docs/results.md`` between the
markers ``<!-- results:begin -->`` and ``<!-- results:end -->``; text outside them (the protocol,
the discussion) is kept. Per experiment: a table with one row per cell (ordered by its factors, e.g.
setting then images per batch) and one column per inference strategy, each entry "mean ± std (n)"
over seeds; the paired differences to a reference strategy (default EMA) on the same checkpoints;
figures (AP against images per batch, the train–test discrepancy against scene diversity). Then the
claims of :mod:`bnstats_lab.experiments.claims`, each with our measurement and a verdict (a paired
difference on the same checkpoints, or for two trainings the unpaired difference of their cells). A cell
that has not been run yet is shown as "not run": the report renders at every stage.

It also rewrites the README's "Which norm at 2 images per GPU" table between
``<!-- which-norm:begin -->`` and ``<!-- which-norm:end -->`` (:mod:`.report_readme`); a README
without these markers is left as it is.

This module renders and writes the page; the parts live in their own modules and are re-exported
here as the report's interface: reading and validating records in :mod:`.records`, the tables'
cells and their order in :mod:`.report_layout`, the statistics, convergence check and claims'
verdicts in :mod:`.report_stats`, the figures in :mod:`.report_figures`.

    python -m bnstats_lab.experiments.report --results results --output docs/results.md --figures docs/results
"""
import argparse
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from d2_bnstats.outputs import write_text

from .catalog import load_catalog, load_experiments
from .claims import CLAIMS, PAPER_TABLES, Claim, PaperTable, TrainingsClaim, TrendClaim
from .records import RecordError, load_records, rows, strategy_entry
from .report_figures import make_figures, make_trend_figures, plot_which_norm
from .report_layout import REFERENCE, cell_rows, fmt_interval, factor_order, strategy_order, value_key, varying_factors
from .report_readme import BEGIN as README_BEGIN
from .report_readme import END as README_END
from .report_readme import SETTINGS as WHICH_NORM_SETTINGS
from .report_readme import has_markers, render_which_norm, splice_readme, which_norm_entries
from .report_stats import (CONVERGENCE_RATIO, EQUIVALENCE_MARGIN, MIN_SEEDS, NOT_RUN, convergence, evaluate_claims,
                           paired_difference, summarize, unpaired_difference, verdict)

__all__ = [
    "BEGIN",
    "END",
    "RecordError",
    "load_records",
    "rows",
    "summarize",
    "paired_difference",
    "unpaired_difference",
    "verdict",
    "convergence",
    "evaluate_claims",
    "make_figures",
    "render_markdown",
    "render_which_norm",
    "write_report",
    "main",
]

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
NOT_AVAILABLE, NOT_PLANNED = "n/a", "—"
TASK_LABEL = {"bbox": "box AP", "segm": "mask AP"}


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
    entries = [e for e in (strategy_entry(r, strategy) for r in cell_recs) if e is not None]
    if entries:
        return NOT_AVAILABLE
    if planned is not None and strategy not in planned:
        return NOT_PLANNED
    return NOT_RUN


def mixed_starting_weights(records: Sequence[dict]) -> List[Tuple[str, int]]:
    """(cell, number of distinct files) for each cell whose records name more than one pre-trained
    weights file by content; records without a hash (older ones, random init) are left out."""
    digests: Dict[str, set] = {}
    for r in records:
        digest = (r.get("initial_weights") or {}).get("sha256")
        if digest:
            digests.setdefault(r["cell"], set()).add(digest)
    return [(cell, len(d)) for cell, d in sorted(digests.items()) if len(d) > 1]


def _experiment_section(records: List[dict], experiment: str, experiments: Sequence[Any], reference: str,
                        figures: Sequence[str], markdown_dir: str) -> List[str]:
    recs = [r for r in records if r["experiment"] == experiment]
    cells = cell_rows(recs, experiment, experiments)
    parts = [f"### Experiment {experiment}"]
    for exp in experiments:
        if exp.name == experiment and getattr(exp, "description", ""):
            parts.append(exp.description)
    if not cells:
        parts.append(f"{experiment}: {NOT_RUN}.")
        return parts
    factor_dicts = [f for _, f, _ in cells]
    varying = varying_factors(factor_dicts)
    constant = {k: factor_dicts[0][k] for k in factor_order(factor_dicts)
                if k not in varying and all(k in f for f in factor_dicts)}
    seeds = sorted({r["seed"] for r in recs})
    commits = sorted({str(r.get("commit", "unknown"))[:10] for r in recs})
    dirty = sum(1 for r in recs if r.get("dirty"))
    parts.append(
        f"{len(recs)} records: {len({r['cell'] for r in recs})} of {len(cells)} cells run"
        + (f", seeds {', '.join(map(str, seeds))}" if seeds else "")
        + (f"; commit {', '.join(commits)}" if commits else "")
        + (f"; {dirty} from a tree with uncommitted changes" if dirty else "") + "."
        + (" Same in every cell: " + ", ".join(f"{k} = {v}" for k, v in constant.items()) + "." if constant else "")
        + "".join(f" Seeds of {cell} started from {n} different pre-trained weights files (by SHA-256)."
                  for cell, n in mixed_starting_weights(recs)))
    planned = [s for _, _, p in cells for s in (p or ())]
    strategies = strategy_order(recs, planned, reference)
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
    comparisons = next((getattr(e, "comparisons", ()) for e in experiments if e.name == experiment), ())
    for a, b in comparisons:
        for task in tasks:
            parts.append(f"Paired difference {a} − {b}, {TASK_LABEL[task]}: per seed on the same checkpoint, "
                         "then mean ± std (number of seeds)")
            parts.append(table([a], lambda cell, cell_recs, plan, strategy, b=b, task=task: (
                _fmt(paired_difference(recs, experiment, cell, strategy, b, (task, "AP")), signed=True)
                or _missing(cell_recs, plan, strategy)), [f"{a} − {b}"]))
    parts += _test_image_intervals(recs, cells, others)
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
        parts.append(f"Convergence check (final detection loss, the training loss without the norms' auxiliary "
                     f"losses, against the smallest images per batch, at most "
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


def _fmt_trend(result: Mapping[str, Any]) -> str:
    ci = result.get("ci95")
    if result.get("slope") is None:
        return f"{len(result['points'])} points: no slope yet"
    interval = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
    per_level = "; ".join(f"{cell} {_fmt(d, signed=True) or NOT_AVAILABLE}" for cell, d in result["per_cell"].items())
    return f"slope {result['slope']:+.2f} AP per unit{interval} ({len(result['points'])} points; {per_level})"


def _test_image_intervals(recs: List[dict], cells, strategies: Sequence[str]) -> List[str]:
    """Per checkpoint (cell, seed) with the comparison tool's intervals: each strategy's box AP minus
    EMA's with its 95% paired bootstrap interval over the test images (how far one checkpoint's
    difference is from the test images' noise; the seeds' intervals above are about the training's)."""
    order = {cell: i for i, (cell, _, _) in enumerate(cells)}
    measured = sorted((r for r in recs if any(e.get("versus_ema") for e in r["strategies"])),
                      key=lambda r: (order.get(r["cell"], len(order)), r["seed"]))
    columns = [s for s in strategies if any((strategy_entry(r, s) or {}).get("versus_ema") for r in measured)]
    if not measured or not columns:
        return []
    body = []
    for r in measured:
        line = [r["cell"], str(r["seed"])]
        for strategy in columns:
            v = (strategy_entry(r, strategy) or {}).get("versus_ema")
            line.append(f"{v['difference']:+.2f} [{v['low']:+.2f}, {v['high']:+.2f}]" if v else "")
        body.append(line)
    return ["Per checkpoint, on its test images: strategy − EMA, box AP, with the 95% paired bootstrap interval "
            "over the test images (the comparison tool's; records from before it have none)",
            _table(["cell", "seed"] + [f"{s} − {REFERENCE}" for s in columns], body)]


def _claims_section(records: List[dict], claims: Sequence[Claim], experiments: Sequence[Any]) -> List[str]:
    expected = {1: "a > b", -1: "a < b", 0: f"a ≈ b (±{EQUIVALENCE_MARGIN})"}
    body = []
    described = set()
    for row in evaluate_claims(records, claims, experiments):
        claim = row["claim"]
        # a claim checked in several cells is described on its first row only
        text = f"**{claim.id}**" if claim.id in described else f"**{claim.id}**: {claim.text} ({claim.paper})"
        described.add(claim.id)
        trainings = isinstance(claim, TrainingsClaim)
        comparison = f"a = {claim.strategy_a}, b = {claim.strategy_b} ({' '.join(claim.metric)})"
        where = f"{claim.experiment}/{row['cell']}" if row["cell"] else (
            f"{claim.experiment}: " + ", ".join(f"{k} = {v}" for k, v in claim.factors.items()))
        if trainings:
            comparison = (f"a = {claim.strategy_a} of {where}, b = {claim.strategy_b} of "
                          f"{claim.experiment_b}/{row.get('cell_b') or '?'} ({' '.join(claim.metric)}; two trainings)")
        if isinstance(claim, TrendClaim):
            comparison = f"slope of a − b against {claim.x}; a = {claim.strategy_a}, b = {claim.strategy_b}"
        previous = NOT_RUN
        if row["status"] == "measured":
            measurement = _fmt_trend(row["trend"]) if "trend" in row else fmt_interval(row["difference"])
            result = row["verdict"]
            if row.get("note"):
                result = f"{result} ({row['note']})"
            previous = row.get("previous_verdict") or "— (declared with the revision)"
        elif row["status"] == NOT_RUN:
            measurement, result = NOT_RUN, NOT_RUN
        else:
            measurement, result = f"{NOT_AVAILABLE}: {row['reason']}", NOT_AVAILABLE
            previous = NOT_AVAILABLE
        body.append([text, where, comparison, expected[claim.expected_sign], measurement, result, previous])
    return [
        "### Claims",
        "Per claim and cell: the paired difference a − b per seed on the same checkpoints, then its mean, "
        "[95% interval] (Student's t) and number of seeds; for two trainings (no shared checkpoint) the "
        "difference of the cells' means with Welch's interval. Verdict (docs/results.md, \"Revision\"): "
        f"inconclusive with fewer than {MIN_SEEDS} seeds; a claimed sign holds when the interval lies on that "
        "side of 0, does not hold when it lies on the other side, is inconclusive when it contains 0; a "
        f"claimed equality holds when the 90% interval lies within ±{EQUIVALENCE_MARGIN} box AP (two one-sided "
        "tests), does not hold when the 95% interval lies outside it. The last column is the verdict of the "
        "rule used before the revision (|mean| against the standard deviation of the differences, convergence "
        "judged on the total loss).",
        _table(["claim (paper)", "cell", "comparison", "expected", "ours: a − b [95% interval] (seeds)",
                "verdict", "verdict before the revision"], body),
    ]


def _paper_table_section(records: List[dict], table: PaperTable) -> List[str]:
    recs = [r for r in records if r["experiment"] == table.experiment
            and all(r["factors"].get(k) == v for k, v in table.factors.items())]
    if not recs:
        return []
    row_values = sorted({r["factors"].get(table.rows) for r in recs}, key=lambda v: value_key(table.rows, v))
    col_values = sorted({r["factors"].get(table.columns) for r in recs}, key=lambda v: value_key(table.columns, v))
    header = [table.rows]
    for col in col_values:
        header += [f"{col}: {table.strategy_b}", f"{col}: {table.strategy_a}", f"{col}: Δ (paired)"]
    body = []
    for row in row_values:
        line = [str(row)]
        for col in col_values:
            cells = sorted({r["cell"] for r in recs if r["factors"].get(table.rows) == row
                            and r["factors"].get(table.columns) == col})
            if len(cells) != 1:
                line += [NOT_RUN if not cells else "several cells"] * 3
                continue
            cell_recs = [r for r in recs if r["cell"] == cells[0]]
            summary = {s["strategy"]: s for s in summarize(cell_recs, table.experiment)}
            line += [_fmt(summary.get(s, {}).get("bbox")) or _missing(cell_recs, None, s)
                     for s in (table.strategy_b, table.strategy_a)]
            diff = paired_difference(cell_recs, table.experiment, cells[0], table.strategy_a, table.strategy_b,
                                     ("bbox", "AP"))
            line.append(_fmt(diff, signed=True) or NOT_AVAILABLE)
        body.append(line)
    where = ", ".join(f"{k} = {v}" for k, v in table.factors.items())
    return [f"**{table.title}**; {table.experiment}, {where}; box AP, mean ± std (seeds)", _table(header, body)]


def render_markdown(records: Sequence[dict], claims: Sequence[Claim] = CLAIMS, figures_dir: Optional[str] = None,
                    markdown_dir: str = "docs", experiments: Sequence[Any] = (), reference: str = REFERENCE,
                    figures: Optional[Mapping[str, Sequence[str]]] = None,
                    paper_tables: Sequence[PaperTable] = (), which_norm: Optional[str] = None) -> str:
    """The generated part of the report (without the markers) for ``records``.

    Per experiment (recorded, declared in ``experiments`` (``spec.Experiment``-like objects, whose
    cells without records show as "not run") or named by a claim): the AP table (rows: cells in
    factor order; columns: strategies; "mean ± std (n)"), the paired differences to ``reference``,
    and links to its figures; then the claims table. Figures are written into ``figures_dir`` by
    :func:`make_figures` unless ``figures`` ({experiment: paths}) is given; links are relative to
    ``markdown_dir``, the folder of the markdown file. With ``which_norm`` (the path of
    :func:`plot_which_norm`'s figure), a section with the README's which-norm table and that figure
    comes before the claims."""
    records = list(records)
    if figures is None:
        figures = make_figures(records, figures_dir) if figures_dir else {}
        for experiment, paths in (make_trend_figures(records, claims, experiments, figures_dir)
                                  if figures_dir else {}).items():
            figures.setdefault(experiment, []).extend(paths)
    names = sorted({r["experiment"] for r in records} | {e.name for e in experiments} | {c.experiment for c in claims})
    parts = [f"Generated from {len(records)} result records by `python -m bnstats_lab.experiments.report`; "
             "edit the text outside the markers, not this part. Entries: mean ± sample std over seeds "
             f"(number of seeds); \"{NOT_RUN}\": not trained yet; \"{NOT_AVAILABLE}\": the strategy does not apply "
             f"to that model; \"{NOT_PLANNED}\": not planned for that cell."]
    for name in names:
        parts += _experiment_section(records, name, experiments, reference, figures.get(name, ()), markdown_dir)
    if which_norm:
        rel = os.path.relpath(which_norm, markdown_dir).replace(os.sep, "/")
        parts += ["### Which norm at 2 images per GPU",
                  "E1's rows are inference strategies on the same EvalNorm-trained checkpoints; E2's rows are "
                  "other trainings; the last row is the large-batch reference.",
                  render_which_norm(records, experiments, None).rstrip("\n"),
                  f"![which_norm_2img]({rel})"]
    parts += _claims_section(records, claims, experiments)
    layouts = [part for table in paper_tables for part in _paper_table_section(records, table)]
    if layouts:
        parts += ["### In the papers' layout"] + layouts
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
                 experiments: Sequence[Any] = (), readme: Optional[str] = None,
                 paper_tables: Sequence[PaperTable] = PAPER_TABLES,
                 which_norm: bool = False) -> Tuple[str, List[str], int]:
    """Write the report: the figures, then ``output_md`` atomically, its generated part between
    :data:`BEGIN` and :data:`END` (the rest of an existing file is kept; a file without markers gets
    them appended; a new file gets a short header). Without ``results_root`` every cell is "not
    run". With ``readme``, also its which-norm table between the markers of :mod:`.report_readme`
    (atomically, the rest kept; a README without them is left untouched). Both files' markers are
    checked before either is written. With ``which_norm``, the which-norm table and its figure
    (``which_norm_2img.png``) go into the page too. Returns (``output_md``, figure paths, number of
    records)."""
    records = load_records(results_root) if os.path.isdir(results_root) else []
    figures = make_figures(records, figures_dir)
    for experiment, paths in make_trend_figures(records, claims, experiments, figures_dir).items():
        figures.setdefault(experiment, []).extend(paths)
    markdown_dir = os.path.dirname(os.path.abspath(output_md))
    figures = {k: [os.path.abspath(p) for p in v] for k, v in figures.items()}
    which_norm_figure = None
    if which_norm:
        which_norm_figure = os.path.abspath(plot_which_norm(
            which_norm_entries(records, experiments), WHICH_NORM_SETTINGS,
            os.path.join(figures_dir, "which_norm_2img.png"),
            "Which norm at 2 images per GPU: box AP, mean ± std over seeds (dots: seeds; hatched: unconverged)"))
    body = render_markdown(records, claims, figures_dir, markdown_dir, experiments, figures=figures,
                           paper_tables=paper_tables, which_norm=which_norm_figure)
    generated = f"{BEGIN}\n{body}{END}"
    if os.path.exists(output_md):
        with open(output_md, encoding="utf-8") as f:
            text = _splice(f.read(), generated, output_md)
    else:
        text = HEADER + generated + "\n"
    readme_text = None
    if readme:
        with open(readme, encoding="utf-8") as f:
            existing = f.read()
        link = os.path.relpath(os.path.abspath(output_md), os.path.dirname(os.path.abspath(readme)))
        link = link.replace(os.sep, "/")
        readme_text = splice_readme(existing, render_which_norm(records, experiments, link), readme)
        readme_text = None if readme_text == existing else readme_text
    write_text(output_md, text)
    if readme_text is not None:
        write_text(readme, readme_text)
    paths = [p for paths in figures.values() for p in paths] + ([which_norm_figure] if which_norm_figure else [])
    return output_md, paths, len(records)


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
    parser.add_argument("--readme", default=None,
                        help="the README whose which-norm table (between its which-norm markers) is rewritten; "
                             "default: README.md in the folder above the page's (the repository root for "
                             "docs/results.md) when it exists and no --catalog is given; '' for none")
    args = parser.parse_args(argv)
    readme = args.readme
    if readme is None and args.catalog is None:  # another catalog's records are not the README's table
        default = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.output))), "README.md")
        readme = os.path.relpath(default) if os.path.isfile(default) else ""
    if not os.path.isdir(args.results):
        print(f"no results folder {args.results}: every cell is reported as {NOT_RUN}")
    try:
        if readme:
            with open(readme, encoding="utf-8") as f:
                if not has_markers(f.read()):
                    print(f"note: {readme} has no {README_BEGIN} / {README_END} markers; its which-norm table "
                          "is not written (add the markers where the table belongs)")
                    readme = ""
        experiments = list(load_experiments(args.catalog).values())
        module = load_catalog(args.catalog) if args.catalog is not None else None
        claims = CLAIMS if module is None else tuple(getattr(module, "CLAIMS", ()))
        tables = PAPER_TABLES if module is None else tuple(getattr(module, "PAPER_TABLES", ()))
        path, figure_paths, n = write_report(args.results, args.output, args.figures, claims=claims,
                                             experiments=experiments, readme=readme, paper_tables=tables,
                                             which_norm=args.catalog is None)
    except (ImportError, FileNotFoundError, ValueError) as e:  # RecordError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({n} records)")
    if readme:
        print(f"wrote {readme} (which-norm table)")
    for p in figure_paths:
        rel = os.path.relpath(p)
        print(f"wrote {p if rel.startswith('..') else rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
