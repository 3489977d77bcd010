"""The experiment runner: real trainings and comparisons of a tiny declared experiment
(tests/data/experiment_catalog_tiny.py), each in its own process as the runner starts them.

Checked: a record holds the comparison's own numbers and the training's metrics; a run with a
record is skipped; a failed run leaves no record, is reported and does not stop the others; a
stopped training resumes from its checkpoint; the declarations refuse bad tables."""
import json
import os
import statistics
import subprocess
import sys

import pytest

from bnstats_lab.experiments.cell import LOSS_WINDOW, run_folder, training_metrics
from bnstats_lab.experiments.catalog import default_experiments
from bnstats_lab.experiments.records import initial_weights, iter_records, read_record, record_path, rows
from bnstats_lab.experiments.spec import Cell, Experiment, evaluation_of

from .conftest import REPO

CATALOG = os.path.join(REPO, "tests", "data", "experiment_catalog_tiny.py")


def run_tool(args, datasets_root, check=None):
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-W", "ignore", os.path.join(REPO, "tools", "run_experiments.py"),
                           "--catalog", CATALOG, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if check is not None:
        assert done.returncode == check, done.stdout + done.stderr
    return done


def metrics_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_runner_records_skips_and_reports_failures(tmp_path, datasets_root):
    results, work = str(tmp_path / "results"), str(tmp_path / "work")
    args = ["--experiment", "tiny", "--seeds", "0", "--results", results, "--work", work]
    first = run_tool(args, datasets_root, check=1)  # the broken cell fails: exit 1, after the good one ran
    assert "tiny: 1 done, 0 skipped, 1 failed: broken/seed0" in first.stdout
    assert "not a registered data set" in first.stdout  # the end of the failed run's log is shown

    assert not os.path.exists(record_path(results, "tiny", "broken", 0))
    path = record_path(results, "tiny", "evalnorm", 0)
    record = read_record(path)
    assert (record["experiment"], record["cell"], record["seed"]) == ("tiny", "evalnorm", 0)
    assert record["factors"] == {"images_per_batch": 2, "norm": "EvalNorm"}

    # the record's numbers are the comparison tool's, strategy by strategy, in the cell's order
    folder = run_folder(work, "tiny", "evalnorm", 0)
    with open(os.path.join(folder, "compare", "compare.json")) as f:
        compared = json.load(f)
    assert [e["strategy"] for e in record["strategies"]] == ["ema", "evalnorm_learned", "batch_stats:2"]
    for entry, done in zip(record["strategies"], compared["strategies"]):
        coco = next(iter(done["results"].values()))["bbox"]
        assert entry["bbox"] == {"AP": coco["AP"], "AP50": coco["AP50"], "AP75": coco["AP75"]}
        l1 = [row["l1"][done["name"]] for row in compared["discrepancy"]["layers"]]
        assert entry["discrepancy_l1"] == pytest.approx(statistics.fmean(l1), abs=1e-6)
    flat = rows([record])
    assert [r["strategy"] for r in flat] == ["ema", "evalnorm_learned", "batch_stats:2"]
    assert flat[0]["bbox_AP"] == record["strategies"][0]["bbox"]["AP"] and flat[0]["factors"]["norm"] == "EvalNorm"

    # training: the metrics detectron2 logged
    logged = [r for r in metrics_rows(os.path.join(folder, "metrics.json")) if "total_loss" in r]
    assert record["train"]["iterations"] == 3 == logged[-1]["iteration"] + 1
    expected = statistics.median(r["total_loss"] for r in logged[-LOSS_WINDOW:])
    assert record["train"]["final_losses"]["total_loss"] == pytest.approx(expected, abs=1e-5)
    assert record["train"]["resumed"] is False
    assert os.path.isfile(os.path.join(folder, "model_final.pth"))
    assert len(record["config_hash"]) == 64 and record["commit"]
    assert record["initial_weights"] is None  # random init: MODEL.WEIGHTS is empty
    # the learned α̂, β̂ and B of every EvalNorm layer, as the checkpoint holds them, backbone first
    import torch

    state = torch.load(os.path.join(folder, "model_final.pth"), map_location="cpu", weights_only=False)["model"]
    layers = record["evalnorm_layers"]
    assert len(layers) == sum(k.endswith(".alpha_hat") for k in state) > 0
    assert layers[0]["layer"].startswith("backbone.bottom_up.")
    for entry in layers:
        for key, name in (("alpha_hat", "alpha_hat"), ("beta_hat", "beta_hat"), ("batch_size", "norm_batch_size")):
            assert entry[key] == pytest.approx(float(state[f"{entry['layer']}.{name}"]), abs=1e-6)

    # second run: the recorded run is skipped (record untouched), the failed one is tried again
    mtime = os.path.getmtime(path)
    second = run_tool(args, datasets_root, check=1)
    assert "tiny: 0 done, 1 skipped, 1 failed: broken/seed0" in second.stdout
    assert os.path.getmtime(path) == mtime
    dry = run_tool(args + ["--dry-run"], datasets_root, check=0)
    assert "would run broken seed 0" in dry.stdout and "would run evalnorm" not in dry.stdout
    assert [r["cell"] for r in iter_records(results)] == ["evalnorm"]

    # an evaluation of that checkpoint under other strategies, without training; seed 1 has no checkpoint
    evaluated = run_tool(["--experiment", "tiny_eval", "--results", results, "--work", work], datasets_root, check=1)
    assert "evaluates" in evaluated.stdout and "seed1" in evaluated.stdout and "does not exist yet" in evaluated.stdout
    assert not os.path.exists(record_path(results, "tiny_eval", "evalnorm", 1))
    again = read_record(record_path(results, "tiny_eval", "evalnorm", 0))
    assert again["train"]["checkpoint_of"] == "tiny/evalnorm" and again["train"]["iterations"] == 3
    assert "initial_weights" in again and again["initial_weights"] == record["initial_weights"]
    assert os.path.getmtime(os.path.join(folder, "model_final.pth")) < os.path.getmtime(path)  # not retrained
    # EMA is deterministic given the checkpoint: the same AP as the training run's own evaluation
    assert again["strategies"][0]["bbox"] == record["strategies"][0]["bbox"]
    assert again["strategies"][1]["label"] == "EvalNorm learned + PreciseBN(4)" and again["strategies"][1]["available"]


@pytest.mark.slow
def test_stopped_training_resumes_from_its_checkpoint(tmp_path, datasets_root):
    """A run stopped after iteration 2 (checkpoint written) continues to the cell's 3 iterations."""
    from d2_bnstats.d2.train import argument_parser, run

    from .data.experiment_catalog_tiny import EXPERIMENTS, TINY

    results, work = str(tmp_path / "results"), str(tmp_path / "work")
    cell = EXPERIMENTS[0].cell("evalnorm")
    folder = run_folder(work, "tiny", "evalnorm", 1)
    partial = list(TINY) + ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "1", "SEED", "1", "OUTPUT_DIR", folder]
    run(argument_parser().parse_args(["--config-file", os.path.join(REPO, cell.config), *partial]))
    # as if stopped after the checkpoint of iteration 2, before the end
    os.remove(os.path.join(folder, "model_final.pth"))
    with open(os.path.join(folder, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")

    run_tool(["--experiment", "tiny", "--cells", "evalnorm", "--seeds", "1", "--results", results, "--work", work],
             datasets_root, check=0)
    record = read_record(record_path(results, "tiny", "evalnorm", 1))
    assert record["train"]["resumed"] is True
    iterations = [r["iteration"] for r in metrics_rows(os.path.join(folder, "metrics.json")) if "total_loss" in r]
    assert iterations[-1] == 2 and record["train"]["iterations"] == 3
    with open(os.path.join(folder, "run.log")) as f:
        assert "model_0000001.pth" in f.read()  # loaded the stopped run's checkpoint, did not start over
    assert not [n for n in os.listdir(folder) if n.startswith("model_0")]  # intermediate checkpoints removed


def test_declarations_refuse_bad_tables():
    with pytest.raises(ValueError, match="KEY VALUE pairs"):
        Cell("a", "c.yaml", ("SOLVER.MAX_ITER",))
    with pytest.raises(ValueError, match="set by the runner"):
        Cell("a", "c.yaml", ("SEED", "3"))
    with pytest.raises(ValueError, match="cells declared twice"):
        Experiment("e", "", (Cell("a", "c.yaml"), Cell("a", "d.yaml")))
    experiment = Experiment("e", "", (Cell("a", "c.yaml"), Cell("b", "c.yaml")), seeds=(0, 1))
    assert [(c.name, s) for c, s in experiment.select()] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    with pytest.raises(ValueError, match="seeds \\[5\\] are not declared"):
        experiment.select(seeds=[5])
    with pytest.raises(KeyError, match="no cell 'z'"):
        experiment.cell("z")
    with pytest.raises(ValueError, match="a comparison is two strategies of its cells.*precise_bn in no cell"):
        Experiment("e", "", (Cell("a", "c.yaml"),), comparisons=(("ema", "precise_bn"),))
    with pytest.raises(ValueError, match="checkpoint_of is \\(experiment, cell\\)"):
        Cell("a", "c.yaml", checkpoint_of=("e1",))
    evaluation = evaluation_of("e1", Cell("a", "c.yaml", ("K", "V"), factors=(("n", 2),)), ("ema", "precise_bn:9"))
    assert (evaluation.name, evaluation.config, evaluation.overrides, evaluation.checkpoint_of) == (
        "a", "c.yaml", ("K", "V"), ("e1", "a"))


@pytest.mark.parametrize("catalog", [None, "bnstats_lab.experiments.catalog_coco"])
def test_declared_experiments_name_existing_configs_and_strategies(catalog):
    from d2_bnstats.compare.registry import registered_strategies
    from d2_bnstats.d2.train import load_config

    from bnstats_lab.experiments.catalog import load_experiments

    for experiment in load_experiments(catalog).values():
        for cell in experiment.cells:
            assert os.path.isfile(os.path.join(REPO, cell.config)), cell.config
            for spec in cell.strategies:
                assert spec.split(":")[0] in registered_strategies()
            if catalog is not None:  # the GPU configs and their overrides load (checked) here too
                load_config(os.path.join(REPO, cell.config), list(cell.overrides))


def test_training_metrics_of_a_cut_metrics_file(tmp_path):
    path = tmp_path / "metrics.json"
    lines = [json.dumps({"iteration": i, "total_loss": float(10 - i), "loss_cls": 1.0, "time": 0.5 + i % 2})
             for i in range(30)]
    path.write_text("\n".join(lines) + '\n{"iteration": 30, "total_lo')  # a line cut by a killed run
    metrics = training_metrics(str(path))
    assert metrics["iterations"] == 30
    assert metrics["final_losses"]["total_loss"] == statistics.median(float(10 - i) for i in range(10, 30))
    assert metrics["s_per_iter"] == statistics.median(0.5 + i % 2 for i in range(30))


def test_requirements_are_made_for_the_cells_that_name_them(tmp_path):
    from bnstats_lab.experiments.runner import make_requirements

    a, b, c = (str(tmp_path / n) for n in ("a.pkl", "b.pkl", "c.pkl"))
    uses_a = Cell("uses-a", "c.yaml", ("MODEL.WEIGHTS", a))
    uses_c = Cell("uses-c", "c.yaml", ("MODEL.WEIGHTS", c))
    experiment = Experiment("e", "", (uses_a, uses_c, Cell("plain", "c.yaml")),
                            requires=((a, ("touch", a)), (b, ("touch", b)), (c, ("false",))))
    make_requirements(experiment, [uses_a], log=lambda m: None)
    assert os.path.exists(a) and not os.path.exists(b)  # b is named by no cell to run
    with pytest.raises(RuntimeError, match=f"the command that makes {c} failed"):
        make_requirements(experiment, [uses_c], log=lambda m: None)


def test_a_record_written_meanwhile_by_another_runner_is_not_redone(tmp_path, monkeypatch):
    """Two runners on one results folder: a run whose record appears while this runner is busy
    with an earlier one is skipped, not redone."""
    from bnstats_lab.experiments import runner
    from bnstats_lab.experiments.records import write_record

    experiment = Experiment("e", "", (Cell("a", "c.yaml"), Cell("b", "c.yaml")), seeds=(0,))
    results, started = str(tmp_path / "results"), []

    def run_cell_process(command, **kwargs):
        cell = command[command.index("--cell") + 1]
        started.append(cell)
        for name in ("a", "b"):  # this run's record, and the other runner's record of b
            write_record(results, {"format": 1, "experiment": "e", "cell": name, "seed": 0, "factors": {},
                                   "strategies": []})
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(runner.subprocess, "run", run_cell_process)
    summary = runner.run_experiment(experiment, results, str(tmp_path / "work"), log=lambda m: None)
    assert started == ["a"] and summary.done == ["a/seed0"] and summary.skipped == ["b/seed0"]


def test_an_attempt_without_checkpoint_leaves_no_metrics_to_mix(tmp_path):
    from bnstats_lab.experiments.cell import clear_attempt_without_checkpoint

    (tmp_path / "metrics.json").write_text('{"iteration": 0, "total_loss": 9.0}\n')
    (tmp_path / "events.out.tfevents.1.vm.1.0").write_text("x")
    (tmp_path / "run.log").write_text("kept")
    assert sorted(os.path.basename(p) for p in clear_attempt_without_checkpoint(str(tmp_path))) == [
        "events.out.tfevents.1.vm.1.0", "metrics.json"]
    assert os.listdir(tmp_path) == ["run.log"]
    # a run with a checkpoint resumes and keeps its metrics
    (tmp_path / "metrics.json").write_text('{"iteration": 0, "total_loss": 9.0}\n')
    (tmp_path / "last_checkpoint").write_text("model_0000199.pth")
    assert clear_attempt_without_checkpoint(str(tmp_path)) == [] and (tmp_path / "metrics.json").exists()


def test_intermediate_checkpoint_cells_point_at_kept_checkpoints(tmp_path):
    """An evaluation of the checkpoint after N iterations reads detectron2's model_{N-1}.pth of the
    source run, which that run keeps; a checkpoint the source does not keep is refused at declaration,
    and one the checkpoint period never writes when the training starts."""
    from bnstats_lab.experiments.cell import source_checkpoint, train, training_arguments
    from bnstats_lab.experiments.catalog import load_experiments

    source = Cell("long", "c.yaml", factors=(("checkpoint", "final"), ("n", 2)), keep_iterations=(800, 1600))
    at800 = evaluation_of("x", source, ("ema",), iteration=800, name="long_at800",
                          factors=(("checkpoint", "after 800 iterations"),))
    assert at800.factor_dict == {"checkpoint": "after 800 iterations", "n": 2} and at800.name == "long_at800"
    path = source_checkpoint(at800, 3, str(tmp_path))
    assert path == os.path.join(str(tmp_path), "x", "long", "seed3", "model_0000799.pth")
    with pytest.raises(ValueError, match="does not keep its checkpoint at iteration 900"):
        evaluation_of("x", source, ("ema",), iteration=900)
    with pytest.raises(ValueError, match="not multiples of the checkpoint period"):
        training_arguments(Cell("odd", "c.yaml", keep_iterations=(850,)), 0, str(tmp_path))
    # the training keeps exactly the declared checkpoints (a finished run: nothing is trained again)
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("model_final.pth", "model_0000199.pth", "model_0000799.pth", "model_0001599.pth"):
        (folder / name).write_bytes(b"x")
    train(source, 0, str(folder))
    assert sorted(os.listdir(folder)) == ["model_0000799.pth", "model_0001599.pth", "model_final.pth"]
    # the declared converged-detector experiment: every evaluation cell's checkpoint is kept by its source
    e5 = load_experiments()["e5"]
    for cell in e5.cells:
        if cell.checkpoint_iteration is not None:
            assert cell.checkpoint_iteration in e5.cell(cell.checkpoint_of[1]).keep_iterations


def test_initial_weights_name_the_file_by_content(tmp_path):
    import hashlib

    weights = tmp_path / "backbone.pkl"
    weights.write_bytes(bytes(range(256)) * 5000)  # over one read block
    entry = initial_weights(str(weights))
    assert entry == {"path": str(weights), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                     "bytes": 256 * 5000}
    weights.write_bytes(b"re-made")
    assert initial_weights(str(weights))["sha256"] != entry["sha256"]
    assert initial_weights("") is None
    assert initial_weights("detectron2://ImageNetPretrained/MSRA/R-50.pkl") == {
        "path": "detectron2://ImageNetPretrained/MSRA/R-50.pkl", "sha256": None, "bytes": None}
