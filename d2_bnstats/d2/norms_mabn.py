"""detectron2 glue for MABN: the norm names "MABN"/"SyncMABN", their config keys, and the model
transform that weight-centralises the convolutions feeding MABN layers.

The maths is in :mod:`d2_bnstats.layers.mabn`. A factory reads ``cfg.BNSTATS.MABN`` of the config
being built (:func:`d2_bnstats.d2.build.current_config`); outside a build it uses the layer's defaults.

Weight centralisation without forking detectron2's modules: every detectron2 ``Conv2d`` applies its
``.norm`` right after the convolution, so the convs that feed MABN are exactly the ``Conv2d``
instances whose ``.norm`` is an :class:`MABN2d` (stem, bottleneck and shortcut convs, FPN lateral and
output convs, box- and mask-head convs). In ``nn.Sequential`` containers (RetinaNet's head) it is an
``nn.Conv2d`` directly followed by an :class:`MABN2d`. The transform assigns those instances a
subclass of their own class whose forward centralises the weight, and centralises the stored weight
once (which changes no output); parameters, buffers and checkpoint keys stay as they are.
"""
import logging
from typing import List, Tuple

from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from ..layers.mabn import MABN2d, WeightCentralizedConv2d, centralize_weight_
from ..layers.mabn import check_options as check_mabn_options
from ..registry import register_norm
from .build import current_config, register_model_transform

logger = logging.getLogger(__name__)

MABN_NORMS = ("MABN", "SyncMABN")


class CentralizedConv2d(WeightCentralizedConv2d, D2Conv2d):
    """detectron2 ``Conv2d`` (norm and activation after the conv) with a centralised weight."""


_CENTRALIZED_CLASS = {D2Conv2d: CentralizedConv2d, nn.Conv2d: WeightCentralizedConv2d}


def _per_step_images(cfg, sync: bool) -> int:
    from detectron2.utils import comm

    total = int(cfg.SOLVER.IMS_PER_BATCH)
    return total if sync else max(1, total // max(1, comm.get_world_size()))


def mabn_kwargs(cfg, sync: bool = False) -> dict:
    """Keyword arguments of :class:`MABN2d` from ``cfg.BNSTATS.MABN`` ({} without the node)."""
    node = getattr(getattr(cfg, "BNSTATS", None), "MABN", None) if cfg is not None else None
    if node is None:
        return {}
    m = int(node.BUFFER_SIZE)
    if node.SIMULATED_BATCH:
        per_step = _per_step_images(cfg, sync)
        if node.SIMULATED_BATCH % per_step:
            raise ValueError(
                f"BNSTATS.MABN.SIMULATED_BATCH = {node.SIMULATED_BATCH} must be a multiple of the images "
                f"normalised together per step ({per_step}: SOLVER.IMS_PER_BATCH = {cfg.SOLVER.IMS_PER_BATCH}"
                f"{'' if sync else ' per process'}); or set it to 0 and choose BNSTATS.MABN.BUFFER_SIZE"
            )
        m = node.SIMULATED_BATCH // per_step
    kwargs = dict(
        eps=float(node.EPS),
        decay=float(node.DECAY),
        buffer_size=m,
        warmup_iters=int(node.WARMUP_ITERS),
        renorm_start=int(node.RENORM_START),
        renorm_clip=float(node.RENORM_CLIP),
    )
    try:
        check_mabn_options(1, **kwargs)
    except ValueError as e:
        raise ValueError(
            f"invalid BNSTATS.MABN settings (BUFFER_SIZE/SIMULATED_BATCH -> buffer_size, WARMUP_ITERS, "
            f"RENORM_START, RENORM_CLIP, DECAY, EPS): {e}"
        ) from None
    return kwargs


def _factory(sync: bool):
    def build_mabn(out_channels: int) -> MABN2d:
        return MABN2d(out_channels, sync=sync, **mabn_kwargs(current_config(), sync))

    build_mabn.__qualname__ = "build_" + ("sync_" if sync else "") + "mabn"
    return build_mabn


register_norm("MABN", _factory(False))
register_norm("SyncMABN", _factory(True))


# ---------------------------------------------------------------------------------------------


def convs_feeding_mabn(model: nn.Module, frozen_resnet: bool = False) -> List[Tuple[str, nn.Conv2d, str]]:
    """``(conv name, conv, norm name)`` for every conv whose output goes straight into an MABN layer.

    With ``frozen_resnet``, also the convs of a ResNet whose norm is a FrozenBN (what detectron2's
    FREEZE_AT makes of an MABN layer; FrozenBN with MABN's statistics is exactly MABN inference).
    """
    from detectron2.modeling.backbone import ResNet

    pairs, seen = [], set()
    frozen_scope = set()
    if frozen_resnet:
        for _, module in model.named_modules():
            if isinstance(module, ResNet):
                frozen_scope.update(id(m) for m in module.modules())
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        norm = getattr(module, "norm", None)
        if isinstance(module, nn.Conv2d) and (
            isinstance(norm, MABN2d) or (isinstance(norm, FrozenBatchNorm2d) and id(module) in frozen_scope)
        ):
            if id(module) not in seen:
                seen.add(id(module))
                pairs.append((name, module, prefix + "norm"))
        elif isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (n1, c1), (n2, c2) in zip(children, children[1:]):
                if isinstance(c1, nn.Conv2d) and isinstance(c2, MABN2d) and getattr(c1, "norm", None) is None:
                    if id(c1) not in seen:
                        seen.add(id(c1))
                        pairs.append((prefix + n1, c1, prefix + n2))
    return pairs


def centralize_convs(model: nn.Module, frozen_resnet: bool = False, ramp_iters: int = 0) -> List[str]:
    """Make every conv feeding an MABN layer weight-centralised (in place); returns their names.

    Without a ramp the stored weights are centralised too (no change to any output). With
    ``ramp_iters`` > 0 (see :class:`WeightCentralizedConv2d`) the stored weights are left as they
    are and the centralisation ramps in over the feeding MABN layer's first ``ramp_iters`` steps.
    """
    done = []
    for name, conv, norm_name in convs_feeding_mabn(model, frozen_resnet):
        if not isinstance(conv, WeightCentralizedConv2d):
            cls = _CENTRALIZED_CLASS.get(type(conv))
            if cls is None:
                logger.warning(
                    "MABN weight centralisation: %s is a %s, not detectron2's Conv2d or nn.Conv2d; left as is",
                    name, type(conv).__name__,
                )
                continue
            conv.__class__ = cls
        layer = model.get_submodule(norm_name)
        if ramp_iters > 0 and isinstance(layer, MABN2d):
            conv.wc_ramp_iters = int(ramp_iters)
            if getattr(conv, "norm", None) is not layer:
                conv.link_mabn(layer)
        else:
            centralize_weight_(conv)
        done.append(name)
    return done


_PLAIN_CLASS = {CentralizedConv2d: D2Conv2d, WeightCentralizedConv2d: nn.Conv2d}


def fold_weight_centralization(model: nn.Module) -> List[str]:
    """For deployment: store every weight-centralised conv's weight centred and give the conv its
    plain class back, so inference computes the same without centralising on every forward (the
    model should then not be trained further). Returns the names of the convs folded."""
    names = []
    for name, module in model.named_modules():
        plain = _PLAIN_CLASS.get(type(module))
        if plain is not None:
            if module.centralization_factor() < 1.0:
                raise ValueError(
                    f"{name}: its centralisation ramp (wc_ramp_iters={module.wc_ramp_iters}) has not finished; "
                    "fold only a model whose MABN layers have trained that many steps"
                )
            centralize_weight_(module)
            module.__class__ = plain
            names.append(name)
    return names


def mabn_weight_centralization(model: nn.Module, cfg) -> None:
    """Model transform: weight-centralise the convs feeding MABN (``BNSTATS.MABN.WEIGHT_CENTRALIZATION``)."""
    layers = [name for name, m in model.named_modules() if isinstance(m, MABN2d)]
    frozen = (
        cfg is not None
        and getattr(cfg.MODEL.RESNETS, "NORM", "") in MABN_NORMS
        and cfg.MODEL.BACKBONE.FREEZE_AT > 0
    )
    if not layers and not frozen:
        return None
    node = getattr(getattr(cfg, "BNSTATS", None), "MABN", None) if cfg is not None else None
    if node is not None and not node.WEIGHT_CENTRALIZATION:
        logger.info("MABN: weight centralisation off (BNSTATS.MABN.WEIGHT_CENTRALIZATION False)")
        return None
    ramp = int(getattr(node, "WC_RAMP_ITERS", 0) or 0) if node is not None else 0
    if ramp < 0:
        raise ValueError(f"BNSTATS.MABN.WC_RAMP_ITERS must be >= 0 (0: no ramp); got {ramp}")
    names = centralize_convs(model, frozen_resnet=frozen, ramp_iters=ramp)
    fed = {norm for _, _, norm in convs_feeding_mabn(model)}
    orphans = [name for name in layers if name not in fed]
    logger.info("MABN: %d MABN layers; weight-centralised %d convs feeding them", len(layers), len(names))
    if orphans:
        logger.warning(
            "MABN: no conv found directly before %d MABN layers (their input is not centralised): %s",
            len(orphans), ", ".join(orphans[:10]) + (" ..." if len(orphans) > 10 else ""),
        )
    return None


register_model_transform("mabn_weight_centralization", mabn_weight_centralization)
