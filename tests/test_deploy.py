"""Deployment: fixed-affine norms → FrozenBN → folded into convs; tracing and export.

Layer level: every norm whose inference is a fixed affine becomes detectron2's FrozenBatchNorm2d with
identical outputs, folding matches to rounding, what is not a fixed affine (EvalNorm, BN without
running statistics) stays, the input model is never changed. Model level, on the CPU Faster/Mask
R-CNN R-18 of configs/cpu (random weights; γ, β drawn at random, then PreciseBN gives every
BN-type layer the population statistics of a few synthetic training batches): the converted and the
folded model give the eager model's detections, and so does the model traced with detectron2's
TracingAdapter; the tool writes a loadable TorchScript file and nothing partial. (One file over 400
lines: the conversion, tracing, export and tool tests share the prepared models, built once per session.)
"""
import functools
import importlib.util
import os
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d, NaiveSyncBatchNorm
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from d2_bnstats import (
    EvalNorm2d,
    GhostBatchNorm2d,
    MABN2d,
    PerLevelNorm,
    RoIShuffleBatchNorm2d,
    SyncBatchNorm2d,
    precise_bn,
)
from d2_bnstats.d2.deploy import convert_for_deployment, fold_norms_into_convs, to_frozen
from d2_bnstats.d2.export import (
    PRIVATE_PACKAGE,
    detection_difference,
    export_onnx,
    export_torchscript,
    onnx_unavailable_reason,
    rcnn_inference,
    run_onnx,
    same_detections,
    trace,
    tracing_adapter_class,
)
from d2_bnstats.d2.norms.mabn import centralize_convs
from d2_bnstats.d2.train import load_config
from d2_bnstats.layers.weight_centralization import WeightCentralizedConv2d

from .conftest import CPU_BASE, REPO

C = 6


# ---------------------------------------------------------------------------------------------
# layer level


def _randomize(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial affine parameters and running statistics for every BN-type layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                if m.running_mean is not None:
                    if not isinstance(m, MABN2d):  # MABN's running mean is 0 by definition
                        m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.2)


LAYERS = {
    "BN": lambda: nn.BatchNorm2d(C),
    "BN without affine": lambda: nn.BatchNorm2d(C, affine=False),
    "torch SyncBatchNorm": lambda: nn.SyncBatchNorm(C),
    "detectron2 NaiveSyncBatchNorm": lambda: NaiveSyncBatchNorm(C),
    "SyncBN": lambda: SyncBatchNorm2d(C),
    "GhostBN": lambda: GhostBatchNorm2d(C, virtual_batch_size=2),
    "RoIShuffleBN": lambda: RoIShuffleBatchNorm2d(C),
    "MABN": lambda: MABN2d(C),
    "EvalNorm (mode ema)": lambda: EvalNorm2d(C, mode="ema"),
}


def _conv_norm(make_norm) -> nn.Module:
    """Input conv → detectron2 Conv2d with a norm → ReLU → nn.Sequential(conv, norm)."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        D2Conv2d(4, C, 3, padding=1, bias=False, norm=make_norm(), activation=nn.ReLU()),
        nn.Sequential(nn.Conv2d(C, C, 1), make_norm()),
    )
    centralize_convs(model)  # the MABN transform's step: convs feeding MABN compute with W - mean(W)
    _randomize(model)
    return model.eval()


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_fixed_affine_norms_become_frozen_bn_with_identical_outputs_and_fold(kind):
    torch.manual_seed(0)
    model = _conv_norm(LAYERS[kind])
    norm = model[1].norm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 9, 11) * 3 + 1
    with torch.no_grad():
        reference = model(x)
        frozen = to_frozen(model)
        folded = fold_norms_into_convs(model)
        y_frozen, y_folded = frozen(x), folded(x)
    norms = [m for m in frozen.modules() if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d))]
    assert len(norms) == 2 and all(type(m) is FrozenBatchNorm2d for m in norms)
    assert not any(isinstance(m, WeightCentralizedConv2d) for m in frozen.modules())
    assert torch.equal(y_frozen, reference)  # the same fused op on the same numbers
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)) for m in folded.modules())
    assert folded[1].norm is None and isinstance(folded[2][1], nn.Identity)
    torch.testing.assert_close(y_folded, reference, rtol=1e-5, atol=1e-5)
    # the input model is untouched: classes, values
    assert model[1].norm is norm and type(model[2][1]) is type(norm)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if isinstance(norm, MABN2d):
        assert isinstance(model[1], WeightCentralizedConv2d)


def test_what_is_not_a_fixed_affine_stays():
    torch.manual_seed(0)
    learned = EvalNorm2d(C)
    with torch.no_grad():
        learned.alpha_hat.fill_(0.3)
        learned.beta_hat.fill_(0.2)
    model = nn.Sequential(
        D2Conv2d(3, C, 3, bias=False, norm=learned),
        D2Conv2d(C, C, 3, bias=False, norm=nn.BatchNorm2d(C, track_running_stats=False)),
        D2Conv2d(C, C, 3, bias=False, norm=nn.GroupNorm(2, C)),
    )
    _randomize(model)
    model.eval()
    x = torch.randn(2, 3, 12, 12)
    converted, report = convert_for_deployment(model, fold=True)
    assert isinstance(converted[0].norm, EvalNorm2d) and converted[0].norm is not learned
    assert type(converted[1].norm) is nn.BatchNorm2d and isinstance(converted[2].norm, nn.GroupNorm)
    assert [name for name, _ in report.kept] == ["0.norm", "1.norm"]
    assert report.frozen == [] and report.folded == []
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)


def test_per_level_statistics_become_per_level_frozen_norms():
    """Shared heads with one set of statistics per FPN level (the plug-in's PerLevelNorm, detectron2's
    CycleBatchNormList): every level becomes a frozen norm; they follow no single conv, so none is folded."""
    torch.manual_seed(0)
    ours = PerLevelNorm(nn.BatchNorm2d(C), 3)
    theirs = CycleBatchNormList(3, num_features=C)
    model = nn.ModuleList([D2Conv2d(3, C, 3, padding=1), ours, theirs])
    _randomize(model)
    with torch.no_grad():
        for i, level in enumerate(list(ours.levels) + list(theirs)):
            level.running_mean.add_(i)  # distinct statistics per level
    model.eval()
    levels = [torch.randn(2, 3, 8 >> i, 8 >> i) for i in range(3)]

    def run(m):
        ours_out = [m[1](m[0](x)) for x in levels]
        m[1].reset()
        return ours_out + [m[2](m[0](x)) for x in levels]

    with torch.no_grad():
        reference = run(model)
        converted, report = convert_for_deployment(model, fold=True)
        outputs = run(converted)
    assert all(type(level) is FrozenBatchNorm2d for level in list(converted[1].levels) + list(converted[2]))
    assert len(report.frozen) == 6 and report.folded == []
    for y, ref in zip(outputs, reference):
        assert torch.equal(y, ref)


def test_unfinished_centralization_ramp_is_an_error():
    layer = MABN2d(C)
    model = nn.Sequential(D2Conv2d(3, C, 3, bias=False, norm=layer))
    centralize_convs(model, ramp_iters=10)
    with pytest.raises(ValueError, match="ramp"):
        to_frozen(model)
    assert isinstance(model[0], WeightCentralizedConv2d)


# ---------------------------------------------------------------------------------------------
# model level

SIZE = 128


def _rcnn_config(norm: str, mask: bool = False, head_norm: str = None):
    head_norm = head_norm or norm
    opts = [
        "MODEL.DEVICE", "cpu",
        "MODEL.RESNETS.NORM", norm,
        "MODEL.FPN.NORM", norm,
        "MODEL.ROI_BOX_HEAD.NUM_CONV", "2",
        "MODEL.ROI_BOX_HEAD.CONV_DIM", "64",
        "MODEL.ROI_BOX_HEAD.NUM_FC", "1",
        "MODEL.ROI_BOX_HEAD.NORM", head_norm,
        "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
        "MODEL.MASK_ON", str(mask),
        "MODEL.ROI_MASK_HEAD.NORM", head_norm,
        "MODEL.ROI_MASK_HEAD.CONV_DIM", "64",
        "TEST.DETECTIONS_PER_IMAGE", "20",
    ]
    return load_config(CPU_BASE, opts)


def _training_batch(g: torch.Generator, mask: bool):
    batch = []
    for _ in range(2):
        image = torch.rand(3, SIZE, SIZE, generator=g) * 255
        xy = torch.rand(4, 2, generator=g) * (SIZE - 40)
        wh = torch.rand(4, 2, generator=g) * 30 + 8
        inst = Instances((SIZE, SIZE))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, 10, (4,), generator=g)
        if mask:
            masks = torch.zeros(4, SIZE, SIZE, dtype=torch.bool)
            for i, (x0, y0, x1, y1) in enumerate(inst.gt_boxes.tensor.round().long().tolist()):
                masks[i, y0:y1, x0:x1] = True
            inst.gt_masks = BitMasks(masks)
        batch.append({"image": image, "instances": inst})
    return batch


@functools.lru_cache(maxsize=None)  # the tests check that nothing changes it
def _prepared_model(norm: str, mask: bool = False, head_norm: str = None):
    """The CPU R-18 model with random weights, a spread-out classifier (distinct scores), random
    γ, β, EvalNorm α̂ = 0.3, β̂ = 0.2, and PreciseBN statistics of two synthetic training batches."""
    cfg = _rcnn_config(norm, mask, head_norm)
    torch.manual_seed(0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        predictor = model.roi_heads.box_predictor
        predictor.cls_score.weight.normal_(0, 0.5, generator=g)
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            if isinstance(m, EvalNorm2d):
                m.alpha_hat.fill_(0.3)
                m.beta_hat.fill_(0.2)
    batches = [_training_batch(g, mask) for _ in range(2)]
    with EventStorage():  # detectron2's training forward logs to it
        precise_bn(model, batches, len(batches))
    return model.eval()


def _image(seed: int = 2):
    return torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 255


def _detect(model, image):
    with torch.no_grad():
        return rcnn_inference(model, [{"image": image}])[0]["instances"]


def assert_same_detections(actual, expected, box_atol=1e-4, score_atol=1e-5, mask_atol=1e-4):
    assert len(expected) > 0, "the reference model detects nothing: the comparison would be empty"
    assert len(actual) == len(expected)
    assert torch.equal(actual.pred_classes, expected.pred_classes)
    torch.testing.assert_close(actual.scores, expected.scores, rtol=0, atol=score_atol)
    torch.testing.assert_close(actual.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=0, atol=box_atol)
    if expected.has("pred_masks"):
        torch.testing.assert_close(actual.pred_masks, expected.pred_masks, rtol=0, atol=mask_atol)


def _run(traced, image):
    # the graph as recorded: skips the JIT's profiling and fusion passes, seconds on a first call
    with torch.jit.optimized_execution(False):
        return traced(image)


def _check_model(norm: str, mask: bool = False, head_norm: str = None, kept=()):
    model = _prepared_model(norm, mask, head_norm)
    image = _image()
    reference = _detect(model, image)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    frozen, frozen_report = convert_for_deployment(model)
    folded, folded_report = convert_for_deployment(model, fold=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # input untouched
    assert_same_detections(_detect(frozen, image), reference, box_atol=0, score_atol=0, mask_atol=0)
    assert_same_detections(_detect(folded, image), reference)
    remaining = {type(m) for m in folded.modules() if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d))}
    assert remaining == set(kept)
    if not kept:
        assert frozen_report.frozen and len(folded_report.folded) == len(frozen_report.frozen)
    traced, adapter = trace(folded, image)
    assert_same_detections(adapter.outputs_schema(_run(traced, image))[0]["instances"], reference)
    # the traced graph generalizes to another image of the same size
    other = _image(seed=3)
    assert_same_detections(adapter.outputs_schema(_run(traced, other))[0]["instances"], _detect(folded, other))
    return model, traced, adapter


def test_faster_rcnn_bn_converted_folded_and_traced():
    _check_model("BN")


def test_faster_rcnn_mabn_centralization_folded_converted_and_traced():
    model, _, _ = _check_model("MABN")
    assert any(isinstance(m, WeightCentralizedConv2d) for m in model.modules())


def test_faster_rcnn_evalnorm_stays_and_traces():
    _check_model("EvalNorm", kept=(EvalNorm2d,))


@pytest.mark.slow
@pytest.mark.parametrize("norm,head_norm", [("SyncBN", None), ("GhostBN", None), ("SyncBN", "RoIShuffleBN")])
def test_faster_rcnn_other_norms_converted_folded_and_traced(norm, head_norm):
    _check_model(norm, head_norm=head_norm)


@pytest.mark.slow
@pytest.mark.parametrize("norm,kept", [("BN", ()), ("EvalNorm", (EvalNorm2d,)), ("MABN", ())])
def test_mask_rcnn_converted_folded_and_traced(norm, kept):
    _check_model(norm, mask=True, kept=kept)


# ---------------------------------------------------------------------------------------------
# TracingAdapter and files


def test_tracing_adapter_is_detectron2s_without_importing_a_broken_export_package():
    cls = tracing_adapter_class()
    assert cls.__name__ == "TracingAdapter"
    try:
        import detectron2.export as export_package  # noqa: F401
    except ImportError as e:  # the snapshot: caffe2 missing; its flatten.py was loaded privately
        assert getattr(e, "name", "").startswith("caffe2")
        assert cls.__module__ == PRIVATE_PACKAGE + ".flatten"
        assert "detectron2.export" not in sys.modules
    else:
        assert cls is export_package.TracingAdapter


def test_detection_comparison_ignores_the_order_of_ties_only():
    expected = Instances((50, 50))
    expected.pred_boxes = Boxes(torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 4, 4]]))
    expected.scores = torch.tensor([0.5, 0.5, 0.2])
    expected.pred_classes = torch.tensor([1, 2, 1])
    swapped = expected[[1, 0, 2]]
    assert same_detections(detection_difference(swapped, expected))
    moved = Instances((50, 50), pred_boxes=Boxes(swapped.pred_boxes.tensor + 0.01), scores=swapped.scores,
                      pred_classes=swapped.pred_classes)
    assert detection_difference(moved, expected)["max_box_difference"] == pytest.approx(0.01, rel=1e-4)
    assert not same_detections(detection_difference(moved, expected))
    other_class = Instances((50, 50), pred_boxes=expected.pred_boxes, scores=expected.scores,
                            pred_classes=torch.tensor([1, 2, 2]))
    assert detection_difference(other_class, expected)["unpaired"] == 2
    assert not same_detections(detection_difference(expected[:2], expected))


def test_saved_torchscript_loads_and_a_failed_write_leaves_nothing(tmp_path):
    model = _conv_norm(lambda: nn.BatchNorm2d(C))
    traced = torch.jit.trace(fold_norms_into_convs(model), torch.randn(1, 3, 8, 8))
    path = export_torchscript(traced, str(tmp_path / "model.ts"))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(path)(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception):
        export_torchscript(object(), str(tmp_path / "broken.ts"))

    def reject(written):
        assert os.path.getsize(written) > 0  # the check sees the complete file, under a temporary name
        raise SystemExit("rejected")

    with pytest.raises(SystemExit, match="rejected"):
        export_torchscript(traced, str(tmp_path / "rejected.ts"), verify=reject)
    assert sorted(os.listdir(tmp_path)) == ["model.ts"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_an_exported_model_gets_the_permissions_of_an_ordinary_write(tmp_path, umask):
    traced = torch.jit.trace(_conv_norm(lambda: nn.BatchNorm2d(C)).eval(), torch.randn(1, 3, 8, 8))
    previous = os.umask(umask)
    try:
        path = export_torchscript(traced, str(tmp_path / "model.ts"))
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(previous)
    mode = os.stat(path).st_mode & 0o777
    assert mode == os.stat(tmp_path / "plain").st_mode & 0o777 == 0o666 & ~umask


def _weights(tmp_path, norm):
    model = _prepared_model(norm)
    path = str(tmp_path / "weights.pth")
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("weights")
    return model, path


def _tool(*args):
    """tools/deploy_model.py's main, in this process (the tool is a thin front end)."""
    spec = importlib.util.spec_from_file_location("deploy_model_tool", os.path.join(REPO, "tools", "deploy_model.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main(list(args))


# the model of _prepared_model: the CPU config plus the test's head options
TEST_OPTS = ["MODEL.ROI_BOX_HEAD.NUM_CONV", "2", "MODEL.ROI_BOX_HEAD.CONV_DIM", "64", "MODEL.ROI_BOX_HEAD.NUM_FC", "1",
             "MODEL.RPN.POST_NMS_TOPK_TEST", "100", "TEST.DETECTIONS_PER_IMAGE", "20"]


def test_tool_writes_a_folded_torchscript_model_that_detects_as_the_original(tmp_path):
    model, weights = _weights(tmp_path, "MABN")
    out = tmp_path / "deployed"
    config = os.path.join(REPO, "configs", "cpu", "frcnn_r18_mabn_2img.yaml")
    numbers = _tool("--config-file", config, "--output", str(out), "--fold", "--random-sample",
                    "MODEL.WEIGHTS", weights, *TEST_OPTS)
    assert numbers["file"] == str(out / "model.ts") and sorted(os.listdir(out)) == ["model.ts"]
    ts = torch.jit.load(str(out / "model.ts"))
    image = _image()
    reference = _detect(model, image)
    _, adapter = trace(fold_norms_into_convs(model), image)  # the schema to read the file's outputs
    assert_same_detections(adapter.outputs_schema(_run(ts, image))[0]["instances"], reference)


def test_tool_errors_are_clear_and_write_nothing(tmp_path):
    config = os.path.join(REPO, "configs", "cpu", "frcnn_r18_bn_2img.yaml")
    out = tmp_path / "a"
    with pytest.raises(SystemExit, match="none.pth"):
        _tool("--config-file", config, "--output", str(out), "--random-sample", "MODEL.WEIGHTS", str(tmp_path / "none.pth"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="not a folder"):
        _tool("--config-file", config, "--output", str(blocker), "--random-sample")
    with pytest.raises(SystemExit, match="TEST_BATCH_STATS"):
        _tool("--config-file", config, "--output", str(out), "--random-sample", "BNSTATS.TEST_BATCH_STATS.ENABLED", "True")
    if onnx_unavailable_reason() is not None:  # where onnx is installed, its absence cannot be shown
        with pytest.raises(SystemExit, match="onnx"):
            _tool("--config-file", config, "--output", str(out), "--random-sample", "--format", "onnx")
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.parametrize("norm", ["BN", pytest.param("EvalNorm", marks=pytest.mark.slow)])
def test_onnx_export_detects_as_the_original(tmp_path, norm):
    reason = onnx_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    import onnx

    model = fold_norms_into_convs(_prepared_model(norm))
    image = _image()
    path = export_onnx(model, image, str(tmp_path / "model.onnx"))
    onnx.checker.check_model(onnx.load(path))
    try:
        outputs = run_onnx(path, image)
    except ImportError:
        pytest.skip("onnxruntime is not installed: the ONNX file passed onnx.checker but cannot be run")
    _, adapter = trace(model, image)
    assert_same_detections(adapter.outputs_schema(outputs)[0]["instances"], _detect(_prepared_model(norm), image))
