"""build_model: the config reaches norm factories; model transforms run on detectron2's own path."""
import pytest
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer
from torch import nn

import d2_bnstats
from d2_bnstats.d2 import build, patch
from d2_bnstats.d2.config import add_bnstats_config

from .conftest import CPU_BASE


@pytest.fixture
def cfg():
    c = get_cfg()
    add_bnstats_config(c)
    c.merge_from_file(CPU_BASE)
    c.MODEL.FPN.OUT_CHANNELS = 32
    return c


@pytest.fixture
def recording_norm():
    seen = []

    def factory(channels):
        seen.append(d2_bnstats.current_config())
        return nn.BatchNorm2d(channels)

    d2_bnstats.register_norm("RecordingNorm", factory)
    yield seen
    d2_bnstats.unregister_norm("RecordingNorm")


def test_factories_see_the_config_being_built(cfg, recording_norm):
    cfg.MODEL.FPN.NORM = "RecordingNorm"
    DefaultTrainer.build_model(cfg)  # detectron2's own trainer path
    assert len(recording_norm) == 8 and all(c is cfg for c in recording_norm)
    assert d2_bnstats.current_config() is None
    d2_bnstats.get_norm("RecordingNorm", 4)
    assert recording_norm[-1] is None


def test_transforms_run_in_order_and_may_replace_the_model(cfg):
    calls = []

    def first(model, c):
        calls.append(("first", c))
        model.tagged = True

    def second(model, c):
        calls.append(("second", model.tagged))
        return nn.Sequential(model)

    d2_bnstats.register_model_transform("test-first", first)
    d2_bnstats.register_model_transform("test-second", second)
    try:
        model = DefaultTrainer.build_model(cfg)
        assert isinstance(model, nn.Sequential) and model[0].tagged
        assert calls == [("first", cfg), ("second", True)]
    finally:
        build._TRANSFORMS[:] = [t for t in build._TRANSFORMS if not t[0].startswith("test-")]


def test_a_failing_build_leaves_no_config_behind(cfg):
    cfg.MODEL.FPN.NORM = "NoSuchNorm"
    with pytest.raises(ValueError):
        build.build_model(cfg)
    assert d2_bnstats.current_config() is None


def test_uninstall_restores_detectron2_builders():
    import detectron2.engine.defaults as defaults
    import detectron2.modeling as modeling

    assert patch.is_installed() and modeling.build_model is build.build_model
    patch.uninstall()
    try:
        assert defaults.build_model is patch.original_build_model()
        assert modeling.build_model is patch.original_build_model()
    finally:
        patch.install()
    assert defaults.build_model is build.build_model
