"""Mask R-CNN R-50-FPN on COCO with EvalNorm everywhere, fine-tuned at 2 images per GPU (8 GPUs), as a
LazyConfig built on detectron2's model-zoo pieces (common/models/mask_rcnn_fpn.py, common/data/coco.py,
common/optim.py, common/coco_schedule.py, common/train.py). The LazyConfig twin of
configs/mrcnn_r50_evalnorm_2img_finetune.yaml: torchvision's ImageNet R-50 (it carries BN statistics,
RGB input, stride in the 3x3 conv), every backbone norm trained (freeze_at 0), EvalNorm in the stem,
the bottleneck blocks, the FPN, a 4conv1fc box head and the mask head; alpha_hat, beta_hat learned
online (``loss_evalnorm``) once the model goes through ``d2_bnstats.build_lazy_model(cfg)``.
"""
from detectron2 import model_zoo

from d2_bnstats.d2.evaluation import fast_coco_eval_available
from d2_bnstats.d2.lazy import bnstats_node

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
optimizer = model_zoo.get_config("common/optim.py").SGD
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_1x
train = model_zoo.get_config("common/train.py").train
bnstats = bnstats_node()

NORM = "EvalNorm"
bottom_up = model.backbone.bottom_up
bottom_up.stem.norm = bottom_up.stages.norm = model.backbone.norm = NORM
bottom_up.stages.stride_in_1x1 = False  # torchvision weights
bottom_up.freeze_at = 0
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]  # 4conv1fc
model.roi_heads.box_head.fc_dims = [1024]
model.roi_heads.box_head.conv_norm = NORM
model.roi_heads.mask_head.conv_norm = NORM
model.pixel_mean = [123.675, 116.280, 103.530]  # RGB, torchvision's convention
model.pixel_std = [58.395, 57.120, 57.375]
model.input_format = "RGB"
dataloader.train.mapper.image_format = "RGB"
dataloader.train.total_batch_size = 16  # 2 images per GPU x 8 GPUs
dataloader.evaluator.use_fast_impl = fast_coco_eval_available()

train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
train.max_iter = 90000
train.eval_period = 10000
train.output_dir = "./output/lazy/mask_rcnn_R_50_FPN_evalnorm"

bnstats.EVALNORM.MODE = "learned"
