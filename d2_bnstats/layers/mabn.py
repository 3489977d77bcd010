"""Moving Average Batch Normalization (MABN): the layer and its state.

Yan et al., "Towards Stabilizing Batch Statistics in Backward Propagation of Batch Normalization",
ICLR 2020 (MABN). Batch normalization uses two batch statistics in the forward pass (mean, variance)
and two in the backward pass (g_B = mean of the output gradient, Ψ_B = mean of gradient × normalized
input); at 1-2 images per GPU all four are noisy. MABN (paper §4) removes the means and replaces the
two remaining statistics by simple moving averages (SMA) over the last ``m`` optimizer steps.

For channel c and optimizer step t (counted from 1), with x the layer input and n = N·H·W:

    χ²_t   = mean over (N, H, W) of x²                     (no mean centring; §4.2)
    S_t    = (χ²_{t-m+1} + ... + χ²_{t-1} + χ²_t) / m       once t > max(m, warmup), else χ²_t
    z      = x / sqrt(S_t + ε)
    r      = clip(sqrt(S_t + ε) / sqrt(R + ε), 1/c, c)     once t > max(renorm_start, warmup), else 1
    y      = γ r z + b
    R      ← ρ R + (1 − ρ) S_t                              after the step; ρ = ``decay`` = 0.98
                                                            weights the OLD value, R starts at 1

Backward (:class:`~d2_bnstats.layers.mabn_autograd.MABNFunction`; g_B is dropped, Ψ is averaged
like χ²; §4.1):

    g      = dL/dy · γ r
    Ψ_t    = mean over (N, H, W) of g z
    Ψ̄_t    = SMA of Ψ exactly as S_t is of χ²
    dL/dx  = (g − z Ψ̄_t) / sqrt(S_t + ε)

With m = 1, no warmup and r = 1 this is exactly the gradient of batch RMS normalization. Inference is
y = γ x / sqrt(R + ε) + b, i.e. a frozen BN with mean 0 and variance R: :class:`MABN2d` keeps R in
``running_var`` and zeros in ``running_mean`` and evaluates with the fused ``F.batch_norm`` call of a
frozen BN, so converting it to a frozen BN reproduces MABN inference exactly. Dropping the mean is
harmless because the convolutions feeding MABN are weight-centralized
(:mod:`d2_bnstats.layers.weight_centralization`): each output filter minus its mean (§4.2).

Differences from the authors' code (github.com/megvii-model/MABN), each deliberate:

* The step t is the number of *optimizer steps* (not forward calls). A layer records a call's χ² and
  Ψ when that call's backward runs, into per-step accumulators; when the optimizer step ends
  (:mod:`d2_bnstats.layers.mabn_step`: after the step of the optimizer that holds the layer's
  parameters, by a per-model optimizer-step hook, or :func:`end_step`) the
  count-weighted mean of the step's calls becomes one ring-buffer entry, R is updated and t
  advances. Hence: gradient accumulation (k micro-batches → one entry: the exact χ²/Ψ of the union),
  shared heads (one entry per step over all calls), activation recomputation (a recomputed forward
  sees the same buffers and gives the same output; only the call whose backward runs is recorded,
  for reentrant and non-reentrant checkpointing alike) and training-mode forwards without backward
  (PreciseBN passes, no_grad forwards) leave the buffers alone. Every call of a step uses the m − 1
  previous steps' entries plus its own χ² (and Ψ), so a call never depends on another call of the
  same step.
* An empty input (0 RoIs) returns an empty output, gives zero gradients to γ and b, and records
  nothing: buffers, R and t are untouched. A step's entry that is not finite (e.g. an overflowing
  fp16 step) is replaced by the previous entry instead of poisoning the SMA and R forever, and the
  step is counted in ``nonfinite_skips`` (the counter every statistics layer of the package keeps,
  :func:`d2_bnstats.layers.moments.count_skips`). This is MABN's own guard, not the shared
  ``commit_running_stats``: the ring buffers keep the previous entry per channel and t advances
  (t is the step schedule, not a count of updates).
* No host synchronization: t is a Python integer mirrored in the ``num_batches_tracked`` buffer, so
  the schedule never reads a tensor on the host; all statistics stay on the device.
* Any per-process batch size (1, odd) and any spatial size; statistics in float32 (float64 inputs
  in float64).
* ``sync=True`` sums χ² and Ψ over processes (:func:`d2_bnstats.layers.moments.all_reduce_sum`): the
  statistics of the global batch, identical to one process normalizing the concatenated batch.
* Checkpoints hold the ring buffers, the per-step accumulators, R and t: a resumed run continues
  exactly. Loading an ordinary BN/FrozenBN state maps its statistics
  (:mod:`d2_bnstats.layers.mabn_from_bn`); which format a state is in is read from its state-dict
  version (:attr:`MABN2d._version`).
"""
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .mabn_autograd import MABNFunction, accumulation_dtype, channel_view
from .mabn_from_bn import bn_to_mabn_parameters, map_bn_state
from .mabn_step import PENDING_CALLS_WARNING, attach_step_hook, clear_pending, end_step, mark_pending, set_optimizer_step_hook
from .moments import add_skip_counter, count_skips, empty_output, world_size

__all__ = [
    "MABN_BUFFERS",
    "MABN2d",
    "attach_step_hook",
    "bn_to_mabn_parameters",
    "check_options",
    "end_step",
    "set_optimizer_step_hook",
]

logger = logging.getLogger(__name__)

_BN_LOAD_WARNED = [False]
# The buffers MABN2d has beyond nn.BatchNorm2d's (ring buffers and the current step's sums).
MABN_BUFFERS = ("chi2_buffer", "psi_buffer", "pending_chi2", "pending_psi", "pending_count")


class MABN2d(nn.BatchNorm2d):
    """Moving Average Batch Normalization for NCHW inputs (see the module docstring for the maths).

    Args:
        num_features: channels C.
        eps: ε added to the second moment.
        decay: ρ in R ← ρ R + (1 − ρ) S_t, the weight of the OLD value (the authors' "momentum" 0.98).
            ``momentum`` is kept in torch's convention (weight of the new value) as ``1 − decay``;
            setting either changes the other. Setting momentum 0 freezes R.
        buffer_size: m, the number of optimizer steps averaged (the authors' real_B / B: 32 / 2 = 16).
        warmup_iters: for the first max(m, warmup_iters) steps χ²_t and Ψ_t of the current step are
            used instead of their SMA.
        renorm_start: r = 1 for the first max(renorm_start, warmup_iters) steps, then clipped to
            [1/renorm_clip, renorm_clip].
        renorm_clip: c ≥ 1 above.
        sync: sum χ² and Ψ over all processes (global-batch statistics); every process must then
            call the layer (and its backward) equally often, also with an empty input.

    Steps end after the ``step()`` of any torch optimizer that holds the layer's parameters (also
    for copies of the layer and in plain PyTorch loops), by a hook attached to the model
    (:func:`attach_step_hook`) or by :func:`end_step` (:mod:`d2_bnstats.layers.mabn_step`);
    constructing the layer installs nothing.

    Buffers (all in the checkpoint): ``running_var`` = R (the running SECOND MOMENT, not a variance),
    ``running_mean`` = 0 (always), ``num_batches_tracked`` = t (optimizer steps recorded),
    ``chi2_buffer``/``psi_buffer`` [m, C] ring buffers (entry of step t in row (t − 1) mod m),
    ``pending_chi2``/``pending_psi``/``pending_count``: the current step's count-weighted sums.

    PreciseBN as fvcore's ``update_bn_stats`` runs it sets momentum 1 and runs training-mode forwards
    under ``no_grad``; in exactly that situation a forward stores its input's second moment (times
    n/(n−1), as fvcore reads ``running_var`` as an unbiased variance) so that the pass leaves R = the
    population second moment E[x²] (the population-statistics protocol's var + mean²). Otherwise a
    forward never changes state.

    Modes: ``train()`` as above; ``eval()`` → γ x / sqrt(R + ε) + b (a frozen BN's fused call);
    ``eval()`` with ``track_running_stats = False`` → the input batch's own second moment
    (batch statistics at test); ``train()`` with ``track_running_stats = False`` leaves R alone.
    """

    # State-dict format: 3 = this layer's own (ring buffers, accumulators). nn.BatchNorm2d's states
    # are version 2 (or None from older torch or files without metadata).
    _version = 3

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        decay: float = 0.98,
        buffer_size: int = 16,
        warmup_iters: int = 100,
        renorm_start: int = 1000,
        renorm_clip: float = 5.0,
        sync: bool = False,
        device=None,
        dtype=None,
    ):
        check_options(num_features, eps, decay, buffer_size, warmup_iters, renorm_start, renorm_clip)
        super().__init__(num_features, eps=eps, momentum=1.0 - float(decay), device=device, dtype=dtype)
        self.decay = float(decay)  # exact value (the momentum setter above went through 1 - decay)
        self.buffer_size = int(buffer_size)
        self.warmup_iters = int(warmup_iters)
        self.renorm_start = int(renorm_start)
        self.renorm_clip = float(renorm_clip)
        self.sync = bool(sync)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("chi2_buffer", torch.zeros(self.buffer_size, num_features, **factory))
        self.register_buffer("psi_buffer", torch.zeros(self.buffer_size, num_features, **factory))
        self.register_buffer("pending_chi2", torch.zeros(num_features, **factory))
        self.register_buffer("pending_psi", torch.zeros(num_features, **factory))
        self.register_buffer("pending_count", torch.zeros((), **factory))
        self._steps = 0  # t: host-side mirror of num_batches_tracked, so the schedule needs no sync
        self._has_pending = False
        self._pending_calls = 0
        add_skip_counter(self)

    # torch's convention (weight of the new value), derived from ``decay``
    @property
    def momentum(self) -> float:
        return 1.0 - self.decay

    @momentum.setter
    def momentum(self, value) -> None:
        if value is None or not 0.0 <= float(value) <= 1.0:
            raise ValueError(
                f"MABN2d.momentum (torch's convention: weight of the new value, = 1 - decay) must be a "
                f"number in [0, 1]; got {value!r} (a cumulative average, momentum=None, is not supported)"
            )
        self.decay = 1.0 - float(value)

    @property
    def steps(self) -> int:
        """t: the number of optimizer steps whose statistics this layer recorded."""
        return self._steps

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, decay={self.decay}, buffer_size={self.buffer_size}, "
            f"warmup_iters={self.warmup_iters}, renorm_start={self.renorm_start}, "
            f"renorm_clip={self.renorm_clip}, sync={self.sync}, steps={self._steps}"
        )

    def reset_running_stats(self) -> None:
        """R = 1, t = 0, empty ring buffers and accumulators (the state of a fresh layer)."""
        super().reset_running_stats()
        if hasattr(self, "chi2_buffer"):  # not yet during nn.BatchNorm2d.__init__
            for name in MABN_BUFFERS:
                getattr(self, name).zero_()
            self._steps = 0
            self._has_pending = False
            self._pending_calls = 0
            clear_pending(self)

    # -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            if self.track_running_stats:
                # identical to a frozen BN with mean 0 and variance R
                return F.batch_norm(
                    x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
                )
            return self._batch_statistics_forward(x)
        if x.numel() == 0 and not (self.sync and world_size() > 1):
            # nothing to normalize: empty output, zero gradients for γ and b, no state change
            return empty_output(x, self.weight, self.bias)
        # PreciseBN as fvcore implements it: under no_grad with momentum = 1 ("replace"), each
        # training-mode forward stores the batch statistics, read back as an UNBIASED variance
        replace = self.decay == 0.0 and self.track_running_stats and not torch.is_grad_enabled()
        return MABNFunction.apply(x, self.weight, self.bias, self, replace)

    def _batch_statistics_forward(self, x: torch.Tensor) -> torch.Tensor:
        """γ x / sqrt(χ²_B + ε) + b with the input's own second moment (differentiable)."""
        dims = [0] + list(range(2, x.dim()))
        chi2 = x.to(accumulation_dtype(x.dtype)).pow(2).mean(dims) if x.numel() else x.new_zeros(x.shape[1])
        scale = self.weight * (chi2 + self.eps).rsqrt()
        return x * channel_view(scale, x).to(x.dtype) + channel_view(self.bias, x).to(x.dtype)

    # -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _record(self, chi2: torch.Tensor, psi: torch.Tensor, count) -> None:
        """Add one call's statistics (weighted by its number of values) to the current step."""
        self.pending_chi2.add_((chi2 * count).to(self.pending_chi2.dtype))
        self.pending_psi.add_((psi * count).to(self.pending_psi.dtype))
        self.pending_count.add_(count)
        self._has_pending = True
        mark_pending(self)
        self._pending_calls += 1
        if self._pending_calls == PENDING_CALLS_WARNING:
            warnings.warn(
                f"MABN2d: {PENDING_CALLS_WARNING} backward passes since this layer's step last ended: no torch "
                "optimizer holding its parameters has stepped, so its step t, ring buffers and R do not "
                "advance. A loop that updates the parameters itself must call d2_bnstats.layers.end_step() "
                "after each update (or attach_step_hook(model) when the optimizer does not hold the "
                "layer's parameters)",
                RuntimeWarning,
                stacklevel=2,
            )

    @torch.no_grad()
    def _end_step(self) -> None:
        """Turn the current step's accumulated statistics into ring-buffer entries; update R; t += 1."""
        if not self._has_pending:
            return
        m = self.buffer_size
        t = self._steps + 1
        slot, prev = (t - 1) % m, (t - 2) % m
        count = self.pending_count
        valid = count > 0  # False only if every process had an empty input (sync)
        denominator = torch.where(valid, count, torch.ones_like(count))
        chi2 = self.pending_chi2 / denominator
        psi = self.pending_psi / denominator
        chi2_ok = valid & torch.isfinite(chi2)
        psi_ok = valid & torch.isfinite(psi)
        count_skips(self, valid & ~(chi2_ok & psi_ok).all())
        new_chi2 = torch.where(chi2_ok, chi2, self.chi2_buffer[prev])
        new_psi = torch.where(psi_ok, psi, self.psi_buffer[prev])
        self.chi2_buffer[slot] = new_chi2
        self.psi_buffer[slot] = new_psi
        if self.track_running_stats:
            s = self.chi2_buffer.mean(0) if t > max(m, self.warmup_iters) else new_chi2
            updated = self.decay * self.running_var + (1.0 - self.decay) * s
            self.running_var.copy_(torch.where(chi2_ok, updated, self.running_var))
        self.num_batches_tracked.add_(1)
        self._steps = t
        self.pending_chi2.zero_()
        self.pending_psi.zero_()
        self.pending_count.zero_()
        self._has_pending = False
        self._pending_calls = 0
        clear_pending(self)

    @torch.no_grad()
    def set_population_statistics(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """Population-statistics protocol (PreciseBN): R = var + mean² of the layer's input.

        ``mean`` and BIASED ``var`` are per channel over the whole pass; with ``count`` 0 (the layer
        saw no values) R is left unchanged. Ring buffers and t are not touched.
        """
        c = self.num_features
        if mean.shape != (c,) or var.shape != (c,):
            raise ValueError(
                f"set_population_statistics expects per-channel mean and var of shape ({c},); "
                f"got {tuple(mean.shape)} and {tuple(var.shape)}"
            )
        second = var.to(self.running_var) + mean.to(self.running_var) ** 2
        valid = torch.as_tensor(count, device=self.running_var.device) > 0
        self.running_var.copy_(torch.where(valid, second, self.running_var))

    def __setstate__(self, state):  # unpickling and deepcopy: a copy with pending statistics ends its step too
        super().__setstate__(state)
        self.__dict__.setdefault("_pending_calls", 0)  # objects pickled before the counter existed
        if self.__dict__.get("_has_pending"):
            mark_pending(self)

    # -----------------------------------------------------------------------------------------
    # loading a state: this layer's own (version 3), or an older one read by its keys

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        version = local_metadata.get("version", None)
        present = [k for k in MABN_BUFFERS if prefix + k in state_dict]
        # Version 3 is this layer's own format; a state without a version >= 3 (a BN/FrozenBN
        # checkpoint, an MABN state saved before the version existed, a file written without
        # metadata) is MABN's if it holds any MABN buffer, else BN's.
        own_format = (version is not None and version >= 3) or bool(present)
        bn_format = not own_format and prefix + "weight" in state_dict
        if bn_format:
            self._map_bn_state(state_dict, prefix)
        ring_ok = all(
            prefix + k in state_dict and state_dict[prefix + k].shape == getattr(self, k).shape
            for k in ("chi2_buffer", "psi_buffer")
        )
        restart = own_format and present and not ring_ok
        if restart:
            for k in ("chi2_buffer", "psi_buffer"):
                if prefix + k in state_dict and state_dict[prefix + k].shape != getattr(self, k).shape:
                    del state_dict[prefix + k]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if bn_format:
            self._forget_keys(missing_keys, prefix, MABN_BUFFERS)
            self._zero_schedule()
        elif restart:
            self._forget_keys(missing_keys, prefix, ("chi2_buffer", "psi_buffer"))
            logger.warning(
                "%s: the checkpoint's MABN ring buffers do not fit buffer_size=%d (or are missing); "
                "starting them empty and restarting the schedule (warmup, renormalization) at step 0",
                prefix.rstrip(".") or "MABN2d", self.buffer_size,
            )
            self._zero_schedule()
        self._steps = int(self.num_batches_tracked)
        self._has_pending = bool(self.pending_count.item() > 0)
        self._pending_calls = int(self._has_pending)
        if self._has_pending:
            mark_pending(self)
        else:
            clear_pending(self)

    @staticmethod
    def _forget_keys(missing_keys, prefix, names) -> None:
        for k in names:
            if prefix + k in missing_keys:
                missing_keys.remove(prefix + k)

    @torch.no_grad()
    def _zero_schedule(self) -> None:
        for k in MABN_BUFFERS:
            getattr(self, k).zero_()
        self.num_batches_tracked.zero_()

    def _map_bn_state(self, state_dict, prefix: str) -> None:
        if not map_bn_state(state_dict, prefix, self.num_features, self.eps):
            return  # the normal loading reports the shape mismatch
        level = logging.INFO if _BN_LOAD_WARNED[0] else logging.WARNING
        _BN_LOAD_WARNED[0] = True
        logger.log(
            level,
            "%s: loading an ordinary BN/FrozenBN state into MABN: mapped its statistics to MABN's "
            "(R = var + mean², gamma and bias rescaled; exact at inference up to weight centralization). "
            "Statistics-free weights (published without BN statistics) get R = 1; for a conversion calibrated "
            "on data see docs/mabn.md.",
            prefix.rstrip(".") or "MABN2d",
        )


def check_options(num_features, eps, decay, buffer_size, warmup_iters, renorm_start, renorm_clip):
    """ValueError naming every out-of-range MABN2d argument and its accepted range."""
    problems = []
    if not isinstance(num_features, int) or num_features < 1:
        problems.append(f"num_features must be a positive int (got {num_features!r})")
    if not eps > 0:
        problems.append(f"eps must be > 0 (got {eps!r})")
    if not 0.0 <= float(decay) <= 1.0:
        problems.append(f"decay (weight of the OLD value of R) must be in [0, 1] (got {decay!r})")
    if int(buffer_size) != buffer_size or buffer_size < 1:
        problems.append(f"buffer_size (m, steps averaged) must be an int >= 1 (got {buffer_size!r})")
    if int(warmup_iters) != warmup_iters or warmup_iters < 0:
        problems.append(f"warmup_iters must be an int >= 0 (got {warmup_iters!r})")
    if int(renorm_start) != renorm_start or renorm_start < 0:
        problems.append(f"renorm_start must be an int >= 0 (got {renorm_start!r})")
    if not float(renorm_clip) >= 1.0:
        problems.append(f"renorm_clip must be >= 1 (r is clipped to [1/clip, clip]; got {renorm_clip!r})")
    if problems:
        raise ValueError("MABN2d: " + "; ".join(problems))
