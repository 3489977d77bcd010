"""Moving Average Batch Normalization (MABN) and weight-centralised convolutions.

Yan et al., "Towards Stabilizing Batch Statistics in Backward Propagation of Batch Normalization",
ICLR 2020 (MABN). Batch normalisation uses two batch statistics in the forward pass (mean, variance)
and two in the backward pass (g_B = mean of the output gradient, Ψ_B = mean of gradient × normalised
input); at 1-2 images per GPU all four are noisy. MABN (paper §4) removes the means and replaces the
two remaining statistics by simple moving averages (SMA) over the last ``m`` optimiser steps.

For channel c and optimiser step t (counted from 1), with x the layer input and n = N·H·W:

    χ²_t   = mean over (N, H, W) of x²                     (no mean centring; §4.2)
    S_t    = (χ²_{t-m+1} + ... + χ²_{t-1} + χ²_t) / m       once t > max(m, warmup), else χ²_t
    z      = x / sqrt(S_t + ε)
    r      = clip(sqrt(S_t + ε) / sqrt(R + ε), 1/c, c)     once t > max(renorm_start, warmup), else 1
    y      = γ r z + b
    R      ← ρ R + (1 − ρ) S_t                              after the step; ρ = ``decay`` = 0.98
                                                            weights the OLD value, R starts at 1

Backward (the custom autograd function; g_B is dropped, Ψ is averaged like χ²; §4.1):

    g      = dL/dy · γ r
    Ψ_t    = mean over (N, H, W) of g z
    Ψ̄_t    = SMA of Ψ exactly as S_t is of χ²
    dL/dx  = (g − z Ψ̄_t) / sqrt(S_t + ε)

With m = 1, no warmup and r = 1 this is exactly the gradient of batch RMS normalisation. Inference is
y = γ x / sqrt(R + ε) + b, i.e. FrozenBN with mean 0 and variance R: :class:`MABN2d` keeps R in
``running_var`` and zeros in ``running_mean`` and evaluates with the same fused call as detectron2's
``FrozenBatchNorm2d``, so ``FREEZE_AT`` conversion to FrozenBN reproduces MABN inference exactly.
Dropping the mean is harmless because the convolutions feeding MABN are weight-centralised
(:class:`WeightCentralizedConv2d`): each output filter's weights minus their mean (§4.2).

Differences from the authors' code (github.com/megvii-model/MABN), each deliberate:

* The step t is the number of *optimiser steps* (not forward calls). A layer records a call's χ² and
  Ψ when that call's backward runs, into per-step accumulators; at the end of the optimiser step
  (torch's global ``register_optimizer_step_post_hook``, see :func:`end_step`) the count-weighted
  mean of the step's calls becomes one ring-buffer entry, R is updated and t advances. Hence:
  gradient accumulation (k micro-batches → one entry: the exact χ²/Ψ of the union), shared heads
  (one entry per step over all calls), activation recomputation (a recomputed forward sees the same
  buffers and gives the same output; only the call whose backward runs is recorded, for reentrant
  and non-reentrant checkpointing alike) and training-mode forwards without backward (PreciseBN
  passes, no_grad forwards) leave the buffers alone. Every call of a step uses the m − 1 previous
  steps' entries plus its own χ² (and Ψ), so a call never depends on another call of the same step.
* An empty input (0 RoIs) returns an empty output, gives zero gradients to γ and b, and records
  nothing: buffers, R and t are untouched. A step's entry that is not finite (e.g. an overflowing
  fp16 step) is replaced by the previous entry instead of poisoning the SMA and R forever.
* No host synchronisation: t is a Python integer mirrored in the ``num_batches_tracked`` buffer, so
  the schedule never reads a tensor on the host; all statistics stay on the device.
* Any per-process batch size (1, odd) and any spatial size; statistics in float32 (float64 inputs
  in float64).
* ``sync=True`` sums χ² and Ψ over processes (``layers.sync.all_reduce_sum``): the statistics of the
  global batch, identical to one process normalising the concatenated batch.
* Checkpoints hold the ring buffers, the per-step accumulators, R and t: a resumed run continues
  exactly. Loading an ordinary BN/FrozenBN state maps its statistics (:func:`bn_to_mabn_parameters`).
"""
import logging
import weakref
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch import nn
from torch.autograd.function import once_differentiable

from .sync import all_reduce_sum, world_size

__all__ = [
    "MABN2d",
    "WeightCentralizedConv2d",
    "bn_to_mabn_parameters",
    "centralize_weight",
    "end_step",
    "set_optimizer_step_hook",
]

logger = logging.getLogger(__name__)

# Layers that recorded statistics (a backward ran) since the last end of an optimiser step.
_PENDING: "weakref.WeakSet[MABN2d]" = weakref.WeakSet()
_HOOK = {"handle": None, "enabled": True}
_BN_LOAD_WARNED = [False]


def end_step() -> None:
    """End the current optimiser step for every MABN layer that recorded statistics in it.

    torch's global optimizer step post-hook calls this after every ``optimizer.step()`` of any
    ``torch.optim.Optimizer`` (registered when the first :class:`MABN2d` is built). Call it yourself
    after each update only in a loop that does not step a torch optimizer, after
    ``set_optimizer_step_hook(False)``. Layers that recorded nothing in the step are left alone.
    """
    layers = list(_PENDING)
    _PENDING.clear()
    for layer in layers:
        layer._end_step()


def _optimizer_step_post_hook(optimizer, args, kwargs) -> None:
    end_step()


def set_optimizer_step_hook(enabled: bool) -> None:
    """Install (default) or remove the global optimizer step hook that calls :func:`end_step`."""
    _HOOK["enabled"] = bool(enabled)
    if enabled:
        _ensure_optimizer_step_hook()
    elif _HOOK["handle"] is not None:
        _HOOK["handle"].remove()
        _HOOK["handle"] = None


def _ensure_optimizer_step_hook() -> None:
    if _HOOK["enabled"] and _HOOK["handle"] is None:
        _HOOK["handle"] = register_optimizer_step_post_hook(_optimizer_step_post_hook)


# ---------------------------------------------------------------------------------------------
# per-channel reductions and affine maps on NCHW tensors


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_sums(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Σ a·b, Σ a) per channel over (N, H, W), in float32 (float64 for float64 inputs).

    For float32/float64 inputs this is one fused pass: aten's batch-norm backward with saved mean
    0 and inverse std 1 returns exactly these two sums as its weight and bias gradients.
    """
    c = a.shape[1]
    dtype = _acc_dtype(a.dtype)
    if a.numel() == 0:
        zeros = a.new_zeros(c, dtype=dtype)
        return zeros, zeros.clone()
    if a.dtype == b.dtype == dtype:
        ones, zeros = a.new_ones(c), a.new_zeros(c)
        _, sab, sa = torch.ops.aten.native_batch_norm_backward(
            a, b, ones, None, None, zeros, ones, True, 0.0, [False, True, True]
        )
        return sab, sa
    dims = [0] + list(range(2, a.dim()))
    a32, b32 = a.to(dtype), b.to(dtype)
    return (a32 * b32).sum(dims), a32.sum(dims)


def _channel_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    shape = [1] * like.dim()
    shape[1] = -1
    return v.reshape(shape)


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x · scale + shift per channel (one fused pass for float32/float64)."""
    if x.dtype == scale.dtype == shift.dtype and x.dtype in (torch.float32, torch.float64) and x.numel() > 0:
        ones, zeros = scale.new_ones(scale.shape), scale.new_zeros(scale.shape)
        return F.batch_norm(x, zeros, ones, scale, shift, False, 0.0, 0.0)
    return x * _channel_view(scale, x).to(x.dtype) + _channel_view(shift, x).to(x.dtype)


# ---------------------------------------------------------------------------------------------


class _MABNFunction(torch.autograd.Function):
    """Training-mode MABN: forward with SMA(χ²) and renormalisation, backward with SMA(Ψ)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, replace_running_stats=False):
        c = x.shape[1]
        n = x.numel() // c if c else 0
        dtype = _acc_dtype(x.dtype)
        t = layer._steps + 1
        m = layer.buffer_size
        slot = (t - 1) % m
        use_sma = t > max(m, layer.warmup_iters)
        renorm = t > max(layer.renorm_start, layer.warmup_iters)
        sync = layer.sync and world_size() > 1

        sum_sq, _ = _channel_sums(x, x)
        if sync:
            packed = torch.cat([sum_sq, sum_sq.new_full((1,), float(n))])
            all_reduce_sum([packed])
            sum_sq, count = packed[:c], packed[c]
            chi2 = sum_sq / count.clamp(min=1.0)
        else:  # the caller handles empty inputs without sync
            count = float(n)
            chi2 = sum_sq / n
        if replace_running_stats:  # see MABN2d.forward: R = χ² (Bessel-inflated), mean 0
            total = count if sync else torch.tensor(float(n), dtype=dtype, device=x.device)
            bessel = torch.where(total > 1, total / (total - 1).clamp(min=1.0), torch.ones_like(total))
            keep = total > 0
            layer.running_var.copy_(torch.where(keep, chi2 * bessel, layer.running_var))
            layer.running_mean.zero_()
        chi2_buffer = layer.chi2_buffer.to(dtype)
        sma = (chi2_buffer.sum(0) - chi2_buffer[slot] + chi2) / m if use_sma else chi2
        var_eps = sma + layer.eps
        inv_std = var_eps.rsqrt()
        if renorm:
            clip = layer.renorm_clip
            r = (var_eps / (layer.running_var.to(dtype) + layer.eps)).sqrt().clamp(1.0 / clip, clip)
            r_inv_std = r * inv_std
        else:
            r_inv_std = inv_std
        scale = weight.to(dtype) * r_inv_std
        y = _affine(x, scale, bias.to(dtype))

        ctx.save_for_backward(x, scale, r_inv_std, inv_std)
        ctx.layer, ctx.chi2, ctx.count, ctx.n = layer, chi2, count, n
        ctx.sync, ctx.use_sma, ctx.slot = sync, use_sma, slot
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, bias.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, scale, r_inv_std, inv_std = ctx.saved_tensors
        layer = ctx.layer
        m = layer.buffer_size
        sum_dyx, sum_dy = _channel_sums(dy, x)
        psi_sum = scale * sum_dyx  # Σ g·z with g = dy·γ·r, z = x / sqrt(S + ε)
        if ctx.sync:
            all_reduce_sum([psi_sum])
            psi = psi_sum / ctx.count.clamp(min=1.0)
        else:
            psi = psi_sum / ctx.n
        if ctx.use_sma:
            psi_buffer = layer.psi_buffer.to(psi.dtype)
            psi_bar = (psi_buffer.sum(0) - psi_buffer[ctx.slot] + psi) / m
        else:
            psi_bar = psi
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # (g − z Ψ̄) / sqrt(S + ε) = dy · γ r / sqrt(S + ε) − x · Ψ̄ / (S + ε)
            dx = dy * _channel_view(scale, dy).to(dy.dtype)
            dx.addcmul_(x, _channel_view(-(inv_std * inv_std * psi_bar), x).to(dy.dtype))
        if ctx.needs_input_grad[1]:
            dw = (r_inv_std * sum_dyx).to(ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            db = sum_dy.to(ctx.bias_dtype)
        layer._record(ctx.chi2, psi, ctx.count)
        return dx, dw, db, None, None


class MABN2d(nn.BatchNorm2d):
    """Moving Average Batch Normalization for NCHW inputs (see the module docstring for the maths).

    Args:
        num_features: channels C.
        eps: ε added to the second moment.
        decay: ρ in R ← ρ R + (1 − ρ) S_t, the weight of the OLD value (the authors' "momentum" 0.98).
            ``momentum`` is kept in torch's convention (weight of the new value) as ``1 − decay``;
            setting either changes the other. Setting momentum 0 freezes R.
        buffer_size: m, the number of optimiser steps averaged (the authors' real_B / B: 32 / 2 = 16).
        warmup_iters: for the first max(m, warmup_iters) steps χ²_t and Ψ_t of the current step are
            used instead of their SMA.
        renorm_start: r = 1 for the first max(renorm_start, warmup_iters) steps, then clipped to
            [1/renorm_clip, renorm_clip].
        renorm_clip: c ≥ 1 above.
        sync: sum χ² and Ψ over all processes (global-batch statistics); every process must then
            call the layer (and its backward) equally often, also with an empty input.

    Buffers (all in the checkpoint): ``running_var`` = R (the running SECOND MOMENT, not a variance),
    ``running_mean`` = 0 (always), ``num_batches_tracked`` = t (optimiser steps recorded),
    ``chi2_buffer``/``psi_buffer`` [m, C] ring buffers (entry of step t in row (t − 1) mod m),
    ``pending_chi2``/``pending_psi``/``pending_count``: the current step's count-weighted sums.

    detectron2's PreciseBN hook (fvcore ``update_bn_stats``) sets momentum 1 and runs training-mode
    forwards under ``no_grad``; in exactly that situation a forward stores its input's second moment
    (times n/(n−1), as fvcore reads ``running_var`` as an unbiased variance) so that the hook leaves
    R = the population second moment E[x²] (the population-statistics protocol's var + mean²).
    Otherwise a forward never changes state.

    Modes: ``train()`` as above; ``eval()`` → γ x / sqrt(R + ε) + b (FrozenBN's fused call);
    ``eval()`` with ``track_running_stats = False`` → the input batch's own second moment
    (batch statistics at test); ``train()`` with ``track_running_stats = False`` leaves R alone.
    """

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
        _ensure_optimizer_step_hook()

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
        """t: the number of optimiser steps whose statistics this layer recorded."""
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
            for name in ("chi2_buffer", "psi_buffer", "pending_chi2", "pending_psi", "pending_count"):
                getattr(self, name).zero_()
            self._steps = 0
            self._has_pending = False
            _PENDING.discard(self)

    # -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            if self.track_running_stats:
                # identical to FrozenBatchNorm2d: FrozenBN with mean 0 and variance R
                return F.batch_norm(
                    x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
                )
            return self._batch_statistics_forward(x)
        if x.numel() == 0 and not (self.sync and world_size() > 1):
            # nothing to normalise: empty output, zero gradients for γ and b, no state change
            return x * _channel_view(self.weight, x) + _channel_view(self.bias, x)
        # PreciseBN as fvcore/detectron2 implement it: under no_grad with momentum = 1 ("replace"),
        # each training-mode forward stores the batch statistics, read back as an UNBIASED variance
        replace = self.decay == 0.0 and self.track_running_stats and not torch.is_grad_enabled()
        return _MABNFunction.apply(x, self.weight, self.bias, self, replace)

    def _batch_statistics_forward(self, x: torch.Tensor) -> torch.Tensor:
        """γ x / sqrt(χ²_B + ε) + b with the input's own second moment (differentiable)."""
        dims = [0] + list(range(2, x.dim()))
        chi2 = x.to(_acc_dtype(x.dtype)).pow(2).mean(dims) if x.numel() else x.new_zeros(x.shape[1])
        scale = self.weight * (chi2 + self.eps).rsqrt()
        return x * _channel_view(scale, x).to(x.dtype) + _channel_view(self.bias, x).to(x.dtype)

    # -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _record(self, chi2: torch.Tensor, psi: torch.Tensor, count) -> None:
        """Add one call's statistics (weighted by its number of values) to the current step."""
        self.pending_chi2.add_((chi2 * count).to(self.pending_chi2.dtype))
        self.pending_psi.add_((psi * count).to(self.pending_psi.dtype))
        self.pending_count.add_(count)
        self._has_pending = True
        _PENDING.add(self)

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
        _PENDING.discard(self)

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
        if self.__dict__.get("_has_pending"):
            _PENDING.add(self)

    # -----------------------------------------------------------------------------------------
    _MABN_KEYS = ("chi2_buffer", "psi_buffer", "pending_chi2", "pending_psi", "pending_count")

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        present = [k for k in self._MABN_KEYS if prefix + k in state_dict]
        ring_ok = all(
            prefix + k in state_dict and state_dict[prefix + k].shape == getattr(self, k).shape
            for k in ("chi2_buffer", "psi_buffer")
        )
        bn_format = not present and prefix + "weight" in state_dict
        if bn_format:
            _map_bn_state(self, state_dict, prefix)
        elif present and not ring_ok:
            for k in ("chi2_buffer", "psi_buffer"):
                if prefix + k in state_dict and state_dict[prefix + k].shape != getattr(self, k).shape:
                    del state_dict[prefix + k]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if bn_format:
            for k in self._MABN_KEYS:
                if prefix + k in missing_keys:
                    missing_keys.remove(prefix + k)
            with torch.no_grad():
                for k in self._MABN_KEYS:
                    getattr(self, k).zero_()
                self.num_batches_tracked.zero_()
        elif present and not ring_ok:
            for k in ("chi2_buffer", "psi_buffer"):
                if prefix + k in missing_keys:
                    missing_keys.remove(prefix + k)
            logger.warning(
                "%s: the checkpoint's MABN ring buffers do not fit buffer_size=%d (or are missing); "
                "starting them empty and restarting the schedule (warmup, renormalisation) at step 0",
                prefix.rstrip(".") or "MABN2d", self.buffer_size,
            )
            with torch.no_grad():
                for k in self._MABN_KEYS:
                    getattr(self, k).zero_()
                self.num_batches_tracked.zero_()
        self._steps = int(self.num_batches_tracked)
        self._has_pending = bool(self.pending_count.item() > 0)
        if self._has_pending:
            _PENDING.add(self)
        else:
            _PENDING.discard(self)


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


# ---------------------------------------------------------------------------------------------
# from ordinary BN statistics to MABN's state


def bn_to_mabn_parameters(
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float = 1e-5,
    removed_mean: Optional[torch.Tensor] = None,
    second_moment: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(γ', b', R) of an MABN layer that reproduces a BN layer (γ, β, μ, σ²) at inference.

    BN computes y = a (u − μ) + β with a = γ / sqrt(σ² + ε) on its input u. MABN sees u' instead:
    the output of the weight-centralised conv, u' = u − d on average, where ``removed_mean`` d is
    the mean that centralisation removes (per channel; 0 if unknown or without centralisation).
    Choosing

        R  = E[u'²]                   (``second_moment`` if measured, else σ² + (μ − d)²)
        γ' = a sqrt(R + ε),   b' = β − a (μ − d)

    gives MABN inference γ' u' / sqrt(R + ε) + b' = a (u' + d − μ) + β, equal to BN whenever
    u' = u − d, and makes training-mode normalisation by the batch second moment (≈ R) start at the
    same scale. Returns float tensors shaped like ``weight``.
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    w, b = weight.to(dtype), bias.to(dtype)
    mu, v = mean.to(dtype), var.to(dtype)
    if removed_mean is not None:
        mu = mu - removed_mean.to(dtype)
    a = w / (v + eps).sqrt()
    r = second_moment.to(dtype) if second_moment is not None else v + mu * mu
    return a * (r + eps).sqrt(), b - a * mu, r


def _map_bn_state(layer: MABN2d, state_dict, prefix: str) -> None:
    """Rewrite a BN/FrozenBN state (in place, this layer's keys only) into MABN's parameters."""
    weight = state_dict[prefix + "weight"]
    c = weight.shape[0] if weight.dim() == 1 else None
    if c != layer.num_features:
        return  # let the normal loading report the shape mismatch
    bias = state_dict.get(prefix + "bias", torch.zeros_like(weight))
    mean = state_dict.get(prefix + "running_mean", torch.zeros_like(weight))
    var = state_dict.get(prefix + "running_var", torch.ones_like(weight))
    w, b, r = bn_to_mabn_parameters(weight, bias, mean, var, layer.eps)
    state_dict[prefix + "weight"] = w.to(weight.dtype)
    state_dict[prefix + "bias"] = b.to(weight.dtype)
    state_dict[prefix + "running_mean"] = torch.zeros_like(r)
    state_dict[prefix + "running_var"] = r
    state_dict[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    level = logging.INFO if _BN_LOAD_WARNED[0] else logging.WARNING
    _BN_LOAD_WARNED[0] = True
    logger.log(
        level,
        "%s: loading an ordinary BN/FrozenBN state into MABN: mapped its statistics to MABN's "
        "(R = var + mean², gamma and bias rescaled; exact at inference up to weight centralisation). "
        "Statistics-free weights (e.g. detectron2's MSRA .pkl) get R = 1; for a conversion calibrated "
        "on data use tools/convert_to_mabn.py.",
        prefix.rstrip(".") or "MABN2d",
    )


# ---------------------------------------------------------------------------------------------
# weight centralisation (§4.2)


def centralize_weight(weight: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Each output filter minus ``alpha`` × its mean over (input channels, kernel positions)."""
    dims = tuple(range(1, weight.dim()))
    mean = weight.mean(dim=dims, keepdim=True)
    return weight - mean if alpha == 1.0 else weight - alpha * mean


class WeightCentralizedConv2d(nn.Conv2d):
    """A conv whose forward uses :func:`centralize_weight` of its weight (gradients flow through it).

    Not built directly: the conv instances that feed MABN layers get this class (or a subclass that
    also derives from the conv's own class) assigned, which keeps every parameter and checkpoint key
    unchanged. After the conv it applies ``self.norm`` and ``self.activation`` when the instance has
    them (detectron2's ``Conv2d``); for a plain ``nn.Conv2d`` it is just the conv.

    Optional ramp (for fine-tuning weights that were trained without centralisation): with
    ``wc_ramp_iters = K > 0`` on the instance, the forward subtracts α × the filter mean with
    α = min(1, t / K), t being the step count of the MABN layer the conv feeds (``self.norm``, or the
    layer given to :meth:`link_mabn`). At t = 0 the conv is the original one.
    """

    wc_ramp_iters = 0  # default: fully centralised from the start (the authors' method)

    def link_mabn(self, layer: "MABN2d") -> None:
        """The MABN layer whose step count drives the ramp when it is not ``self.norm`` (a plain
        attribute holding a tuple: not a submodule, so no checkpoint key; deep copies follow it)."""
        self.__dict__["_wc_mabn"] = (layer,)

    def centralization_factor(self) -> float:
        """α: 1 without a ramp, else min(1, t / wc_ramp_iters) (a host-side number, no sync)."""
        ramp = self.wc_ramp_iters
        if ramp <= 0:
            return 1.0
        layer = getattr(self, "norm", None)
        if not isinstance(layer, MABN2d):
            linked = self.__dict__.get("_wc_mabn")
            layer = linked[0] if linked else None
        if layer is None:
            return 1.0
        return min(1.0, layer.steps / ramp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._conv_forward(x, centralize_weight(self.weight, self.centralization_factor()), self.bias)
        norm = getattr(self, "norm", None)
        if norm is not None:
            x = norm(x)
        activation = getattr(self, "activation", None)
        if activation is not None:
            x = activation(x)
        return x


@torch.no_grad()
def centralize_weight_(conv: nn.Conv2d) -> None:
    """Centralise a conv's stored weight in place (no change to a weight-centralised conv's output)."""
    conv.weight.copy_(centralize_weight(conv.weight))
