"""Mask R-CNN R-50-FPN on COCO with MABN everywhere, trained from random init at 2 images per GPU
(8 GPUs), as a LazyConfig built on detectron2's model-zoo pieces (common/models/mask_rcnn_fpn.py,
common/data/coco.py, common/optim.py, common/coco_schedule.py, common/train.py). The LazyConfig twin
of configs/mrcnn_r50_mabn_2img_scratch.yaml: the MABN authors' placement and schedule (every norm and
conv of the stem, bottlenecks, shortcut convs, FPN, a 4conv1fc box head and the 4-conv mask head;
nothing frozen; 2x). The convs feeding MABN are weight-centralized and MABN's steps end with the
optimizer's once the model goes through ``d2_bnstats.build_lazy_model(cfg)``. See docs/mabn.md.
"""
from detectron2 import model_zoo

from d2_bnstats.d2.evaluation import fast_coco_eval_available
from d2_bnstats.d2.lazy import bnstats_node

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
optimizer = model_zoo.get_config("common/optim.py").SGD
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_2x
train = model_zoo.get_config("common/train.py").train
bnstats = bnstats_node()

NORM = "MABN"
bottom_up = model.backbone.bottom_up
bottom_up.stem.norm = bottom_up.stages.norm = model.backbone.norm = NORM
bottom_up.stages.stride_in_1x1 = False
bottom_up.freeze_at = 0
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]  # 4conv1fc
model.roi_heads.box_head.fc_dims = [1024]
model.roi_heads.box_head.conv_norm = NORM
model.roi_heads.mask_head.conv_norm = NORM
model.pixel_std = [57.375, 57.120, 58.395]  # random init: normalize the input (BGR)
dataloader.train.total_batch_size = 16  # 2 images per GPU x 8 GPUs
dataloader.evaluator.use_fast_impl = fast_coco_eval_available()

train.init_checkpoint = ""
train.max_iter = 180000
train.eval_period = 10000
train.output_dir = "./output/lazy/mask_rcnn_R_50_FPN_mabn"

bnstats.MABN.BUFFER_SIZE = 16  # m = 32 / 2 images per GPU (a simulated batch of 32, as the authors)
bnstats.MABN.WARMUP_ITERS = 100
bnstats.MABN.RENORM_START = 1000
bnstats.MABN.DECAY = 0.98  # weight of the OLD value of the running second moment
