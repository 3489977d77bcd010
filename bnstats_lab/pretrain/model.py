"""The network pre-trained: detectron2's ResNet backbone from a detection config, a classifier
around it, and weight centralization of its convs for the MABN variant.

The backbone is built by ``build_resnet_backbone`` from the detection config itself (depth,
``RES2_OUT_CHANNELS``, ``STRIDE_IN_1X1``, norm; ``OUT_FEATURES ["res5"]``, ``FREEZE_AT 0``), so the
checkpoint's keys are the detection backbone's. The classifier is global average pooling and one
linear layer (10 classes), not exported.

Weight centralization (the MABN variant, methods.md section 2; Yan et al., ICLR 2020, section 4.2):
with :func:`centralize_backbone` every conv computes with its filters centred (each output filter's
weights minus their mean over input channels and kernel positions), using the plug-in's one
implementation (:mod:`d2_bnstats.layers.weight_centralization`, through its detectron2 glue for
detectron2's ``Conv2d``). Its stored weights start centred and stay centred under SGD (the gradient
through the centralization is centred, and weight decay scales a centred weight), and
``fold_weight_centralization`` gives the convs their plain class back for export.
"""
import os

from torch import nn

NUM_CLASSES = 10


def backbone_config(options):
    """The detectron2 config of the backbone to pre-train (from ``options.config_file``)."""
    from detectron2.config import get_cfg

    from d2_bnstats import add_bnstats_config
    from d2_bnstats.d2.config import check_norm_keys

    cfg = get_cfg()
    add_bnstats_config(cfg)
    if options.config_file:
        if not os.path.isfile(options.config_file):
            raise FileNotFoundError(f"config file {options.config_file} does not exist")
        cfg.merge_from_file(options.config_file)
    if options.opts:
        if len(options.opts) % 2:
            raise ValueError(f"overrides must come as KEY VALUE pairs, got {list(options.opts)}")
        cfg.merge_from_list(list(options.opts))
    if options.depth is not None:
        if options.depth not in (18, 34, 50, 101, 152):
            raise ValueError(f"ResNet depth must be one of 18, 34, 50, 101, 152; got {options.depth}")
        cfg.MODEL.RESNETS.DEPTH = options.depth
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if options.depth in (18, 34) else 256
    cfg.MODEL.RESNETS.NORM = options.norm
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    check_norm_keys(cfg)
    return cfg


class BackboneClassifier(nn.Module):
    """detectron2's ResNet backbone + global average pooling + a linear layer."""

    def __init__(self, backbone: nn.Module, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.backbone = backbone
        channels = backbone.output_shape()["res5"].channels
        self.fc = nn.Linear(channels, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(self.backbone(x)["res5"].mean(dim=(2, 3)))


def build_classifier(cfg) -> BackboneClassifier:
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    from d2_bnstats.d2.build import configure_norms

    # the norms get their options (BNSTATS.*) from the config, as in a detection build
    backbone = build_resnet_backbone(configure_norms(cfg), ShapeSpec(channels=3))
    return BackboneClassifier(backbone)


def centralize_backbone(backbone: nn.Module) -> int:
    """Make every conv of ``backbone`` compute with its centralized weight (in place, same parameters
    and state-dict keys; stored weights centred too); returns the number of convs."""
    from d2_bnstats.d2.norms.mabn import centralize_conv

    count = 0
    for name, conv in list(backbone.named_modules()):
        if isinstance(conv, nn.Conv2d):
            if not centralize_conv(conv):
                raise TypeError(f"{name}: cannot weight-centralize a {type(conv).__name__}")
            count += 1
    return count
