"""Health of the running statistics in training: non-finite updates skipped once per step, and
the skips as detectron2 metrics.

:class:`StepGuardHook` makes the non-finite decision once per step for the whole model
(``d2_bnstats.layers.step_guard``): a snapshot of the running statistics before each step, and after
it every layer whose statistics came out non-finite gets its values back and counts a skip. It must
come first among the hooks, so that nothing after the step (PreciseBN, the checkpointer, the
evaluation) sees the bad values; if the step raises (detectron2 stops on a non-finite loss), the
restore happens when training ends, so the model in memory keeps finite statistics.

Every statistics-keeping layer of the plug-in (EvalNorm, SyncBN, GhostBN, RoIShuffleBN, MABN) leaves
its running statistics unchanged when a batch's statistics are not finite and counts the skip in its
``nonfinite_skips`` counter (methods.md §4; ``d2_bnstats.layers.moments.commit_running_stats``).
:func:`put_skip_counts` reads every layer's counter with one host transfer and writes two scalars to
detectron2's ``EventStorage``:

- ``bnstats/nonfinite_skips_total``: skips since the layers were built (the counters are not in
  checkpoints, so a resumed run starts again at 0);
- ``bnstats/nonfinite_skips``: skips since the previous call (the last step, when called after each
  step).

:class:`StatisticsHealthHook` calls it after every step, before detectron2's writers run if it is
registered ahead of them. Counts are this process's; detectron2 writes the main process's metrics
(the synchronized layers skip on every process alike).
"""
from typing import List, Optional

import torch
from detectron2.engine import HookBase
from detectron2.utils.events import EventStorage, get_event_storage
from torch import nn

from ..layers.moments import SKIP_COUNTER
from ..layers.step_guard import StepStatisticsGuard

TOTAL_KEY = "bnstats/nonfinite_skips_total"
NEW_KEY = "bnstats/nonfinite_skips"


def counting_layers(model: nn.Module) -> List[nn.Module]:
    """The modules of ``model`` (DistributedDataParallel included) that keep a skip counter."""
    return [m for m in model.modules() if isinstance(getattr(m, SKIP_COUNTER, None), torch.Tensor)]


def total_skips(layers: List[nn.Module]) -> int:
    """Sum of the layers' counters: one host transfer for all of them."""
    counters = [getattr(m, SKIP_COUNTER) for m in layers]
    if not counters:
        return 0
    device = counters[0].device
    return int(torch.stack([c.to(device) for c in counters]).sum())


def put_skip_counts(storage: EventStorage, layers: List[nn.Module], previous: int = 0) -> int:
    """Write the total and the new (since ``previous``) skip counts of ``layers``; returns the total."""
    total = total_skips(layers)
    storage.put_scalar(TOTAL_KEY, total, smoothing_hint=False)
    storage.put_scalar(NEW_KEY, total - previous, smoothing_hint=False)
    return total


class StatisticsHealthHook(HookBase):
    """After each step, write the skip counts of the trainer's model (see the module docstring).

    The layers are listed once, before training; ``layers`` overrides the list (e.g. a sub-model).
    A model without such layers writes nothing.
    """

    def __init__(self, layers: Optional[List[nn.Module]] = None):
        self._layers = layers
        self._previous = 0

    def before_train(self):
        if self._layers is None:
            self._layers = counting_layers(self.trainer.model)
        self._previous = total_skips(self._layers)

    def after_step(self):
        if self._layers:
            self._previous = put_skip_counts(get_event_storage(), self._layers, self._previous)


class StepGuardHook(HookBase):
    """The once-per-step non-finite guard of the trainer's model (see the module docstring); put it
    first in the trainer's hooks. ``model`` overrides the trainer's (e.g. a sub-model)."""

    def __init__(self, model: Optional[nn.Module] = None):
        self._model = model
        self.guard: Optional[StepStatisticsGuard] = None
        self._pending = False

    def before_train(self):
        self.guard = StepStatisticsGuard(self._model if self._model is not None else self.trainer.model)

    def before_step(self):
        self.guard.snapshot()
        self._pending = True

    def after_step(self):
        self.guard.restore_nonfinite()
        self._pending = False

    def after_train(self):
        if self.guard is None:
            return
        if self._pending:  # the step raised: still leave finite statistics in memory
            self.guard.restore_nonfinite()
            self._pending = False
        self.guard.close()
