"""From an ordinary BatchNorm's parameters and statistics to MABN's state.

BN computes y = a (u − μ) + β with a = γ / sqrt(σ² + ε) on its input u; MABN at inference computes
y = γ' u' / sqrt(R + ε) + b' on its input u' (the output of a weight-centralized conv, u' = u − d on
average, d being the mean that centralization removes). Choosing

    R  = E[u'²]                   (measured, or σ² + (μ − d)² from BN's statistics)
    γ' = a sqrt(R + ε),   b' = β − a (μ − d)

gives MABN inference a (u' + d − μ) + β, equal to BN whenever u' = u − d, and makes training-mode
normalization by the batch second moment (≈ R) start at the same scale.
"""
from typing import Dict, Optional, Tuple

import torch

__all__ = ["bn_to_mabn_parameters", "map_bn_state"]


def bn_to_mabn_parameters(
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float = 1e-5,
    removed_mean: Optional[torch.Tensor] = None,
    second_moment: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(γ', b', R) of an MABN layer that reproduces a BN layer (γ, β, μ, σ²) at inference (see the
    module docstring). ``removed_mean`` is d (per channel; 0 if unknown or without centralization),
    ``second_moment`` E[u'²] if measured (else σ² + (μ − d)²). Returns float tensors shaped like
    ``weight``."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    w, b = weight.to(dtype), bias.to(dtype)
    mu, v = mean.to(dtype), var.to(dtype)
    if removed_mean is not None:
        mu = mu - removed_mean.to(dtype)
    a = w / (v + eps).sqrt()
    r = second_moment.to(dtype) if second_moment is not None else v + mu * mu
    return a * (r + eps).sqrt(), b - a * mu, r


def map_bn_state(state_dict: Dict[str, torch.Tensor], prefix: str, num_features: int, eps: float) -> bool:
    """Rewrite one BN/FrozenBN layer's entries of ``state_dict`` (keys ``prefix + name``, in place)
    into MABN's weight, bias, running_mean (0), running_var (R) and num_batches_tracked (0), from the
    statistics alone (a missing bias/mean/var counts as 0/0/1). Returns False, changing nothing, when
    the stored weight does not have ``num_features`` channels (the normal loading then reports it)."""
    weight = state_dict[prefix + "weight"]
    if weight.dim() != 1 or weight.shape[0] != num_features:
        return False
    bias = state_dict.get(prefix + "bias", torch.zeros_like(weight))
    mean = state_dict.get(prefix + "running_mean", torch.zeros_like(weight))
    var = state_dict.get(prefix + "running_var", torch.ones_like(weight))
    w, b, r = bn_to_mabn_parameters(weight, bias, mean, var, eps)
    state_dict[prefix + "weight"] = w.to(weight.dtype)
    state_dict[prefix + "bias"] = b.to(weight.dtype)
    state_dict[prefix + "running_mean"] = torch.zeros_like(r)
    state_dict[prefix + "running_var"] = r
    state_dict[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return True
