"""The detection loss: the training loss without the norms' auxiliary losses.

detectron2 logs ``total_loss``, the sum of every entry of the model's loss dict. EvalNorm adds
``loss_evalnorm`` to that dict (eq. 9 of the EvalNorm paper), a loss that trains only its α̂, β̂ and
that shrinks as the batch grows by construction; at 2 images from random init it is most of the
total (about 3.2 of 4.0). The total then says little about how well the detector trains, and two
runs at different batch sizes cannot be compared by it. ``detection_loss`` is the sum of the other
entries, the losses the detector's own weights are trained on.

:class:`DetectionLossHook` writes it to detectron2's ``EventStorage`` after every step (it must come
before the writers, so ``metrics.json`` and the console get it with the step's other losses). It
reads the step's losses from the storage, where detectron2's trainer puts them (averaged over
processes, on the main process), so it adds no reduction of its own.
"""
from typing import Iterable, Mapping, Optional

from detectron2.engine import HookBase
from detectron2.utils.events import get_event_storage

from ..layers.evalnorm_aux import EVALNORM_LOSS_KEY

__all__ = ["AUXILIARY_LOSS_KEYS", "DETECTION_LOSS_KEY", "DetectionLossHook", "detection_loss"]

# The loss-dict entries that train a norm's own estimators, not the detector.
AUXILIARY_LOSS_KEYS = (EVALNORM_LOSS_KEY,)
DETECTION_LOSS_KEY = "detection_loss"


def detection_loss(losses: Mapping[str, float], auxiliary: Iterable[str] = AUXILIARY_LOSS_KEYS) -> Optional[float]:
    """The sum of the ``loss_*`` entries of ``losses`` that are not ``auxiliary``; None if there is none."""
    auxiliary = set(auxiliary)
    values = [float(v) for k, v in losses.items() if k.startswith("loss_") and k not in auxiliary]
    return sum(values) if values else None


class DetectionLossHook(HookBase):
    """After every step, ``detection_loss`` (:func:`detection_loss` of the step's logged losses)."""

    def after_step(self):
        storage = get_event_storage()
        step_losses = {k: v for k, (v, it) in storage.latest().items() if k.startswith("loss_") and it == storage.iter}
        value = detection_loss(step_losses)
        if value is not None:
            storage.put_scalar(DETECTION_LOSS_KEY, value)
