"""Run a declared experiment cell by cell, continuing where a previous run stopped.

Each (cell, seed) whose record exists is skipped; the others run one at a time, each in its own
process (:mod:`bnstats_lab.experiments.cell`) with the given number of torch threads, its output
appended to ``<work>/<experiment>/<cell>/seed<k>/run.log``. A run that fails is reported with the end
of its log and the runner goes on to the next; the summary lists the failures. Progress and an
estimate of the time left (mean time of the runs done so far) are printed after every run.
"""
import dataclasses
import os
import subprocess
import sys
import time
from typing import Callable, List, Optional, Sequence

from .cell import run_folder, source_checkpoint
from .records import has_record
from .spec import Experiment

LOG_TAIL_LINES = 15


@dataclasses.dataclass
class RunSummary:
    done: List[str] = dataclasses.field(default_factory=list)
    skipped: List[str] = dataclasses.field(default_factory=list)
    failed: List[str] = dataclasses.field(default_factory=list)


def _format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def make_requirements(experiment: Experiment, cells=None, log: Callable[[str], None] = print) -> None:
    """Make the missing files of ``Experiment.requires`` that ``cells`` (default: all) name in their
    overrides, in the declared order."""
    cells = experiment.cells if cells is None else cells
    for path, command in experiment.requires:
        if os.path.exists(path) or not any(path in cell.overrides for cell in cells):
            continue
        log(f"{experiment.name}: making {path}: {' '.join(command)}")
        completed = subprocess.run(list(command))
        if completed.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(f"{experiment.name}: the command that makes {path} failed "
                               f"(exit {completed.returncode}): {' '.join(command)}")


def _log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def run_experiment(
    experiment: Experiment,
    results_root: str = "results",
    work_root: str = "output/experiments",
    cells: Optional[Sequence[str]] = None,
    seeds: Optional[Sequence[int]] = None,
    threads: Optional[int] = None,
    catalog: Optional[str] = None,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> RunSummary:
    """Run the experiment's missing (cell, seed) pairs; see the module docstring."""
    runs = experiment.select(cells, seeds)
    todo = [(c, s) for c, s in runs if not has_record(results_root, experiment.name, c.name, s)]
    summary = RunSummary(skipped=[f"{c.name}/seed{s}" for c, s in runs if (c, s) not in todo])
    log(f"{experiment.name}: {len(runs)} runs declared, {len(summary.skipped)} with a record, {len(todo)} to run")
    if dry_run:
        for cell, seed in todo:
            log(f"  would run {cell.name} seed {seed}")
        return summary
    if todo:
        make_requirements(experiment, [cell for cell, _ in todo], log)
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    started = time.perf_counter()
    for index, (cell, seed) in enumerate(todo, 1):
        name = f"{cell.name}/seed{seed}"
        if has_record(results_root, experiment.name, cell.name, seed):  # written meanwhile by another runner
            summary.skipped.append(name)
            log(f"[{index}/{len(todo)}] {experiment.name} {name}: skipped, its record appeared meanwhile")
            continue
        source = source_checkpoint(cell, seed, work_root)
        if source is not None and not os.path.isfile(source):
            summary.failed.append(name)
            log(f"[{index}/{len(todo)}] {experiment.name} {name}: not run: it evaluates {source}, which does not "
                f"exist yet (run {'/'.join(cell.checkpoint_of)} seed {seed} first)")
            continue
        folder = run_folder(work_root, experiment.name, cell.name, seed)
        os.makedirs(folder, exist_ok=True)
        log_path = os.path.join(folder, "run.log")
        command = [sys.executable, "-m", "bnstats_lab.experiments.cell", "--experiment", experiment.name,
                   "--cell", cell.name, "--seed", str(seed), "--results", results_root, "--work", work_root]
        if catalog:
            command += ["--catalog", catalog]
        log(f"[{index}/{len(todo)}] {experiment.name} {name}: running (log: {log_path})")
        run_start = time.perf_counter()
        with open(log_path, "a") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
            out.flush()
            returncode = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        took = time.perf_counter() - run_start
        if returncode == 0 and has_record(results_root, experiment.name, cell.name, seed):
            summary.done.append(name)
            status = f"done in {_format_seconds(took)}"
        else:
            summary.failed.append(name)
            status = f"FAILED (exit {returncode}) after {_format_seconds(took)}; end of {log_path}:\n{_log_tail(log_path)}"
        left = len(todo) - index
        eta = (time.perf_counter() - started) / index * left
        log(f"[{index}/{len(todo)}] {experiment.name} {name}: {status}"
            + (f" — {left} left, about {_format_seconds(eta)}" if left else ""))
    log(f"{experiment.name}: {len(summary.done)} done, {len(summary.skipped)} skipped, {len(summary.failed)} failed"
        + (f": {', '.join(summary.failed)}" if summary.failed else ""))
    return summary
