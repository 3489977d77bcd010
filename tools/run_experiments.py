#!/usr/bin/env python
"""Run declared experiments cell by cell (resumable) and render their report.

    python tools/run_experiments.py --list                          # experiments, cells, records present
    python tools/run_experiments.py --experiment levels             # what has no record yet
    python tools/run_experiments.py --experiment e1 --cells scratch_2img_d100 --seeds 0 1 --threads 2
    python tools/run_experiments.py --experiment e1 --dry-run       # what would run
    python tools/run_experiments.py --report                        # docs/results.md + figures + README table

A run whose record exists under --results is skipped; a stopped training resumes from its last
checkpoint. The logic is in bnstats_lab.experiments.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a clone's script: the lab (bnstats_lab) and the plug-in of this clone
    sys.path.insert(0, ROOT)

import argparse

import bnstats_lab  # noqa: F401  (data sets registered, weights hints)
from bnstats_lab.experiments.catalog import load_experiments
from bnstats_lab.experiments.records import has_record
from bnstats_lab.experiments.runner import run_experiment


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", nargs="+", default=[], metavar="NAME", help="experiments to run, in order")
    p.add_argument("--cells", nargs="+", default=None, metavar="CELL", help="only these cells")
    p.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED", help="only these seeds")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    p.add_argument("--results", default="results", help="records folder (default: results)")
    p.add_argument("--work", default="output/experiments", help="checkpoints and logs (default: output/experiments)")
    p.add_argument("--catalog", default=None, help="a module or .py file declaring EXPERIMENTS (default: the lab's)")
    p.add_argument("--dry-run", action="store_true", help="list the runs without a record; run nothing")
    p.add_argument("--list", action="store_true", help="list the experiments and their records, run nothing")
    p.add_argument("--report", action="store_true", help="render docs/results.md from the records (after any runs)")
    p.add_argument("--report-output", default="docs/results.md", help="with --report: the page to write (default %(default)s)")
    p.add_argument("--figures", default="docs/results", help="with --report: the folder of its figures (default %(default)s)")
    p.add_argument("--readme", default=None,
                   help="README whose which-norm table is rewritten with the report (default: the report's, "
                        "README.md when it exists; '' for none)")
    return p.parse_args(argv)


def list_experiments(experiments, results_root):
    for experiment in experiments.values():
        print(f"{experiment.name}: {experiment.description} (seeds {list(experiment.seeds)})")
        for cell in experiment.cells:
            present = [s for s in experiment.seeds if has_record(results_root, experiment.name, cell.name, s)]
            source = f"evaluates {'/'.join(cell.checkpoint_of)}" if cell.checkpoint_of else cell.config
            print(f"  {cell.name:28s} records for seeds {present or '-'}  ({source})")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        experiments = load_experiments(args.catalog)
    except (ImportError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    unknown = [n for n in args.experiment if n not in experiments]
    if unknown:
        print(f"error: unknown experiment(s) {unknown}; declared: {', '.join(experiments)}", file=sys.stderr)
        return 2
    if args.list or not (args.experiment or args.report):
        list_experiments(experiments, args.results)
        return 0
    failed = []
    for name in args.experiment:
        try:
            summary = run_experiment(experiments[name], args.results, args.work, cells=args.cells, seeds=args.seeds,
                                     threads=args.threads, catalog=args.catalog, dry_run=args.dry_run)
        except (KeyError, ValueError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        failed += [f"{name}/{run}" for run in summary.failed]
    if args.report:
        from bnstats_lab.experiments import report

        report_args = ["--results", args.results, "--output", args.report_output, "--figures", args.figures]
        if args.readme is not None:
            report_args += ["--readme", args.readme]
        if report.main(report_args + (["--catalog", args.catalog] if args.catalog else [])) != 0:
            return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
