"""Pre-train detectron2's ResNet backbone as a Fashion-MNIST classifier: the stand-in for ImageNet.

No ImageNet weights can be downloaded on the machines this project targets, yet three of the four
training settings of the config matrix start from a pre-trained backbone (frozen BN, fine-tuned BN,
re-initialised BN statistics). This package trains exactly the backbone the detection configs build
(``build_resnet_backbone`` from a detectron2 config: depth 18/34/50, its ``RES2_OUT_CHANNELS``,
``STRIDE_IN_1X1``, norm) with a global-average-pool + linear classifier on the 60,000 Fashion-MNIST
training images, and writes the backbone as a checkpoint in detectron2's model-zoo format, which
``MODEL.WEIGHTS`` loads through ``DetectionCheckpointer`` exactly as an ImageNet checkpoint.

Modules:

* :mod:`.options`: :class:`PretrainOptions`, the recipe of ``make pretrain`` and its checks.
* :mod:`.names`: the default checkpoint names and the command that builds each (the hint added to a
  missing ``MODEL.WEIGHTS`` error).
* :mod:`.model`: the backbone from a detection config, the classifier around it, and weight
  centralization of its convs (the MABN variant).
* :mod:`.inputs`: how a 28x28 item becomes the backbone's input (canvas, augmentation, normalisation).
* :mod:`.checkpoint`: the model-zoo ``.pkl`` format, written and read.
* :mod:`.train`: the training loop, the test accuracy and :func:`pretrain`, which ties them together.
"""
from .checkpoint import AUTHOR, export_backbone, read_pretrain_info
from .inputs import compose_batch
from .model import BackboneClassifier, backbone_config, build_classifier, centralize_backbone
from .names import DEFAULT_DIR, build_command_for, default_checkpoint_name, default_checkpoint_path, missing_weights_hint
from .options import DEFAULT_CONFIG, PretrainOptions
from .train import evaluate, pretrain

__all__ = [
    "AUTHOR",
    "DEFAULT_CONFIG",
    "DEFAULT_DIR",
    "BackboneClassifier",
    "PretrainOptions",
    "backbone_config",
    "build_classifier",
    "build_command_for",
    "centralize_backbone",
    "compose_batch",
    "default_checkpoint_name",
    "default_checkpoint_path",
    "evaluate",
    "export_backbone",
    "missing_weights_hint",
    "pretrain",
    "read_pretrain_info",
]
