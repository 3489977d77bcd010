"""Deployment conversion: norms whose inference is a fixed per-channel affine become detectron2's
``FrozenBatchNorm2d``, optionally folded into the convolution before them.

At inference, a BatchNorm-type layer with population statistics (μ, σ²), scale γ, shift β and ε
computes, per channel c,

    y = γ (x − μ) / sqrt(σ² + ε) + β  =  s x + t,     s = γ / sqrt(σ² + ε),   t = β − μ s

whatever the sample. That holds for ``nn.BatchNorm2d`` and everything derived from it that keeps
running statistics (detectron2's "BN", its ``NaiveSyncBatchNorm``, torch's ``nn.SyncBatchNorm``, the
plug-in's SyncBN, GhostBN and RoIShuffleBN, whose training-time batch splitting and communication do
not exist at inference, and BN whose statistics PreciseBN recomputed), and for MABN, whose inference
is γ x / sqrt(R + ε) + b: a frozen BN with μ = 0 and σ² = R (docs/mabn.md). detectron2's
``FrozenBatchNorm2d`` evaluates it with the same fused ``F.batch_norm`` call as those layers' own
eval-mode forward, so :func:`to_frozen` changes no output bit.

Not a fixed affine, hence kept as they are: any BN-type layer without running statistics
(``track_running_stats=False``: the test batch's statistics), a layer whose norm declaration gives a
reason (``keep_reason`` of :class:`d2_bnstats.registry.Norm`: EvalNorm, whose statistics mix in the
sample's own; a layer in mode "ema" is BN inference and is converted), GroupNorm and other
per-sample norms.

Before that, each registered norm's own deployment conversion (``deploy`` of its declaration) runs on
the copy: MABN's weight-centralized convolutions store their centred weight and get their plain class
back (exact), so the deployed model has no plug-in class left in it for MABN; a third party's norm
converts its layers likewise. Each conversion's modules are listed in the report under the norm's name.

Folding (:func:`fold_norms_into_convs`): a conv y = W ∗ x + b followed by the affine above is one
conv with W' = s·W (per output filter) and b' = s (b − μ) + β, computed in float64 and stored in the
conv's dtype. detectron2's ``Conv2d`` applies its ``.norm`` right after the convolution (before the
activation), so every ``Conv2d`` whose ``.norm`` became a ``FrozenBatchNorm2d`` is folded and its
``.norm`` set to None; in an ``nn.Sequential`` an ``nn.Conv2d`` without norm or activation of its
own followed directly by a ``FrozenBatchNorm2d`` is folded and the norm replaced by
``nn.Identity``. Folding removes one pass over every normalized feature map; outputs change only by
rounding (float32: relative 1e-7 per layer). Frozen norms that follow something else (per-level
copies, detectron2's ``CycleBatchNormList``) stay frozen norms.

Every function here returns a new module (a deep copy) and leaves its input untouched.
"""
import copy
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from ..registry import declared_norms

__all__ = ["DeploymentReport", "convert_for_deployment", "fold_norms_into_convs", "to_frozen"]

logger = logging.getLogger(__name__)

_BATCH_NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)


@dataclass
class DeploymentReport:
    """What :func:`convert_for_deployment` did, by module name (names in the returned model)."""

    converted: Dict[str, List[str]] = field(default_factory=dict)  # norm declaration -> modules its deploy converted
    frozen: List[Tuple[str, str]] = field(default_factory=list)  # (name, original class name)
    kept: List[Tuple[str, str]] = field(default_factory=list)  # (name, why it is not a fixed affine)
    folded: List[str] = field(default_factory=list)  # convs that absorbed their norm

    def summary(self) -> str:
        lines = [
            f"{len(self.frozen)} norms converted to FrozenBatchNorm2d"
            + (f" ({', '.join(f'{n} {c}' for c, n in _count(self.frozen))})" if self.frozen else ""),
            *(f"{len(names)} modules converted by {norm}'s deployment conversion" for norm, names in self.converted.items()),
            f"{len(self.folded)} norms folded into the preceding conv",
            f"{len(self.kept)} norms kept (inference is not a fixed affine)",
        ]
        lines += [f"  kept {name}: {why}" for name, why in self.kept[:20]]
        if len(self.kept) > 20:
            lines.append(f"  ... and {len(self.kept) - 20} more")
        return "\n".join(lines)


def _count(pairs: List[Tuple[str, str]]) -> List[Tuple[str, int]]:
    counts: Dict[str, int] = {}
    for _, cls in pairs:
        counts[cls] = counts.get(cls, 0) + 1
    return sorted(counts.items())


def fixed_affine_reason(module: nn.Module):
    """None if ``module`` is a BatchNorm-type layer whose inference is a fixed affine (convertible),
    else a short reason why not; raises nothing. Not a BatchNorm-type layer: ``"not BatchNorm"``."""
    for norm in declared_norms():
        reason = norm.keep_reason(module) if norm.keep_reason is not None else None
        if reason is not None:
            return reason
    if not isinstance(module, _BATCH_NORM_TYPES):
        return "not BatchNorm"
    if not module.track_running_stats or module.running_mean is None or module.running_var is None:
        return "no running statistics: it normalizes with the test batch's statistics"
    return None


@torch.no_grad()
def frozen_copy(bn: nn.Module) -> FrozenBatchNorm2d:
    """detectron2's ``FrozenBatchNorm2d`` with ``bn``'s statistics, affine and ε (same device and
    dtype as ``bn``'s running statistics); γ = 1, β = 0 for a layer without affine parameters."""
    reason = fixed_affine_reason(bn)
    if reason is not None:
        raise TypeError(f"{type(bn).__name__} cannot become a FrozenBatchNorm2d: {reason}")
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    stats = bn.running_mean
    frozen.running_mean = bn.running_mean.detach().clone()
    frozen.running_var = bn.running_var.detach().clone()
    if bn.affine:
        frozen.weight = bn.weight.detach().clone().to(stats.dtype)
        frozen.bias = bn.bias.detach().clone().to(stats.dtype)
    else:
        frozen.weight = torch.ones_like(stats)
        frozen.bias = torch.zeros_like(stats)
    return frozen


def _convert_in_place(model: nn.Module, report: DeploymentReport) -> nn.Module:
    """Replace every convertible norm of ``model`` (in place) by its frozen copy; returns the model
    (a different object when ``model`` itself is such a norm)."""
    root_reason = fixed_affine_reason(model)
    if root_reason is None:
        report.frozen.append(("", type(model).__name__))
        return frozen_copy(model)
    replacements: Dict[int, nn.Module] = {}  # a norm reachable under several names: one copy
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            reason = fixed_affine_reason(child)
            if reason is None:
                if id(child) not in replacements:
                    replacements[id(child)] = frozen_copy(child)
                    report.frozen.append((full, type(child).__name__))
                setattr(module, child_name, replacements[id(child)])
            elif reason != "not BatchNorm":
                report.kept.append((full, reason))
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _to_frozen(model: nn.Module, report: DeploymentReport) -> nn.Module:
    model = copy.deepcopy(_unwrap(model))
    # the norms' own conversions first (MABN's convs: once plain convs they fold like any other)
    for norm in declared_norms():
        if norm.deploy is not None:
            names = list(norm.deploy(model) or [])
            if names:
                report.converted[norm.name] = names
    return _convert_in_place(model, report)


def to_frozen(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (unwrapped from (Distributed)DataParallel) in which every norm whose
    inference is a fixed affine is detectron2's ``FrozenBatchNorm2d`` and every weight-centralized
    conv a plain conv with its centred weight stored; an inference model (no parameter requires
    grad). Identical outputs at inference (same fused op); ``model`` is not changed. See the module
    docstring for which norms are converted."""
    return convert_for_deployment(model)[0]


@torch.no_grad()
def fold_into_conv(conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> None:
    """Make ``conv`` (in place) compute conv followed by ``norm``: W' = s W, b' = s (b − μ) + β with
    s = γ / sqrt(σ² + ε), in float64, stored in the conv's dtype."""
    if conv.out_channels != norm.num_features:
        raise ValueError(f"cannot fold a norm of {norm.num_features} channels into a conv with {conv.out_channels} outputs")
    w = conv.weight.detach().double()
    scale = norm.weight.double() * (norm.running_var.double() + norm.eps).rsqrt()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    new_weight = w * scale.reshape((-1,) + (1,) * (w.dim() - 1))
    new_bias = (b - norm.running_mean.double()) * scale + norm.bias.double()
    requires_grad = conv.weight.requires_grad
    conv.weight = nn.Parameter(new_weight.to(conv.weight.dtype), requires_grad=requires_grad)
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=requires_grad)


def _foldable_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and not isinstance(module, nn.ConvTranspose2d)


def _fold_in_place(model: nn.Module, report: DeploymentReport) -> None:
    done = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, D2Conv2d) and isinstance(module.norm, FrozenBatchNorm2d) and id(module) not in done:
            fold_into_conv(module, module.norm)
            module.norm = None
            done.add(id(module))
            report.folded.append(prefix + "norm")
        elif isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (_, conv), (norm_name, norm) in zip(children, children[1:]):
                plain = getattr(conv, "norm", None) is None and getattr(conv, "activation", None) is None
                if _foldable_conv(conv) and plain and isinstance(norm, FrozenBatchNorm2d) and id(conv) not in done:
                    fold_into_conv(conv, norm)
                    setattr(module, norm_name, nn.Identity())
                    done.add(id(conv))
                    report.folded.append(prefix + norm_name)


def fold_norms_into_convs(model: nn.Module) -> nn.Module:
    """:func:`to_frozen`, then every frozen norm right after a conv folded into that conv's weight and
    bias (see the module docstring). Returns a new module; ``model`` is not changed."""
    return convert_for_deployment(model, fold=True)[0]


def convert_for_deployment(model: nn.Module, fold: bool = False) -> Tuple[nn.Module, DeploymentReport]:
    """:func:`to_frozen` (and with ``fold`` :func:`fold_norms_into_convs`) with a report of what was
    converted, folded and kept. Returns (new model, report); ``model`` is not changed.

    The new model is for inference: no parameter requires grad (a traced graph then never records
    autograd, whatever the caller's grad mode), train/eval flags are those of ``model``."""
    report = DeploymentReport()
    converted = _to_frozen(model, report)
    if fold:
        _fold_in_place(converted, report)
    converted.requires_grad_(False)
    logger.info("Deployment conversion: %s", report.summary().replace("\n", "; "))
    return converted, report
