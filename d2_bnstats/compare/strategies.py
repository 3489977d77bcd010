"""Inference-statistics strategies: how a trained model's population-statistics layers normalize at
evaluation.

A :class:`Strategy` puts a fresh copy of the checkpoint into its state (``prepare``), optionally wraps
the evaluation forwards (``inference``), chooses the images per test batch (``test_batch_size``) and
says how a training batch's layer input is cut into what it normalizes together at evaluation
(``discrepancy_groups``, for the train–test discrepancy report). The built-in ones:

- EMA: the checkpoint's running statistics (torch's exponential moving average);
- PreciseBN(N): population statistics recomputed over N training images;
- batch statistics at test with k images per test batch;
- EvalNorm learned / 1/B² / 1/B (Singh & Shrivastava, ICCV 2019, sections 3.2-3.4: the sample's own
  moments mixed with the population's, weights α̂, β̂), and EvalNorm offline (α̂, β̂ estimated after
  training, a BN-trained model converted first);
- EvalNorm learned with PreciseBN's population statistics: μ_E, σ²_E of eqs. 7-8 recomputed over N
  training images with the final weights instead of the running averages (a combination neither
  paper evaluates).

Names for specs (``"precise_bn:1000"``) live in :mod:`d2_bnstats.compare.registry`.
"""
import contextlib
import dataclasses
import math
from typing import Dict, List, Optional

import torch
from detectron2.data import build_detection_train_loader
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage
from torch import nn

from .. import batch_statistics, set_evalnorm_mode
from ..d2.evalnorm_offline import convert_to_evalnorm, estimate_evalnorm, refusal_reason
from ..d2.population import PreciseBNRunner, default_precise_bn_loader_factory
from ..layers.evalnorm import evalnorm_layers
from ..layers.population_protocol import population_layers, unwrap


@dataclasses.dataclass
class CompareContext:
    """What strategies see: the config, the loaded model (never modified; strategies get copies),
    the trainer class (data loaders), and the tool's options."""

    cfg: object
    model: nn.Module
    trainer_cls: type
    options: Dict[str, object] = dataclasses.field(default_factory=dict)


def model_has_evalnorm(model: nn.Module) -> bool:
    return bool(evalnorm_layers(unwrap(model)))


def no_population_layers_reason(model: nn.Module, include_frozen: bool) -> Optional[str]:
    """Why a strategy that acts on population-statistics layers has nothing to act on, or None.

    A GN or FrozenBN model would otherwise be evaluated exactly as under EMA and its row would
    suggest a measured equality where nothing was changed."""
    if population_layers(unwrap(model), include_frozen=include_frozen):
        return None
    return ("the model has no layers with population statistics (its norms are GN, FrozenBN or none): "
            "the result would be EMA's")


def seed_training_draw(ctx: CompareContext) -> int:
    """Seed the random generators before a strategy draws training images (the sampler's order and
    the augmentation), so that every strategy and every rerun draws the same images; returns the
    seed (stored with the strategy's facts)."""
    seed = int(ctx.options.get("training_images_seed", 0))
    seed_all_rng(seed + comm.get_rank())
    return seed


def set_evalnorm_ema_if_present(model: nn.Module) -> None:
    """Non-EvalNorm strategies evaluate EvalNorm layers as plain BN (mode "ema")."""
    set_evalnorm_mode(unwrap(model), "ema")


class Strategy:
    """An inference-statistics strategy. Subclasses set ``name`` and override what they need:
    ``unavailable`` (None, or why the strategy cannot run here), ``prepare`` (put a fresh copy of
    the model into the strategy's state), ``inference`` (a context around evaluation forwards),
    ``test_batch_size`` (images per test batch and process)."""

    name = "?"
    description = ""
    test_batch_size = 1

    def how_to_apply(self) -> str:
        """What a user sets to evaluate (and deploy) with this strategy."""
        return "nothing: the checkpoint's own statistics"

    def unavailable(self, ctx: CompareContext) -> Optional[str]:
        return None

    def prepare(self, ctx: CompareContext, model: nn.Module) -> dict:
        """Returns extra facts for the JSON (e.g. PreciseBN's image count)."""
        set_evalnorm_ema_if_present(model)
        return {}

    def inference(self, model: nn.Module):
        return contextlib.nullcontext()

    def discrepancy_groups(self, x: torch.Tensor, images: int) -> Optional[List[torch.Tensor]]:
        """How one captured layer input (a training batch of ``images`` images) is cut into the
        inputs this strategy normalizes together at evaluation; None if it cannot be emulated."""
        return [x]


class EMAStrategy(Strategy):
    name = "EMA"
    description = "running statistics of the checkpoint (torch's exponential moving average)"


class PreciseBNStrategy(Strategy):
    description = "population statistics recomputed over N training images (PreciseBN, all processes)"

    def __init__(self, num_images: int):
        if num_images < 1:
            raise ValueError(f"PreciseBN needs N >= 1 images, got {num_images}")
        self.num_images = num_images
        self.name = f"PreciseBN({num_images})"

    def unavailable(self, ctx):
        return no_population_layers_reason(ctx.model, include_frozen=False)  # PreciseBN skips frozen layers

    def how_to_apply(self):
        return (f"TEST.PRECISE_BN.ENABLED True BNSTATS.PRECISE_BN.NUM_SAMPLES {self.num_images} (PreciseBN before "
                "every evaluation, --eval-only included; the checkpoint saved after it holds the statistics)")

    def prepare(self, ctx, model):
        super().prepare(ctx, model)
        cfg = ctx.cfg
        batches = max(1, math.ceil(self.num_images / cfg.SOLVER.IMS_PER_BATCH))
        runner = PreciseBNRunner(cfg, model, default_precise_bn_loader_factory(cfg, ctx.trainer_cls), batches)
        seed = seed_training_draw(ctx)  # the loader is built and drawn from inside run()
        report = runner.run(f"PreciseBN({self.num_images})")
        if report is None:
            return {"images": 0, "layers_updated": 0, "images_seed": seed}
        return {
            "images": batches * cfg.SOLVER.IMS_PER_BATCH,
            "images_seed": seed,
            "layers_updated": len(report.updated),
            "layers_without_data": report.skipped,
            "seconds": round(report.seconds, 2),
        }


class BatchStatsStrategy(Strategy):
    description = "statistics of the test batch itself (k images per test batch and process)"

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"batch statistics at test need k >= 1 images per test batch, got {k}")
        self.test_batch_size = k
        self.name = f"batch stats (k={k})"

    def how_to_apply(self):
        return (f"BNSTATS.TEST_BATCH_STATS.ENABLED True BNSTATS.TEST_BATCH_STATS.IMS_PER_BATCH {self.test_batch_size} "
                f"(test batches of {self.test_batch_size} images normalized by their own statistics)")

    def unavailable(self, ctx):
        return no_population_layers_reason(ctx.model, include_frozen=True)

    def inference(self, model):
        return batch_statistics(model)

    def discrepancy_groups(self, x, images):
        k = self.test_batch_size
        if k == images:
            return [x]
        if k > images or x.shape[0] % images:
            return None
        # layer inputs are in image order (RoI heads: the same number of RoIs per image)
        per_image = x.shape[0] // images
        return list(x.split(per_image * k))


EVALNORM_MODES = {
    "evalnorm_learned": ("EvalNorm learned", "learned", "α̂, β̂ learned during training (L_aux)"),
    "evalnorm_rule": ("EvalNorm 1/B²", "rule", "α = β = 1/B², the paper's rule of thumb"),
    "evalnorm_exact": ("EvalNorm 1/B", "exact", "α = β = 1/B, exact algebra of the batch"),
}


def estimate_evalnorm_offline(cfg, model: nn.Module, num_images: int) -> List[str]:
    """Convert ``model``'s BN layers to EvalNorm (if it has none yet) and estimate α̂, β̂ on
    ``num_images`` training images with everything else frozen (:mod:`d2_bnstats.d2.evalnorm_offline`);
    in place. Returns the names of the converted layers."""
    converted = [] if model_has_evalnorm(model) else convert_to_evalnorm(model)
    iterations = max(1, math.ceil(num_images / cfg.SOLVER.IMS_PER_BATCH))
    with EventStorage(0):  # detectron2's heads log to the storage in training mode
        estimate_evalnorm(model, build_detection_train_loader(cfg), iterations)
    return converted


class EvalNormStrategy(Strategy):
    def __init__(self, key: str):
        self.key = key
        self.name, self.mode, self.description = EVALNORM_MODES[key]

    def unavailable(self, ctx):
        if not model_has_evalnorm(ctx.model):
            return "the model has no EvalNorm layers (no MODEL.*.NORM is EvalNorm)"
        return None

    def prepare(self, ctx, model):
        set_evalnorm_mode(unwrap(model), self.mode)
        return {"mode": self.mode}

    def how_to_apply(self):
        return f"BNSTATS.EVALNORM.MODE {self.mode}"

    def discrepancy_groups(self, x, images):
        return [x]


class EvalNormOfflineStrategy(EvalNormStrategy):
    """α̂, β̂ estimated after training; a model trained with BN is converted to EvalNorm first."""

    def __init__(self, num_images: int):
        self.key = "evalnorm_offline"
        self.num_images = num_images
        self.name = "EvalNorm offline"
        self.mode = "learned"
        self.description = f"α̂, β̂ estimated offline on {num_images} training images, everything else frozen"

    def unavailable(self, ctx):
        if model_has_evalnorm(ctx.model):
            return None
        reason = refusal_reason(unwrap(ctx.model))  # statistics that are not BN's (MABN, GhostBN, ...)
        if reason:
            return reason
        if not any(isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and m.track_running_stats
                   for m in unwrap(ctx.model).modules()):
            return "the model has neither EvalNorm layers nor trainable BN layers to convert"
        return None

    def how_to_apply(self):
        return (f"tools/estimate_evalnorm.py on {self.num_images} training images writes the converted weights; "
                "evaluate them with BNSTATS.EVALNORM.MODE learned")

    def prepare(self, ctx, model):
        seed = seed_training_draw(ctx)
        converted = estimate_evalnorm_offline(ctx.cfg, unwrap(model), self.num_images)
        set_evalnorm_mode(unwrap(model), "learned")
        return {"mode": "learned", "images": self.num_images, "images_seed": seed, "converted_layers": len(converted)}


class EvalNormPreciseBNStrategy(PreciseBNStrategy):
    """EvalNorm with learned α̂, β̂ mixing each sample's moments with PreciseBN's population statistics
    (recomputed over N training images) instead of the running averages."""

    def __init__(self, num_images: int):
        super().__init__(num_images)
        self.name = f"EvalNorm learned + PreciseBN({num_images})"
        self.description = (f"α̂, β̂ learned during training, population statistics recomputed over {num_images} "
                            "training images (PreciseBN) instead of the running averages")

    def unavailable(self, ctx):
        if not model_has_evalnorm(ctx.model):
            return "the model has no EvalNorm layers (no MODEL.*.NORM is EvalNorm)"
        return None

    def how_to_apply(self):
        return (f"BNSTATS.EVALNORM.MODE learned TEST.PRECISE_BN.ENABLED True BNSTATS.PRECISE_BN.NUM_SAMPLES "
                f"{self.num_images}")

    def prepare(self, ctx, model):
        facts = super().prepare(ctx, model)  # EvalNorm layers as BN ("ema") while PreciseBN reads their inputs
        set_evalnorm_mode(unwrap(model), "learned")
        return dict(facts, mode="learned")

    def discrepancy_groups(self, x, images):
        return [x]
