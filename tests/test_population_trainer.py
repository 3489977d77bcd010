"""Population statistics in real detectron2 training and evaluation (tiny fashion-scenes split):
PreciseBN before every evaluation and in --eval-only, FrozenBN late in training with --resume,
batch statistics at test through the Trainer, and tools/compare_bn_stats.py end to end."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.engine import hooks
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils.events import get_event_storage

from d2_bnstats.d2.population import FrozenBNHook, PreciseBNHook
from d2_bnstats.d2.statistics_health import StepGuardHook
from d2_bnstats.d2.train import evaluate_checkpoint, load_config
from d2_bnstats.d2.trainer import Trainer
from d2_bnstats.layers.frozen_bn import frozen_layers
from d2_bnstats.layers.population import precise_bn
from d2_bnstats.layers.population_protocol import population_layers, unwrap

from .conftest import REPO, tiny_opts

FRCNN_BN = os.path.join(REPO, "configs", "cpu", "frcnn_r18_bn_2img.yaml")


def statistics(model):
    return {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in population_layers(unwrap(model), True)}


class RecordingTrainer(Trainer):
    """Our Trainer, recording what each evaluation saw and the batches its training loaders gave."""

    evaluations = []  # (storage iteration or None, statistics at the start of the evaluation)
    train_batches = []

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        try:
            iteration = get_event_storage().iter
        except AssertionError:  # no EventStorage: --eval-only
            iteration = None
        cls.evaluations.append((iteration, statistics(model)))
        return super().test(cfg, model, evaluators)

    @classmethod
    def build_train_loader(cls, cfg):
        loader = super().build_train_loader(cfg)

        def recorded():
            for batch in loader:
                cls.train_batches.append(batch)
                yield batch

        return recorded()


def assert_statistics_equal_report(stats, report):
    """The layers hold exactly what a PreciseBN report computed (running_var unbiased over N)."""
    assert set(report.updated) == set(stats)
    for layer in report.layers:
        mean, var = stats[layer.name]
        assert torch.equal(mean, layer.mean), layer.name
        n = layer.count
        torch.testing.assert_close(var, (layer.var.double() * n / (n - 1)).float(), rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def trained(datasets_root, tmp_path_factory):
    """3 iterations, evaluation every 2 (after the 2nd) and at the end, PreciseBN (2 batches) enabled."""
    out = tmp_path_factory.mktemp("precise_train")
    RecordingTrainer.evaluations.clear()
    cfg = load_config(FRCNN_BN, tiny_opts(out, max_iter=3, **{
        "TEST.EVAL_PERIOD": 2, "TEST.PRECISE_BN.ENABLED": True, "TEST.PRECISE_BN.NUM_ITER": 2,
    }))
    cfg.freeze()
    trainer = RecordingTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return cfg, trainer, list(RecordingTrainer.evaluations), out


def test_precise_bn_hook_replaces_detectron2s_and_runs_before_every_evaluation(trained):
    cfg, trainer, evaluations, out = trained
    kinds = [type(h) for h in trainer._hooks]
    assert hooks.PreciseBN not in kinds
    assert kinds[0] is StepGuardHook  # the step's non-finite statistics are undone before any other hook runs
    position = {k: kinds.index(k) for k in (hooks.LRScheduler, PreciseBNHook, hooks.PeriodicCheckpointer, hooks.EvalHook)}
    assert position[hooks.LRScheduler] < position[PreciseBNHook] < position[hooks.PeriodicCheckpointer] < position[hooks.EvalHook]
    hook = trainer._hooks[position[PreciseBNHook]]
    # periodic evaluation after iteration 1 (the 2nd), final evaluation after iteration 2 (the last)
    assert [it for it, _ in hook.history] == [1, 2]
    # the periodic evaluation runs in after_step of iteration 1, the final one in after_train (the
    # storage's iteration is then max_iter); each right after the PreciseBN pass before it
    assert [it for it, _ in evaluations] == [1, 3]
    for (iteration, report), (_, stats) in zip(hook.history, evaluations):
        assert report.num_batches == 2 and report.skipped == []
        assert len(report.updated) == len(population_layers(unwrap(trainer.model)))
        assert_statistics_equal_report(stats, report)  # nothing ran between PreciseBN and the evaluation
    # the final checkpoint holds the statistics of the last PreciseBN pass
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    final = hook.history[-1][1]
    assert_statistics_equal_report({n: (saved[f"{n}.running_mean"], saved[f"{n}.running_var"]) for n in final.updated}, final)


def test_eval_only_runs_precise_bn_before_evaluating(trained, tmp_path):
    cfg, _, _, out = trained
    eval_cfg = load_config(FRCNN_BN, tiny_opts(tmp_path, **{
        "MODEL.WEIGHTS": out / "model_final.pth", "TEST.PRECISE_BN.ENABLED": True, "TEST.PRECISE_BN.NUM_ITER": 2,
    }))
    eval_cfg.freeze()
    RecordingTrainer.evaluations.clear()
    RecordingTrainer.train_batches.clear()
    results = evaluate_checkpoint(eval_cfg, trainer_cls=RecordingTrainer)
    assert "AP" in results["bbox"]
    (iteration, stats), = RecordingTrainer.evaluations
    assert iteration is None and len(RecordingTrainer.train_batches) == 2
    # reference: the checkpoint, PreciseBN over the very batches the eval-only path drew
    model = Trainer.build_model(eval_cfg)
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils.events import EventStorage

    DetectionCheckpointer(model).load(str(out / "model_final.pth"))
    with EventStorage():
        report = precise_bn(model, RecordingTrainer.train_batches, 2)
    assert_statistics_equal_report(stats, report)


class BackboneRecorder(DatasetEvaluator):
    def __init__(self):
        self.batch_sizes = []

    def reset(self):
        self.batch_sizes = []

    def process(self, inputs, outputs):
        self.batch_sizes.append(len(inputs))

    def evaluate(self):
        return {}


def test_batch_statistics_at_test_through_the_trainer(trained, tmp_path):
    cfg, trainer, _, out = trained
    cfg = load_config(FRCNN_BN, tiny_opts(tmp_path, **{
        "BNSTATS.TEST_BATCH_STATS.ENABLED": True, "BNSTATS.TEST_BATCH_STATS.IMS_PER_BATCH": 3,
    }))
    model = copy.deepcopy(unwrap(trainer.model)).eval()
    # reference: torch's own batch-statistics mode (BN without running statistics)
    reference = copy.deepcopy(model)
    for _, bn in population_layers(reference):
        bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
    features = {"ours": [], "reference": []}
    model.backbone.register_forward_hook(lambda m, i, o: features["ours"].append(o))
    reference.backbone.register_forward_hook(lambda m, i, o: features["reference"].append(o))
    recorder = BackboneRecorder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer.test(cfg, model, evaluators=[recorder])
    assert recorder.batch_sizes == [3, 3, 2]  # 8 tiny val images, k = 3
    loader = Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])
    with torch.no_grad():
        for batch in loader:
            reference(batch)
    assert len(features["ours"]) == len(features["reference"]) == 3
    for ours, ref in zip(features["ours"], features["reference"]):
        for level in ref:
            torch.testing.assert_close(ours[level], ref[level], rtol=1e-4, atol=1e-4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.slow
def test_frozen_bn_late_in_training_survives_evaluation_and_resume(datasets_root, tmp_path):
    opts = {
        "BNSTATS.FROZEN_BN.START_ITER": 1, "TEST.PRECISE_BN.NUM_ITER": 2, "TEST.EVAL_PERIOD": 2,
        "SOLVER.CHECKPOINT_PERIOD": 3,
    }
    cfg = load_config(FRCNN_BN, tiny_opts(tmp_path, max_iter=4, **opts))
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    hook = next(h for h in trainer._hooks if isinstance(h, FrozenBNHook))
    assert not any(isinstance(h, PreciseBNHook) for h in trainer._hooks)  # TEST.PRECISE_BN is off
    (report,) = hook.runner.reports  # one PreciseBN pass, right before freezing
    layers = [n for n, _ in population_layers(unwrap(trainer.model), include_frozen=True)]
    assert sorted(hook.frozen) == sorted(layers) == sorted(frozen_layers(trainer.model))
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    middle = torch.load(tmp_path / "model_0000002.pth", map_location="cpu", weights_only=False)["model"]
    # statistics: those of the pass, through 3 training steps and an evaluation (eval()/train())
    assert_statistics_equal_report({n: (final[f"{n}.running_mean"], final[f"{n}.running_var"]) for n in layers}, report)
    # affine parameters kept training
    assert any(not torch.equal(final[f"{n}.weight"], middle[f"{n}.weight"]) for n in layers)

    resumed_cfg = load_config(FRCNN_BN, tiny_opts(tmp_path, max_iter=5, **dict(opts, **{"DATASETS.TEST": "()"})))
    resumed_cfg.freeze()
    resumed = Trainer(resumed_cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 4
    resumed.train()
    hook = next(h for h in resumed._hooks if isinstance(h, FrozenBNHook))
    assert hook.runner.reports == []  # resumed past START_ITER: the checkpoint's statistics are kept
    assert sorted(frozen_layers(resumed.model)) == sorted(layers)
    after = statistics(resumed.model)
    for n in layers:
        assert torch.equal(after[n][0], final[f"{n}.running_mean"]) and torch.equal(after[n][1], final[f"{n}.running_var"])


@pytest.mark.slow
def test_compare_tool_end_to_end(trained, datasets_root, tmp_path):
    from d2_bnstats.compare import registered_strategies

    cfg, _, _, out = trained
    output = tmp_path / "compare"
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root, PYTHONWARNINGS="ignore", PYTHONPATH=REPO)
    # flags after the KEY VALUE overrides, as in `compare_bn_stats.py --config-file C MODEL.WEIGHTS W --output O`
    args = [sys.executable, os.path.join(REPO, "tools", "compare_bn_stats.py"), "--config-file", FRCNN_BN]
    args += tiny_opts(tmp_path / "unused", **{"MODEL.WEIGHTS": out / "model_final.pth"})
    args += ["--output", str(output), "--precise-bn-samples", "4", "--batch-sizes", "1", "2", "--discrepancy-images", "4"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((output / "compare.json").read_text())
    names = [s["name"] for s in summary["strategies"]]
    assert names == ["EMA", "PreciseBN(4)", "batch stats (k=1)", "batch stats (k=2)", "EvalNorm learned",
                     "EvalNorm 1/B²", "EvalNorm 1/B", "EvalNorm learned + PreciseBN(4)", "EvalNorm offline"]
    assert len(names) == len(registered_strategies()) + 1  # batch statistics twice
    for s in summary["strategies"]:
        assert s["name"] in proc.stdout
        if s["name"].startswith("EvalNorm") and s["name"] != "EvalNorm offline":
            # a BN-trained model has no learned α̂, β̂ nor recorded B: these say so instead of a row
            assert not s["available"] and "no EvalNorm layers" in s["reason"] and s["reason"] in proc.stdout
            continue
        assert s["available"], s
        bbox = s["results"]["fashion_scenes_tiny_val"]["bbox"]
        assert set(bbox) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    # EMA reproduces the plain --eval-only evaluation of the checkpoint
    plain = evaluate_checkpoint(load_config(FRCNN_BN, tiny_opts(tmp_path / "plain", **{"MODEL.WEIGHTS": out / "model_final.pth"})))
    ema = summary["strategies"][0]["results"]["fashion_scenes_tiny_val"]["bbox"]
    assert ema["AP"] == pytest.approx(plain["bbox"]["AP"], abs=1e-9)
    assert summary["strategies"][1]["prepare"]["images"] == 4
    # each available strategy against EMA: its difference is the COCO evaluator's AP difference, with a
    # paired bootstrap interval over the test images; the recommendation names a strategy only if its
    # interval lies above 0
    versus = summary["versus_ema"]
    available = [s for s in summary["strategies"][1:] if s["available"]]
    assert sorted(versus["strategies"]) == sorted(s["name"] for s in available)
    for s in available:
        r = versus["strategies"][s["name"]]
        assert r["difference"] == pytest.approx(s["results"]["fashion_scenes_tiny_val"]["bbox"]["AP"] - ema["AP"], abs=1e-6)
        assert r["low"] <= r["high"] and r["rounds"] == 1000 and r["how_to_apply"]
    chosen = versus["recommendation"]["strategy"]
    assert chosen is None or versus["strategies"][chosen]["low"] > 0
    assert "Recommendation: " + versus["recommendation"]["text"] in proc.stdout
    # the offline strategy converted the BN model (backbone and FPN norms) before estimating α̂, β̂
    assert summary["strategies"][-1]["prepare"]["converted_layers"] == 28
    # discrepancy: batch statistics with the training batch (k = 2) reproduce training normalisation
    rows = summary["discrepancy"]["layers"]
    assert len(rows) == 28 and summary["discrepancy"]["train_batch_images"] == 2
    for row in rows:
        assert row["l1"]["batch stats (k=2)"] < 1e-4, row
        assert row["l1"]["EMA"] > 1e-3, row
    assert any(r["l1"]["batch stats (k=1)"] > 1e-3 for r in rows)
    pngs = [summary["plots"]["ap"], summary["plots"]["discrepancy_layers"]] + list(summary["plots"]["histograms"].values())
    assert len(pngs) == 5
    for png in pngs:
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _two_process_training_worker(rank, world_size, opts):
    cfg = load_config(FRCNN_BN, opts, world_size=world_size)
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    hook = next(h for h in trainer._hooks if isinstance(h, PreciseBNHook))
    return statistics(trainer.model), [r["backbone.bottom_up.stem.conv1.norm"].count for _, r in hook.history]


@pytest.mark.slow
def test_precise_bn_hook_in_two_process_training_gives_identical_statistics(datasets_root, tmp_path):
    from .distributed import run_distributed

    opts = tiny_opts(tmp_path, max_iter=2, **{
        "SOLVER.IMS_PER_BATCH": 4, "TEST.PRECISE_BN.ENABLED": True, "TEST.PRECISE_BN.NUM_ITER": 2,
        "DATASETS.TEST": "()",
    })
    (stats0, counts0), (stats1, counts1) = run_distributed(_two_process_training_worker, 2, args=(opts,), timeout=900)
    assert counts0 == counts1 and len(counts0) == 1
    # N counts the values of both processes: 2 batches x 2 processes x 2 images of 128x128 for the stem
    assert counts0[0] == 2 * 2 * 2 * 64 * 64
    for name in stats0:
        assert torch.equal(stats0[name][0], stats1[name][0]) and torch.equal(stats0[name][1], stats1[name][1]), name


@pytest.mark.slow
def test_resuming_a_finished_run_still_runs_precise_bn_before_its_evaluation(trained, tmp_path):
    import shutil

    cfg, _, _, out = trained
    shutil.copy(out / "model_final.pth", tmp_path / "model_final.pth")
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    resumed_cfg = cfg.clone()
    resumed_cfg.defrost()
    resumed_cfg.OUTPUT_DIR = str(tmp_path)
    resumed_cfg.freeze()
    RecordingTrainer.evaluations.clear()
    trainer = RecordingTrainer(resumed_cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == trainer.max_iter  # nothing left to train
    trainer.train()
    hook = next(h for h in trainer._hooks if isinstance(h, PreciseBNHook))
    (_, report), = hook.history
    (_, stats), = RecordingTrainer.evaluations
    assert_statistics_equal_report(stats, report)
    saved = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert_statistics_equal_report({n: (saved[f"{n}.running_mean"], saved[f"{n}.running_var"]) for n in report.updated}, report)
