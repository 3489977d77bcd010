"""EvalNorm inside detectron2: config keys, the configs, checkpoints through DetectionCheckpointer,
alpha_hat/beta_hat learned by detectron2's own DefaultTrainer (gradients of everything else equal to
a BN model's), evaluation modes switched with --eval-only, offline estimation, and DDP."""
import copy
import glob
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer
from detectron2.layers import FrozenBatchNorm2d
from detectron2.utils.events import EventStorage

import d2_bnstats  # noqa: F401
from d2_bnstats.d2.evalnorm_offline import convert_to_evalnorm
from d2_bnstats.d2.train import argument_parser, load_config, main
from d2_bnstats.layers.evalnorm import evalnorm_layers
from d2_bnstats.layers.evalnorm_projection import attach_projection_hook

from .conftest import REPO, assert_detection_loss_logged, tiny_opts
from .distributed import run_distributed

EN_CPU = os.path.join(REPO, "configs", "cpu", "frcnn_r18_evalnorm_2img.yaml")
BN_CPU = os.path.join(REPO, "configs", "cpu", "frcnn_r18_bn_2img.yaml")
EN_R50 = os.path.join(REPO, "configs", "frcnn_r50_evalnorm_2img.yaml")
SMALL = {"MODEL.FPN.OUT_CHANNELS": 32, "MODEL.ROI_BOX_HEAD.FC_DIM": 64, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32}


def small_opts(output_dir, **extra):
    return tiny_opts(output_dir, **{**SMALL, **extra})


def build(config, opts):
    return DefaultTrainer.build_model(load_config(config, opts))


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------ config
def test_config_keys_reach_every_layer(tmp_path):
    model = build(
        EN_CPU,
        small_opts(tmp_path, **{
            "BNSTATS.EVALNORM.MODE": "rule", "BNSTATS.EVALNORM.BATCH_SIZE": 4, "BNSTATS.EVALNORM.AUX_SAMPLES": 0,
        }),
    )
    layers = evalnorm_layers(model)
    # stem + 8 blocks x 2 + 3 shortcuts; FPN: 4 lateral + 4 output convs
    assert len(layers) == 28
    assert sum(n.startswith("backbone.bottom_up") for n, _ in layers) == 20
    assert all(l.mode == "rule" and l.batch_size == 4 and l.aux_samples == 0 and l.learn for _, l in layers)
    assert float(layers[0][1].alpha) == pytest.approx(1 / 16)
    model = build(EN_CPU, small_opts(tmp_path, **{
        "BNSTATS.EVALNORM.MODE": "fixed", "BNSTATS.EVALNORM.ALPHA": 0.2, "BNSTATS.EVALNORM.LEARN": False,
    }))
    layer = evalnorm_layers(model)[0][1]
    assert (float(layer.alpha), float(layer.beta)) == pytest.approx((0.2, 0.2)) and not layer.alpha_hat.requires_grad
    assert getattr(model, "_evalnorm_aux_hook", None) is None  # nothing to learn: no hook


def test_built_models_keep_alpha_beta_in_the_unit_interval(tmp_path):
    model = build(EN_CPU, small_opts(tmp_path))
    layer = evalnorm_layers(model)[0][1]
    layer.alpha_hat.grad = torch.tensor(-1.0)
    torch.optim.SGD([layer.alpha_hat], lr=10.0).step()  # the projection hook of the build clamps it
    assert layer.alpha_hat.item() == 1.0
    assert attach_projection_hook(model) is attach_projection_hook(model)


@pytest.mark.parametrize(
    "config, opts, message",
    [
        (BN_CPU, {"BNSTATS.EVALNORM.MODE": "EMA"}, "BNSTATS.EVALNORM.MODE = 'EMA' is not an EvalNorm mode"),
        (BN_CPU, {"BNSTATS.EVALNORM.AUX_LOSS_WEIGHT": -0.5}, "BNSTATS.EVALNORM.AUX_LOSS_WEIGHT = -0.5 must be"),
        (EN_CPU, {"BNSTATS.EVALNORM.ALPHA": 1.5}, r"BNSTATS.EVALNORM.ALPHA = 1.5 must be in \[0, 1\]"),
    ],
)
def test_evalnorm_config_values_are_checked_when_the_config_is_loaded(config, opts, message, tmp_path):
    with pytest.raises(ValueError, match=message):  # also for a config whose model has no EvalNorm layer
        load_config(config, small_opts(tmp_path, **opts))


@pytest.mark.parametrize(
    "opts, message",
    [
        ({"BNSTATS.EVALNORM.MODE": "EMA"}, "BNSTATS.EVALNORM.MODE = 'EMA' is not an EvalNorm mode; accepted: learned"),
        ({"BNSTATS.EVALNORM.MODE": "fixed"}, r"needs BNSTATS.EVALNORM.ALPHA in \[0, 1\]"),
        ({"BNSTATS.EVALNORM.MODE": "fixed", "BNSTATS.EVALNORM.ALPHA": 0.5, "BNSTATS.EVALNORM.BETA": 2.0}, "BETA = 2.0"),
        ({"BNSTATS.EVALNORM.BATCH_SIZE": -2}, "BNSTATS.EVALNORM.BATCH_SIZE = -2 must be >= 1"),
        ({"BNSTATS.EVALNORM.AUX_SAMPLES": -1}, "AUX_SAMPLES = -1"),
    ],
)
def test_bad_evalnorm_config_values_name_the_key(opts, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        build(EN_CPU, small_opts(tmp_path, **opts))


def test_r50_config_evalnorm_in_backbone_fpn_and_4conv1fc_head_and_frozen_stages(datasets_root, tmp_path):
    cfg = load_config(EN_R50, tiny_opts(tmp_path, **{
        "MODEL.WEIGHTS": "", "MODEL.DEVICE": "cpu", "SOLVER.IMS_PER_BATCH": 2,
        "INPUT.MIN_SIZE_TRAIN": "(64,)", "INPUT.MAX_SIZE_TRAIN": 64, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": 64, "MODEL.BACKBONE.FREEZE_AT": 2,
    }))
    assert cfg.SOLVER.IMS_PER_BATCH == 2 and cfg.MODEL.BACKBONE.FREEZE_AT == 2
    trainer = DefaultTrainer(cfg)
    model = trainer.model
    names = [n for n, _ in evalnorm_layers(model)]
    bottom_up = model.backbone.bottom_up
    # FREEZE_AT 2: stem and res2 norms became FrozenBN (no train/test gap there); res3-5 are EvalNorm
    assert isinstance(bottom_up.stem.conv1.norm, FrozenBatchNorm2d)
    assert all(isinstance(m, FrozenBatchNorm2d) for n, m in bottom_up.res2.named_modules() if n.endswith("norm"))
    assert sum(n.startswith("backbone.bottom_up.res") for n in names) == 3 * (4 + 6 + 3) + 3  # 3 norms/block, shortcuts
    assert sum(n.startswith("backbone.fpn_") for n in names) == 8
    head = model.roi_heads.box_head
    assert [n for n in names if n.startswith("roi_heads.box_head")] == [f"roi_heads.box_head.conv{i}.norm" for i in range(1, 5)]
    assert len(head.fcs) == 1
    with EventStorage(0) as storage:
        trainer._trainer.run_step()
        assert "loss_evalnorm" in storage.histories()
        assert any(k.startswith("evalnorm/roi_heads.box_head.conv4.norm/") for k in storage.histories())
    box_norm = head.conv1.norm
    assert box_norm.norm_batch_size.item() == 2 * 32  # samples per forward in a head: RoIs
    assert model.backbone.bottom_up.res3[0].conv1.norm.norm_batch_size.item() == 2


# ------------------------------------------------------------------------------------ checkpoints
def _incompatible(model, path):
    """Load ``path`` into ``model`` as detectron2 does (DetectionCheckpointer), and return the missing and
    unexpected keys (torch's ``load_state_dict(strict=False)`` of the same file; a shape mismatch raises)."""
    DetectionCheckpointer(model).load(path, checkpointables=[])
    state = torch.load(path, map_location="cpu", weights_only=False)["model"]
    return model.load_state_dict(state, strict=False)


def test_bn_and_frozenbn_checkpoints_load_into_evalnorm_and_back(tmp_path):
    en_model = build(EN_CPU, small_opts(tmp_path))
    en_keys = {f"{n}.{p}" for n, _ in evalnorm_layers(en_model) for p in ("alpha_hat", "beta_hat")}
    for norm in ("BN", "FrozenBN"):
        source = build(BN_CPU, small_opts(tmp_path, **{"MODEL.RESNETS.NORM": norm, "MODEL.FPN.NORM": norm}))
        with torch.no_grad():
            for _, buf in source.named_buffers():
                if buf.dtype.is_floating_point:
                    buf.uniform_(0.5, 1.5)
        path = str(tmp_path / f"{norm}.pth")
        torch.save({"model": source.state_dict()}, path)
        target = build(EN_CPU, small_opts(tmp_path))
        inc = _incompatible(target, path)
        assert set(inc.missing_keys) == en_keys, norm  # only alpha_hat, beta_hat
        assert not inc.unexpected_keys
        source_state = source.state_dict()
        for key, value in target.state_dict().items():
            if key in source_state:
                assert torch.equal(value, source_state[key]), key
    # EvalNorm -> EvalNorm: exact
    path = str(tmp_path / "evalnorm.pth")
    with torch.no_grad():
        for _, layer in evalnorm_layers(en_model):
            layer.alpha_hat.fill_(0.25)
            layer.norm_batch_size.fill_(2)
    torch.save({"model": en_model.state_dict()}, path)
    reloaded = build(EN_CPU, small_opts(tmp_path))
    inc = _incompatible(reloaded, path)
    assert not inc.missing_keys and not inc.unexpected_keys
    for key, value in en_model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    # EvalNorm -> BN: loads; EvalNorm's own keys are the only unexpected ones
    bn_model = build(BN_CPU, small_opts(tmp_path))
    inc = _incompatible(bn_model, path)
    assert not inc.missing_keys
    own = ("norm_batch_size", "_extra_state")
    assert set(inc.unexpected_keys) == en_keys | {f"{n}.{k}" for n, _ in evalnorm_layers(en_model) for k in own}


# ------------------------------------------------------------------------------------ training
def _seeded_trainer(config, opts, state=None):
    np.random.seed(0)
    torch.manual_seed(0)
    trainer = DefaultTrainer(load_config(config, opts))
    if state is not None:
        trainer.model.load_state_dict(state, strict=False)
    return trainer


def test_default_trainer_learns_alpha_beta_and_trains_exactly_like_bn(datasets_root, tmp_path):
    bn = _seeded_trainer(BN_CPU, small_opts(tmp_path / "bn", max_iter=4))
    en = _seeded_trainer(EN_CPU, small_opts(tmp_path / "en", max_iter=4), bn.model.state_dict())
    results = {}
    for name, trainer in (("bn", bn), ("en", en)):
        np.random.seed(1)
        torch.manual_seed(1)
        with EventStorage(0) as storage:
            trainer._trainer.run_step()
            results[name] = {k: v.latest() for k, v in storage.histories().items() if k.startswith("loss")}
    assert set(results["en"]) == set(results["bn"]) | {"loss_evalnorm"}
    for key, value in results["bn"].items():
        assert results["en"][key] == pytest.approx(value, abs=1e-6), key
    bn_grads = {n: p.grad for n, p in bn.model.named_parameters()}
    for name, p in en.model.named_parameters():
        if name.endswith(("alpha_hat", "beta_hat")):
            assert p.grad is not None and p.grad.abs() > 0, name
        else:
            torch.testing.assert_close(p.grad, bn_grads[name], rtol=0, atol=1e-6, msg=name)

    # detectron2's own loop: loss_evalnorm and alpha/beta per layer in metrics.json, values learned
    en.train()
    metrics = read_metrics(tmp_path / "en")
    losses = [m for m in metrics if "loss_evalnorm" in m]
    assert losses and all(np.isfinite(m["loss_evalnorm"]) and m["loss_evalnorm"] > 0 for m in losses)
    last = metrics[-1]
    names = [n for n, _ in evalnorm_layers(en.model)]
    for n in names:
        assert f"evalnorm/{n}/alpha" in last and f"evalnorm/{n}/beta" in last
    layers = dict(evalnorm_layers(en.model))
    moved = [n for n in names if layers[n].alpha_hat.item() > 0 or layers[n].beta_hat.item() > 0]
    assert len(moved) >= 0.9 * len(names)  # learned away from the initial 0 (a layer may sit at its optimum 0)
    assert all(0 <= l.alpha_hat.item() <= 1 and 0 <= l.beta_hat.item() <= 1 for l in layers.values())
    assert last[f"evalnorm/{names[0]}/alpha"] == pytest.approx(layers[names[0]].alpha_hat.item(), abs=0.2)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "en"))


def test_a_model_copies_and_converts_right_after_a_training_step(datasets_root, tmp_path):
    """The last training forward leaves each layer's L_aux (part of that step's graph) in the model;
    copies (deepcopy, a whole-module torch.save/torch.load) and the deployment conversions, which copy,
    must work then and give the original model's outputs."""
    cfg = load_config(EN_CPU, small_opts(tmp_path))
    torch.manual_seed(0)
    model = DefaultTrainer.build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = next(iter(DefaultTrainer.build_train_loader(cfg)))
    with EventStorage(0):
        losses = model(batch)
    assert "loss_evalnorm" in losses
    sum(losses.values()).backward()
    optimizer.step()
    layers = [layer for _, layer in evalnorm_layers(model)]
    assert any(layer.aux_loss is not None and layer.aux_loss.grad_fn is not None for layer in layers)

    copied = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    frozen = d2_bnstats.to_frozen(model)
    folded = d2_bnstats.fold_norms_into_convs(model)
    deployed, _ = d2_bnstats.convert_for_deployment(model, fold=True)
    assert all(layer.aux_loss is not None for layer in layers)  # the original keeps its own

    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        reference = model.backbone(x)
        for name, other, tolerance in (
            ("deepcopy", copied, 0), ("torch.save/load", reloaded, 0),
            ("to_frozen", frozen, 1e-5), ("fold", folded, 1e-4), ("deployment", deployed, 1e-4),
        ):
            other.eval()
            outputs = other.backbone(x)
            for key, value in reference.items():
                torch.testing.assert_close(outputs[key], value, rtol=0, atol=tolerance, msg=f"{name} {key}")

    # a copy trains on: its L_aux is computed and added to its losses
    copied.train()
    with EventStorage(0):
        again = copied(batch)
    assert "loss_evalnorm" in again and again["loss_evalnorm"].requires_grad


def test_eval_only_switches_modes_and_ema_equals_the_bn_model(datasets_root, tmp_path):
    model = build(EN_CPU, small_opts(tmp_path))
    with torch.no_grad():  # a "trained" EvalNorm model: statistics, alpha_hat, beta_hat and B set
        for name, buf in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.uniform_(0.5, 1.5)
        for _, layer in evalnorm_layers(model):
            layer.alpha_hat.fill_(0.3)
            layer.beta_hat.fill_(0.4)
            layer.norm_batch_size.fill_(2)
    weights = str(tmp_path / "model.pth")
    torch.save({"model": model.state_dict()}, weights)

    def detections(config, out, **opts):
        args = argument_parser().parse_args(
            ["--config-file", config, "--eval-only"] + small_opts(tmp_path / out, **{"MODEL.WEIGHTS": weights, **opts})
        )
        assert set(main(args)["bbox"]) >= {"AP", "AP50", "AP75"}
        (path,) = glob.glob(str(tmp_path / out / "inference" / "**" / "coco_instances_results.json"), recursive=True)
        with open(path) as f:
            return json.load(f)

    ema = detections(EN_CPU, "ema", **{"BNSTATS.EVALNORM.MODE": "ema"})
    assert ema and ema == detections(BN_CPU, "bn")  # "ema" is BN inference; the checkpoint loads into BN
    learned = detections(EN_CPU, "learned")  # the default mode, from the same checkpoint
    assert learned and learned != ema


# ------------------------------------------------------------------------------------ offline
def test_estimate_evalnorm_tool_changes_nothing_but_alpha_beta(datasets_root, tmp_path):
    opts = small_opts(tmp_path)
    source = build(BN_CPU, opts)
    with torch.no_grad():  # non-trivial statistics, as after training
        for name, buf in source.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.uniform_(0.5, 1.5)
    weights = str(tmp_path / "bn.pth")
    torch.save({"model": source.state_dict()}, weights)
    out = str(tmp_path / "estimated" / "model_evalnorm.pth")
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "estimate_evalnorm.py"), "--config-file", BN_CPU,
         "--images", "4", "--ims-per-batch", "2", "--output", out] + opts + ["MODEL.WEIGHTS", weights],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "28 layers, 2 iterations" in proc.stdout and "alpha_hat" in proc.stdout and "backbone.fpn_output5.norm" in proc.stdout
    saved = torch.load(out, map_location="cpu", weights_only=False)["model"]
    original = source.state_dict()
    for key, value in original.items():  # every other parameter and buffer bit for bit
        assert torch.equal(saved[key], value), key
    extra = set(saved) - set(original)
    assert extra == {f"{k.rsplit('.', 1)[0]}.{p}" for k in original if k.endswith("running_mean")
                     for p in ("alpha_hat", "beta_hat", "norm_batch_size", "_extra_state")}
    alphas = [v.item() for k, v in saved.items() if k.endswith(("alpha_hat", "beta_hat"))]
    assert all(0 <= a <= 1 for a in alphas) and sum(a > 0 for a in alphas) > len(alphas) // 2
    assert all(v.item() == 2 for k, v in saved.items() if k.endswith("norm_batch_size"))
    # the config written next to it builds the EvalNorm model; the checkpoint loads without gaps
    eval_cfg = load_config(out.replace(".pth", ".yaml"))
    assert eval_cfg.MODEL.RESNETS.NORM == "EvalNorm" and eval_cfg.MODEL.FPN.NORM == "EvalNorm"
    model = DefaultTrainer.build_model(eval_cfg)
    inc = _incompatible(model, out)
    assert not inc.missing_keys and not inc.unexpected_keys


def test_convert_to_evalnorm_keeps_frozen_layers_unless_asked(tmp_path):
    model = build(BN_CPU, small_opts(tmp_path, **{"MODEL.BACKBONE.FREEZE_AT": 2}))
    frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert frozen == 1 + 4  # stem + res2 (2 blocks x 2)
    before = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    names = convert_to_evalnorm(model)
    assert sorted(names) == sorted(before) and sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == frozen
    layer = dict(model.named_modules())[names[0]]
    ref = before[names[0]].eval()
    x = torch.randn(2, layer.num_features, 8, 8)
    layer.eval().set_mode("ema")
    assert torch.equal(layer(x), ref(x))
    assert len(convert_to_evalnorm(model, include_frozen=True)) == frozen
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())


# ------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank, world_size, config, opts):
    from d2_bnstats.d2.trainer import Trainer

    trainer = Trainer(load_config(config, opts, world_size=world_size))
    trainer.train()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    return {n: (l.alpha_hat.item(), l.beta_hat.item(), l.norm_batch_size.item()) for n, l in evalnorm_layers(model)}


@pytest.mark.slow
def test_ddp_two_processes_learn_identical_alpha_beta(datasets_root, tmp_path):
    opts = small_opts(tmp_path, max_iter=3, **{"SOLVER.IMS_PER_BATCH": 4, "MODEL.FPN.NORM": "SyncEvalNorm",
                                                "TEST.EVAL_PERIOD": 0, "DATASETS.TEST": "()"})
    results = run_distributed(_ddp_worker, 2, args=(EN_CPU, opts), timeout=600)
    assert results[0] == results[1]  # alpha_hat, beta_hat (and B) identical on both ranks
    values = results[0]
    assert all(a > 0 or b > 0 for a, b, _ in values.values())
    assert all(v[2] == 2 for n, v in values.items() if n.startswith("backbone.bottom_up"))  # 2 images per process
    assert all(v[2] == 4 for n, v in values.items() if n.startswith("backbone.fpn_"))  # SyncEvalNorm: global batch
    metrics = read_metrics(tmp_path)
    assert [m["iteration"] for m in metrics if "loss_evalnorm" in m][-1] == 2


def test_plugin_trainer_logs_the_detection_loss(datasets_root, tmp_path):
    """Per step, ``detection_loss`` is the sum of the step's losses without ``loss_evalnorm``; it reaches
    metrics.json (the console line: the LazyConfig tool's test)."""
    from d2_bnstats.d2.trainer import Trainer

    trainer = Trainer(load_config(EN_CPU, small_opts(tmp_path, max_iter=3)))
    trainer.resume_or_load(resume=False)
    trainer.train()
    histories = trainer.storage.histories()
    per_step = {}
    for name, history in histories.items():
        if name.startswith("loss_") and name != "loss_evalnorm":
            for value, iteration in history.values():
                per_step[iteration] = per_step.get(iteration, 0.0) + value
    logged = {iteration: value for value, iteration in histories["detection_loss"].values()}
    assert sorted(logged) == [0, 1, 2] and sorted(per_step) == [0, 1, 2]
    for iteration, value in logged.items():
        assert value == pytest.approx(per_step[iteration], rel=1e-9)
    totals = {iteration: value for value, iteration in histories["total_loss"].values()}
    evalnorm = {iteration: value for value, iteration in histories["loss_evalnorm"].values()}
    for iteration, value in logged.items():
        assert value == pytest.approx(totals[iteration] - evalnorm[iteration], rel=1e-5)
    assert_detection_loss_logged(read_metrics(tmp_path))
