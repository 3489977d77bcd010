"""detectron2's own model-zoo configs with the plug-in's norms: build, one training step, one inference.

A user keeps their config and changes the norm keys: here detectron2's
``COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml`` and ``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml``,
read through ``detectron2.model_zoo.get_config_file``, with each plug-in norm in the backbone
(MODEL.RESNETS.NORM), the FPN, a 4conv1fc box head and the mask head, the rest of the file as it is
(FREEZE_AT 2 included). RoI-shuffled BN normalises RoI features, so it goes in the heads only, with
SyncBN in the backbone and FPN (the pairing of the config matrix). The inputs are shrunk to 64 px and
the batch is synthetic, so that a step takes seconds on CPU.
"""
import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.engine import SimpleTrainer
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import BitMasks, Boxes, Instances
from torch import nn

import d2_bnstats

FASTER = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
MASK = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
NORMS = ("EvalNorm", "MABN", "SyncBN", "GhostBN", "RoIShuffleBN", "BN")
# Every norm runs in Faster R-CNN; Mask R-CNN (a 4-conv mask head more) with the two methods that change
# the model most by default, the others in the slow suite.
DEFAULT_MASK_NORMS = {"EvalNorm", "MABN"}
SIZE = 64
SMALL = {
    "MODEL.WEIGHTS": "",
    "MODEL.DEVICE": "cpu",
    "INPUT.MIN_SIZE_TRAIN": f"({SIZE},)",
    "INPUT.MAX_SIZE_TRAIN": str(SIZE),
    "INPUT.MIN_SIZE_TEST": str(SIZE),
    "INPUT.MAX_SIZE_TEST": str(SIZE),
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": "256",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": "64",
    "MODEL.RPN.PRE_NMS_TOPK_TEST": "128",
    "MODEL.RPN.POST_NMS_TOPK_TEST": "32",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": "8",
    "SOLVER.IMS_PER_BATCH": "2",
}
STAGES = ["stem", "res2", "res3", "res4", "res5"]


def zoo_config_file(name):
    try:
        return model_zoo.get_config_file(name)
    except RuntimeError as e:
        pytest.skip(f"detectron2's model-zoo configs are not installed ({e}); `make env` installs them with the "
                    "default set-up, and a detectron2 built from source ships them")


def zoo_config(name, norm):
    cfg = get_cfg()
    d2_bnstats.add_bnstats_config(cfg)
    cfg.merge_from_file(zoo_config_file(name))
    body = "SyncBN" if norm == "RoIShuffleBN" else norm
    keys = {
        "MODEL.RESNETS.NORM": body,
        "MODEL.FPN.NORM": body,
        "MODEL.ROI_BOX_HEAD.NORM": norm,
        "MODEL.ROI_BOX_HEAD.NUM_CONV": "4",
        "MODEL.ROI_BOX_HEAD.NUM_FC": "1",
        "MODEL.ROI_MASK_HEAD.NORM": norm,
    }
    cfg.merge_from_list([x for kv in {**keys, **SMALL}.items() for x in kv])
    d2_bnstats.check_norm_keys(cfg)
    d2_bnstats.check_bnstats_config(cfg)
    return cfg


def synthetic_sample(seed):
    """A random image with two boxes (and their box-shaped masks)."""
    g = torch.Generator().manual_seed(seed)
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]])
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        masks[k, y0:y1, x0:x1] = True
    instances = Instances((SIZE, SIZE), gt_boxes=Boxes(boxes), gt_classes=torch.tensor([1, 5]), gt_masks=BitMasks(masks))
    image = torch.randint(0, 256, (3, SIZE, SIZE), generator=g).float()
    return {"image": image, "instances": instances, "height": SIZE, "width": SIZE}


def norm_type(name):
    return type(d2_bnstats.get_norm(name, 32))


def norm_sites(model, cfg):
    """{place: [(module name, norm module)]} for the four places a norm was asked for."""
    sites = {
        "backbone": [(n, m.norm) for n, m in model.backbone.bottom_up.named_modules() if isinstance(getattr(m, "norm", None), nn.Module)],
        "fpn": [(n, m.norm) for n, m in model.backbone.named_children() if n.startswith("fpn_") and m.norm is not None],
        "box head": [(n, m.norm) for n, m in model.roi_heads.box_head.named_children() if n.startswith("conv")],
    }
    if cfg.MODEL.MASK_ON:
        sites["mask head"] = [(n, m.norm) for n, m in model.roi_heads.mask_head.named_children() if n.startswith("mask_fcn")]
    return sites


def check_placement(sites, cfg):
    body, heads = norm_type(cfg.MODEL.RESNETS.NORM), norm_type(cfg.MODEL.ROI_BOX_HEAD.NORM)
    assert len(sites["fpn"]) == 8 and len(sites["box head"]) == 4 and len(sites.get("mask head", [None] * 4)) == 4
    for name, norm in sites["backbone"]:
        # detectron2 turns BatchNorm2d/SyncBatchNorm (and subclasses) of the frozen stages into FrozenBN
        frozen = STAGES.index(name.split(".")[0]) < cfg.MODEL.BACKBONE.FREEZE_AT
        expected = FrozenBatchNorm2d if frozen and issubclass(body, (nn.BatchNorm2d, nn.SyncBatchNorm)) else body
        assert type(norm) is expected, (name, type(norm), expected)
    assert any(name.startswith("res5") for name, norm in sites["backbone"] if type(norm) is body)
    assert all(type(norm) is body for _, norm in sites["fpn"])
    for place in ("box head", "mask head"):
        assert all(type(norm) is heads for _, norm in sites.get(place, [])), place


def run_zoo_config(name, norm):
    cfg = zoo_config(name, norm)
    torch.manual_seed(0)
    model = build_model(cfg)
    sites = norm_sites(model, cfg)
    check_placement(sites, cfg)

    batch = [synthetic_sample(0), synthetic_sample(1)]
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    trainer = SimpleTrainer(model, [batch], build_optimizer(cfg, model))
    trainer.train(0, 1)
    losses = {k: h.latest() for k, h in trainer.storage.histories().items() if k.startswith("loss_")}
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    assert ("loss_mask" in losses) == cfg.MODEL.MASK_ON
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    after = dict(model.named_parameters())
    changed = {k for k, p in after.items() if not torch.equal(before[k], p.detach())}
    assert "roi_heads.box_predictor.cls_score.weight" in changed
    assert not {k for k in changed if not after[k].requires_grad}, "a frozen parameter changed"
    prefixes = {"backbone": "backbone.bottom_up.", "fpn": "backbone.", "box head": "roi_heads.box_head.",
                "mask head": "roi_heads.mask_head."}
    for place, layers in sites.items():  # every place's norm layers were trained
        trained = [n for n, norm in layers if any(p.requires_grad for p in norm.parameters())]
        assert trained, place
        assert any(k.startswith(f"{prefixes[place]}{n}.norm.") for n in trained for k in changed), place

    model.eval()
    with torch.no_grad():
        out = model([{"image": batch[0]["image"], "height": SIZE, "width": SIZE}])
    fields = out[0]["instances"].get_fields()
    assert {"pred_boxes", "scores", "pred_classes"} <= set(fields)
    assert ("pred_masks" in fields) == cfg.MODEL.MASK_ON
    assert torch.isfinite(fields["pred_boxes"].tensor).all() and torch.isfinite(fields["scores"]).all()


CASES = [pytest.param(FASTER, norm, id=f"faster_rcnn-{norm}") for norm in NORMS] + [
    pytest.param(MASK, norm, id=f"mask_rcnn-{norm}", marks=() if norm in DEFAULT_MASK_NORMS else pytest.mark.slow)
    for norm in NORMS
]


@pytest.mark.parametrize("name, norm", CASES)
def test_model_zoo_config_with_plugin_norm_builds_trains_and_infers(name, norm):
    run_zoo_config(name, norm)


def test_model_zoo_configs_are_detectron2s_own():
    """The files read are the model zoo's (no copy of ours): their base and their MASK_ON."""
    for name, mask_on in ((FASTER, False), (MASK, True)):
        path = zoo_config_file(name)
        assert path.replace("\\", "/").endswith(f"model_zoo/configs/{name}")
        text = open(path).read()
        assert '_BASE_: "../Base-RCNN-FPN.yaml"' in text and f"MASK_ON: {mask_on}" in text
