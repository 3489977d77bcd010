"""detectron2 glue of MABN: the norms "MABN"/"SyncMABN", their ``BNSTATS.MABN`` config node, and the
model transform that weight-centralizes the convolutions feeding MABN and ends MABN's steps with the
optimizer's.

The maths is in :mod:`d2_bnstats.layers.mabn` (the layer), :mod:`d2_bnstats.layers.mabn_step` (when a
step ends) and :mod:`d2_bnstats.layers.weight_centralization`; docs/mabn.md is the user's guide.

Which convs feed MABN, without forking detectron2's modules: every detectron2 ``Conv2d`` applies its
``.norm`` (then its ``.activation``) right after the convolution, so the convs that feed MABN are
exactly the ``Conv2d`` instances whose ``.norm`` is an :class:`MABN2d` (stem, bottleneck and shortcut
convs, FPN lateral and output convs, box- and mask-head convs). In ``nn.Sequential`` containers
(RetinaNet's head) it is an ``nn.Conv2d`` directly followed by an :class:`MABN2d`. The transform gives
those instances a weight-centralized subclass of their own class (:class:`CentralizedConv2d` for
detectron2's ``Conv2d``) and centralizes the stored weight once (which changes no output);
parameters, buffers and checkpoint keys stay as they are. With a centralization ramp
(``WC_RAMP_ITERS``) the ramp follows the step count of the conv's own ``.norm``.
"""
import logging
from typing import List, Optional, Tuple

from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from ...layers.mabn import MABN2d, check_options
from ...layers.mabn_step import attach_step_hook
from ...layers.weight_centralization import WeightCentralizedConv2d, fold_weight_centralization, make_weight_centralized
from ...registry import Norm
from ..config import bnstats_node

logger = logging.getLogger(__name__)


def build_mabn(out_channels: int, **options) -> MABN2d:
    return MABN2d(out_channels, **options)


def build_sync_mabn(out_channels: int, **options) -> MABN2d:
    return MABN2d(out_channels, sync=True, **options)


NAMES = ("MABN", "SyncMABN")


def defaults(node) -> None:
    """``BNSTATS.MABN``: the options of the norms "MABN" and "SyncMABN"."""
    # MABN: the norms "MABN" and "SyncMABN" (d2_bnstats.layers.mabn, docs/mabn.md). Defaults are
    # the authors' detection settings (2 images per GPU, a simulated batch of 32).
    # m: number of optimizer steps whose batch statistics (chi^2 forward, Psi backward) are averaged
    # (simple moving average). Default 16 = 32 / 2 images per step. Ignored if SIMULATED_BATCH > 0.
    node.BUFFER_SIZE = 16
    # If > 0: m = SIMULATED_BATCH / images normalized together per step (SOLVER.IMS_PER_BATCH per
    # process for "MABN", the whole SOLVER.IMS_PER_BATCH for "SyncMABN"); must divide. Default 0 (off).
    node.SIMULATED_BATCH = 0
    # Current-step statistics instead of their average for the first max(m, WARMUP_ITERS) steps. Default 100.
    node.WARMUP_ITERS = 100
    # Renormalization factor r = 1 for the first max(RENORM_START, WARMUP_ITERS) steps. Default 1000.
    node.RENORM_START = 1000
    # Afterwards r is clipped to [1 / RENORM_CLIP, RENORM_CLIP]. Default 5.0.
    node.RENORM_CLIP = 5.0
    # Running second moment R <- DECAY * R + (1 - DECAY) * average; DECAY weights the OLD value
    # (PyTorch's momentum = 1 - DECAY). Default 0.98.
    node.DECAY = 0.98
    # epsilon added to the second moment. Default 1e-5.
    node.EPS = 1e-5
    # Centralize the weights of every conv that feeds an MABN layer (each output filter minus its
    # mean; checkpoint keys unchanged). MABN drops mean centring and relies on it. Default True.
    node.WEIGHT_CENTRALIZATION = True
    # If > 0: centralization ramps in over this many steps of each MABN layer (the conv subtracts
    # min(1, t / WC_RAMP_ITERS) x its filter mean), so weights trained WITHOUT centralization (converted
    # BN/FrozenBN weights) start as the original model. Default 0: fully centralized from step 0.
    node.WC_RAMP_ITERS = 0


# ---------------------------------------------------------------------------------------------
# config -> checked values -> layer options

# key: (kind, accepted(value), what is accepted)
_RULES = {
    "BUFFER_SIZE": (int, lambda v: v >= 1, "an integer >= 1 (m, optimizer steps averaged)"),
    "SIMULATED_BATCH": (int, lambda v: v >= 0, "an integer >= 0 (0 = off, else m = SIMULATED_BATCH / images per step)"),
    "WARMUP_ITERS": (int, lambda v: v >= 0, "an integer >= 0 (steps with current-step statistics)"),
    "RENORM_START": (int, lambda v: v >= 0, "an integer >= 0 (steps with r = 1)"),
    "RENORM_CLIP": (float, lambda v: v >= 1, "a number >= 1 (r is clipped to [1/clip, clip])"),
    "DECAY": (float, lambda v: 0 <= v <= 1, "a number in [0, 1] (the MABN decay: weight of the OLD value of R)"),
    "EPS": (float, lambda v: v > 0, "a number > 0 (epsilon added to the second moment)"),
    "WEIGHT_CENTRALIZATION": (bool, lambda v: True, "True or False"),
    "WC_RAMP_ITERS": (int, lambda v: v >= 0, "an integer >= 0 (0: no ramp)"),
}


def _checked(key: str, value):
    kind, accepted, text = _RULES[key]
    if kind is bool:
        ok = isinstance(value, bool)
    else:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = number and (kind is float or float(value).is_integer()) and accepted(value)
    if not ok:
        raise ValueError(f"BNSTATS.MABN.{key} = {value!r}: expected {text}")
    return kind(value)


def _values(node) -> dict:
    """Every key of a ``BNSTATS.MABN`` node, checked (defaults for keys the node lacks)."""
    declared = _Defaults()
    defaults(declared)
    return {key: _checked(key, node.get(key, getattr(declared, key))) for key in _RULES}


class _Defaults:
    """A plain holder for the declared defaults."""


def check_config(cfg) -> None:
    """ValueError naming key, value and accepted values for any bad ``BNSTATS.MABN`` value. (Whether
    SIMULATED_BATCH divides the images per step is checked when a layer is built: it depends on
    the number of processes.)"""
    node = bnstats_node(cfg, "MABN")
    if node is None:
        return
    simulated = _values(node)["SIMULATED_BATCH"]
    if simulated > 0 and _images_per_step(cfg) is None:
        raise ValueError(
            f"BNSTATS.MABN.SIMULATED_BATCH = {simulated} needs the images per step: set SOLVER.IMS_PER_BATCH, "
            "or set SIMULATED_BATCH to 0 and choose BNSTATS.MABN.BUFFER_SIZE"
        )


def _images_per_step(cfg):
    """SOLVER.IMS_PER_BATCH, or None where the config does not have it (a LazyConfig without
    ``dataloader.train.total_batch_size``)."""
    solver = cfg.get("SOLVER", None) if hasattr(cfg, "get") else None
    return solver.get("IMS_PER_BATCH", None) if solver is not None and hasattr(solver, "get") else None


def _per_step_images(cfg, sync: bool) -> int:
    from detectron2.utils import comm

    total = int(cfg.SOLVER.IMS_PER_BATCH)
    return total if sync else max(1, total // max(1, comm.get_world_size()))


def layer_options(cfg, name: str) -> dict:
    """Keyword arguments of :class:`MABN2d` for norm ``name`` from ``cfg.BNSTATS.MABN`` ({} without
    the node)."""
    node = bnstats_node(cfg, "MABN")
    if node is None:
        return {}
    sync = name == "SyncMABN"
    values = _values(node)
    m = values["BUFFER_SIZE"]
    simulated = values["SIMULATED_BATCH"]
    if simulated:
        per_step = _per_step_images(cfg, sync)
        if simulated % per_step:
            raise ValueError(
                f"BNSTATS.MABN.SIMULATED_BATCH = {simulated} must be a multiple of the images "
                f"normalized together per step ({per_step}: SOLVER.IMS_PER_BATCH = {cfg.SOLVER.IMS_PER_BATCH}"
                f"{'' if sync else ' per process'}); or set it to 0 and choose BNSTATS.MABN.BUFFER_SIZE"
            )
        m = simulated // per_step
    options = dict(
        eps=values["EPS"],
        decay=values["DECAY"],
        buffer_size=m,
        warmup_iters=values["WARMUP_ITERS"],
        renorm_start=values["RENORM_START"],
        renorm_clip=values["RENORM_CLIP"],
    )
    check_options(1, **options)
    return options


# ---------------------------------------------------------------------------------------------
# weight centralization of the convs feeding MABN


class CentralizedConv2d(WeightCentralizedConv2d, D2Conv2d):
    """detectron2's ``Conv2d`` (norm and activation after the conv) with a centralized weight; its
    ramp follows its own ``.norm`` when that is an MABN layer."""

    def ramp_layer(self) -> Optional[nn.Module]:
        norm = getattr(self, "norm", None)
        return norm if isinstance(norm, MABN2d) else super().ramp_layer()

    def forward(self, x):
        x = self._conv_forward(x, self.centralized_weight(), self.bias)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


_CENTRALIZED_CLASS = {D2Conv2d: CentralizedConv2d, nn.Conv2d: WeightCentralizedConv2d}


def centralize_conv(conv: nn.Conv2d, ramp_iters: int = 0, ramp_layer: Optional[nn.Module] = None) -> bool:
    """Make a detectron2 ``Conv2d`` or an ``nn.Conv2d`` weight-centralized in place
    (:func:`~d2_bnstats.layers.weight_centralization.make_weight_centralized`); False, changing
    nothing, for another conv class."""
    if isinstance(conv, WeightCentralizedConv2d):
        cls = type(conv)
    else:
        cls = _CENTRALIZED_CLASS.get(type(conv))
        if cls is None:
            return False
    make_weight_centralized(conv, cls, ramp_iters=ramp_iters, ramp_layer=ramp_layer)
    return True


def _frozen_resnet_modules(model: nn.Module) -> set:
    from detectron2.modeling.backbone import ResNet

    scope = set()
    for module in model.modules():
        if isinstance(module, ResNet):
            scope.update(id(m) for m in module.modules())
    return scope


def convs_feeding_mabn(model: nn.Module, frozen_resnet: bool = False) -> List[Tuple[str, nn.Conv2d, str]]:
    """``(conv name, conv, norm name)`` for every conv whose output goes straight into an MABN layer.

    With ``frozen_resnet``, also the convs of a ResNet whose norm is a FrozenBN (what detectron2's
    FREEZE_AT makes of an MABN layer; FrozenBN with MABN's statistics is exactly MABN inference).
    """
    pairs, seen = [], set()
    frozen_scope = _frozen_resnet_modules(model) if frozen_resnet else set()
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
    """Make every conv feeding an MABN layer weight-centralized (in place); returns their names.

    Without a ramp the stored weights are centralized too (no change to any output). With
    ``ramp_iters`` > 0 the stored weights are left as they are and the centralization ramps in over
    the feeding MABN layer's first ``ramp_iters`` steps (a conv feeding a FrozenBN is centralized
    fully: a frozen layer has no steps).
    """
    done = []
    for name, conv, norm_name in convs_feeding_mabn(model, frozen_resnet):
        layer = model.get_submodule(norm_name)
        ramp = ramp_iters if ramp_iters > 0 and isinstance(layer, MABN2d) else 0
        linked = layer if ramp and getattr(conv, "norm", None) is not layer else None
        if not centralize_conv(conv, ramp_iters=ramp, ramp_layer=linked):
            logger.warning(
                "MABN weight centralization: %s is a %s, not detectron2's Conv2d or nn.Conv2d; left as is",
                name, type(conv).__name__,
            )
            continue
        done.append(name)
    return done


def weight_centralization(model: nn.Module, cfg) -> None:
    """Weight-centralize the convs feeding MABN (``BNSTATS.MABN.WEIGHT_CENTRALIZATION``, ramp
    ``WC_RAMP_ITERS``); ``cfg`` None: the defaults."""
    layers = [name for name, m in model.named_modules() if isinstance(m, MABN2d)]
    frozen = (
        cfg is not None
        and cfg.MODEL.RESNETS.get("NORM", "") in NAMES
        and cfg.MODEL.BACKBONE.FREEZE_AT > 0
    )
    if not layers and not frozen:
        return
    node = bnstats_node(cfg, "MABN")
    values = _values(node) if node is not None else {"WEIGHT_CENTRALIZATION": True, "WC_RAMP_ITERS": 0}
    if not values["WEIGHT_CENTRALIZATION"]:
        logger.info("MABN: weight centralization off (BNSTATS.MABN.WEIGHT_CENTRALIZATION False)")
        return
    names = centralize_convs(model, frozen_resnet=frozen, ramp_iters=values["WC_RAMP_ITERS"])
    fed = {norm for _, _, norm in convs_feeding_mabn(model)}
    orphans = [name for name in layers if name not in fed]
    logger.info("MABN: %d MABN layers; weight-centralized %d convs feeding them", len(layers), len(names))
    if orphans:
        logger.warning(
            "MABN: no conv found directly before %d MABN layers (their input is not centralized): %s",
            len(orphans), ", ".join(orphans[:10]) + (" ..." if len(orphans) > 10 else ""),
        )


def transform(model: nn.Module, cfg) -> None:
    """The model transform: weight-centralize the convs feeding MABN (:func:`weight_centralization`)
    and, if the model has MABN layers, attach the optimizer-step hook that ends their steps
    (:func:`~d2_bnstats.layers.mabn_step.attach_step_hook`, once per model; the handle is returned by
    calling it again, e.g. to remove it)."""
    weight_centralization(model, cfg)
    if any(isinstance(m, MABN2d) for m in model.modules()):
        attach_step_hook(model)
    return None


def deploy(model: nn.Module) -> List[str]:
    """Weight-centralized convs store their centred weight and get their plain class back (exact),
    so the deployed model has no plug-in class left for MABN; returns their names."""
    return fold_weight_centralization(model)


NORM = Norm(
    name="mabn",
    factories={"MABN": build_mabn, "SyncMABN": build_sync_mabn},
    config_key="MABN",
    defaults=defaults,
    check=check_config,
    options=layer_options,
    transform=transform,
    deploy=deploy,
    statistics="population",  # running_var is the second moment R (inference: FrozenBN with mean 0)
    layer_types=(MABN2d,),
)
