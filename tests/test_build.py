"""build_model: the config reaches norm factories; model transforms run on detectron2's own path."""
import pytest
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer
from torch import nn

import d2_bnstats
from d2_bnstats.d2 import build, patch
from d2_bnstats import add_bnstats_config

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
    """A third-party norm whose factory reads an option from the config being built."""
    seen = []

    def factory(channels, groups=1):
        seen.append(groups)
        return nn.GroupNorm(groups, channels)

    def options(cfg, name):
        return {"groups": cfg.MODEL.FPN.OUT_CHANNELS // 16}

    d2_bnstats.register_norm("RecordingNorm", factory, config_options=options)
    yield seen
    d2_bnstats.unregister_norm("RecordingNorm")


def test_factories_receive_the_options_of_the_config_being_built(cfg, recording_norm):
    cfg.MODEL.FPN.NORM = "RecordingNorm"
    cfg.freeze()
    model = DefaultTrainer.build_model(cfg)  # detectron2's own trainer path
    assert recording_norm == [2] * 8  # OUT_CHANNELS 32 // 16, for each of the FPN's 8 norms
    assert sorted({m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}) == [2]
    assert cfg.MODEL.FPN.NORM == "RecordingNorm" and type(cfg.MODEL.FPN.NORM) is str  # cfg itself unchanged
    d2_bnstats.get_norm("RecordingNorm", 4)  # outside a build: the factory's defaults
    assert recording_norm[-1] == 1


def test_configured_norm_is_the_name_and_survives_copies(cfg, recording_norm):
    import copy
    import pickle

    norm = d2_bnstats.configure_norm(cfg, "RecordingNorm")
    assert norm == "RecordingNorm" and norm.options == {"groups": 2} and hash(norm) == hash("RecordingNorm")
    for clone in (copy.deepcopy(norm), pickle.loads(pickle.dumps(norm))):
        assert clone == norm and clone.options == norm.options
    assert d2_bnstats.configure_norm(cfg, "BN") == "BN" and type(d2_bnstats.configure_norm(cfg, "BN")) is str
    assert d2_bnstats.configure_norm(None, "RecordingNorm") == "RecordingNorm"


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
        assert d2_bnstats.model_transforms()[-2:] == ["test-first", "test-second"]
        model = DefaultTrainer.build_model(cfg)
        assert isinstance(model, nn.Sequential) and model[0].tagged
        assert calls == [("first", cfg), ("second", True)]
        with pytest.raises(ValueError, match="already registered"):
            d2_bnstats.register_model_transform("test-first", second)
    finally:
        d2_bnstats.unregister_model_transform("test-first")
        d2_bnstats.unregister_model_transform("test-second")
    assert not [n for n in d2_bnstats.model_transforms() if n.startswith("test-")]


def test_the_methods_transforms_run_in_the_declared_order():
    from d2_bnstats.d2.norms import builtin_norms

    declared = [n.name for n in sorted(builtin_norms(), key=lambda n: n.transform_order) if n.transform is not None]
    assert d2_bnstats.model_transforms()[: len(declared)] == declared
    # MABN centralizes the convs feeding its layers before the per-level copies wrap those layers
    assert declared.index("mabn") < declared.index("per_level") == len(declared) - 1


def test_a_failing_build_names_the_value(cfg):
    cfg.MODEL.FPN.NORM = "NoSuchNorm"
    with pytest.raises(ValueError, match="NoSuchNorm"):
        build.build_model(cfg)


def test_uninstall_restores_detectron2_builders():
    import detectron2.engine.defaults as defaults
    import detectron2.modeling as modeling

    assert patch.is_installed() and modeling.build_model is build.build_model
    patch.uninstall()
    try:
        assert defaults.build_model is patch.original_build_model()
        assert modeling.build_model is patch.original_build_model()
    finally:
        patch.reinstall()
    assert defaults.build_model is build.build_model


def test_an_omegaconf_config_builds_as_without_the_plug_in(cfg):
    """detectron2's build_model takes an OmegaConf DictConfig made from a yacs config (its own test
    testOmegaConf does this with a model-zoo config); the patched one does too, and with a plug-in norm
    the options still reach the layers."""
    import torch
    from omegaconf import OmegaConf

    from d2_bnstats.layers.ghost_bn import GhostBatchNorm2d

    cfg.MODEL.DEVICE = "cpu"
    plain = OmegaConf.create(cfg.dump())
    torch.manual_seed(0)
    model = build.build_model(plain)
    torch.manual_seed(0)
    reference = patch.original_build_model()(OmegaConf.create(cfg.dump()))
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))

    cfg.MODEL.FPN.NORM = "GhostBN"
    cfg.BNSTATS.GHOST_BN.VIRTUAL_BATCH_SIZE = 3
    configured = OmegaConf.create(cfg.dump())
    OmegaConf.set_readonly(configured, True)
    model = build.build_model(configured)
    ghost = [m for m in model.modules() if isinstance(m, GhostBatchNorm2d)]
    assert len(ghost) == 8 and {m.virtual_batch_size for m in ghost} == {3}
    assert configured.MODEL.FPN.NORM == "GhostBN" and type(configured.MODEL.FPN.NORM) is str  # unchanged
