"""The plug-in on detectron2's LazyConfig path: options node, norm options, transforms, hooks, errors.

The CPU configs of configs/lazy/cpu/ (R-18 FPN Faster R-CNN on fashion-scenes) train a few iterations
on the tiny split in a loop built the way detectron2's ``tools/lazyconfig_train_net.py`` builds its
own (``SimpleTrainer`` + hooks), with the plug-in's calls; the GPU examples (Mask R-CNN R-50-FPN on
detectron2's model-zoo pieces) are built on the CPU.
"""
import math
import os

import pytest
from detectron2 import model_zoo
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.engine import SimpleTrainer, hooks
from detectron2.layers import Conv2d as D2Conv2d
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.utils.events import EventStorage
from omegaconf import OmegaConf
from torch import nn

import d2_bnstats
from d2_bnstats.d2.build import apply_model_transforms
from d2_bnstats.d2.norms.mabn import CentralizedConv2d, convs_feeding_mabn
from d2_bnstats.d2.population import FrozenBNHook, PreciseBNHook
from d2_bnstats.d2.replicas import ReplicaCheck
from d2_bnstats.d2.statistics_health import StepGuardHook
from d2_bnstats.layers.evalnorm import EvalNorm2d, evalnorm_layers
from d2_bnstats.layers.ghost_bn import GhostBatchNorm2d
from d2_bnstats.layers.mabn import MABN2d

from .conftest import REPO

CPU = os.path.join(REPO, "configs", "lazy", "cpu", "faster_rcnn_R_18_FPN_fashion{}.py")
GPU = os.path.join(REPO, "configs", "lazy", "mask_rcnn_R_50_FPN_{}.py")
SIZE = 64  # px: half the configs' canvas, a quarter of the cost


def cpu_config(method="", tmp_path=None, max_iter=3):
    """A CPU LazyConfig on the tiny fashion-scenes split at 64 px, a few iterations at a constant LR."""
    cfg = LazyConfig.load(CPU.format(f"_{method}" if method else ""))
    for split in ("train", "test"):
        loader = cfg.dataloader[split]
        loader.dataset.names = f"fashion_scenes_tiny_{'train' if split == 'train' else 'val'}"
        resize = loader.mapper.augmentations[0]
        resize.short_edge_length = (SIZE,) if split == "train" else SIZE
        resize.max_size = SIZE
    cfg.dataloader.train.num_workers = cfg.dataloader.test.num_workers = 0
    cfg.optimizer.lr = 0.001
    cfg.lr_multiplier.warmup_length = 0.0
    cfg.train.max_iter = max_iter
    if tmp_path is not None:
        cfg.train.output_dir = str(tmp_path)
    return cfg


def lazy_train(cfg, model, plugin_hooks=None, extra_hooks=()):
    """detectron2's ``do_train`` of ``lazyconfig_train_net.py`` with the plug-in's hooks."""
    cfg.optimizer.params.model = model
    trainer = SimpleTrainer(model, instantiate(cfg.dataloader.train), instantiate(cfg.optimizer))
    if plugin_hooks is None:
        plugin_hooks = d2_bnstats.lazy.build_hooks(cfg, model)
    trainer.register_hooks(
        [hooks.IterationTimer(), hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier))]
        + plugin_hooks
        + list(extra_hooks)
    )
    trainer.train(0, cfg.train.max_iter)
    return trainer


def flatten(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, (list, tuple)) else value
    return out


# --------------------------------------------------------------------------------------------------
# the options node


def test_bnstats_node_has_the_yacs_keys_and_defaults():
    """Every BNSTATS key with its yacs default, plus detectron2's TEST.PRECISE_BN.ENABLED/NUM_ITER."""
    yacs = get_cfg()
    d2_bnstats.add_bnstats_config(yacs)
    expected = flatten(yacs.BNSTATS)
    expected.update({f"PRECISE_BN.{k}": yacs.TEST.PRECISE_BN[k] for k in ("ENABLED", "NUM_ITER")})
    node = d2_bnstats.lazy.bnstats_node()
    assert flatten(OmegaConf.to_container(node)) == expected
    node.GHOST_BN.VIRTUAL_BATCH_SIZE = 7  # a new node each time: no shared state
    assert d2_bnstats.lazy.bnstats_node().GHOST_BN.VIRTUAL_BATCH_SIZE == 32


def test_transforms_run_without_a_config():
    model = nn.Sequential(D2Conv2d(3, 4, 3, norm=MABN2d(4)), D2Conv2d(4, 4, 3, norm=EvalNorm2d(4)))
    apply_model_transforms(model, None)  # defaults, no TypeError
    assert type(model[0]) is CentralizedConv2d and type(model[1]) is D2Conv2d


# --------------------------------------------------------------------------------------------------
# EvalNorm and MABN through the LazyConfig path


def test_evalnorm_lazy_config_learns_alpha_beta_and_logs_loss_evalnorm(datasets_root, tmp_path):
    cfg = cpu_config("evalnorm", tmp_path)
    plain = instantiate(cfg.model)  # what LazyConfig users got before: EvalNorm layers, no auxiliary loss
    batch = next(iter(instantiate(cfg.dataloader.train)))
    with EventStorage():
        assert "loss_evalnorm" not in plain(batch)

    model = d2_bnstats.build_lazy_model(cfg)
    layers = dict(evalnorm_layers(model))
    assert len(layers) == len(evalnorm_layers(plain)) > 20
    assert all(l.alpha_hat.item() == 0 and l.beta_hat.item() == 0 for l in layers.values())
    trainer = lazy_train(cfg, model)

    history = trainer.storage.histories()
    losses = [v for v, _ in history["loss_evalnorm"].values()]
    assert len(losses) == cfg.train.max_iter and all(math.isfinite(v) and v > 0 for v in losses)
    assert any(l.alpha_hat.item() > 0 or l.beta_hat.item() > 0 for l in layers.values())
    assert all(0 <= l.alpha_hat.item() <= 1 and 0 <= l.beta_hat.item() <= 1 for l in layers.values())
    name = next(iter(layers))
    assert history[f"evalnorm/{name}/alpha"].latest() == pytest.approx(layers[name].alpha_hat.item(), abs=0.2)


def test_mabn_lazy_config_centralizes_the_convs_and_ends_steps_with_the_optimizer(datasets_root, tmp_path):
    cfg = cpu_config("mabn", tmp_path, max_iter=2)
    plain = instantiate(cfg.model)
    assert not any(isinstance(m, CentralizedConv2d) for m in plain.modules())

    model = d2_bnstats.build_lazy_model(cfg)
    mabn = [n for n, m in model.named_modules() if isinstance(m, MABN2d)]
    fed = convs_feeding_mabn(model)
    assert len(mabn) > 20 and sorted(norm for _, _, norm in fed) == sorted(mabn)
    assert any(name.startswith("roi_heads.box_head.conv") for name, _, _ in fed)
    for name, conv, _ in fed:
        assert isinstance(conv, CentralizedConv2d), name
        assert conv.weight.mean(dim=(1, 2, 3)).abs().max() < 1e-5, name

    lazy_train(cfg, model)  # the step hook attached by the build ends one MABN step per optimizer step
    assert {model.get_submodule(n).steps for n in mabn} == {2}


# --------------------------------------------------------------------------------------------------
# options reach the layers; errors name LazyConfig fields


def test_bnstats_options_reach_the_layers():
    cfg = cpu_config("evalnorm")
    box_head = cfg.model.roi_heads.box_head
    box_head.conv_dims, box_head.conv_norm = [128, 128], "GhostBN"
    cfg.model.backbone.norm = "MABN"
    cfg = LazyConfig.apply_overrides(  # the command line's key=value form
        cfg, ["bnstats.GHOST_BN.VIRTUAL_BATCH_SIZE=3", "bnstats.EVALNORM.MODE=fixed", "bnstats.EVALNORM.ALPHA=0.2"]
    )
    cfg.bnstats.MABN.SIMULATED_BATCH = 8  # m = 8 / dataloader.train.total_batch_size (2) = 4
    model = d2_bnstats.build_lazy_model(cfg)
    ghost = [m for m in model.roi_heads.box_head.modules() if isinstance(m, GhostBatchNorm2d)]
    assert len(ghost) == 2 and {m.virtual_batch_size for m in ghost} == {3}
    values = {(float(l.alpha), float(l.beta), l.mode) for _, l in evalnorm_layers(model)}
    assert len(values) == 1 and values.pop() == (pytest.approx(0.2), pytest.approx(0.2), "fixed")
    fpn = [m for n, m in model.backbone.named_modules() if n.startswith("fpn_") and isinstance(m, MABN2d)]
    assert len(fpn) == 8 and {m.buffer_size for m in fpn} == {4}


def _set(cfg, field, value):
    OmegaConf.update(cfg, field, value, merge=False)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("bnstats.EVALNORM.MODE", "bogus", "is not an EvalNorm mode"),
        ("bnstats.MABN.DECAY", 2.0, "a number in [0, 1]"),
        ("bnstats.GHOST_BN.VIRTUAL_BATCH_SIZE", 0, "a positive integer"),
        ("bnstats.PRECISE_BN.NUM_SAMPLES", -1, "use a number of images > 0"),
        ("bnstats.CPU_FALLBACK", "yes", "expected True or False"),
        ("bnstats.MABN.BUFFER_SIZE", 2.5, "expected an integer"),
        ("bnstats.GHOST_BN.VIRTUAL_BATCH", 4, "is not an option of the plug-in"),
        ("bnstats.MABN.SIMULATED_BATCH", 3, "dataloader.train.total_batch_size = 2"),
        ("model.backbone.norm", "BatchNorm", "unknown norm"),
        ("dataloader.train.total_batch_size", 0, "must be a positive multiple"),
    ],
)
def test_bad_values_fail_naming_the_lazyconfig_field(field, value, words):
    cfg = cpu_config("mabn")
    _set(cfg, field, value)
    with pytest.raises(ValueError) as error:
        d2_bnstats.configure_lazy_norms(cfg)
    message = str(error.value)
    assert f"{field} = {value!r}" in message or f"{field} is not" in message, message
    assert words in message and "BNSTATS" not in message and "SOLVER" not in message, message


def test_prepare_model_needs_the_norms_configured():
    cfg = cpu_config("mabn")
    cfg.bnstats.MABN.BUFFER_SIZE = 4
    with pytest.raises(ValueError, match=r"model\.backbone\.bottom_up\.stem\.norm = 'MABN' does not carry"):
        d2_bnstats.prepare_model(instantiate(cfg.model), cfg)  # instantiated without configure_lazy_norms
    model = instantiate(d2_bnstats.configure_lazy_norms(cfg).model)
    assert d2_bnstats.prepare_model(model, cfg) is model
    assert {m.buffer_size for m in model.modules() if isinstance(m, MABN2d)} == {4}


# --------------------------------------------------------------------------------------------------
# hooks of a lazyconfig_train_net-style loop


def test_hooks_run_precise_bn_before_evaluation(datasets_root, tmp_path):
    cfg = cpu_config("", tmp_path, max_iter=2)  # BN
    cfg.bnstats.PRECISE_BN.ENABLED = True
    cfg.bnstats.PRECISE_BN.NUM_ITER = 2
    model = d2_bnstats.build_lazy_model(cfg)
    ours = d2_bnstats.lazy.build_hooks(cfg, model)
    assert [type(h) for h in ours] == [StepGuardHook, PreciseBNHook]
    seen = []

    def evaluate():
        seen.append(len(ours[1].history))
        return d2_bnstats.lazy.evaluate(cfg, model)

    lazy_train(cfg, model, ours, [hooks.EvalHook(cfg.train.eval_period, evaluate)])
    assert seen == [1]  # the final evaluation ran after the final PreciseBN pass
    (iteration, report), = ours[1].history
    assert iteration == 1 and len(report.updated) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    assert os.path.isfile(os.path.join(tmp_path, "coco_instances_results.json"))  # the evaluator's output


def test_hooks_follow_the_bnstats_node():
    cfg = cpu_config("")
    (guard,) = d2_bnstats.lazy.build_hooks(cfg, nn.Linear(1, 1))
    assert isinstance(guard, StepGuardHook)
    cfg.bnstats.FROZEN_BN.START_ITER = 1
    cfg.bnstats.FROZEN_BN.PRECISE_BN = False
    cfg.bnstats.CHECK_REPLICAS = True
    guard, frozen, replicas = d2_bnstats.lazy.build_hooks(cfg, nn.Linear(1, 1))
    assert isinstance(guard, StepGuardHook)
    assert isinstance(frozen, FrozenBNHook) and frozen.start_iter == 1 and frozen.runner is None
    assert isinstance(replicas, ReplicaCheck) and replicas.output_dir == cfg.train.output_dir
    del cfg.train.max_iter
    with pytest.raises(ValueError, match=r"bnstats\.FROZEN_BN\.START_ITER = 1 needs .*train\.max_iter"):
        d2_bnstats.lazy.build_hooks(cfg, nn.Linear(1, 1))


# --------------------------------------------------------------------------------------------------
# the GPU examples, built on the CPU


def zoo_pieces():
    try:
        model_zoo.get_config("common/models/mask_rcnn_fpn.py")
    except RuntimeError as e:
        pytest.skip(f"detectron2's model-zoo LazyConfig files are not installed ({e})")


@pytest.mark.parametrize("method, layer", [("evalnorm", EvalNorm2d), ("mabn", MABN2d)])
def test_gpu_examples_put_the_norm_in_backbone_fpn_and_heads(method, layer):
    zoo_pieces()
    cfg = LazyConfig.load(GPU.format(method))
    cfg.train.device = "cpu"
    model = d2_bnstats.build_lazy_model(cfg)
    places = {
        "stem": model.backbone.bottom_up.stem,
        "res5": model.backbone.bottom_up.res5,
        "fpn": model.backbone.fpn_output2,
        "box head": model.roi_heads.box_head.conv4,
        "mask head": model.roi_heads.mask_head.mask_fcn4,
    }
    for place, module in places.items():
        assert any(type(m) is layer for m in module.modules()), place
    assert isinstance(cfg.model.backbone.bottom_up.stem.norm, d2_bnstats.ConfiguredNorm)
    assert isinstance(model.backbone.bottom_up, ResNet) and isinstance(model.backbone.bottom_up.stem, BasicStem)
    centralized = [m for m in model.modules() if isinstance(m, CentralizedConv2d)]
    assert (len(centralized) > 50) == (method == "mabn")
    assert cfg.dataloader.train.total_batch_size == 16 and cfg.train.max_iter in (90000, 180000)


def test_prepare_model_reuses_the_checks_and_view_of_configure_lazy_norms(monkeypatch):
    """One view and one round of checks per build; a change after configuring is checked again."""
    from d2_bnstats.d2.lazy import model as lazy_model

    cfg = cpu_config("mabn")
    calls = []
    real = lazy_model.check_config
    monkeypatch.setattr(lazy_model, "check_config", lambda c, *a, **k: calls.append(1) or real(c, *a, **k))
    model = instantiate(d2_bnstats.configure_lazy_norms(cfg).model)
    d2_bnstats.prepare_model(model, cfg)
    assert len(calls) == 1
    cfg.bnstats.MABN.BUFFER_SIZE = 4  # changed after configuring: checked again, and found stale
    with pytest.raises(ValueError, match="does not carry the options"):
        d2_bnstats.prepare_model(model, cfg)
    assert len(calls) == 2
