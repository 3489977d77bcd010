"""CPU-sized Faster R-CNN on fashion-scenes as a LazyConfig: ResNet-18 FPN at 128 px, random init,
2 images per batch, BN. The LazyConfig twin of configs/cpu/Base-R18-FPN-fashion.yaml (same values);
the files next to it put a plug-in norm in. Minutes on 2 CPU cores.

    python tools/lazyconfig_train_net.py --config-file configs/lazy/cpu/faster_rcnn_R_18_FPN_fashion_evalnorm.py

with a loop that uses the plug-in's calls (README, "LazyConfig"). Self-contained (no model-zoo
files needed). The fashion-scenes data sets it names are built by datasets/prepare_fashion_scenes.py
and registered by the repository's lab (``import bnstats_lab``, which the clone's tools do); elsewhere
override ``dataloader.{train,test}.dataset.names`` with data sets of your own (``--register-coco``).
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.data import get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers, StandardROIHeads
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf
import torch

from d2_bnstats.d2.evaluation import fast_coco_eval_available
from d2_bnstats.d2.lazy import bnstats_node

SIZE = 128  # px, the canvas of fashion-scenes
WIDTH = 128  # FPN channels

model = L(GeneralizedRCNN)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="BN"),
            stages=L(ResNet.make_default_stages)(depth=18, norm="BN"),
            out_features=["res2", "res3", "res4", "res5"],
            freeze_at=0,  # random init: nothing to freeze
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=WIDTH,
        norm="",
        top_block=L(LastLevelMaxPool)(),
    ),
    proposal_generator=L(RPN)(
        in_features=["p2", "p3", "p4", "p5", "p6"],
        head=L(StandardRPNHead)(in_channels=WIDTH, num_anchors=3),
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[[16], [32], [64], [128], [256]],  # items are 10-64 px on a 128 px canvas
            aspect_ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64],
            offset=0.0,
        ),
        anchor_matcher=L(Matcher)(thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=128,
        positive_fraction=0.5,
        pre_nms_topk=(1000, 500),
        post_nms_topk=(500, 200),
        nms_thresh=0.7,
    ),
    roi_heads=L(StandardROIHeads)(
        num_classes=10,
        batch_size_per_image=128,
        positive_fraction=0.25,
        proposal_matcher=L(Matcher)(thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False),
        box_in_features=["p2", "p3", "p4", "p5"],
        box_pooler=L(ROIPooler)(
            output_size=7, scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32), sampling_ratio=0, pooler_type="ROIAlignV2"
        ),
        box_head=L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=WIDTH, height=7, width=7), conv_dims=[], fc_dims=[512, 512], conv_norm=""
        ),
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=512),
            test_score_thresh=0.05,
            test_topk_per_image=30,
            box2box_transform=L(Box2BoxTransform)(weights=(10, 10, 5, 5)),
            num_classes="${..num_classes}",
        ),
    ),
    pixel_mean=[46.0, 47.0, 46.0],  # fashion-scenes statistics (RGB)
    pixel_std=[35.0, 35.0, 35.0],
    input_format="RGB",
)

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="fashion_scenes_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(SIZE,), max_size=SIZE, sample_style="choice"),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="RGB",
        use_instance_mask=False,
    ),
    total_batch_size=2,
    num_workers=1,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="fashion_scenes_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=SIZE, max_size=SIZE)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=1,
)
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    tasks=("bbox",),
    output_dir="${train.output_dir}",
    use_fast_impl=fast_coco_eval_available(),  # pycocotools where detectron2 has no compiled evaluator
)

optimizer = L(torch.optim.SGD)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),  # params.model is set by the loop
    lr=0.02,
    momentum=0.9,
    weight_decay=1e-4,
)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[1100, 1400], num_updates=1500),
    warmup_length=100 / 1500,
    warmup_method="linear",
    warmup_factor=0.001,
)

train = dict(
    output_dir="./output/lazy/cpu/faster_rcnn_R_18_FPN_fashion",
    init_checkpoint="",
    max_iter=1500,
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=100000, max_to_keep=100),
    eval_period=0,  # evaluate once, at the end
    log_period=20,
    device="cpu",
)

# the plug-in's options: the BNSTATS keys and defaults (README, "LazyConfig")
bnstats = bnstats_node()
