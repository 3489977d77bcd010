"""The comparison tool's strategy registry and helpers (the end-to-end run is in
test_population_trainer.py::test_compare_tool_end_to_end)."""
import pytest
import torch

from d2_bnstats.compare import (
    BatchStatsStrategy,
    Strategy,
    build_strategy,
    default_strategy_specs,
    register_strategy,
    registered_strategies,
    unregister_strategy,
)

OPTIONS = {"precise_bn_samples": 100, "test_batch_size": 2, "batch_sizes": [1, 4], "max_images": 0}


def test_specs_build_the_strategies_with_their_arguments():
    assert build_strategy("precise_bn:2000", OPTIONS).name == "PreciseBN(2000)"
    assert build_strategy("precise_bn", OPTIONS).name == "PreciseBN(100)"
    assert build_strategy("batch_stats", OPTIONS).test_batch_size == 2
    assert build_strategy("batch_stats:4", OPTIONS).test_batch_size == 4
    specs = default_strategy_specs(OPTIONS)
    assert specs[:4] == ["ema", "precise_bn", "batch_stats:1", "batch_stats:4"]
    assert {"evalnorm_learned", "evalnorm_rule", "evalnorm_exact", "evalnorm_offline"} <= set(specs)


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown strategy 'nope'; available: ema, precise_bn"),
    ("batch_stats:two", "takes an integer after the colon, got 'two'"),
    ("batch_stats:0", "k >= 1"),
    ("precise_bn:0", "N >= 1"),
])
def test_bad_specs_say_what_is_accepted(spec, message):
    with pytest.raises(ValueError, match=message):
        build_strategy(spec, OPTIONS)


@pytest.fixture
def registry_restored():
    before = registered_strategies()
    yield
    for kind in registered_strategies():
        if kind not in before:
            unregister_strategy(kind)
    assert registered_strategies() == before


def test_registering_a_strategy(registry_restored):
    class Mine(Strategy):
        name = "mine"

    register_strategy("mine", lambda arg, opts: Mine())
    assert build_strategy("mine", OPTIONS).name == "mine" and "mine" in default_strategy_specs(OPTIONS)
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("mine", lambda arg, opts: Mine())
    unregister_strategy("mine")
    assert "mine" not in registered_strategies()
    with pytest.raises(KeyError, match="not registered"):
        unregister_strategy("mine")


def test_batch_statistics_groups_for_the_discrepancy_report():
    backbone = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2)  # 4 images
    groups = BatchStatsStrategy(2).discrepancy_groups(backbone, images=4)
    assert [g.shape[0] for g in groups] == [2, 2] and torch.equal(torch.cat(groups), backbone)
    rois = torch.zeros(4 * 128, 8, 7, 7)  # 128 RoIs per image, in image order
    assert [g.shape[0] for g in BatchStatsStrategy(1).discrepancy_groups(rois, images=4)] == [128] * 4
    assert BatchStatsStrategy(4).discrepancy_groups(rois, images=4) == [rois]
    assert BatchStatsStrategy(8).discrepancy_groups(rois, images=4) is None  # k > training batch: n/a


def test_the_command_line_accepts_flags_after_config_overrides():
    from d2_bnstats.compare import parse_args

    args = parse_args(["--config-file", "C", "MODEL.WEIGHTS", "w.pth", "--output", "out", "--max-images", "100",
                       "BNSTATS.FROZEN_BN.START_ITER", "-1"])
    assert args.output == "out" and args.max_images == 100
    assert args.opts == ["MODEL.WEIGHTS", "w.pth", "BNSTATS.FROZEN_BN.START_ITER", "-1"]
    args = parse_args(["--config-file", "C", "--strategies", "ema", "batch_stats:2", "MODEL.WEIGHTS", "w.pth",
                       "--batch-sizes", "1", "4", "OUTPUT_DIR", "o"])
    assert args.strategies == ["ema", "batch_stats:2"] and args.batch_sizes == [1, 4]
    assert args.opts == ["OUTPUT_DIR", "o", "MODEL.WEIGHTS", "w.pth"]


def test_the_command_line_keeps_the_training_tools_launch_flags():
    from d2_bnstats.compare import argument_parser, parse_args
    from d2_bnstats.d2.train import argument_parser as train_argument_parser

    train = vars(train_argument_parser().parse_args([]))
    args = vars(parse_args([]))
    assert {k: args[k] for k in train if k != "opts"} == {k: v for k, v in train.items() if k != "opts"}
    assert args["opts"] == []
    args = parse_args(["--config", "C", "--num-gpus", "2", "--dist-url", "tcp://127.0.0.1:1234", "--eval-only"])
    assert (args.config_file, args.num_gpus, args.dist_url, args.eval_only) == ("C", 2, "tcp://127.0.0.1:1234", True)
    text = argument_parser().format_help()
    assert "--precise-bn-samples" in text and "--config-file" in text and "evalnorm_offline" in text


def test_evalnorm_with_precise_bn_is_the_learned_formula_on_precise_bn_statistics(datasets_root, tmp_path):
    """Reference: the PreciseBN strategy on another copy of the model, over the same images."""
    import copy
    import os

    import numpy as np
    from detectron2.modeling import build_model

    from d2_bnstats.compare import CompareContext
    from d2_bnstats.d2.train import load_config
    from d2_bnstats.d2.trainer import Trainer
    from d2_bnstats.layers.evalnorm import evalnorm_layers

    from .conftest import REPO, tiny_opts

    cfg = load_config(os.path.join(REPO, "configs", "cpu", "frcnn_r18_evalnorm_2img.yaml"), tiny_opts(tmp_path))
    model = build_model(cfg)
    ctx = CompareContext(cfg, model, Trainer)
    precise, combined = copy.deepcopy(model), copy.deepcopy(model)

    def prepare(spec, copy_of_model):
        np.random.seed(int(torch.randint(1000, ())))  # disturbed: each strategy seeds its own draw
        return build_strategy(spec, OPTIONS).prepare(ctx, copy_of_model)

    prepare("precise_bn:4", precise)
    facts = prepare("evalnorm_precise_bn:4", combined)
    assert facts["images"] == 4 and facts["mode"] == "learned"
    pairs = list(zip(evalnorm_layers(precise), evalnorm_layers(combined), evalnorm_layers(model)))
    assert len(pairs) == facts["layers_updated"] > 0
    for (name, a), (_, b), (_, original) in pairs:
        assert a.mode == "ema" and b.mode == "learned"
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var), name
        assert not torch.equal(b.running_var, original.running_var), name  # not the checkpoint's statistics
        assert torch.equal(b.alpha_hat, original.alpha_hat) and torch.equal(b.beta_hat, original.beta_hat)
    assert build_strategy("evalnorm_precise_bn:4", OPTIONS).name == "EvalNorm learned + PreciseBN(4)"


def test_precise_bn_draws_the_images_its_seed_names(datasets_root, tmp_path):
    """The same seed gives the same statistics whatever the random state before; another seed
    draws other images; the seed is part of the strategy's facts."""
    import copy

    import numpy as np

    from d2_bnstats.layers.population_protocol import population_layers

    model, ctx = _untrained_model_context(tmp_path, "frcnn_r18_bn_2img_scratch.yaml")

    def statistics_after(seed, disturbance):
        np.random.seed(disturbance)
        torch.manual_seed(disturbance)
        ctx.options["training_images_seed"] = seed
        candidate = copy.deepcopy(model)
        facts = build_strategy("precise_bn:4", OPTIONS).prepare(ctx, candidate)
        assert facts["images_seed"] == seed and facts["images"] == 4
        return [layer.running_mean.clone() for _, layer in population_layers(candidate)]

    first, again, other = statistics_after(0, 1), statistics_after(0, 2), statistics_after(5, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def _untrained_model_context(tmp_path, config):
    """A freshly built model of ``configs/cpu/<config>`` and its comparison context. The frozen and
    fine-tuned settings start from a pre-trained file; the layers do not depend on it, so none is loaded."""
    import os

    from detectron2.modeling import build_model

    from d2_bnstats.compare import CompareContext
    from d2_bnstats.d2.train import load_config
    from d2_bnstats.d2.trainer import Trainer

    from .conftest import REPO, tiny_opts

    cfg = load_config(os.path.join(REPO, "configs", "cpu", config), tiny_opts(tmp_path, **{"MODEL.WEIGHTS": ""}))
    model = build_model(cfg)
    return model, CompareContext(cfg, model, Trainer)


@pytest.mark.parametrize("config, expected", [
    ("frcnn_r18_gn_2img_scratch.yaml", {"PreciseBN(4)": False, "batch stats (k=2)": False, "EMA": True}),
    ("frcnn_r18_frozenbn_2img_frozen.yaml", {"PreciseBN(4)": False, "batch stats (k=2)": False, "EMA": True}),
    ("frcnn_r18_bn_2img_scratch.yaml", {"PreciseBN(4)": True, "batch stats (k=2)": True, "EMA": True}),
])
def test_strategies_that_act_on_population_statistics_are_unavailable_without_such_layers(tmp_path, config, expected):
    """Reference: the model's own modules — a GN or FrozenBN model has no BatchNorm with running
    statistics, so PreciseBN and batch statistics would silently evaluate it as EMA does."""
    from torch import nn

    model, ctx = _untrained_model_context(tmp_path, config)
    has_running_stats = any(isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and m.running_mean is not None
                            for m in model.modules())
    assert has_running_stats == expected["PreciseBN(4)"]  # the reference agrees with the expectation
    for spec in ("precise_bn:4", "batch_stats:2", "ema"):
        strategy = build_strategy(spec, OPTIONS)
        why = strategy.unavailable(ctx)
        assert (why is None) == expected[strategy.name], (config, strategy.name, why)
        if why is not None:
            assert "no layers with population statistics" in why


def test_precise_bn_is_unavailable_when_every_layer_is_frozen_but_batch_statistics_are_not(tmp_path):
    """PreciseBN leaves frozen layers alone; batch statistics at test use them."""
    from d2_bnstats.layers.frozen_bn import freeze_batch_statistics

    model, ctx = _untrained_model_context(tmp_path, "frcnn_r18_bn_2img_scratch.yaml")
    assert freeze_batch_statistics(model)
    assert build_strategy("precise_bn:4", OPTIONS).unavailable(ctx) is not None
    assert build_strategy("batch_stats:2", OPTIONS).unavailable(ctx) is None


def test_every_registered_strategy_writes_into_a_folder_of_its_own():
    """The evaluators' detections (read again for the intervals against EMA) are kept per strategy:
    "EvalNorm 1/B²" and "EvalNorm 1/B" once shared a folder, and one overwrote the other's."""
    from d2_bnstats.compare.comparison import build_strategies
    from d2_bnstats.compare.report import slug

    built = build_strategies(None, OPTIONS)
    folders = [slug(s.name) for s in built]
    assert len(set(folders)) == len(folders) == len(built)
    assert slug("EvalNorm 1/B²") != slug("EvalNorm 1/B")
