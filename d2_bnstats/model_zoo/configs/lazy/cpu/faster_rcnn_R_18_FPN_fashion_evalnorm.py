"""EvalNorm in backbone and FPN, 2 images per batch, random init: the LazyConfig twin of
configs/cpu/frcnn_r18_evalnorm_2img.yaml. alpha_hat, beta_hat are learned online (``loss_evalnorm``;
``evalnorm/<layer>/alpha|beta`` in metrics.json) once the model goes through
``d2_bnstats.build_lazy_model(cfg)``.
"""
# every variable imported from the base is part of this config (LazyConfig.load keeps them)
from .faster_rcnn_R_18_FPN_fashion import bnstats, dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.backbone.bottom_up.stem.norm = "EvalNorm"
model.backbone.bottom_up.stages.norm = "EvalNorm"
model.backbone.norm = "EvalNorm"

bnstats.EVALNORM.MODE = "learned"
train.output_dir = "./output/lazy/cpu/faster_rcnn_R_18_FPN_fashion_evalnorm"
