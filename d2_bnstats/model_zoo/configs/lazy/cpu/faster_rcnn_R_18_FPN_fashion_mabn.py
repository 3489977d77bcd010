"""MABN everywhere, 2 images per batch, random init: the LazyConfig twin of
configs/cpu/frcnn_r18_mabn_2img.yaml -- stem, basic blocks, shortcut convs, FPN and a 4conv1fc box
head; nothing frozen; the RPN head has no norm. The convs feeding MABN are weight-centralized and
MABN's steps end with the optimizer's once the model goes through ``d2_bnstats.build_lazy_model(cfg)``.
"""
# every variable imported from the base is part of this config (LazyConfig.load keeps them)
from .faster_rcnn_R_18_FPN_fashion import WIDTH, bnstats, dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.backbone.bottom_up.stem.norm = "MABN"
model.backbone.bottom_up.stages.norm = "MABN"
model.backbone.norm = "MABN"
model.roi_heads.box_head.conv_dims = [WIDTH] * 4
model.roi_heads.box_head.fc_dims = [512]
model.roi_heads.box_head.conv_norm = "MABN"

bnstats.MABN.BUFFER_SIZE = 16  # m: 16 steps x 2 images = a simulated batch of 32
bnstats.MABN.WARMUP_ITERS = 100
bnstats.MABN.RENORM_START = 1000
bnstats.MABN.RENORM_CLIP = 5.0
bnstats.MABN.DECAY = 0.98  # weight of the OLD value of the running second moment
train.output_dir = "./output/lazy/cpu/faster_rcnn_R_18_FPN_fashion_mabn"
