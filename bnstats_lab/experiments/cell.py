"""One run of an experiment: train a cell once with a seed, evaluate the checkpoint under the
cell's strategies, write the result record.

Training is ``tools/train_net.py``'s library entry (:func:`d2_bnstats.d2.train.run`) with
``--resume``: a run stopped part-way continues from its last checkpoint. Evaluation is the comparison
tool's library entry (:func:`d2_bnstats.compare.run`); a finished comparison (``compare.json``
newer than the final model) is reused. The record is written last, so it exists only for a complete
run. The runner starts each run as its own process (``python -m bnstats_lab.experiments.cell``),
so one run's failure or memory cannot touch the next.
"""
import argparse
import glob
import json
import logging
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

from d2_bnstats.d2.losses import DETECTION_LOSS_KEY

from .records import (config_hash, evalnorm_parameters, initial_weights, now, read_record, record_path,
                      source_version, write_record)
from .spec import Cell, Experiment

logger = logging.getLogger("bnstats_lab.experiments")

FINAL_MODEL = "model_final.pth"
CHECKPOINT_PERIOD = 200  # iterations between checkpoints a stopped run resumes from
LOSS_WINDOW = 20  # logged values whose median is the "final" loss


def run_folder(work_root: str, experiment: str, cell: str, seed: int) -> str:
    return os.path.join(work_root, experiment, cell, f"seed{seed}")


def training_arguments(cell: Cell, seed: int, output_dir: str) -> List[str]:
    not_saved = [i for i in cell.keep_iterations if i % CHECKPOINT_PERIOD]
    if not_saved:
        raise ValueError(f"cell {cell.name}: keep_iterations {not_saved} are not multiples of the checkpoint "
                         f"period {CHECKPOINT_PERIOD}, so no checkpoint is saved there")
    return [
        "--config-file", cell.config, "--resume", "--num-gpus", str(cell.num_processes),
        *cell.overrides,
        "SEED", str(seed), "OUTPUT_DIR", output_dir, "SOLVER.CHECKPOINT_PERIOD", str(CHECKPOINT_PERIOD),
    ]  # fmt: skip


def clear_attempt_without_checkpoint(output_dir: str) -> List[str]:
    """Remove the metrics of an attempt that stopped before its first checkpoint (no
    ``last_checkpoint``): the run starts again at iteration 0 and detectron2 appends to
    ``metrics.json``, which would mix the attempts' rows. Returns the removed paths."""
    if os.path.isfile(os.path.join(output_dir, "last_checkpoint")):
        return []
    stale = [os.path.join(output_dir, "metrics.json")] + glob.glob(os.path.join(output_dir, "events.out.tfevents.*"))
    removed = [p for p in stale if os.path.isfile(p)]
    for path in removed:
        os.remove(path)
    return removed


def train(cell: Cell, seed: int, output_dir: str) -> Dict[str, object]:
    """Train (or finish training) the cell; the training part of the record."""
    from d2_bnstats.d2.train import argument_parser, run

    final = os.path.join(output_dir, FINAL_MODEL)
    resumed = os.path.isfile(os.path.join(output_dir, "last_checkpoint")) and not os.path.isfile(final)
    start = time.perf_counter()
    if not os.path.isfile(final):
        clear_attempt_without_checkpoint(output_dir)
        run(argument_parser().parse_args(training_arguments(cell, seed, output_dir)))
    seconds = time.perf_counter() - start
    kept = {checkpoint_name(i) for i in cell.keep_iterations}
    for path in glob.glob(os.path.join(output_dir, "model_[0-9]*.pth")):  # intermediate checkpoints
        if os.path.basename(path) not in kept:
            os.remove(path)
    return dict(training_metrics(os.path.join(output_dir, "metrics.json")), seconds=round(seconds, 1), resumed=resumed)


def training_metrics(metrics_path: str, up_to: Optional[int] = None) -> Dict[str, object]:
    """Iterations, median s/iter and the final losses (median of the last logged values) of a
    detectron2 ``metrics.json`` (one JSON object per line); with ``up_to``, of its first ``up_to``
    iterations only (the losses at an intermediate checkpoint)."""
    rows = []
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:  # a line cut by a killed run
                        continue
    training_rows = [r for r in rows if "total_loss" in r and (up_to is None or r.get("iteration", -1) < up_to)]
    if not training_rows:
        return {"iterations": None, "s_per_iter": None, "final_losses": {}}
    last = training_rows[-LOSS_WINDOW:]
    loss_keys = sorted(k for k in last[-1] if k in ("total_loss", DETECTION_LOSS_KEY) or k.startswith("loss_"))
    losses = {k: round(statistics.median(r[k] for r in last if k in r), 5) for k in loss_keys}
    times = [r["time"] for r in training_rows if "time" in r]
    return {
        "iterations": training_rows[-1].get("iteration", -1) + 1,
        "s_per_iter": round(statistics.median(times), 4) if times else None,
        "final_losses": losses,
    }


def compare_arguments(cell: Cell, output_dir: str, compare_dir: str, weights: Optional[str] = None) -> List[str]:
    weights = weights or os.path.join(output_dir, FINAL_MODEL)
    return [
        "--config-file", cell.config, "--output", compare_dir, "--strategies", *cell.strategies,
        *cell.compare_options,
        *cell.overrides, "MODEL.WEIGHTS", weights, "OUTPUT_DIR", output_dir,
    ]  # fmt: skip


def checkpoint_name(iterations: int) -> str:
    """detectron2's name of the checkpoint saved after ``iterations`` iterations (its iteration index
    is ``iterations − 1``)."""
    return f"model_{iterations - 1:07d}.pth"


def source_checkpoint(cell: Cell, seed: int, work_root: str) -> Optional[str]:
    """The checkpoint an evaluation cell (``checkpoint_of``) evaluates, or None for a training cell."""
    if cell.checkpoint_of is None:
        return None
    name = FINAL_MODEL if cell.checkpoint_iteration is None else checkpoint_name(cell.checkpoint_iteration)
    return os.path.join(run_folder(work_root, *cell.checkpoint_of, seed), name)


def evaluate(cell: Cell, output_dir: str, weights: Optional[str] = None) -> dict:
    """The comparison's summary (``compare.json``) of ``weights`` (default: the run's final model), run
    unless a finished one is newer than the model."""
    from d2_bnstats.compare import parse_args, run

    weights = weights or os.path.join(output_dir, FINAL_MODEL)
    compare_dir = os.path.join(output_dir, "compare")
    summary_path = os.path.join(compare_dir, "compare.json")
    model_time = os.path.getmtime(weights)
    if not (os.path.isfile(summary_path) and os.path.getmtime(summary_path) > model_time and
            _same_strategies(summary_path, cell)):
        run(parse_args(compare_arguments(cell, output_dir, compare_dir, weights)))
    with open(summary_path) as f:
        return json.load(f)


def _same_strategies(summary_path: str, cell: Cell) -> bool:
    with open(summary_path) as f:
        return len(json.load(f).get("strategies", [])) == len(cell.strategies)


def strategy_entries(cell: Cell, summary: dict) -> List[dict]:
    """The record's strategy list: the cell's spec strings with the comparison's COCO numbers (first
    test set) and mean train–test discrepancy over layers."""
    entries = []
    layers = summary.get("discrepancy", {}).get("layers", [])
    for spec, done in zip(cell.strategies, summary["strategies"]):
        entry = {"strategy": spec, "label": done["name"], "description": done.get("description"),
                 "available": done.get("available", True), "reason": done.get("reason"),
                 "test_batch_size": done.get("test_batch_size")}
        if "images_seed" in (done.get("prepare") or {}):  # the training images a strategy drew
            entry["images_seed"] = done["prepare"]["images_seed"]
        versus = ((summary.get("versus_ema") or {}).get("strategies") or {}).get(done["name"])
        if versus:  # box AP − EMA's on this checkpoint, 95% paired bootstrap interval over the test images
            entry["versus_ema"] = {k: versus[k] for k in ("difference", "low", "high", "rounds")}
        results = done.get("results") or {}
        if results:
            tasks = next(iter(results.values()))
            for task in ("bbox", "segm"):
                if tasks.get(task):
                    entry[task] = {m: tasks[task][m] for m in ("AP", "AP50", "AP75") if m in tasks[task]}
        values = [row["l1"].get(done["name"]) for row in layers if row.get("l1")]
        values = [v for v in values if v is not None]
        entry["discrepancy_l1"] = round(statistics.fmean(values), 6) if values else None
        entries.append(entry)
    return entries


def recipe(cell: Cell, read_weights: bool = True) -> Dict[str, object]:
    """The record's ``config_hash`` (of the cell's full training config, the seed and output folder
    left out) and, with ``read_weights``, its ``initial_weights`` (:func:`initial_weights` of
    ``MODEL.WEIGHTS``), from one load of the config."""
    from d2_bnstats.d2.train import load_config

    cfg = load_config(cell.config, cell.overrides)
    described = {"config_hash": config_hash(cfg.dump())}
    if read_weights:
        described["initial_weights"] = initial_weights(cfg.MODEL.WEIGHTS)
    return described


def trained_from(cell: Cell, seed: int, results_root: str) -> Dict[str, object]:
    """``{"initial_weights": ...}`` as the record of the training an evaluation cell evaluates has it;
    empty when that record is missing or predates the field (unknown, which is not random init)."""
    path = record_path(results_root, *cell.checkpoint_of, seed)
    source = read_record(path) if os.path.isfile(path) else {}
    return {"initial_weights": source["initial_weights"]} if "initial_weights" in source else {}


def run_cell(experiment: Experiment, cell: Cell, seed: int, results_root: str, work_root: str, repo: str = ".") -> dict:
    """Train, evaluate, write and return the record of ``cell`` with ``seed``."""
    start = time.perf_counter()
    source = source_version(repo)  # the code this process runs was loaded now, not when the run ends
    output_dir = run_folder(work_root, experiment.name, cell.name, seed)
    weights = source_checkpoint(cell, seed, work_root)
    # read before training: the config file or the weights file may change while this cell trains;
    # an evaluation started from what its training cell's record says (the file may be re-made since)
    described = recipe(cell, read_weights=weights is None)
    if weights is not None:
        described.update(trained_from(cell, seed, results_root))
    if weights is None:
        training = train(cell, seed, output_dir)
    else:  # an evaluation of another cell's checkpoint: its training is that cell's
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{experiment.name}/{cell.name} seed {seed} evaluates {weights}, which does not "
                                    f"exist: run {'/'.join(cell.checkpoint_of)} seed {seed} first")
        os.makedirs(output_dir, exist_ok=True)
        training = dict(training_metrics(os.path.join(os.path.dirname(weights), "metrics.json"),
                                         cell.checkpoint_iteration),
                        checkpoint_of="/".join(cell.checkpoint_of))
        if cell.checkpoint_iteration is not None:
            training["checkpoint_iteration"] = cell.checkpoint_iteration
    evaluation_start = time.perf_counter()
    summary = evaluate(cell, output_dir, weights)
    record = {
        "experiment": experiment.name, "cell": cell.name, "seed": seed, "factors": cell.factor_dict,
        "config": cell.config, "overrides": list(cell.overrides), **described, **source, "train": training,
        "evaluation_seconds": round(time.perf_counter() - evaluation_start, 1),
        "wall_seconds": round(time.perf_counter() - start, 1), "created": now(),
        "strategies": strategy_entries(cell, summary),
        "evalnorm_layers": evalnorm_parameters(weights or os.path.join(output_dir, FINAL_MODEL)),
    }  # fmt: skip
    write_record(results_root, record)
    return record


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description="Run one (cell, seed) of a declared experiment.")
    p.add_argument("--experiment", required=True)
    p.add_argument("--cell", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--results", default="results")
    p.add_argument("--work", default="output/experiments")
    p.add_argument("--catalog", default=None, help="module declaring EXPERIMENTS (default: the lab's catalog)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    import bnstats_lab  # noqa: F401  (data sets registered, weights hints)
    # Everything a run executes is imported now, at its start: the evaluation runs tens of minutes
    # later, and a module imported only then would come from the working tree as it is by then, mixed
    # with the modules loaded at the start (the record's commit names the start's code).
    import d2_bnstats.compare  # noqa: F401
    import d2_bnstats.d2.train  # noqa: F401

    from .catalog import load_experiments

    args = parse_args(argv)
    experiment = load_experiments(args.catalog)[args.experiment]
    run_cell(experiment, experiment.cell(args.cell), args.seed, args.results, args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
