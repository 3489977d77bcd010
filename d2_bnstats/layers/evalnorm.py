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
  it in :attr:`EvalNorm2d.aux_loss`; :func:`~d2_bnstats.layers.evalnorm_aux.attach_aux_loss_hook`
  adds the sum over layers to a model's loss dict. A layer whose output was back-propagated in a
  training step while its ``aux_loss`` was not (a loop that does not add it to the loss) warns at
  its next training forward, once: alpha_hat, beta_hat would silently stay where they are. The
  check stops after the first step that back-propagates L_aux, so a correct loop pays for it in its
  first step only. The formulas are plain functions in :mod:`d2_bnstats.layers.evalnorm_math`.
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
  *writes* running_var from biased moments (the synchronised training path) it uses the shared
  running-statistics update of :mod:`d2_bnstats.layers.moments` (unbiased with n / (n - 1), n the
  global count; a global batch without values changes nothing, ``num_batches_tracked`` included).
- A training batch whose statistics are not finite (a NaN or Inf in the input) leaves the running
  statistics and ``num_batches_tracked`` as they were and is counted in ``nonfinite_skips``, in both
  the plain and the synchronised path; the output is BN's all the same
  (:func:`~d2_bnstats.layers.moments.guarded_batch_norm`, ``commit_running_stats``).
- sigma2_i, mu_i are computed in one pass shifted by a value of each map
  (:func:`~d2_bnstats.layers.moments.per_sample_moments`), accurate at any mean/std ratio. Inference
  without gradient on a contiguous float32/float64 input above the fused-statistics size writes
  its output into that shifted copy of the input (one tensor of the input's size, not two); during
  an ONNX export it takes the plain path (no fused statistics kernel, no in-place output).
- alpha_hat, beta_hat are 0-dim parameters kept in [0, 1] by projection: after every step of an
  optimiser that holds them they are clamped back into [0, 1]
  (:mod:`~d2_bnstats.layers.evalnorm_projection`: a process-wide hook for every layer that has
  computed L_aux, installed by the first such layer, and
  :func:`~d2_bnstats.layers.evalnorm_projection.attach_projection_hook` for a whole model;
  constructing a layer installs nothing); the forward uses the clamped value with a straight-through
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
  (nn.BatchNorm2d would increment ``num_batches_tracked``); likewise an empty global batch of the
  synchronised variant.
- Checkpoints: the layer's own format is checkpoint version 5 (``_version``; torch's BatchNorm
  writes 2, detectron2's FrozenBatchNorm2d 3, this layer 4 before its state held the L_aux step).
  The step that chooses the L_aux subset is the layer's extra state (``<prefix>_extra_state``, a
  0-dim int64 tensor, since detectron2's checkpointer loads tensors only), so a run resumed from a
  checkpoint takes the same subsets as an uninterrupted one. Entries of version 4 lack it: the step
  starts at 0. A layer's entries of an older version or without a version (BN, FrozenBN, Caffe2,
  EvalNorm files written before versioning, state dicts rebuilt without torch's metadata) are
  completed: the step as 0, the recorded B as "unknown", ``num_batches_tracked`` as 0, missing
  running statistics as the identity (as FrozenBatchNorm2d does); alpha_hat, beta_hat stay missing
  (a loader reports them: they are not estimated yet).
- Half/bfloat16 inputs: statistics and coefficients are computed in float32, the output has the
  input's dtype.

Model-level helpers here: :func:`evalnorm_layers`, :func:`set_evalnorm_mode`,
:func:`evalnorm_state`. Length (~530 lines): this docstring (the maths and the documented
conventions) is a fifth of it, the rest is the one layer class with its checkpoint handling and
its training and evaluation forwards; the formulas, the loss-dict hook and the [0, 1] projection
are modules of their own (evalnorm_math, evalnorm_aux, evalnorm_projection).

This module imports torch only.
"""
import math
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .evalnorm_math import (
    Number,
    as_dtype,
    aux_loss,
    aux_subset,
    evalnorm_moments,
    unit_interval,
    unit_interval_value,
)
from .evalnorm_projection import watch_learning_layer
from .moments import (
    add_skip_counter,
    batch_moments_from_samples,
    empty_output,
    exporting_to_onnx,
    global_moments,
    guarded_batch_norm,
    per_sample_moments,
    recording_graph,
    shifted_sample_moments,
    unbiased_variance,
    update_running_stats,
    world_size,
)

MODES = ("learned", "rule", "exact", "fixed", "ema")
DEFAULT_AUX_SAMPLES = 256
# the state-dict key torch gives a module's get_extra_state(), after the module's prefix
EXTRA_STATE_KEY = "_extra_state"


def _clamp01(v: float, what: str) -> float:
    v = float(v)
    if not (0.0 <= v <= 1.0) or math.isnan(v):
        raise ValueError(f"{what} must be in [0, 1], got {v}")
    return v


class EvalNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with EvalNorm evaluation statistics (see the module docstring for the maths).

    Args (beyond nn.BatchNorm2d's; ``track_running_stats`` must be True):
        sync: normalise training batches over all processes (``global_moments`` of
            layers/moments.py). Without a process group or with one process it is the plain layer.
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
        # whether the last step back-propagated the output and L_aux ({"output", "aux"} flags);
        # None once a step back-propagated L_aux (or after the warning): the loop is known
        self._aux_use = {}
        self._batch_size_cache = (None, None)
        self._warned_unknown_b = False
        self.mode = "learned"
        self.fixed_alpha: Optional[float] = None
        self.fixed_beta: Optional[float] = None
        self.batch_size: Optional[float] = None
        add_skip_counter(self)
        self.set_mode(mode, alpha=alpha, beta=beta, batch_size=batch_size)

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

    def _alpha_beta(self, detach: bool, on_host: bool = False) -> Tuple[Number, Number]:
        """Current (alpha, beta): python floats, or 0-dim float32 tensors in mode "learned" (floats
        there too with ``on_host``: their values read from CPU parameters, no gradient)."""
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
                        "using alpha = beta = 0 (BN inference). Give it a batch size: set_mode(mode, batch_size=B) "
                        "or set_evalnorm_mode(model, mode, batch_size=B).",
                        stacklevel=3,
                    )
                    self._warned_unknown_b = True
                return 0.0, 0.0
            a = min(1.0, 1.0 / (b * b) if self.mode == "rule" else 1.0 / b)
            return a, a
        if on_host and self.alpha_hat.is_cpu and self.beta_hat.is_cpu:
            return unit_interval_value(self.alpha_hat), unit_interval_value(self.beta_hat)
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

    def __getstate__(self):
        # ``aux_loss`` is part of the last training forward's graph (not a leaf): torch cannot
        # deep-copy it, so ``copy.deepcopy`` (the deployment conversions, weight averaging) and
        # pickling would fail on any model copied right after a training step; a copy has not run
        # that forward, so it starts without it
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state["aux_loss"] = None
        state["_aux_collecting"] = False
        if state.get("_aux_use"):  # flags set by the original's backward; the copy checks its own
            state["_aux_use"] = {}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_aux_use", {})  # objects pickled before the check existed

    # ---------------------------------------------------------------------------- checkpoints
    # torch's BatchNorm writes version 2 and detectron2's FrozenBatchNorm2d 3, so 4 and above mark this
    # layer's own format; 5 added the L_aux step (see the module docstring).
    _version = 5

    def get_extra_state(self) -> torch.Tensor:
        """The step that chooses the L_aux subset, as a CPU int64 tensor (checkpointers take tensors)."""
        return torch.tensor(self._aux_step, dtype=torch.int64)

    def set_extra_state(self, state) -> None:
        self._aux_step = int(state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        own_format = version is not None and version >= 4
        present = prefix + "weight" in state_dict or prefix + "running_mean" in state_dict
        if present and (version is None or version < 5):  # written before the layer kept its L_aux step
            state_dict.setdefault(prefix + EXTRA_STATE_KEY, torch.zeros((), dtype=torch.int64))
        if not own_format and present:  # a file of another (BN-type) layer, or of EvalNorm before versioning
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
        out = empty_output(x, self.weight, self.bias)
        if with_aux:
            self._record_aux((self.alpha_hat.float() + self.beta_hat.float()) * 0.0)
        elif torch.is_grad_enabled() and self.alpha_hat.requires_grad:
            out = out + ((self.alpha_hat + self.beta_hat) * 0.0).to(x.dtype)
        return out

    def _wants_aux(self) -> bool:
        return self.learn and torch.is_grad_enabled() and (self.alpha_hat.requires_grad or self.beta_hat.requires_grad)

    def _exponential_average_factor(self) -> float:
        if self.momentum is None:  # cumulative average, as torch; 0 batches tracked: the next is the first
            return 1.0 / max(1.0, float(self.num_batches_tracked))
        return self.momentum

    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
        with_aux = self._wants_aux()
        use_sync = self.sync and world_size() > 1
        if x.numel() == 0 and not use_sync:
            return self._empty_output(x, with_aux)
        if with_aux:  # mu_E, sigma2_E before this batch's update: the test sample is never in them
            population = (self.running_mean.detach().float().clone(), self.running_var.detach().float().clone())
        if use_sync:
            out, batch = self._forward_train_sync(x)
            if x.numel() == 0:
                if with_aux:
                    self._record_aux((self.alpha_hat.float() + self.beta_hat.float()) * 0.0)
                return out
        else:
            out = guarded_batch_norm(self, x)  # nn.BatchNorm2d's output, its update when finite
            if self.track_running_stats:
                self._record_batch_size(float(x.shape[0]))
            batch = None
        if not with_aux:
            return out
        sample_moments = per_sample_moments(x.detach())
        if batch is None:
            batch = batch_moments_from_samples(*sample_moments)
        alpha, beta = self._learned_ab()  # L_aux trains alpha_hat, beta_hat whatever the eval mode
        loss = aux_loss(x.detach(), sample_moments, batch, population, alpha, beta, self.eps, self.aux_samples, self._aux_step)
        self._aux_step += 1
        self._record_aux(loss)
        watch_learning_layer(self)
        if self._aux_use is not None:
            self._check_aux_use(out, loss)
        return out

    def _check_aux_use(self, out: torch.Tensor, loss: torch.Tensor) -> None:
        """Warn if the previous step back-propagated this layer's output but not its L_aux; then
        watch this step's (tensor hooks that only set a flag)."""
        used = self._aux_use
        if used.get("aux"):
            self._aux_use = None  # L_aux reaches alpha_hat, beta_hat: nothing more to check
            return
        if used.get("output"):
            warnings.warn(
                "EvalNorm2d: the last training step back-propagated this layer's output but not its "
                "auxiliary loss (layer.aux_loss), so alpha_hat and beta_hat are not learned (EvalNorm "
                "eq. 9). Add the layers' aux_loss to the loss (d2_bnstats.layers.evalnorm_aux."
                "attach_aux_loss_hook(model) adds it to a model's dict of losses), or build the layers "
                "with learn=False",
                RuntimeWarning,
                stacklevel=3,
            )
            self._aux_use = None
            return
        flags = {}
        self._aux_use = flags
        if out.requires_grad:
            out.register_hook(lambda grad: flags.__setitem__("output", True))
        if loss.requires_grad:
            loss.register_hook(lambda grad: flags.__setitem__("aux", True))

    def _forward_train_sync(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """BN of the global batch (a collective: every process calls it, also with an empty ``x``):
        the output and the global (mean, biased variance) it normalised with, detached."""
        moments = global_moments(x, sync=True)
        scale = torch.rsqrt(moments.var + self.eps)
        shift = -moments.mean * scale
        if self.affine:
            scale = scale * self.weight.float()
            shift = shift * self.weight.float() + self.bias.float()
        out = x * scale.to(x.dtype).reshape(1, -1, 1, 1) + shift.to(x.dtype).reshape(1, -1, 1, 1)
        if self.track_running_stats:
            update_running_stats(self, moments.count, moments.mean, unbiased_variance(moments))
            self._record_global_batch_size(moments.count, x.shape[2] * x.shape[3])
        return out, (moments.mean.detach(), moments.var.detach())

    def _record_batch_size(self, b: float) -> None:
        """Running average of B (the first batch is taken as is); no host-device transfer."""
        f = self._exponential_average_factor()
        with torch.no_grad():
            buf = self.norm_batch_size
            buf.copy_(torch.where(buf > 0, buf * (1.0 - f) + f * b, torch.full_like(buf, b)))

    def _record_global_batch_size(self, count: torch.Tensor, hw: int) -> None:
        """B = global count / (H W): the inverse weight of one sample in the global mean; an empty
        global batch records nothing."""
        if hw == 0:
            return
        f = self._exponential_average_factor()
        with torch.no_grad():
            buf = self.norm_batch_size
            b = count.to(buf.dtype) / hw
            buf.copy_(torch.where(count > 0, torch.where(buf > 0, buf + f * (b - buf), b), buf))

    def _learned_ab(self):
        return unit_interval(self.alpha_hat), unit_interval(self.beta_hat)

    def _aux_subset(self, x: torch.Tensor):
        """The values the next training forward computes L_aux on (``aux_subset`` of evalnorm_math)."""
        return aux_subset(x, self.aux_samples, self._aux_step)

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
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (self.affine and (self.weight.requires_grad or self.bias.requires_grad))
        )
        # without gradient, learned alpha, beta of a CPU layer as Python floats: reading them costs less
        # than the kernels of their tensor form, and 0, 0 then takes BN inference below. Not while a
        # graph is recorded, which would keep them as constants.
        alpha, beta = self._alpha_beta(detach=True, on_host=not needs_grad and not recording_graph())
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
        mean_e, var_e = as_dtype(self.running_mean, cdt), as_dtype(self.running_var, cdt)
        if not needs_grad:
            # off CPU: statistics and output in one shifted copy; on CPU per_sample_moments avoids the copy
            if not x.is_cpu and x.dtype == cdt and x.is_contiguous() and not exporting_to_onnx():
                return self._eval_in_shifted_copy(x, mean_e, var_e, alpha, beta)
            mean_i, var_i = per_sample_moments(x, self._variance_floor(var_e, beta))
            mu_hat, var_hat = evalnorm_moments(mean_i, var_i, mean_e, var_e, alpha, beta)
            if x.is_contiguous():
                # one fused pass: BN inference of the (1, N*C, H, W) view with per-sample statistics
                weight = bias = None
                if self.affine:
                    weight, bias = as_dtype(self.weight, cdt), as_dtype(self.bias, cdt)
                    if n > 1:  # gamma, beta of each (sample, channel); one sample takes them as they are
                        weight, bias = weight.expand(n, c).reshape(-1), bias.expand(n, c).reshape(-1)
                out = torch.batch_norm(
                    x.view(1, n * c, h, w), weight, bias, mu_hat.view(-1), var_hat.view(-1), False, 0.0, self.eps,
                    torch.backends.cudnn.enabled,
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

    @staticmethod
    def _variance_floor(var_e: torch.Tensor, beta: Number):
        """How precisely sigma2_hat needs sigma2_i (``per_sample_moments``' ``var_floor``): an error e in
        sigma2_i is an error beta·e in sigma2_hat >= beta·sigma2_i + (1 − beta)·sigma2_E, so relative to
        sigma2_hat it is at most e / (sigma2_i + floor) with floor = (1 − beta)/beta · sigma2_E. With a
        small beta (learned values, 1/B² in the heads) the plain sums then suffice for maps whose mean
        is far from 0 in units of their own spread, instead of recomputing them with shifted sums."""
        if isinstance(beta, torch.Tensor) or beta >= 1.0:
            return None
        return math.inf if beta <= 0.0 else var_e * ((1.0 - beta) / beta)

    def _eval_in_shifted_copy(
        self, x: torch.Tensor, mean_e: torch.Tensor, var_e: torch.Tensor, alpha: Number, beta: Number
    ) -> torch.Tensor:
        """The inference output without gradient for a contiguous float32/float64 ``x``, written into the
        shifted copy d = x − s the per-sample statistics are reduced from
        (:func:`~d2_bnstats.layers.moments.shifted_sample_moments`): y = d·a + b per sample and channel,
        a = γ / sqrt(sigma2_hat + eps), b = β − (mu_hat − s)·a, by two passes in place. One tensor of
        x's size is created (the output) instead of two, and the mean enters only as mu_hat − s, of
        the order of the map's standard deviation (eqs. 7-8 are shift-invariant in the means)."""
        n, c, h, w = x.shape
        shift, out, m, var_i = shifted_sample_moments(x)
        mu_shifted, var_hat = evalnorm_moments(m, var_i, mean_e - shift, var_e, alpha, beta)
        scale = torch.rsqrt(var_hat.add_(self.eps))
        if self.affine:
            scale.mul_(self.weight.to(x.dtype))
        offset = mu_shifted.mul_(scale).neg_()
        if self.affine:
            offset.add_(self.bias.to(x.dtype))
        out.mul_(scale.unsqueeze(2)).add_(offset.unsqueeze(2))
        return out.view(n, c, h, w)


# ----------------------------------------------------------------------------------------------
# Model-level helpers
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
