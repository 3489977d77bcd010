"""Placeholder for ``detectron2._C`` when detectron2 is installed without its C++ extension.

``scripts/setup_env.sh`` copies this file to ``detectron2/_C.py`` when it installs the Python part
of the PyPI snapshot ``pb1-detectron2==0.6``, whose source archive lacks
``detectron2/layers/csrc``. Several detectron2 modules import ``_C`` at module level, so the
module must exist; everything that really needs the compiled code raises an error that names the
operation and the remedy instead of failing with an obscure import error.

This file is standalone on purpose: it lives inside the detectron2 package and must not import
d2_bnstats.
"""

IS_PLACEHOLDER = True

_REMEDY = (
    "detectron2 was installed without its compiled extension (the PyPI snapshot pb1-detectron2 "
    "ships no C++ sources). To get it, build detectron2 from source: "
    "`D2_SOURCE=/path/to/detectron2-checkout make env` in the d2_bnstats repository, or "
    "`pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'`."
)

# attribute of the real extension -> the user-facing operation that needs it
_OPERATIONS = {
    "deform_conv_forward": "deformable convolution (DeformConv)",
    "deform_conv_backward_input": "deformable convolution (DeformConv)",
    "deform_conv_backward_filter": "deformable convolution (DeformConv)",
    "modulated_deform_conv_forward": "modulated deformable convolution (ModulatedDeformConv)",
    "modulated_deform_conv_backward": "modulated deformable convolution (ModulatedDeformConv)",
    "box_iou_rotated": "rotated boxes (pairwise IoU of RotatedBoxes)",
    "nms_rotated": "rotated boxes (rotated NMS)",
    "roi_align_rotated_forward": "rotated boxes (ROIAlignRotated)",
    "roi_align_rotated_backward": "rotated boxes (ROIAlignRotated)",
    "InstanceAnnotation": "the fast C++ COCO evaluator (COCOEvaluator(use_fast_impl=True))",
    "COCOevalEvaluateImages": "the fast C++ COCO evaluator (COCOEvaluator(use_fast_impl=True))",
    "COCOevalAccumulate": "the fast C++ COCO evaluator (COCOEvaluator(use_fast_impl=True))",
}


class CompiledOpUnavailable(AttributeError):
    """Raised for every compiled operation. An AttributeError so ``hasattr(_C, name)`` is False."""


# Informational entry points used by detectron2.utils.collect_env (called by default_setup):
# they answer instead of raising so that training scripts start normally.
def get_compiler_version():
    return "not built (placeholder detectron2._C, no C++ extension)"


def get_cuda_version():
    return "not built (placeholder detectron2._C, no C++ extension)"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    operation = _OPERATIONS.get(name, f"the compiled operation {name!r}")
    raise CompiledOpUnavailable(f"{operation} is unavailable: {_REMEDY}")
