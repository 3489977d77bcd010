"""The config matrix: files and README match the table, the rule and the settings hold in the files,
every config builds, trains one iteration and infers, bad configs fail with a clear message.

The build/train/infer test runs once per distinct model: configs that differ only in SOLVER (images
per GPU, LR, schedule) and OUTPUT_DIR build the same model, which is asserted, not assumed. A handful
of CPU models run in the default suite; the rest (all R-50 and the remaining CPU ones) are marked slow
and run in `make test` / CI. A config naming a norm that is not registered fails.
"""
import copy
import os
import pickle
import re

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.engine import SimpleTrainer
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from torch import nn

import d2_bnstats
from bnstats_lab import config_describe as describe
from bnstats_lab import config_generate as gen
from bnstats_lab import config_matrix as cm
from bnstats_lab.config_scaling import rescale_overrides
from d2_bnstats.d2.config import check_batch_config
from d2_bnstats.d2.train import check_config, load_config
from d2_bnstats.d2.weights import after_loading_weights, reset_norm_statistics

from .conftest import REPO, tiny_opts
from .pretrained import tiny_pretrained  # noqa: F401  (fixture)

MATRIX_NORMS = {"bn", "evalnorm", "mabn", "brn", "cbn", "syncbn", "syncbn_roishuffle", "gn", "gnws", "bnws", "bcn", "frozenbn"}


def abspath(rel):
    return os.path.join(REPO, rel)


def leaf_and_base_files():
    files = gen.leaf_files(REPO)
    for family in cm.FAMILIES:
        d = os.path.join(REPO, family.directory)
        files += sorted(f"{family.directory}/{n}" for n in os.listdir(d) if n.startswith("Base") and n.endswith(".yaml"))
    return files


_UNCHECKED = {}


def unchecked_config(rel):
    """The file's config without checks, loaded once per test run (a clone each time)."""
    if rel not in _UNCHECKED:
        _UNCHECKED[rel] = describe.load_config_unchecked(abspath(rel))
    return _UNCHECKED[rel].clone()


# ------------------------------------------------------------------------------------------------
# The generator and the table
# ------------------------------------------------------------------------------------------------
def test_generated_files_and_readme_table_match_the_table():
    report = gen.generate(REPO, write=False)
    assert not report.problems, "\n".join(report.problems + ["-> run: python tools/make_configs.py"])


def test_matrix_covers_every_norm_setting_and_batch():
    """Every (arch, norm, images/GPU, setting) of the experiments, by an enumeration written here."""
    expected = set()
    for family, depth in (("r50", 50), ("r18", 18)):
        for arch in ("frcnn", "mrcnn"):
            for n in (2, 4, 8):
                for norm in ("bn", "evalnorm", "mabn", "brn", "syncbn", "syncbn_roishuffle"):
                    for setting in ("scratch", "frozen", "finetune", "reinit"):
                        expected.add((family, arch, norm, n, setting))
                for setting in ("scratch", "frozen", "finetune"):
                    expected.add((family, arch, "gn", n, setting))
                    expected.add((family, arch, "cbn", n, setting))
                expected.add((family, arch, "frozenbn", n, "frozen"))
                expected.update({(family, arch, "gnws", n, "scratch"), (family, arch, "bnws", n, "scratch")})
                expected.update({(family, arch, "bcn", n, "scratch"), (family, arch, "bcn", n, "frozen")})
    got = {c.key for c in cm.cells()}
    assert got == expected
    assert {c.norm.key for c in cm.cells()} == MATRIX_NORMS
    for cell in cm.cells():
        family, arch, norm, n, setting = cell.key
        name = f"{arch}_{family}_{norm}_{n}img_{setting}.yaml"
        directory = "configs" if family == "r50" else "configs/cpu"
        assert cell.path == f"{directory}/{name}" or not cell.generated
        assert os.path.isfile(abspath(cell.path))


def test_generator_never_overwrites_a_hand_written_file(tmp_path):
    """A hand-written file with a generated name (not declared EXTERNAL) is reported, and left as it is."""
    root = tmp_path / "repo"
    (root / "configs" / "cpu").mkdir(parents=True)
    base = "configs/cpu/Base-R18-FPN-fashion.yaml"
    (root / base).write_text(open(abspath(base)).read())
    cell = next(c for c in cm.cells() if c.generated and c.family.key == "r18")
    hand_written = "# written by hand\n_BASE_: \"Base-R18-FPN-fashion.yaml\"\n"
    (root / cell.path).write_text(hand_written)
    (root / "configs" / "README.md").write_text(f"x\n{gen.TABLE_BEGIN}\n{gen.TABLE_END}\n")
    report = gen.generate(str(root), write=False)
    assert any(p.startswith(f"{cell.path} exists but was not generated") for p in report.problems)
    assert (root / cell.path).read_text() == hand_written


def test_linear_scaling_rule_holds_in_every_generated_file():
    """LR / total batch and iterations x total batch equal the references', read from the files."""
    reference = {  # (LR at the reference batch, reference batch, {schedule: (iterations, steps)})
        "r50": (0.02, 16, {"1x": (90000, (60000, 80000)), "3x": (270000, (210000, 250000))}),
        "r18": (0.02, 2, {"1x": (1500, (1100, 1400)), "3x": (4500, (3500, 4200))}),
    }
    for cell in cm.cells():
        if not cell.generated:
            continue
        cfg = unchecked_config(cell.path)
        lr0, b0, schedules = reference[cell.family.key]
        gpus = 8 if cell.family.key == "r50" else 1
        total = cfg.SOLVER.IMS_PER_BATCH
        assert total == gpus * cell.images_per_gpu, cell.path
        assert cfg.SOLVER.BASE_LR == pytest.approx(lr0 * total / b0, rel=1e-9), cell.path
        iters, steps = schedules["3x" if cell.setting.key == "scratch" else "1x"]
        assert cfg.SOLVER.MAX_ITER * total == iters * b0, cell.path
        assert tuple(s * total for s in cfg.SOLVER.STEPS) == tuple(s * b0 for s in steps), cell.path


def test_settings_and_norms_hold_in_every_generated_file():
    for cell in cm.cells():
        if not cell.generated:
            continue
        cfg = unchecked_config(cell.path)
        setting = cell.setting.key
        spec = cell.norm
        assert cfg.MODEL.MASK_ON == (cell.arch == "mrcnn"), cell.path
        assert cfg.MODEL.RESNETS.DEPTH == cell.family.depth, cell.path
        if setting == "scratch":
            assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.BACKBONE.FREEZE_AT == 0, cell.path
        else:
            assert cfg.MODEL.WEIGHTS, cell.path
        if setting == "frozen":
            assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 2, cell.path
        else:
            assert cfg.MODEL.RESNETS.NORM == spec.backbone and cfg.MODEL.BACKBONE.FREEZE_AT == 0, cell.path
        assert cfg.BNSTATS.INIT.RESET_NORM_STATS == (setting == "reinit"), cell.path
        assert cfg.MODEL.FPN.NORM == spec.fpn, cell.path
        if spec.key == "frozenbn":
            assert cfg.MODEL.ROI_BOX_HEAD.NUM_CONV == 0 and cfg.MODEL.ROI_BOX_HEAD.NUM_FC == 2, cell.path
        else:  # 4conv1fc with the norm (RoI-shuffled BN there for syncbn_roishuffle)
            assert (cfg.MODEL.ROI_BOX_HEAD.NUM_CONV, cfg.MODEL.ROI_BOX_HEAD.NUM_FC) == (4, 1), cell.path
            assert cfg.MODEL.ROI_BOX_HEAD.NORM == spec.heads, cell.path
            if cell.arch == "mrcnn":
                assert cfg.MODEL.ROI_MASK_HEAD.NORM == spec.heads, cell.path
        if cell.family.key == "r18":
            assert cfg.DATASETS.TRAIN == ("fashion_scenes_train",) and cfg.INPUT.MAX_SIZE_TRAIN <= 256, cell.path
            if setting != "scratch":
                expected = {"gn": cm.FASHION_GN, "mabn": cm.FASHION_BN_WC}.get(spec.key, cm.FASHION_BN)
                if setting == "frozen":
                    expected = cm.FASHION_BN  # the frozen backbone is BN-pretrained whatever the heads use
                assert cfg.MODEL.WEIGHTS == expected, cell.path
        assert describe.derive_setting(cfg) == setting, cell.path
        assert cfg.OUTPUT_DIR.endswith(cell.name), cell.path
        if spec.key == "brn":  # the paper's schedule steps (5k, 25k, 40k of a 90k 1x) scaled to the run
            brn, steps = cfg.BNSTATS.BATCH_RENORM, cfg.SOLVER.MAX_ITER
            got = (brn.RAMP_START_ITER, brn.D_MAX_END_ITER, brn.R_MAX_END_ITER)
            assert got == tuple(round(steps * k / 90000) for k in (5000, 25000, 40000)), cell.path
            if steps == 90000:
                assert got == (5000, 25000, 40000), cell.path


def test_every_file_named_by_the_scheme_says_what_it_is():
    """Generated or hand-written: a name `{arch}_r{depth}_{norm}_{N}img[_{setting}]` must match the
    contents (images per GPU from SOLVER.IMS_PER_BATCH and the directory's GPU count, norms, setting)."""
    checked = 0
    for rel in gen.leaf_files(REPO):
        parsed = cm.parse_leaf_name(rel)
        if parsed is None:
            continue
        cfg = unchecked_config(rel)
        gpus = describe.gpus_for(abspath(rel), REPO)
        assert cfg.SOLVER.IMS_PER_BATCH == gpus * int(parsed["n"]), (
            f"{rel}: SOLVER.IMS_PER_BATCH = {cfg.SOLVER.IMS_PER_BATCH}, but the name says {parsed['n']} images "
            f"per GPU on the {gpus} GPU(s) the configs in {os.path.dirname(rel)}/ are written for"
        )
        assert cfg.MODEL.MASK_ON == (parsed["arch"] == "mrcnn"), rel
        assert parsed["backbone"] == f"r{cfg.MODEL.RESNETS.DEPTH}", rel
        spec = cm.NORM_BY_KEY.get(parsed["norm"])
        if spec is not None and parsed["arch"] in cm.ARCHS:
            norms = describe.config_norms(cfg)
            if spec.key != "frozenbn":
                assert spec.fpn == norms.get("MODEL.FPN.NORM"), rel
        if parsed["setting"]:
            assert describe.derive_setting(cfg) == parsed["setting"], rel
        checked += 1
    assert checked >= len([c for c in cm.cells() if c.generated])


def test_every_config_file_loads_with_all_checks():
    """Every leaf and base loads through load_config (norm names, batch split over its GPUs, weights)."""
    for rel in leaf_and_base_files():
        cfg = unchecked_config(rel)  # detectron2's loading, each file parsed once (load_config re-parses)
        gpus = describe.gpus_for(abspath(rel), REPO)
        if cfg.MODEL.WEIGHTS and "://" not in cfg.MODEL.WEIGHTS:
            cfg.MODEL.WEIGHTS = ""  # local pre-trained backbones: see the missing-weights tests
        check_config(cfg, world_size=gpus)
    # the cached loading above is detectron2's merge_from_file + load_config's checks exactly
    for rel in ("configs/mrcnn_r50_gn_4img_finetune.yaml", "configs/cpu/mrcnn_r18_syncbn_8img_reinit.yaml"):
        gpus = describe.gpus_for(abspath(rel), REPO)
        cfg = unchecked_config(rel)
        cfg.MODEL.WEIGHTS = ""
        check_config(cfg, world_size=gpus)
        assert load_config(abspath(rel), ["MODEL.WEIGHTS", ""], world_size=gpus).dump() == cfg.dump()


def test_rescale_keeps_images_per_gpu_and_follows_the_rule():
    cfg = describe.load_config_unchecked(abspath("configs/frcnn_r50_bn_2img_finetune.yaml"))
    opts = rescale_overrides(cfg, gpus=4, config_gpus=8)
    assert opts == ["SOLVER.IMS_PER_BATCH", "8", "SOLVER.BASE_LR", "0.01", "SOLVER.MAX_ITER", "180000",
                    "SOLVER.STEPS", "(120000, 160000)"]
    check_batch_config(load_config(abspath("configs/frcnn_r50_bn_2img_finetune.yaml"), opts, world_size=4), 4)


# ------------------------------------------------------------------------------------------------
# Bad configs fail with a clear message (through the generated configs)
# ------------------------------------------------------------------------------------------------

def test_rescale_prints_overrides_a_shell_reads_back(capsys):
    import importlib.util
    import shlex

    spec = importlib.util.spec_from_file_location("make_configs", os.path.join(REPO, "tools", "make_configs.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    config = abspath("configs/frcnn_r50_bn_2img_finetune.yaml")
    assert tool.main(["--rescale", config, "--gpus", "4"]) == 0
    printed = capsys.readouterr().out.strip()
    expected = rescale_overrides(describe.load_config_unchecked(config), gpus=4, config_gpus=8)
    assert shlex.split(printed) == expected and "'(" in printed  # the STEPS tuple is one quoted word

def test_unknown_norm_in_a_copied_leaf_names_key_value_and_suggestion(tmp_path):
    leaf = abspath("configs/cpu/frcnn_r18_bn_2img_scratch.yaml")
    text = open(leaf).read().replace('_BASE_: "', f'_BASE_: "{os.path.dirname(leaf)}/').replace(
        'FPN:\n    NORM: "BN"', 'FPN:\n    NORM: "GroupNorm"')
    bad = tmp_path / "typo.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match=r"MODEL\.FPN\.NORM = 'GroupNorm'.*Did you mean 'GN'\?"):
        load_config(str(bad))


@pytest.mark.parametrize("rel, world_size", [("configs/mrcnn_r50_bn_2img_scratch.yaml", 3),
                                             ("configs/cpu/frcnn_r18_gn_8img_scratch.yaml", 3)])
def test_total_batch_that_does_not_split_over_the_processes(rel, world_size):
    ims = describe.load_config_unchecked(abspath(rel)).SOLVER.IMS_PER_BATCH
    with pytest.raises(ValueError, match=rf"SOLVER.IMS_PER_BATCH = {ims} .*multiple of the number of processes \({world_size}\)"):
        load_config(abspath(rel), world_size=world_size)


@pytest.mark.parametrize("rel, command", [
    ("configs/cpu/frcnn_r18_bn_2img_finetune.yaml", "tools/pretrain_backbone.py --depth 18 --output output/pretrain/r18_fashion_mnist.pkl"),
    ("configs/cpu/mrcnn_r18_gn_4img_finetune.yaml", "tools/pretrain_backbone.py --depth 18 --norm GN --output"),
    ("configs/cpu/frcnn_r18_frozenbn_2img_frozen.yaml", "make pretrain"),
])
def test_missing_pretrained_weights_say_how_to_build_them(rel, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative weights path does not exist here
    with pytest.raises(FileNotFoundError, match=r"MODEL.WEIGHTS = 'output/pretrain/r18_\w*fashion_mnist\.pkl': no such file") as e:
        load_config(abspath(rel))
    assert command in str(e.value)


# ------------------------------------------------------------------------------------------------
# Re-initialised statistics
# ------------------------------------------------------------------------------------------------
class OwnStatistics(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("second_moment", torch.full((3,), 7.0))

    def reset_running_stats(self):
        self.second_moment.fill_(1.0)


def test_reset_norm_statistics_resets_exactly_the_layers_with_statistics():
    bn = nn.BatchNorm2d(4)
    sync = nn.SyncBatchNorm(4)
    untracked = nn.BatchNorm2d(4, track_running_stats=False)
    frozen = FrozenBatchNorm2d(4)
    gn = nn.GroupNorm(2, 4)
    own = OwnStatistics()
    model = nn.Sequential(bn, sync, untracked, frozen, gn, own)
    for m in (bn, sync, frozen):
        m.running_mean.fill_(3.0)
        m.running_var.fill_(5.0)
    bn.num_batches_tracked.fill_(9)
    params = {k: v.clone() for k, v in model.named_parameters()}
    frozen_state = {k: v.clone() for k, v in frozen.state_dict().items()}
    assert reset_norm_statistics(model) == 3
    for m in (bn, sync):
        assert torch.equal(m.running_mean, torch.zeros(4)) and torch.equal(m.running_var, torch.ones(4))
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(own.second_moment, torch.ones(3))
    assert all(torch.equal(v, frozen.state_dict()[k]) for k, v in frozen_state.items())
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in params.items())


def _trainer_for(rel, out, weights, resume_dir=None):
    from d2_bnstats.d2.trainer import Trainer

    cfg = load_config(abspath(rel), tiny_opts(out, max_iter=1, **{"MODEL.WEIGHTS": weights, "DATASETS.TEST": "()"}))
    return Trainer(cfg)


def test_trainer_resets_statistics_on_a_new_run_only(datasets_root, tiny_pretrained, tmp_path):
    weights = tiny_pretrained.get(18, "BN")
    ckpt = pickle.load(open(weights, "rb"))["model"]
    key = "backbone.bottom_up.res3.0.conv1.norm"
    assert float(abs(torch.from_numpy(ckpt["res3.0.conv1.norm.running_mean"])).sum()) > 0  # something to reset

    # re-initialised: the weights are loaded, the statistics reset after loading
    trainer = _trainer_for("configs/cpu/frcnn_r18_bn_2img_reinit.yaml", tmp_path / "re", weights)
    trainer.resume_or_load(resume=False)
    state = trainer.model.state_dict()
    assert torch.equal(state[key + ".weight"], torch.from_numpy(ckpt["res3.0.conv1.norm.weight"]))
    assert torch.equal(state["backbone.bottom_up.res3.0.conv1.weight"], torch.from_numpy(ckpt["res3.0.conv1.weight"]))
    bns = [m for m in trainer.model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    assert bns and all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in bns)
    assert all(torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in bns)

    # ... but never when resuming the run's own checkpoint
    dict(trainer.model.named_buffers())[key + ".running_mean"].fill_(5.0)
    trainer.checkpointer.save("model_0000000")
    resumed = _trainer_for("configs/cpu/frcnn_r18_bn_2img_reinit.yaml", tmp_path / "re", weights)
    resumed.resume_or_load(resume=True)
    assert torch.equal(resumed.model.state_dict()[key + ".running_mean"], torch.full_like(state[key + ".running_mean"], 5.0))


# ------------------------------------------------------------------------------------------------
# Every config: build, load its weights, one training iteration, one inference
# ------------------------------------------------------------------------------------------------
def _model_signature(cfg) -> str:
    c = cfg.clone()
    for key in ("SOLVER", "OUTPUT_DIR", "DATALOADER", "TEST", "DATASETS", "SEED", "CUDNN_BENCHMARK", "VIS_PERIOD", "GLOBAL"):
        c.pop(key, None)
    return c.dump()


def _groups():
    """{group id: [files]}: files in one group build the same model (differ in SOLVER/OUTPUT_DIR...)."""
    by_signature = {}
    for rel in gen.leaf_files(REPO):
        sig = _model_signature(unchecked_config(rel))
        by_signature.setdefault(sig, []).append(rel)
    groups = {}
    for files in by_signature.values():
        names = [os.path.splitext(os.path.relpath(f, "configs"))[0] for f in files]
        ns = [m.group(1) for m in (re.search(r"_(\d+)img", n) for n in names) if m]
        if len(files) > 1 and len(ns) == len(names) and len({re.sub(r"_\d+img", "_Nimg", n) for n in names}) == 1:
            gid = re.sub(r"_\d+img", "_{" + ",".join(ns) + "}img", names[0])
        else:
            gid = "+".join(names)
        groups[gid] = files
    return groups


GROUPS = _groups()
# A handful in the default suite (one per setting, a Mask R-CNN, GN and SyncBN); the rest are slow.
DEFAULT_RUN = {
    "cpu/frcnn_r18_bn_{2,4,8}img_scratch",
    "cpu/mrcnn_r18_gn_{2,4,8}img_finetune",
    "cpu/frcnn_r18_syncbn_{2,4,8}img_reinit",
    "cpu/frcnn_r18_frozenbn_{2,4,8}img_frozen",
}
MATRIX_OPTS = {
    "DATASETS.TRAIN": "('fashion_scenes_tiny_train',)",
    "DATASETS.TEST": "('fashion_scenes_tiny_val',)",
    "INPUT.MIN_SIZE_TRAIN": "(64,)",
    "INPUT.MAX_SIZE_TRAIN": "64",
    "INPUT.MIN_SIZE_TEST": "64",
    "INPUT.MAX_SIZE_TEST": "64",
    "INPUT.MASK_FORMAT": "bitmask",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": "256",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": "64",
    "MODEL.RPN.PRE_NMS_TOPK_TEST": "128",
    "MODEL.RPN.POST_NMS_TOPK_TEST": "32",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": "8",  # the 256-channel 4conv1fc and mask heads dominate otherwise
    "SOLVER.IMS_PER_BATCH": "2",
    "DATALOADER.NUM_WORKERS": "0",
    "MODEL.DEVICE": "cpu",
}


def test_default_run_groups_exist():
    assert DEFAULT_RUN <= set(GROUPS), sorted(DEFAULT_RUN - set(GROUPS))


def _norm_type(name):
    return type(d2_bnstats.get_norm(name, 32)) if name else None


def _check_norm_placement(model, cfg):
    bottom_up = model.backbone.bottom_up
    configured = FrozenBatchNorm2d if cfg.MODEL.RESNETS.NORM == "FrozenBN" else _norm_type(cfg.MODEL.RESNETS.NORM)
    stages = ["stem", "res2", "res3", "res4", "res5"]  # FREEZE_AT k freezes the first k of them
    bottom_norms = [(name, m.norm) for name, m in bottom_up.named_modules() if isinstance(getattr(m, "norm", None), nn.Module)]
    assert bottom_norms
    for name, norm in bottom_norms:
        frozen_stage = stages.index(name.split(".")[0]) < cfg.MODEL.BACKBONE.FREEZE_AT
        # detectron2 turns BatchNorm2d/SyncBatchNorm (and subclasses) of frozen stages into FrozenBN
        expected = FrozenBatchNorm2d if frozen_stage and issubclass(configured, (nn.BatchNorm2d, nn.SyncBatchNorm)) else configured
        assert type(norm) is expected, (name, type(norm), expected)
    fpn_convs = [getattr(model.backbone, n) for n in dir(model.backbone) if re.match(r"fpn_(lateral|output)\d$", n)]
    assert fpn_convs and all(type(c.norm) is _norm_type(cfg.MODEL.FPN.NORM) for c in fpn_convs if c.norm is not None)
    assert all((c.norm is None) == (not cfg.MODEL.FPN.NORM) for c in fpn_convs)
    _check_frozen(model, cfg)
    if not hasattr(model, "roi_heads"):  # RetinaNet: its head's norms are tested in test_per_level.py
        return
    heads = [(model.roi_heads.box_head, cfg.MODEL.ROI_BOX_HEAD.NORM, cfg.MODEL.ROI_BOX_HEAD.NUM_CONV)]
    if cfg.MODEL.MASK_ON:
        heads.append((model.roi_heads.mask_head, cfg.MODEL.ROI_MASK_HEAD.NORM, cfg.MODEL.ROI_MASK_HEAD.NUM_CONV))
    for head, name, num_conv in heads:
        convs = [m for m in head.children() if isinstance(m, nn.Conv2d) and hasattr(m, "norm")][:num_conv]
        assert len(convs) == num_conv
        assert all(type(c.norm) is _norm_type(name) if name else c.norm is None for c in convs)


def _check_frozen(model, cfg):
    bottom_up = model.backbone.bottom_up
    frozen = [p for p in model.parameters() if not p.requires_grad]
    if cfg.MODEL.BACKBONE.FREEZE_AT == 0:
        assert not frozen
    else:
        assert all(not p.requires_grad for p in bottom_up.stem.parameters())


def _expected_after_loading(checkpoint, cfg):
    """The backbone state a checkpoint should load as: the values themselves, except that a MABN
    backbone maps each BN layer's (gamma, beta, mean, var) to MABN's (gamma', beta', R) on loading
    (d2_bnstats.layers.mabn.bn_to_mabn_parameters; the mapping itself is tested in test_mabn.py)."""
    expected = {k: torch.from_numpy(v) for k, v in checkpoint.items()}
    if cfg.MODEL.RESNETS.NORM not in ("MABN", "SyncMABN"):
        return expected
    from d2_bnstats.layers.mabn import bn_to_mabn_parameters

    eps = float(cfg.BNSTATS.MABN.EPS)
    for key in [k for k in expected if k.endswith(".norm.running_var")]:
        p = key[: -len("running_var")]
        w, b, r = bn_to_mabn_parameters(expected[p + "weight"], expected[p + "bias"], expected[p + "running_mean"],
                                        expected[p + "running_var"], eps)
        expected[p + "weight"], expected[p + "bias"] = w, b
        expected[p + "running_mean"], expected[p + "running_var"] = torch.zeros_like(r), r
    return expected


def _check_weights_loaded(model, cfg, weights):
    ckpt = pickle.load(open(weights, "rb"))
    assert ckpt["matching_heuristics"] and "__author__" in ckpt
    DetectionCheckpointer(model).load(weights)
    prefix = "backbone.bottom_up."
    state = {k[len(prefix):]: v for k, v in model.state_dict().items()
             if k.startswith(prefix) and not k.endswith("num_batches_tracked")}
    # nothing of the backbone missing, nothing in the checkpoint unused, every value loaded exactly;
    # the only keys a BN checkpoint cannot have are the norm's own state beyond BatchNorm2d's
    # (EvalNorm's alpha_hat/beta_hat/B, MABN's ring buffers), which start at the layer's initial values
    extras = set()
    for name, module in model.backbone.bottom_up.named_modules():
        if isinstance(module, nn.BatchNorm2d) and type(module) is not nn.BatchNorm2d:
            own = set(type(module)(module.num_features).state_dict()) - set(nn.BatchNorm2d(module.num_features).state_dict())
            extras |= {f"{name}.{k}" for k in own}
    assert not extras & set(ckpt["model"])
    state = {k: v for k, v in state.items() if k not in extras}
    assert sorted(state) == sorted(ckpt["model"])
    expected = _expected_after_loading(ckpt["model"], cfg)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    after_loading_weights(cfg, model, resumed=False)  # what the Trainer does next
    stats = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    if cfg.BNSTATS.INIT.RESET_NORM_STATS:
        assert stats and all(torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in stats)
        assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in stats)
    else:  # frozen / fine-tuned: the pre-trained statistics stay
        state = model.state_dict()
        for k, v in expected.items():
            assert torch.equal(state[prefix + k], v), k


def run_one_config(rel, root_out, tiny_pretrained):
    unchecked = unchecked_config(rel)
    weights = tiny_pretrained.for_config_weights(unchecked.MODEL.WEIGHTS)
    opts = dict(MATRIX_OPTS, **{"MODEL.WEIGHTS": weights, "OUTPUT_DIR": str(root_out)})
    cfg = load_config(abspath(rel), [x for kv in opts.items() for x in kv])
    torch.manual_seed(0)
    model = build_model(cfg)
    _check_norm_placement(model, cfg)
    if weights:
        _check_weights_loaded(model, cfg, weights)

    mapper = DatasetMapper(cfg, is_train=True)
    batch = [mapper(copy.deepcopy(d)) for d in DatasetCatalog.get("fashion_scenes_tiny_train")[:2]]
    assert all(len(b["instances"]) for b in batch)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    trainer = SimpleTrainer(model, [batch], build_optimizer(cfg, model))
    trainer.train(0, 1)
    loss = trainer.storage.history("total_loss").latest()
    assert torch.isfinite(torch.tensor(loss)), loss
    after = dict(model.named_parameters())
    classifier = "roi_heads.box_predictor.cls_score.weight" if hasattr(model, "roi_heads") else "head.cls_score.weight"
    assert not torch.equal(before[classifier], after[classifier])
    for k, p in after.items():
        if not p.requires_grad:
            assert torch.equal(before[k], p), f"frozen parameter {k} changed"
    res5 = [k for k in after if k.startswith("backbone.bottom_up.res5") and k.endswith("conv1.weight")][0]
    assert torch.equal(before[res5], after[res5]) == (not after[res5].requires_grad)

    model.eval()
    with torch.no_grad():
        out = model([{"image": batch[0]["image"], "height": 64, "width": 64}])
    fields = out[0]["instances"].get_fields()
    assert {"pred_boxes", "scores", "pred_classes"} <= set(fields)
    if cfg.MODEL.MASK_ON:
        assert "pred_masks" in fields
    return cfg


@pytest.mark.parametrize(
    "group",
    [pytest.param(g, id=g, marks=() if g in DEFAULT_RUN else pytest.mark.slow) for g in sorted(GROUPS)],
)
def test_config_builds_loads_trains_and_infers(group, datasets_root, tiny_pretrained, tmp_path):
    files = GROUPS[group]
    signature = _model_signature(unchecked_config(files[0]))
    assert all(_model_signature(unchecked_config(f)) == signature for f in files)
    run_one_config(files[0], tmp_path, tiny_pretrained)
