"""Experiments: declared tables of trained checkpoints and evaluation strategies, a resumable
runner, result records under ``results/`` and the report ``docs/results.md``.

    python tools/run_experiments.py --list
    python tools/run_experiments.py --experiment e1 --threads 2     # runs what has no record yet
    python tools/run_experiments.py --report                        # docs/results.md from the records

``spec`` (Cell, Experiment), ``catalog`` (the declared experiments), ``cell`` (one run: train,
evaluate, record), ``runner`` (the table, resumable), ``records`` (the JSON records: writing, and the
one reader and validator), ``claims`` (the papers' claims), ``report_stats`` (means over seeds,
paired differences, verdicts, the convergence check), ``report_layout`` (table order),
``report_figures``, ``report_readme`` (the README's "which norm" table) and ``report`` (the page
``docs/results.md``).
"""
from .catalog import load_experiments
from .runner import run_experiment
from .spec import Cell, Experiment

__all__ = ["Cell", "Experiment", "load_experiments", "run_experiment"]
