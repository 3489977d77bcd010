"""The norm registry and the get_norm patch, through real detectron2 model builders."""
import subprocess
import sys

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from torch import nn

import d2_bnstats
from d2_bnstats import registry
from d2_bnstats import add_bnstats_config
from d2_bnstats.d2.config import NORM_KEYS
from d2_bnstats.d2.train import load_config

from .conftest import CPU_BASE, REPO


class ThirdPartyNorm(nn.BatchNorm2d):
    """A norm registered by 'a third party' in these tests."""

    built_with = []

    def __init__(self, channels):
        super().__init__(channels)
        ThirdPartyNorm.built_with.append(channels)


@pytest.fixture
def third_party_norm():
    ThirdPartyNorm.built_with = []
    d2_bnstats.register_norm("ThirdPartyNorm", ThirdPartyNorm)
    yield "ThirdPartyNorm", ThirdPartyNorm
    d2_bnstats.unregister_norm("ThirdPartyNorm")


def small_cfg(**overrides):
    cfg = get_cfg()
    add_bnstats_config(cfg)
    cfg.merge_from_file(CPU_BASE)
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
    cfg.MODEL.ROI_BOX_HEAD.CONV_DIM = 32
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 32
    for k, v in overrides.items():
        node = cfg
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return cfg


def modules_of(model, cls):
    return [m for m in model.modules() if type(m) is cls]


def norm_class(name):
    """The class a norm name builds (probe with 32 channels)."""
    return type(d2_bnstats.get_norm(name, 32))


def all_names_under_test(third_party_name):
    return d2_bnstats.registered_norms() + ([third_party_name] if third_party_name not in d2_bnstats.registered_norms() else [])


# --- every registered name through every norm-carrying key -----------------------------------


def test_registered_names_reach_resnet_fpn_box_and_mask_heads(third_party_norm):
    for name in all_names_under_test(third_party_norm[0]):
        cls = norm_class(name)
        cfg = small_cfg()
        cfg.MODEL.MASK_ON = True
        cfg.MODEL.RESNETS.NORM = name
        cfg.MODEL.FPN.NORM = name
        cfg.MODEL.ROI_BOX_HEAD.NUM_CONV = 2
        cfg.MODEL.ROI_BOX_HEAD.NORM = name
        cfg.MODEL.ROI_MASK_HEAD.NORM = name
        model = build_model(cfg)
        bottom_up = model.backbone.bottom_up
        assert isinstance(bottom_up.stem.conv1.norm, cls), name
        for stage in ("res2", "res3", "res4", "res5"):
            assert modules_of(getattr(bottom_up, stage), cls), (name, stage)
        # FPN: lateral and output convs carry the norm
        for level in (2, 3, 4, 5):
            for kind in ("lateral", "output"):
                assert isinstance(getattr(model.backbone, f"fpn_{kind}{level}").norm, cls), (name, kind, level)
        assert len(modules_of(model.roi_heads.box_head, cls)) == 2, name
        assert len(modules_of(model.roi_heads.mask_head, cls)) == 2, name


def test_registered_names_reach_retinanet_and_sem_seg_heads(third_party_norm):
    for name in all_names_under_test(third_party_norm[0]):
        cls = norm_class(name)
        cfg = small_cfg()
        cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
        cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.RETINANET.NUM_CLASSES = 10
        cfg.MODEL.RETINANET.NORM = name
        model = build_model(cfg)
        # detectron2 builds the head's norms (4 cls + 4 bbox convs); per-level variants may wrap them
        head_norms = [m for m in model.head.modules() if isinstance(m, cls)]
        assert len(head_norms) >= 8, (name, len(head_norms))
        model.train()
        images = [{"image": torch.rand(3, 64, 64) * 255, "instances": _one_box_instances(64)} for _ in range(2)]
        from detectron2.utils.events import EventStorage

        with EventStorage():
            losses = model(images)
        assert all(torch.isfinite(v) for v in losses.values())

        cfg = small_cfg()
        cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
        cfg.MODEL.SEM_SEG_HEAD.NAME = "SemSegFPNHead"
        cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 11
        cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
        cfg.MODEL.SEM_SEG_HEAD.NORM = name
        model = build_model(cfg)
        assert modules_of(model.sem_seg_head, cls), name


def _one_box_instances(size):
    from detectron2.structures import Boxes, Instances

    inst = Instances((size, size))
    inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 40.0]]))
    inst.gt_classes = torch.tensor([1])
    return inst


def test_third_party_factory_is_called_with_each_channel_count(third_party_norm):
    name, cls = third_party_norm
    cfg = small_cfg()
    cfg.MODEL.FPN.NORM = name
    build_model(cfg)
    # FPN: 4 lateral + 4 output convs, all with OUT_CHANNELS channels
    assert cls.built_with == [32] * 8


# --- detectron2's own names are unchanged ------------------------------------------------------


def test_detectron2_names_build_detectron2_layers():
    from detectron2.layers import BatchNorm2d, NaiveSyncBatchNorm

    assert type(d2_bnstats.get_norm("BN", 8)) is BatchNorm2d
    assert type(d2_bnstats.get_norm("FrozenBN", 8)) is FrozenBatchNorm2d
    gn = d2_bnstats.get_norm("GN", 64)
    assert type(gn) is nn.GroupNorm and gn.num_groups == 32
    assert type(d2_bnstats.get_norm("naiveSyncBN", 8)) is NaiveSyncBatchNorm
    assert d2_bnstats.get_norm("naiveSyncBN_N", 8)._stats_mode == "N"
    assert d2_bnstats.get_norm("", 8) is None and d2_bnstats.get_norm(None, 8) is None
    assert type(d2_bnstats.get_norm(lambda c: nn.LayerNorm(c), 8)) is nn.LayerNorm
    for name in registry.detectron2_norm_names():
        if name not in d2_bnstats.registered_norms():
            original = type(registry.detectron2_get_norm()(name, 32))
            assert type(d2_bnstats.get_norm(name, 32)) is original, name


def test_bn_config_builds_the_same_model_as_unpatched_detectron2():
    from d2_bnstats.d2 import patch

    cfg = small_cfg()
    torch.manual_seed(0)
    patched = build_model(cfg)
    patch.uninstall()
    try:
        assert not patch.is_installed()
        torch.manual_seed(0)
        plain = build_model(cfg)
    finally:
        patch.reinstall()
    assert patch.is_installed()
    assert [type(m) for m in patched.modules()] == [type(m) for m in plain.modules()]
    for (ka, va), (kb, vb) in zip(patched.state_dict().items(), plain.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# --- unknown names ------------------------------------------------------------------------------


def test_unknown_name_is_a_value_error_with_choices_and_suggestion():
    with pytest.raises(ValueError) as info:
        d2_bnstats.get_norm("bn", 8)
    assert not isinstance(info.value, KeyError)
    msg = str(info.value)
    assert "'bn'" in msg and "Did you mean 'BN'" in msg
    for name in d2_bnstats.available_norms():
        assert name in msg
    with pytest.raises(ValueError, match="Did you mean 'FrozenBN'"):
        d2_bnstats.get_norm("FrozenBNN", 8)
    with pytest.raises(ValueError, match="Available norms"):
        d2_bnstats.get_norm("Xyzzy", 8)


@pytest.mark.parametrize("key", NORM_KEYS)
def test_unknown_name_in_a_config_names_the_key(key, tmp_path):
    with pytest.raises(ValueError) as info:
        load_config(CPU_BASE, [key, "GroupNrom"])
    msg = str(info.value)
    assert f"{key} = 'GroupNrom'" in msg and "Did you mean 'GN'" in msg


def test_unknown_name_during_model_building_is_a_value_error():
    cfg = small_cfg()
    cfg.MODEL.FPN.NORM = "NoSuchNorm"
    with pytest.raises(ValueError, match="unknown norm 'NoSuchNorm'"):
        build_model(cfg)


# --- third-party registration -----------------------------------------------------------------


def test_register_as_decorator_and_call_and_conflicts():
    @d2_bnstats.register_norm("TP_Decorated")
    def build(channels):
        return nn.BatchNorm2d(channels)

    try:
        assert "TP_Decorated" in d2_bnstats.available_norms()
        assert type(d2_bnstats.get_norm("TP_Decorated", 4)) is nn.BatchNorm2d
        with pytest.raises(ValueError, match="already registered"):
            d2_bnstats.register_norm("TP_Decorated", build)
        d2_bnstats.register_norm("TP_Decorated", lambda c: nn.GroupNorm(1, c), force=True)
        assert type(d2_bnstats.get_norm("TP_Decorated", 4)) is nn.GroupNorm
    finally:
        d2_bnstats.unregister_norm("TP_Decorated")
    assert "TP_Decorated" not in d2_bnstats.available_norms()
    with pytest.raises(ValueError):
        d2_bnstats.get_norm("TP_Decorated", 4)


def test_overriding_a_detectron2_name_needs_force():
    with pytest.raises(ValueError, match="built-in"):
        d2_bnstats.register_norm("GN", lambda c: nn.GroupNorm(1, c))
    d2_bnstats.register_norm("GN", lambda c: nn.GroupNorm(1, c), force=True)
    try:
        assert d2_bnstats.get_norm("GN", 64).num_groups == 1
    finally:
        d2_bnstats.unregister_norm("GN")
    assert d2_bnstats.get_norm("GN", 64).num_groups == 32


def test_bad_registrations():
    with pytest.raises(ValueError):
        d2_bnstats.register_norm("", lambda c: None)
    with pytest.raises(TypeError):
        d2_bnstats.register_norm("NotCallable", 3)
    with pytest.raises(ValueError, match="not registered"):
        d2_bnstats.unregister_norm("NeverRegistered")


# --- the patch reaches modules imported before the plug-in ------------------------------------


def test_import_after_detectron2_patches_already_loaded_modules():
    code = r"""
import detectron2.modeling.backbone.fpn as fpn
import detectron2.modeling.backbone.resnet as resnet
import detectron2.modeling.roi_heads.box_head as box_head
import detectron2.modeling.roi_heads.mask_head as mask_head
import detectron2.modeling.meta_arch.retinanet as retinanet
import detectron2.modeling.meta_arch.semantic_seg as semantic_seg
import detectron2.layers.blocks as blocks
import detectron2.layers as layers
import detectron2.engine.defaults
original = fpn.get_norm
import d2_bnstats
from d2_bnstats.registry import get_norm
mods = [fpn, resnet, box_head, mask_head, retinanet, semantic_seg, blocks, layers]
assert all(m.get_norm is get_norm for m in mods), [m.__name__ for m in mods if m.get_norm is not get_norm]
import detectron2.projects.deeplab.resnet as deeplab_resnet   # imported after the plug-in
assert deeplab_resnet.get_norm is get_norm
import torch.nn as nn
d2_bnstats.register_norm("LateNorm", lambda c: nn.GroupNorm(2, c))
assert isinstance(fpn.get_norm("LateNorm", 8), nn.GroupNorm)
import d2_bnstats.d2.patch as patch
assert patch.reinstall() == 0 and patch.original_get_norm() is original   # idempotent
import detectron2.engine.defaults as defaults, detectron2.modeling as modeling
from d2_bnstats.d2.build import build_model
assert defaults.build_model is build_model and modeling.build_model is build_model
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
