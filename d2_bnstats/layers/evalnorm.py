"""EvalNorm: BatchNorm whose *evaluation* statistics include the sample being normalised.

Singh & Shrivastava, "EvalNorm: Estimating Batch Normalization Statistics for Evaluation",
ICCV 2019, sections 3.2-3.4 (eqs. 3-9). Training is plain BatchNorm; only inference changes.

Maths
-----
Training normalises sample i with the statistics of its batch B, which contains the sample
itself. With alpha = 1/B the batch moments split exactly into the sample's own moments
(mu_i, sigma2_i: mean and *biased* variance over its H x W positions) and those of the other
B - 1 samples C (eqs. 3-4)::

    mu_B     = alpha mu_i + (1 - alpha) mu_C
    sigma2_B = alpha sigma2_i + (1 - alpha) sigma2_C + alpha (1 - alpha) (mu_i - mu_C)^2

BN inference replaces mu_B, sigma2_B by the population statistics mu_E, sigma2_E and so drops
the sample's share. EvalNorm replaces only mu_C, sigma2_C (eqs. 5-8)::

    mu_hat     = alpha mu_i + (1 - alpha) mu_E
    sigma2_hat = beta sigma2_i + (1 - beta) sigma2_E + beta (1 - beta) (mu_i - mu_E)^2
    y          = gamma (x - mu_hat) / sqrt(sigma2_hat + eps) + b

with one (alpha, beta) pair per layer. Modes (:data:`MODES`) choose them:

- ``"learned"`` (default): alpha_hat, beta_hat estimated by minimising (eq. 9)::

      L_aux = mean | stopgrad((x - mu_B) / sigma_B) - (stopgrad(x) - mu_hat) / sigma_hat |

  where mu_hat, sigma_hat use stopgrad(mu_i), stopgrad(sigma2_i), so only alpha_hat, beta_hat
  receive gradient and the network trains exactly as with BN ("online" estimation; the same
  loss with everything else frozen is the "offline" estimation). sigma_B, sigma_hat include eps
  as BN does. The layer computes L_aux in every training forward (with grad enabled) and keeps
  it in :attr:`EvalNorm2d.aux_loss`; :func:`attach_aux_loss_hook` adds the sum over layers to
  a model's loss dict.
- ``"rule"``: alpha = beta = 1/B^2 (the paper's rule of thumb, Table 1);
- ``"exact"``: alpha = beta = 1/B (eqs. 3-4 taken literally);
- ``"fixed"``: given alpha, beta;
- ``"ema"``: alpha = beta = 0, i.e. BN inference (the layer calls BN's own forward).

B is the normalisation batch the layer saw in training, recorded automatically as a running
average (same momentum as the running statistics) in the buffer ``norm_batch_size``:
N for a plain layer, count_global / (H W) for the synchronised variant (= the number of
samples of the global batch when all processes have the same spatial size; in general the
exact inverse weight 1/alpha of one sample of size H x W in the global mean). A ``batch_size``
given to the layer overrides it.

Conventions (documented choices)
--------------------------------
- sigma2_i is the biased variance over H x W (that is what eqs. 3-4 need). ``running_var``
  keeps torch's convention: the EMA of the *unbiased* batch variance. The formula uses
  sigma2_E = running_var as stored, the same quantity BN inference uses, so that alpha = beta =
  0 is BN inference exactly and the estimator is continuous in alpha, beta. The unbiased EMA
  differs from the biased batch variance BN normalises with in training by the factor
  n / (n - 1), n = values per channel of a training batch (B H W: >= 32 in the backbone of the
  CPU configs, > 10^4 in box heads); the learned alpha_hat, beta_hat absorb it. Where this layer
  *writes* running_var from biased moments (the synchronised training path) it converts to
  unbiased with n / (n - 1), n the global count.
- alpha_hat, beta_hat are 0-dim parameters kept in [0, 1] by projection: after every optimiser
  step the parameters are clamped back into [0, 1] (torch's global optimizer step post hook, so
  any loop and optimiser works); the forward uses the clamped value with a straight-through
  gradient (torch's clamp has zero gradient *at* a bound, which would freeze a parameter sitting
  on it). They start at 0 (= BN inference until learned).
- L_aux is the mean over elements of the absolute error, by default over a deterministic subset
  of at most about ``aux_samples`` values per channel whose offset cycles with the step, so that
  over a cycle every value is used equally often (an unbiased estimate of the full L_aux; no
  random numbers are drawn, so training randomness is unchanged). ``aux_samples=0`` uses all.
- In eval mode alpha, beta are constants (the task loss never trains them); gradients still
  flow to the input through mu_i, sigma2_i.
- An empty input (N = 0) returns an empty output connected to the graph (zero gradients for
  every parameter, alpha_hat and beta_hat included) and leaves every buffer untouched
  (nn.BatchNorm2d would increment ``num_batches_tracked``).
- Half/bfloat16 inputs: statistics and coefficients are computed in float32, the output has the
  input's dtype.

This module imports torch only.
"""
import math
import warnings
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .sync import global_moments, world_size

MODES = ("learned", "rule", "exact", "fixed", "ema")
DEFAULT_AUX_SAMPLES = 256

Number = Union[float, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# The maths, as plain functions (used by the layer, reusable by tools and tests)
# ----------------------------------------------------------------------------------------------
def per_sample_moments(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of ``x`` (N, C, H, W) over H, W: two [N, C] tensors in float32
    (float64 for double input), without gradient.

    Two vectorised reductions (sum and L2 norm, accumulated in float32) instead of
    ``torch.var_mean``, which is 3-5x slower on CPU; variance = E[x^2] - mean^2, clamped at 0.
    Its absolute error is about 1e-7 E[x^2], negligible next to sigma2_E in sigma2_hat.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    n, c, h, w = x.shape
    hw = h * w
    if x.numel() == 0 or hw == 0:
        zeros = torch.zeros(n, c, dtype=dtype, device=x.device)
        return zeros, zeros.clone()
    with torch.no_grad():
        total = x.sum(dim=(2, 3), dtype=dtype)
        sq = torch.linalg.vector_norm(x, ord=2, dim=(2, 3), dtype=dtype)
        mean = total / hw
        var = (sq * sq / hw - mean * mean).clamp_(min=0)
    return mean, var


def batch_moments_from_samples(mean_i: torch.Tensor, var_i: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a batch from its samples' moments (equal sizes)."""
    mean = mean_i.mean(0)
    var = var_i.mean(0) + (mean_i - mean).pow(2).mean(0)
    return mean, var


def evalnorm_moments(
    mean_i: torch.Tensor, var_i: torch.Tensor, mean_e: torch.Tensor, var_e: torch.Tensor, alpha: Number, beta: Number
) -> Tuple[torch.Tensor, torch.Tensor]:
    """mu_hat, sigma2_hat of eqs. 7-8 (per sample and channel). Interpolations use lerp, exact at
    the ends: alpha = 1 gives mu_i, alpha = 0 gives mu_E (likewise beta)."""
    dtype = torch.promote_types(mean_i.dtype, mean_e.dtype)
    mean_i, var_i = mean_i.to(dtype), var_i.to(dtype)
    mean_e, var_e = mean_e.to(dtype).expand_as(mean_i), var_e.to(dtype).expand_as(var_i)
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(dtype)
    if isinstance(beta, torch.Tensor):
        beta = beta.to(dtype)
    d = mean_i - mean_e
    mu_hat = torch.lerp(mean_e, mean_i, alpha)
    var_hat = torch.lerp(var_e, var_i, beta) + (beta * (1 - beta)) * d * d
    return mu_hat, var_hat


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


def _clamp01(v: float, what: str) -> float:
    v = float(v)
    if not (0.0 <= v <= 1.0) or math.isnan(v):
        raise ValueError(f"{what} must be in [0, 1], got {v}")
    return v


# ----------------------------------------------------------------------------------------------
# Keeping alpha_hat, beta_hat in [0, 1]: projection after every optimiser step
# ----------------------------------------------------------------------------------------------
_UNIT_INTERVAL_TAG = "_d2_bnstats_unit_interval"
_projection_hook = None


def _project_after_step(optimizer, args, kwargs) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"] if getattr(p, _UNIT_INTERVAL_TAG, False)]
    if params:
        with torch.no_grad():
            for p in params:
                p.clamp_(0.0, 1.0)


def _unit_interval(p: torch.Tensor) -> torch.Tensor:
    """``p`` clamped to [0, 1] in value, with gradient 1 everywhere (straight-through).

    The optimiser-step projection keeps the parameter inside [0, 1], where this is the identity;
    torch's clamp has zero gradient *at* the bounds, which would freeze a parameter that starts
    at 0 (our initial value) or that the projection put on a bound.
    """
    p = p.float()
    return p + (p.detach().clamp(0.0, 1.0) - p.detach())


def _install_projection() -> None:
    global _projection_hook
    if _projection_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _projection_hook = register_optimizer_step_post_hook(_project_after_step)


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------
class EvalNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with EvalNorm evaluation statistics (see the module docstring for the maths).

    Args (beyond nn.BatchNorm2d's; ``track_running_stats`` must be True):
        sync: normalise training batches over all processes (layers/sync.py ``global_moments``);
            registered as "SyncEvalNorm". Without a process group or with one process it is the
            plain layer.
        mode: one of :data:`MODES` (``set_mode`` changes it later).
        alpha, beta: values for mode "fixed" (beta defaults to alpha).
        batch_size: B for modes "rule"/"exact" (default: the recorded ``norm_batch_size``).
        learn: compute L_aux in training so alpha_hat, beta_hat are learned (False: they are
            frozen, requires_grad=False, and training costs exactly what BN costs).
        aux_samples: values per channel used for L_aux per training forward (0: all).
        init_alpha, init_beta: initial alpha_hat, beta_hat.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        sync: bool = False,
        mode: str = "learned",
        alpha: Optional[float] = None,
        beta: Optional[float] = None,
        batch_size: Optional[float] = None,
        learn: bool = True,
        aux_samples: int = DEFAULT_AUX_SAMPLES,
        init_alpha: float = 0.0,
        init_beta: float = 0.0,
    ):
        if not track_running_stats:
            raise ValueError("EvalNorm2d needs running statistics (track_running_stats=True): they are mu_E, sigma2_E")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype if dtype is not None else torch.float32}
        self.alpha_hat = nn.Parameter(torch.tensor(_clamp01(init_alpha, "init_alpha"), **factory), requires_grad=learn)
        self.beta_hat = nn.Parameter(torch.tensor(_clamp01(init_beta, "init_beta"), **factory), requires_grad=learn)
        setattr(self.alpha_hat, _UNIT_INTERVAL_TAG, True)
        setattr(self.beta_hat, _UNIT_INTERVAL_TAG, True)
        # B seen in training (running average); 0 = never trained
        self.register_buffer("norm_batch_size", torch.zeros((), device=device, dtype=torch.float32))
        self.sync = bool(sync)
        self.learn = bool(learn)
        if int(aux_samples) < 0:
            raise ValueError(f"aux_samples must be >= 0 (0 = all values), got {aux_samples}")
        self.aux_samples = int(aux_samples)
        self.aux_loss: Optional[torch.Tensor] = None  # latest training-mode L_aux
        self._aux_collecting = False
        self._aux_step = 0
        self._batch_size_cache = (None, None)
        self._warned_unknown_b = False
        self.mode = "learned"
        self.fixed_alpha: Optional[float] = None
        self.fixed_beta: Optional[float] = None
        self.batch_size: Optional[float] = None
        self.set_mode(mode, alpha=alpha, beta=beta, batch_size=batch_size)
        _install_projection()

    # ---------------------------------------------------------------------------- configuration
    def set_mode(
        self, mode: str, *, alpha: Optional[float] = None, beta: Optional[float] = None, batch_size: Optional[float] = None
    ) -> "EvalNorm2d":
        """Switch the evaluation mode (see :data:`MODES`); ``alpha``/``beta`` for "fixed",
        ``batch_size`` overrides the recorded B for "rule"/"exact" (None: recorded)."""
        if mode not in MODES:
            raise ValueError(f"unknown EvalNorm mode {mode!r}; accepted: {', '.join(MODES)}")
        if mode == "fixed":
            if alpha is None:
                raise ValueError("EvalNorm mode 'fixed' needs alpha= (and optionally beta=, default alpha), in [0, 1]")
            self.fixed_alpha = _clamp01(alpha, "alpha")
            self.fixed_beta = _clamp01(alpha if beta is None else beta, "beta")
        elif alpha is not None or beta is not None:
            raise ValueError(f"alpha=/beta= are only used by mode 'fixed', not {mode!r}")
        if batch_size is not None:
            batch_size = float(batch_size)
            if not batch_size >= 1:
                raise ValueError(f"batch_size must be >= 1 (images or RoIs per normalisation batch), got {batch_size}")
        self.batch_size = batch_size
        self.mode = mode
        return self

    @property
    def recorded_batch_size(self) -> Optional[float]:
        """B recorded in training (None if the layer never trained). Cached per buffer version,
        so evaluation reads the buffer (a host sync on GPU) once, not per forward."""
        buf = self.norm_batch_size
        key = (buf.data_ptr(), buf._version)
        if self._batch_size_cache[0] != key:
            value = float(buf)
            self._batch_size_cache = (key, value if value > 0 else None)
        return self._batch_size_cache[1]

    def _resolved_batch_size(self) -> Optional[float]:
        return self.batch_size if self.batch_size is not None else self.recorded_batch_size

    def _alpha_beta(self, detach: bool) -> Tuple[Number, Number]:
        """Current (alpha, beta): python floats, or 0-dim float32 tensors in mode "learned"."""
        if self.mode == "ema":
            return 0.0, 0.0
        if self.mode == "fixed":
            return self.fixed_alpha, self.fixed_beta
        if self.mode in ("rule", "exact"):
            b = self._resolved_batch_size()
            if b is None:
                if not self._warned_unknown_b:
                    warnings.warn(
                        f"EvalNorm mode {self.mode!r}: this layer never trained, so its batch size B is unknown; "
                        "using alpha = beta = 0 (BN inference). Pass batch_size= (set_evalnorm_mode) or "
                        "BNSTATS.EVALNORM.BATCH_SIZE.",
                        stacklevel=3,
                    )
                    self._warned_unknown_b = True
                return 0.0, 0.0
            a = min(1.0, 1.0 / (b * b) if self.mode == "rule" else 1.0 / b)
            return a, a
        alpha, beta = self._learned_ab()
        if detach:
            alpha, beta = alpha.detach(), beta.detach()
        return alpha, beta

    @property
    def alpha(self) -> torch.Tensor:
        """The alpha evaluation uses now (read-only 0-dim tensor in [0, 1])."""
        return torch.as_tensor(self._alpha_beta(detach=True)[0], dtype=torch.float32, device=self.alpha_hat.device)

    @property
    def beta(self) -> torch.Tensor:
        """The beta evaluation uses now (read-only 0-dim tensor in [0, 1])."""
        return torch.as_tensor(self._alpha_beta(detach=True)[1], dtype=torch.float32, device=self.alpha_hat.device)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", mode={self.mode}"
        if self.mode == "fixed":
            s += f", alpha={self.fixed_alpha}, beta={self.fixed_beta}"
        if self.batch_size is not None:
            s += f", batch_size={self.batch_size}"
        if self.sync:
            s += ", sync=True"
        return s

    # ---------------------------------------------------------------------------- checkpoints
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A BN / FrozenBN / Caffe2 checkpoint has no EvalNorm state. alpha_hat, beta_hat stay
        # missing (the checkpointer reports them: they are not estimated yet); everything else is
        # initialised silently: the recorded B as "unknown", num_batches_tracked (absent from
        # FrozenBN checkpoints) as 0, and running statistics absent from Caffe2 checkpoints
        # (folded BN: weight/bias only) as the identity, as FrozenBatchNorm2d does.
        if prefix + "weight" in state_dict or prefix + "running_mean" in state_dict:
            defaults = {
                "norm_batch_size": torch.zeros_like(self.norm_batch_size),
                "num_batches_tracked": torch.zeros_like(self.num_batches_tracked),
            }
            if prefix + "running_var" not in state_dict and prefix + "running_mean" not in state_dict:
                defaults["running_mean"] = torch.zeros_like(self.running_mean)
                defaults["running_var"] = torch.ones_like(self.running_var)
            for name, value in defaults.items():
                state_dict.setdefault(prefix + name, value)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._batch_size_cache = (None, None)

    # ---------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if self.training:
            return self._forward_train(x)
        return self._forward_eval(x)

    def _empty_output(self, x: torch.Tensor, with_aux: bool) -> torch.Tensor:
        out = x
        if self.affine:
            out = x * self.weight.reshape(1, -1, 1, 1).to(x.dtype) + self.bias.reshape(1, -1, 1, 1).to(x.dtype)
        if with_aux:
            self._record_aux((self.alpha_hat.float() + self.beta_hat.float()) * 0.0)
        elif torch.is_grad_enabled() and self.alpha_hat.requires_grad:
            out = out + ((self.alpha_hat + self.beta_hat) * 0.0).to(x.dtype)
        return out

    def _wants_aux(self) -> bool:
        return self.learn and torch.is_grad_enabled() and (self.alpha_hat.requires_grad or self.beta_hat.requires_grad)

    def _exponential_average_factor(self) -> float:
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
        with_aux = self._wants_aux()
        use_sync = self.sync and world_size() > 1
        if x.numel() == 0 and not use_sync:
            return self._empty_output(x, with_aux)
        n, c, h, w = x.shape
        tracking = self.track_running_stats
        if with_aux:  # mu_E, sigma2_E before this batch's update: the test sample is never in them
            mean_e, var_e = self.running_mean.detach().float().clone(), self.running_var.detach().float().clone()
        if not use_sync:
            out = super().forward(x)  # exactly nn.BatchNorm2d (num_batches_tracked, momentum, stats)
            if tracking:
                self._record_batch_size(float(n))
            if not with_aux:
                return out
            mean_i, var_i = per_sample_moments(x.detach())
            mean_b, var_b = batch_moments_from_samples(mean_i, var_i)
        else:
            moments = global_moments(x, sync=True)
            scale = torch.rsqrt(moments.var + self.eps)
            shift = -moments.mean * scale
            if self.affine:
                scale = scale * self.weight.float()
                shift = shift * self.weight.float() + self.bias.float()
            out = x * scale.to(x.dtype).reshape(1, -1, 1, 1) + shift.to(x.dtype).reshape(1, -1, 1, 1)
            if tracking:
                self._update_running_stats_sync(moments, h * w)
            if x.numel() == 0:
                if with_aux:
                    self._record_aux((self.alpha_hat.float() + self.beta_hat.float()) * 0.0)
                return out
            if not with_aux:
                return out
            mean_i, var_i = per_sample_moments(x.detach())
            mean_b, var_b = moments.mean.detach(), moments.var.detach()
        self._record_aux(self._aux_loss(x.detach(), mean_i, var_i, mean_b, var_b, mean_e, var_e))
        return out

    def _record_batch_size(self, b: float) -> None:
        """Running average of B (the first batch is taken as is); no host-device transfer."""
        f = self._exponential_average_factor()
        with torch.no_grad():
            buf = self.norm_batch_size
            buf.copy_(torch.where(buf > 0, buf * (1.0 - f) + f * b, torch.full_like(buf, b)))

    def _update_running_stats_sync(self, moments, hw: int) -> None:
        """BN's running-statistics update from the global moments (unbiased variance)."""
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            f = self._exponential_average_factor()
            count = moments.count
            valid = count > 1
            unbiased = moments.var * count / (count - 1).clamp(min=1)
            rm, rv = self.running_mean, self.running_var
            rm.copy_(torch.where(valid, rm + f * (moments.mean.to(rm.dtype) - rm), rm))
            rv.copy_(torch.where(valid, rv + f * (unbiased.to(rv.dtype) - rv), rv))
            if hw > 0:  # B = global count / (H W): the inverse weight of one sample in the global mean
                b = count.to(self.norm_batch_size.dtype) / hw
                buf = self.norm_batch_size
                buf.copy_(torch.where(count > 0, torch.where(buf > 0, buf + f * (b - buf), b), buf))

    def _aux_loss(self, x, mean_i, var_i, mean_b, var_b, mean_e, var_e) -> torch.Tensor:
        """L_aux of eq. 9 (mean absolute error, on a subset of values; see the module docstring)."""
        alpha, beta = self._learned_ab()  # L_aux trains alpha_hat, beta_hat whatever the eval mode
        mu_hat, var_hat = evalnorm_moments(mean_i, var_i, mean_e, var_e, alpha, beta)
        r_b = torch.rsqrt(var_b + self.eps)
        r_hat = torch.rsqrt(var_hat + self.eps)
        a = r_b - r_hat  # z_B - z_hat = x a + b
        b = mu_hat * r_hat - mean_b * r_b
        xs, rows = self._aux_subset(x)
        if rows is not None:
            a, b = a[rows], b[rows]
        self._aux_step += 1
        return l1_of_affine(xs, a, b)

    def _learned_ab(self):
        return _unit_interval(self.alpha_hat), _unit_interval(self.beta_hat)

    def _aux_subset(self, x: torch.Tensor):
        """The values L_aux is computed on: at most about ``aux_samples`` per channel, taken as
        whole maps of every k-th sample when a map fits the budget (heads: many small RoIs),
        else as every k-th row of every sample (backbone: few large maps). The offset cycles
        with the training step, so over k steps every value is used equally often."""
        n, c, h, w = x.shape
        m = self.aux_samples
        if m <= 0 or n * h * w <= m:
            return x, None
        step = self._aux_step
        if h * w <= m:
            stride = -(-n // (m // (h * w)))
            rows = slice(step % stride, None, stride)
            return x[rows], rows
        rows_per_sample = max(1, (m // n) // w)
        stride = -(-h // rows_per_sample)
        return x[:, :, step % stride :: stride, :], None

    def _record_aux(self, loss: torch.Tensor) -> None:
        if self._aux_collecting and self.aux_loss is not None:
            self.aux_loss = self.aux_loss + loss  # a layer called several times in one model forward
        else:
            self.aux_loss = loss

    def _forward_eval(self, x: torch.Tensor) -> torch.Tensor:
        if self.running_mean is None or self.running_var is None:
            return super().forward(x)  # BN without running statistics: batch statistics
        if x.numel() == 0:
            return self._empty_output(x, with_aux=False)
        alpha, beta = self._alpha_beta(detach=True)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (self.affine and (self.weight.requires_grad or self.bias.requires_grad))
        )
        # keep alpha_hat/beta_hat in the graph (zero gradient) so DistributedDataParallel finds
        # them used when a layer runs in eval mode inside a training step
        tie = needs_grad and self.alpha_hat.requires_grad
        if isinstance(alpha, float) and alpha == 0.0 and beta == 0.0:
            if not tie:
                return super().forward(x)  # BN inference, exactly
            zero = (self.alpha_hat + self.beta_hat) * 0.0
            bias = self.bias + zero.to(self.bias.dtype) if self.affine else zero.expand(self.num_features)
            weight = self.weight if self.affine else None
            return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps)
        n, c, h, w = x.shape
        cdt = torch.promote_types(x.dtype, torch.float32)
        mean_e, var_e = self.running_mean.to(cdt), self.running_var.to(cdt)
        if not needs_grad:
            mean_i, var_i = per_sample_moments(x)
            mu_hat, var_hat = evalnorm_moments(mean_i, var_i, mean_e, var_e, alpha, beta)
            if x.is_contiguous():
                # one fused pass: BN inference of the (1, N*C, H, W) view with per-sample statistics
                weight = bias = None
                if self.affine:
                    weight = self.weight.to(cdt).repeat(n)
                    bias = self.bias.to(cdt).repeat(n)
                out = F.batch_norm(
                    x.view(1, n * c, h, w), mu_hat.reshape(-1), var_hat.reshape(-1), weight, bias, False, 0.0, self.eps
                )
                return out.view(n, c, h, w)
        else:
            var_i, mean_i = torch.var_mean(x.to(cdt), dim=(2, 3), correction=0)
            mu_hat, var_hat = evalnorm_moments(mean_i, var_i, mean_e, var_e, alpha, beta)
        scale = torch.rsqrt(var_hat + self.eps)
        if self.affine:
            scale = scale * self.weight.to(cdt)
        shift = -mu_hat * scale
        if self.affine:
            shift = shift + self.bias.to(cdt)
        if tie:
            shift = shift + (self.alpha_hat + self.beta_hat).to(cdt) * 0.0
        return torch.addcmul(shift.to(x.dtype)[:, :, None, None], x, scale.to(x.dtype)[:, :, None, None])


# ----------------------------------------------------------------------------------------------
# Model-level helpers (torch only)
# ----------------------------------------------------------------------------------------------
def evalnorm_layers(model: nn.Module) -> List[Tuple[str, EvalNorm2d]]:
    """(name, layer) for every EvalNorm2d in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, EvalNorm2d)]


def set_evalnorm_mode(
    model: nn.Module,
    mode: str,
    *,
    alpha: Optional[float] = None,
    beta: Optional[float] = None,
    batch_size: Optional[float] = None,
) -> int:
    """Set the evaluation mode of every EvalNorm2d in ``model``; returns how many layers changed.

    ``mode`` is one of "learned", "rule" (alpha = beta = 1/B^2), "exact" (1/B), "fixed" (needs
    ``alpha``, optional ``beta`` defaulting to ``alpha``), "ema" (BN inference). ``batch_size``
    overrides each layer's recorded B (None: recorded). Works on a trained model at any time; no
    retraining. A model without EvalNorm layers is left alone (returns 0).
    """
    layers = evalnorm_layers(model)
    if mode not in MODES:
        raise ValueError(f"unknown EvalNorm mode {mode!r}; accepted: {', '.join(MODES)}")
    for _, layer in layers:
        layer.set_mode(mode, alpha=alpha, beta=beta, batch_size=batch_size)
    return len(layers)


def evalnorm_state(model: nn.Module) -> List[Dict[str, object]]:
    """Per EvalNorm layer: name, mode, learned alpha_hat/beta_hat, B, and the alpha/beta in use."""
    rows = []
    for name, layer in evalnorm_layers(model):
        rows.append(
            {
                "layer": name,
                "mode": layer.mode,
                "alpha_hat": float(layer.alpha_hat.detach().clamp(0, 1)),
                "beta_hat": float(layer.beta_hat.detach().clamp(0, 1)),
                "batch_size": layer._resolved_batch_size(),
                "alpha": float(layer.alpha),
                "beta": float(layer.beta),
            }
        )
    return rows


class AuxLossHook:
    """Adds the EvalNorm auxiliary loss to a model's training loss dict.

    A forward pre-hook on the model clears every layer's ``aux_loss`` and starts collection (a
    layer called several times in one forward adds up its losses); the forward hook, when the
    model is in training mode with grad enabled and returns a dict, adds
    ``output[key] = weight * sum over layers of L_aux``. Each layer's alpha_hat, beta_hat only
    get gradient from their own term, so their effective step is lr * weight whatever the number
    of layers. ``callback(layers)``, if given, runs after every training forward (used to log
    alpha_hat, beta_hat).
    """

    def __init__(
        self,
        model: nn.Module,
        weight: float = 1.0,
        key: str = "loss_evalnorm",
        callback: Optional[Callable[[List[Tuple[str, EvalNorm2d]]], None]] = None,
    ):
        self.layers = evalnorm_layers(model)
        self.weight = float(weight)
        self.key = key
        self.callback = callback
        self._warned = False
        self.handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _pre(self, module, inputs):
        # Collected again every forward: later passes (per-level copies, conversions) may have
        # replaced or added layers since the hook was attached; a walk over modules is cheap.
        self.layers = evalnorm_layers(module)
        for _, layer in self.layers:
            layer.aux_loss = None
            layer._aux_collecting = True

    def _post(self, module, inputs, output):
        losses = []
        for _, layer in self.layers:
            layer._aux_collecting = False
            if layer.aux_loss is not None:
                losses.append(layer.aux_loss)
        if not (module.training and torch.is_grad_enabled()):
            return None
        if losses:
            if isinstance(output, dict):
                output[self.key] = torch.stack([l.reshape(()) for l in losses]).sum() * self.weight
            elif not self._warned:
                warnings.warn(
                    f"EvalNorm: the model returned {type(output).__name__}, not a dict of losses, so "
                    f"{self.key!r} was not added; alpha_hat/beta_hat are not learned",
                    stacklevel=2,
                )
                self._warned = True
        if self.callback is not None:
            self.callback(self.layers)
        return None


def attach_aux_loss_hook(model: nn.Module, weight: float = 1.0, key: str = "loss_evalnorm", callback=None) -> Optional[AuxLossHook]:
    """Attach :class:`AuxLossHook` to ``model`` once (None if it has no EvalNorm layer that learns)."""
    existing = getattr(model, "_evalnorm_aux_hook", None)
    if existing is not None:
        existing.remove()
    layers = evalnorm_layers(model)
    if not any(layer.learn for _, layer in layers):
        return None
    hook = AuxLossHook(model, weight=weight, key=key, callback=callback)
    object.__setattr__(model, "_evalnorm_aux_hook", hook)
    return hook
