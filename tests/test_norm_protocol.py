"""The norm protocol: one declaration per norm, registered by one public call, for the plug-in's own
norms and a third party's alike (config node, checks, options, transform, deployment conversion)."""
import itertools

import pytest
import torch
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from torch import nn

import d2_bnstats
from d2_bnstats.d2.norms import builtin_norms
from d2_bnstats.d2.train import load_config
from d2_bnstats.layers.population_protocol import is_population_layer

from .conftest import CPU_BASE, synthetic_detection_batch

SIZE = 96


class ThirdPartyGN(nn.GroupNorm):
    """A third party's norm: GroupNorm whose group count comes from the config."""

    def __init__(self, channels: int, groups: int = 4):
        super().__init__(groups, channels)


def third_defaults(node) -> None:
    # groups of ThirdPartyGN; default 4
    node.GROUPS = 4


def third_check(cfg) -> None:
    node = d2_bnstats.d2.config.bnstats_node(cfg, "THIRD_GN")
    groups = node.get("GROUPS", 4) if node is not None else 4
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"BNSTATS.THIRD_GN.GROUPS = {groups!r}: expected a positive integer")


def third_options(cfg, name):
    third_check(cfg)
    node = d2_bnstats.d2.config.bnstats_node(cfg, "THIRD_GN")
    return {} if node is None else {"groups": node.GROUPS}


def third_transform(model, cfg):
    """Counts the forwards of the model (a transform that installs a hook, as the plug-in's do)."""
    if any(isinstance(m, ThirdPartyGN) for m in model.modules()):
        model.third_forwards = 0

        def count(module, args):
            module.third_forwards += 1

        model.register_forward_pre_hook(count)


def third_deploy(model):
    """ThirdPartyGN -> plain nn.GroupNorm with the same parameters (exact)."""
    names = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ThirdPartyGN):
                plain = nn.GroupNorm(child.num_groups, child.num_channels, eps=child.eps)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain)
                names.append(f"{parent_name}.{name}" if parent_name else name)
    return names


THIRD = d2_bnstats.Norm(
    name="third_gn",
    factories={"ThirdGN": ThirdPartyGN},
    config_key="THIRD_GN",
    defaults=third_defaults,
    check=third_check,
    options=third_options,
    transform=third_transform,
    deploy=third_deploy,
    statistics="none",
    layer_types=(ThirdPartyGN,),
)


@pytest.fixture
def third_party():
    d2_bnstats.register_norm(THIRD)
    yield THIRD
    d2_bnstats.unregister_norm("ThirdGN")


def _config(*extra):
    opts = [
        "MODEL.DEVICE", "cpu",
        "MODEL.RESNETS.NORM", "BN",
        "MODEL.FPN.NORM", "ThirdGN",
        "MODEL.ROI_BOX_HEAD.NUM_CONV", "1",
        "MODEL.ROI_BOX_HEAD.CONV_DIM", "32",
        "MODEL.ROI_BOX_HEAD.NUM_FC", "1",
        "MODEL.ROI_BOX_HEAD.NORM", "ThirdGN",
        "MODEL.FPN.OUT_CHANNELS", "32",
        *extra,
    ]
    return load_config(CPU_BASE, opts)




def test_a_third_party_norm_is_declared_trained_and_deployed_through_the_public_call(third_party):
    assert "ThirdGN" in d2_bnstats.available_norms() and THIRD in d2_bnstats.declared_norms()
    transforms = d2_bnstats.model_transforms()
    assert transforms.index("third_gn") < transforms.index("per_level")  # per-level copies wrap after every norm's
    # its config node, with its defaults, on the yacs and the LazyConfig path
    cfg = _config("BNSTATS.THIRD_GN.GROUPS", "8")
    assert cfg.BNSTATS.THIRD_GN.GROUPS == 8 and d2_bnstats.lazy.bnstats_node().THIRD_GN.GROUPS == 4
    # its check runs when the config is loaded, naming the key
    with pytest.raises(ValueError, match=r"BNSTATS.THIRD_GN.GROUPS = 0: expected a positive integer"):
        _config("BNSTATS.THIRD_GN.GROUPS", "0")
    # its options reach the factory through detectron2's own builder
    torch.manual_seed(0)
    model = build_model(cfg)
    layers = [m for m in model.modules() if isinstance(m, ThirdPartyGN)]
    assert len(layers) == 8 + 1 and {m.num_groups for m in layers} == {8}  # FPN's 8 norms, the box head's conv
    assert model.third_forwards == 0  # its transform ran
    # one training step of detectron2's own trainer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    SimpleTrainer(model, itertools.repeat(synthetic_detection_batch(SIZE)), optimizer).train(0, 1)
    assert model.third_forwards == 1
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("fpn" in n and "norm" in n for n in changed)  # its layers' parameters trained
    # its deployment conversion: no third-party class left, outputs unchanged
    model.eval()
    deployed, report = d2_bnstats.convert_for_deployment(model)
    assert len(report.converted["third_gn"]) == 9
    assert not [m for m in deployed.modules() if isinstance(m, ThirdPartyGN)]
    images = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.backbone(images)
        actual = deployed.backbone(images)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_unregistering_removes_the_whole_declaration(third_party):
    d2_bnstats.unregister_norm("ThirdGN")
    try:
        assert "ThirdGN" not in d2_bnstats.available_norms() and "third_gn" not in d2_bnstats.model_transforms()
        with pytest.raises(ValueError, match="ThirdGN"):
            _config()
    finally:
        d2_bnstats.register_norm(THIRD)
    with pytest.raises(ValueError, match="already registered"):
        d2_bnstats.register_norm(THIRD)


def test_bad_declarations_fail_at_once():
    with pytest.raises(ValueError, match="config_key and defaults go together"):
        d2_bnstats.Norm(name="x", factories={"X": nn.Identity}, config_key="X")
    with pytest.raises(ValueError, match="statistics = 'some'"):
        d2_bnstats.Norm(name="x", factories={"X": nn.Identity}, statistics="some")
    with pytest.raises(TypeError, match="factory for 'X' must be callable"):
        d2_bnstats.Norm(name="x", factories={"X": 3})
    with pytest.raises(ValueError, match="one of detectron2's built-in names"):
        d2_bnstats.register_norm(d2_bnstats.Norm(name="x", factories={"GN": nn.Identity}))


@pytest.mark.parametrize("norm", builtin_norms(), ids=lambda n: n.name)
def test_each_builtin_declaration_says_what_its_layers_are(norm):
    """The declaration is the one place tools learn a norm's kind: its statistics and layer types
    must be what its factories build (PreciseBN and the comparison tool act on population layers)."""
    for name, factory in norm.factories.items():
        if name in norm.overrides_detectron2:
            layer = factory(64)
        else:
            layer = d2_bnstats.get_norm(name, 64)
        assert type(layer) in norm.layer_types, name
        assert is_population_layer(layer) == (norm.statistics != "none"), name
    assert d2_bnstats.registry.norm_declaration(next(iter(norm.factories), "")) in (norm, None)
