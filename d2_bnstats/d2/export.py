"""Tracing and exporting detectron2 models (TorchScript, ONNX) with detectron2's ``TracingAdapter``.

Follows detectron2's ``tools/deploy/export_model.py`` (``--export-method tracing``): the model is
called as ``model.inference([{"image": image}], do_postprocess=False)`` for ``GeneralizedRCNN`` (so
masks stay RoI masks; the final resize to the input's size is left to the caller, as in
detectron2) and as ``model([{"image": image}])`` otherwise; ``TracingAdapter`` flattens inputs and
outputs to tensors, ``torch.jit.trace`` records the graph, and ``adapter.outputs_schema`` rebuilds
``Instances`` from the traced model's tensors.

Where ``TracingAdapter`` comes from (:func:`tracing_adapter_class`): ``from detectron2.export import
TracingAdapter`` when that import works (detectron2 main). The 2022 detectron2 snapshot's
``detectron2/export/__init__.py`` imports its Caffe2 exporter, which imports ``caffe2`` without a
guard, so the package fails to import wherever Caffe2 is not installed (every current torch). Only
then, detectron2's own, unmodified ``detectron2/export/flatten.py`` (the module that defines
``TracingAdapter``; it needs nothing of Caffe2) and the one module it imports,
``torchscript_patch.py``, are loaded from detectron2's installed files under a private package name
(:data:`PRIVATE_PACKAGE`) whose search path is detectron2's ``export`` folder, without running
``detectron2/export/__init__.py``. ``detectron2.export`` itself stays unimported (importing it still
fails as before); nothing is written to detectron2's files. The classes are detectron2's, only
their ``__module__`` names the private package.

ONNX: torch's TorchScript-based exporter (``dynamo=False``), as detectron2's tool. torch has no ONNX
translation of ``aten::batch_norm_update_stats`` (its fused BN statistics kernel, which EvalNorm's
per-sample moments use for small CPU inputs); the layer leaves that kernel out while an export
records the graph (:func:`~d2_bnstats.layers.moments.exporting_to_onnx`), so the file holds torch's
own translations only and nothing is registered here.

Files are written atomically (:func:`d2_bnstats.outputs.atomic_path`): into a temporary file in the
output folder, then ``os.replace``d onto the final name, so a failed export leaves no partial file
behind; the file gets the permissions an ordinary write would give it (0o666 minus the umask).
"""
import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
import time
import types
import warnings
from typing import Callable, Dict, List, Optional

import torch
from detectron2.modeling import GeneralizedRCNN
from torch import nn

from ..outputs import atomic_path

# the exporters' atomic write, under its earlier name
atomic_output = atomic_path

__all__ = [
    "FILE_NAMES",
    "FORMATS",
    "PRIVATE_PACKAGE",
    "atomic_output",
    "detection_difference",
    "export_onnx",
    "export_torchscript",
    "onnx_unavailable_reason",
    "rcnn_inference",
    "run_onnx",
    "same_detections",
    "time_variants",
    "trace",
    "tracing_adapter_class",
]

PRIVATE_PACKAGE = "d2_bnstats.d2._detectron2_export_without_caffe2"
FORMATS = ("torchscript", "onnx")
FILE_NAMES = {"torchscript": "model.ts", "onnx": "model.onnx"}


def _missing_caffe2(error: ImportError) -> bool:
    name = getattr(error, "name", None) or ""
    return name == "caffe2" or name.startswith("caffe2.")


def _flatten_without_package_init() -> types.ModuleType:
    """detectron2's ``export/flatten.py`` loaded under :data:`PRIVATE_PACKAGE` (see module docstring)."""
    module_name = PRIVATE_PACKAGE + ".flatten"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.find_spec("detectron2.export")  # imports detectron2, not detectron2.export
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("detectron2 has no 'export' package: TracingAdapter is not available")
    folders = list(spec.submodule_search_locations)
    if not any(os.path.isfile(os.path.join(folder, "flatten.py")) for folder in folders):
        raise ImportError(f"detectron2's export package ({', '.join(folders)}) has no flatten.py: TracingAdapter is not available")
    package = types.ModuleType(PRIVATE_PACKAGE, "detectron2/export loaded without its __init__ (no caffe2)")
    package.__path__ = folders
    package.__package__ = PRIVATE_PACKAGE
    sys.modules[PRIVATE_PACKAGE] = package
    try:
        return importlib.import_module(module_name)
    except BaseException:
        sys.modules.pop(PRIVATE_PACKAGE, None)
        raise


def tracing_adapter_class() -> type:
    """detectron2's ``TracingAdapter``: from ``detectron2.export`` if it imports, else (only when that
    import fails for want of Caffe2) from detectron2's ``export/flatten.py`` without the package's
    ``__init__`` (see the module docstring)."""
    try:
        from detectron2.export import TracingAdapter

        return TracingAdapter
    except ImportError as error:
        if not _missing_caffe2(error):
            raise
    return _flatten_without_package_init().TracingAdapter


def rcnn_inference(model: nn.Module, inputs):
    """How detectron2's export tool calls a model for tracing: ``GeneralizedRCNN`` without the final
    resize (RoI masks, boxes in the input image's coordinates), anything else as it is."""
    if isinstance(model, GeneralizedRCNN):
        instances = model.inference(inputs, do_postprocess=False)[0]
        return [{"instances": instances}]
    return model(inputs)


@contextlib.contextmanager
def _quiet_tracer():
    # detectron2's code has data-dependent Python branches (box checks, empty-input guards); the
    # tracer warns about each of them on every trace, as it does for detectron2's own export tool
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        yield


def trace(model: nn.Module, image: torch.Tensor, inference: Optional[Callable] = rcnn_inference):
    """``(traced, adapter)``: ``model`` (in eval mode) traced on one CHW ``image`` through
    ``TracingAdapter``. ``traced(image)`` returns a tuple of tensors; ``adapter.outputs_schema(...)``
    turns them back into the model's outputs."""
    if model.training:
        raise ValueError("trace an inference model: call model.eval() first")
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise ValueError(f"expected one CHW image tensor, got {getattr(image, 'shape', type(image))}")
    adapter = tracing_adapter_class()(model, [{"image": image}], inference).eval()  # a new module trains
    with _quiet_tracer(), torch.no_grad():
        traced = torch.jit.trace(adapter, (image,), check_trace=False)
    return traced, adapter


def export_torchscript(traced, path: str, verify: Optional[Callable[[str], None]] = None) -> str:
    """Save a traced model to ``path`` (atomically); returns ``path``. ``verify(written_file)`` runs
    before the file gets its final name; an exception from it leaves no file."""
    with atomic_path(path) as tmp:
        torch.jit.save(traced, tmp)
        if verify is not None:
            verify(tmp)
    return path


def onnx_unavailable_reason() -> Optional[str]:
    """None if torch can write ONNX files here, else why not (torch's exporter needs the ``onnx``
    package)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        return "ONNX export needs the 'onnx' package (pip install onnx); torch's exporter refuses to run without it"
    return None


def export_onnx(
    model: nn.Module,
    image: torch.Tensor,
    path: str,
    opset_version: int = 17,
    verify: Optional[Callable[[str], None]] = None,
) -> str:
    """Export ``model`` (eval mode) traced on ``image`` as ONNX to ``path`` (atomically) with torch's
    TorchScript-based exporter (what detectron2's tool uses); returns ``path``. ``verify`` as for
    :func:`export_torchscript`."""
    reason = onnx_unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    if model.training:
        raise ValueError("export an inference model: call model.eval() first")
    # in eval mode: torch's exporter puts the adapter back in the mode it had, and with it the model
    adapter = tracing_adapter_class()(model, [{"image": image}], rcnn_inference).eval()
    kwargs = {"opset_version": opset_version}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the tracing exporter: detectron2's models do not go through torch.export
    with atomic_path(path) as tmp, _quiet_tracer(), torch.no_grad():
        torch.onnx.export(adapter, (image,), tmp, **kwargs)
        if verify is not None:
            verify(tmp)
    return path


def run_onnx(path: str, image: torch.Tensor):
    """The flattened outputs (a tuple of tensors, as the traced model's) of an ONNX file run by
    onnxruntime on CPU; ImportError without onnxruntime."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: image.detach().cpu().numpy()})
    return tuple(torch.from_numpy(o) for o in outputs)


def detection_difference(actual, expected) -> Dict[str, float]:
    """How far two ``Instances`` of one image are apart, whatever the order of detections with (nearly)
    equal scores: each expected detection, highest score first, is paired with the unpaired actual
    detection of its class nearest to it (box and score); returns the counts, the detections left
    unpaired, and over the pairs the largest absolute difference of boxes, scores and masks."""
    result = {"detections": float(len(actual)), "expected_detections": float(len(expected)), "unpaired": 0.0}
    free = list(range(len(actual)))
    worst = {"box": 0.0, "score": 0.0, "mask": 0.0}
    masks = actual.has("pred_masks") and expected.has("pred_masks")
    for i in torch.argsort(expected.scores, descending=True, stable=True).tolist():
        candidates = [j for j in free if int(actual.pred_classes[j]) == int(expected.pred_classes[i])]
        if not candidates:
            result["unpaired"] += 1
            continue
        box = (actual.pred_boxes.tensor[candidates] - expected.pred_boxes.tensor[i]).abs().amax(dim=1)
        score = (actual.scores[candidates] - expected.scores[i]).abs()
        best = int(torch.argmin(box + score))
        j = candidates[best]
        free.remove(j)
        worst["box"] = max(worst["box"], float(box[best]))
        worst["score"] = max(worst["score"], float(score[best]))
        if masks:
            difference = (actual.pred_masks[j].float() - expected.pred_masks[i].float()).abs().max()
            worst["mask"] = max(worst["mask"], float(difference))
    result["unpaired"] += len(free)
    result.update({f"max_{key}_difference": value for key, value in worst.items() if key != "mask" or masks})
    return result


def same_detections(difference: Dict[str, float], box_tolerance: float = 1e-3, score_tolerance: float = 1e-4) -> bool:
    """Whether a :func:`detection_difference` is within rounding (boxes in pixels)."""
    if difference["detections"] != difference["expected_detections"] or difference["unpaired"]:
        return False
    return (
        difference.get("max_box_difference", 0.0) <= box_tolerance
        and difference.get("max_score_difference", 0.0) <= score_tolerance
        and difference.get("max_mask_difference", 0.0) <= box_tolerance
    )


def time_variants(variants: Dict[str, Callable[[], object]], iterations: int = 20, warmup: int = 3) -> Dict[str, Dict[str, float]]:
    """Seconds per call of each ``variants[name]()`` (no arguments), over ``iterations`` rounds after
    ``warmup`` rounds; one round calls every variant once, in turn, so that a change in the machine's
    load affects all alike. ``{name: {"median", "mean", "min"}}``; CUDA is synchronized around calls."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    times: Dict[str, List[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for round_ in range(warmup + iterations):
            for name, fn in variants.items():
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
    result = {}
    for name, values in times.items():
        ordered = sorted(values)
        result[name] = {"median": ordered[len(ordered) // 2], "mean": sum(values) / len(values), "min": ordered[0]}
    return result
