"""EvalNorm's formulas as plain functions: the evaluation statistics and the auxiliary loss.

Singh & Shrivastava, "EvalNorm: Estimating Batch Normalization Statistics for Evaluation", ICCV 2019,
section 3 (the derivation is in :mod:`d2_bnstats.layers.evalnorm`'s docstring).

- :func:`evalnorm_moments`: mu_hat, sigma2_hat of eqs. 7-8 from a sample's moments (mu_i, sigma2_i)
  and the population statistics (mu_E, sigma2_E)::

      mu_hat     = alpha mu_i + (1 - alpha) mu_E
      sigma2_hat = beta sigma2_i + (1 - beta) sigma2_E + beta (1 - beta) (mu_i - mu_E)^2

- :func:`aux_loss`: L_aux of eq. 9, the mean absolute difference between what BN produced in
  training, (x - mu_B) / sigma_B, and what evaluation would produce, (x - mu_hat) / sigma_hat, with
  every statistic constant so that only alpha, beta receive gradient. Both normalisations are
  affine in x per sample and channel, so the loss is mean |x a + b| (:func:`l1_of_affine`), computed
  on a strided subset of the values (:func:`aux_subset`).
- :func:`unit_interval`: the value of a parameter clamped to [0, 1] with a straight-through
  gradient (alpha_hat, beta_hat are kept in [0, 1] by projection after each optimiser step:
  :mod:`d2_bnstats.layers.evalnorm_projection`).

This module imports torch only.
"""
from typing import Optional, Tuple, Union

import torch

Number = Union[float, torch.Tensor]


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; ``t`` itself when it has it already, without the call of ``Tensor.to``
    (about 1 µs of argument parsing per call, several per inference call of a small layer)."""
    return t if t.dtype == dtype else t.to(dtype)


def evalnorm_moments(
    mean_i: torch.Tensor, var_i: torch.Tensor, mean_e: torch.Tensor, var_e: torch.Tensor, alpha: Number, beta: Number
) -> Tuple[torch.Tensor, torch.Tensor]:
    """mu_hat, sigma2_hat of eqs. 7-8 (per sample and channel: ``mean_e``, ``var_e`` [C] broadcast
    against ``mean_i``, ``var_i`` [N, C]). Interpolations use lerp, exact at the ends: alpha = 1 gives
    mu_i, alpha = 0 gives mu_E (likewise beta). With a Python float beta (inference) the last term is
    added in place, in the same order of operations as with a tensor beta."""
    dtype = torch.promote_types(mean_i.dtype, mean_e.dtype)
    mean_i, var_i = as_dtype(mean_i, dtype), as_dtype(var_i, dtype)
    mean_e, var_e = as_dtype(mean_e, dtype), as_dtype(var_e, dtype)
    if isinstance(alpha, torch.Tensor):
        alpha = as_dtype(alpha, dtype)
    d = mean_i - mean_e
    if not isinstance(beta, torch.Tensor):
        mu_hat = torch.lerp(mean_e, mean_i, alpha)
        var_hat = torch.lerp(var_e, var_i, beta).addcmul_(d, d, value=beta * (1 - beta))
        return mu_hat, var_hat
    beta = as_dtype(beta, dtype)
    mu_hat = torch.lerp(mean_e, mean_i, alpha)
    var_hat = torch.lerp(var_e, var_i, beta) + (beta * (1 - beta)) * d * d
    return mu_hat, var_hat


def unit_interval_value(p: torch.Tensor) -> float:
    """The value of :func:`unit_interval` (``p`` as float32, clamped to [0, 1]) as a Python float, read
    on the host: for a CPU parameter in inference, where reading it costs less than the kernels of the
    tensor form. NaN stays NaN."""
    p = p.detach()  # a scalar read of a tensor that requires grad warns
    v = float(p if p.dtype == torch.float32 else p.float())
    return v if 0.0 <= v <= 1.0 or v != v else (0.0 if v < 0.0 else 1.0)


def l1_of_affine(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean(|x * a + b|) over all of ``x`` (N, C, ...), with ``a``, ``b`` of shape (N, C) broadcast
    over the trailing dimensions; gradients go to ``a`` and ``b`` only.

    Computed without keeping any tensor of ``x``'s size for the backward pass: with
    s = sign(x a + b) (a subgradient of |.|, 0 at 0 as torch's abs), sum|x a + b| =
    a sum(s x) + b sum(s), so the loss is that expression with the sums taken as constants;
    its value and its gradient are those of the plain expression.
    """
    if x.numel() == 0:
        return (a.sum() + b.sum()) * 0.0
    extra = (None,) * (x.dim() - 2)
    dims = tuple(range(2, x.dim()))
    with torch.no_grad():
        t = torch.addcmul(b.detach()[(...,) + extra], x, a.detach()[(...,) + extra])
        t.sign_()
        s = t.sum(dims) if dims else t.clone()
        sx = t.mul_(x)
        sx = sx.sum(dims) if dims else sx
    return ((a * sx).sum() + (b * s).sum()) / x.numel()


def aux_subset(x: torch.Tensor, budget: int, step: int) -> Tuple[torch.Tensor, Optional[slice]]:
    """The values of ``x`` (N, C, H, W) that L_aux uses at training step ``step``: at most about
    ``budget`` per channel (``budget`` <= 0: all), as a view of ``x``, and the slice of samples
    taken (None: every sample).

    Whole maps of every k-th sample when a map fits the budget (heads: many small RoIs), else every
    k-th row of every sample (backbone: few large maps). The offset cycles with ``step``, so over k
    steps every value is used equally often: the mean over a cycle is the full L_aux, and no random
    numbers are drawn (training randomness is unchanged).
    """
    n, c, h, w = x.shape
    if budget <= 0 or n * h * w <= budget:
        return x, None
    if h * w <= budget:
        stride = -(-n // (budget // (h * w)))
        rows = slice(step % stride, None, stride)
        return x[rows], rows
    rows_per_sample = max(1, (budget // n) // w)
    stride = -(-h // rows_per_sample)
    return x[:, :, step % stride :: stride, :], None


def aux_loss(
    x: torch.Tensor,
    sample_moments: Tuple[torch.Tensor, torch.Tensor],
    batch_moments: Tuple[torch.Tensor, torch.Tensor],
    population: Tuple[torch.Tensor, torch.Tensor],
    alpha: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
    budget: int = 0,
    step: int = 0,
) -> torch.Tensor:
    """L_aux of eq. 9 for a training batch ``x`` (N, C, H, W, no gradient needed).

    ``sample_moments``: (mu_i, sigma2_i), [N, C]; ``batch_moments``: (mu_B, sigma2_B) BN normalised
    with, [C]; ``population``: (mu_E, sigma2_E) before this batch's update, [C]; all constants.
    sigma_B, sigma_hat include ``eps`` as BN does. Only ``alpha``, ``beta`` get gradient.
    ``budget``, ``step``: the subset of values used (:func:`aux_subset`).
    """
    mean_i, var_i = sample_moments
    mean_b, var_b = batch_moments
    mu_hat, var_hat = evalnorm_moments(mean_i, var_i, population[0], population[1], alpha, beta)
    r_b = torch.rsqrt(var_b + eps)
    r_hat = torch.rsqrt(var_hat + eps)
    a = r_b - r_hat  # z_B - z_hat = x a + b
    b = mu_hat * r_hat - mean_b * r_b
    xs, rows = aux_subset(x, budget, step)
    if rows is not None:
        a, b = a[rows], b[rows]
    return l1_of_affine(xs, a, b)


def unit_interval(p: torch.Tensor) -> torch.Tensor:
    """``p`` (as float32) clamped to [0, 1] in value, with gradient 1 everywhere (straight-through).

    The optimiser-step projection keeps the parameter inside [0, 1], where this is the identity;
    torch's clamp has zero gradient *at* the bounds, which would freeze a parameter that starts at 0
    (EvalNorm's initial value) or that the projection put on a bound.
    """
    p = p.float()
    return p + (p.detach().clamp(0.0, 1.0) - p.detach())
