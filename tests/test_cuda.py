"""CUDA correctness of every norm (marker ``cuda``; skipped where torch sees no CUDA device).

* Parity: every registered norm of the plug-in (and variants that reach its other code paths), with
  detectron2's BN, FrozenBN and GN as controls, trains three steps and evaluates on CUDA in float32,
  under ``torch.autocast("cuda", bfloat16)`` and under float16 autocast with a GradScaler, against
  the same layer on CPU in float64 on the same (rounded) inputs: outputs, input gradients, parameter
  gradients, every buffer after every step, eval outputs and input gradient (tests/device_parity.py
  says how; tests/test_device_parity.py runs the same harness, and tests/device_checks.py's checks
  below, on the CPU).
* No host synchronisation: a training step of each layer alone (forward, backward, optimizer step
  with the plug-in's post-step hooks, MABN's step end) under torch's sync debug mode "error"; and one
  detectron2 training iteration of an R-18-FPN Faster R-CNN per norm with the mode "error" exactly
  while its norm (and plug-in) modules run forward and backward and while the optimizer steps.
* PreciseBN on CUDA: the same statistics as on CPU in float64, with no host synchronisation per
  batch; the comparison tool end to end with MODEL.DEVICE cuda.
* SyncBN, SyncEvalNorm and SyncMABN in two processes (gloo, CUDA tensors, one GPU) equal one process
  on the concatenated batch.
* A checkpoint saved on CUDA loads on CPU and back (layers, and a detectron2 model).
"""
import pytest
import torch
from detectron2.utils.events import EventStorage

from d2_bnstats.layers.evalnorm_projection import attach_projection_hook
from d2_bnstats.registry import registered_norms

from . import device_checks as checks
from . import device_parity as dp
from . import sync_guard as sg

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

VARIANTS = dp.norm_variants(32)
D2_NORMS = ["BN", "FrozenBN", "GN"] + registered_norms()


def _parity_cases():
    for variant in sorted(VARIANTS):
        for precision in dp.PRECISIONS:
            marks = [pytest.mark.xfail(strict=True, reason=dp.MABN_SCALED_PSI)] if (variant, precision) in dp.KNOWN_GAPS else []
            yield pytest.param(variant, precision, marks=marks, id=f"{variant}-{precision}")


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 means float32: no TF32 in matmuls or convolutions during these tests."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------------------------------
# parity with CPU float64


@pytest.mark.parametrize("shape", sorted(dp.SHAPES))
@pytest.mark.parametrize("variant, precision", list(_parity_cases()))
def test_layer_on_cuda_matches_cpu_float64(variant, precision, shape):
    dp.check_parity(VARIANTS[variant], dp.SHAPES[shape], dp.PRECISIONS[precision], "cuda")


# --------------------------------------------------------------------------------------------------
# no host synchronisation in training


def _layer_and_optimizer(variant):
    torch.manual_seed(0)
    layer = VARIANTS[variant]().cuda()
    params = [p for p in layer.parameters() if p.requires_grad]
    return layer, (torch.optim.SGD(params, lr=0.01) if params else None)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", sorted(dp.SHAPES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_training_step_of_a_layer_makes_no_host_sync(variant, shape, autocast):
    layer, opt = _layer_and_optimizer(variant)
    projection = attach_projection_hook(layer)
    x = torch.randn(*dp.SHAPES[shape], device="cuda") * 2 + 0.5
    g = torch.randn_like(x)
    try:
        dp.training_step(layer, x, g, opt, autocast)  # first call: lazy initialisation is not the layer's
        torch.cuda.synchronize()
        with sg.sync_errors():
            for _ in range(2):
                dp.training_step(layer, x, g, opt, autocast)
        torch.cuda.synchronize()
    finally:
        projection.remove()


@pytest.mark.parametrize("norm", D2_NORMS)
def test_detectron2_iteration_makes_no_host_sync_in_norm_layers(norm):
    trainer = dp.detectron2_trainer(norm, "cuda")
    with EventStorage(0):
        for _ in range(2):  # warm-up: cuDNN, allocator, lazy state
            trainer.run_step()
        torch.cuda.synchronize()
        guard = sg.guarded_iteration(trainer)
        torch.cuda.synchronize()
    assert guard.forward_calls > 0 and guard.nodes_run > 0


# --------------------------------------------------------------------------------------------------
# PreciseBN, the comparison tool, synchronised norms across processes, checkpoints (tests/device_checks.py)


@pytest.mark.parametrize("variant", ["BN", "SyncBN", "EvalNorm", "MABN", "GhostBN(v=3)", "RoIShuffleBN(K=3)"])
def test_precise_bn_on_cuda_matches_cpu_float64_without_host_sync_per_batch(variant):
    checks.precise_bn_parity(variant, "cuda")


def test_compare_tool_on_cuda(datasets_root, tmp_path):
    checks.compare_tool_run("cuda", datasets_root, tmp_path)


def test_synchronised_norms_in_two_processes_on_cuda_equal_one_process_on_the_union():
    checks.synchronised_norms_parity("cuda")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layer_checkpoint_saved_on_cuda_loads_on_cpu_and_back(variant):
    checks.layer_checkpoint_roundtrip(variant, "cuda")


@pytest.mark.parametrize("norm", ["EvalNorm", "MABN", "GhostBN"])
def test_detectron2_checkpoint_saved_on_cuda_loads_on_cpu_and_back(norm, tmp_path):
    checks.detectron2_checkpoint_roundtrip(norm, "cuda", tmp_path)
