"""What happens to MODEL.WEIGHTS around loading: re-initialised statistics, missing-file messages.

The "re-initialised BN statistics" training setting (EvalNorm paper, section 5) starts from
pre-trained weights whose norm layers' running statistics are reset before training. A model
transform cannot do it (weights are loaded after the model is built), and a reset on every load
would also wipe the statistics of a resumed run, so it happens once, right after
``MODEL.WEIGHTS`` is loaded for a *new* run: d2_bnstats' ``Trainer.resume_or_load`` calls
:func:`after_loading_weights`; other training loops call it themselves.

A ``MODEL.WEIGHTS`` file that does not exist stops the config checks with
:func:`missing_weights_message`. Code that knows how some weights files are made (a project that
pre-trains its own backbones) registers a hint with :func:`add_missing_weights_hint`, and the
message then says how to build the missing file.
"""
import logging
import os
from typing import Callable, List, Optional

from torch import nn

logger = logging.getLogger(__name__)


def reset_norm_statistics(model: nn.Module) -> int:
    """Reset the running statistics of every norm layer that has them; returns how many.

    A layer qualifies when it is a torch ``_NormBase`` tracking running statistics (BatchNorm and
    its subclasses: BN, SyncBN, EvalNorm, ...) -- reset with torch's ``reset_running_stats()``
    (mean 0, variance 1, ``num_batches_tracked`` 0) -- or any other module that defines
    ``reset_running_stats()`` (a layer keeping other statistics resets them its own way).
    FrozenBN (no such method) and GN (no statistics) are left alone; parameters are never touched.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            if module.track_running_stats:
                module.reset_running_stats()
                count += 1
        elif callable(getattr(module, "reset_running_stats", None)):
            module.reset_running_stats()
            count += 1
    return count


def after_loading_weights(cfg, model: nn.Module, resumed: bool) -> None:
    """Apply ``BNSTATS.INIT`` once ``MODEL.WEIGHTS`` is loaded; ``resumed``: the weights came from
    the run's own last checkpoint (then nothing is reset)."""
    if resumed or not cfg.BNSTATS.INIT.RESET_NORM_STATS:
        return
    count = reset_norm_statistics(model)
    logger.info(
        "BNSTATS.INIT.RESET_NORM_STATS: reset the running statistics of %d norm layers after loading %s",
        count,
        cfg.MODEL.WEIGHTS or "(no weights)",
    )


WeightsHint = Callable[[str], Optional[str]]
_HINTS: List[WeightsHint] = []


def add_missing_weights_hint(hint: WeightsHint) -> WeightsHint:
    """Register ``hint(weights_path) -> sentence or None``, consulted by :func:`missing_weights_message`
    (e.g. a project that builds its own pre-trained backbones names the command that builds one).
    Registering the same function twice has no effect."""
    if hint not in _HINTS:
        _HINTS.append(hint)
    return hint


def remove_missing_weights_hint(hint: WeightsHint) -> None:
    if hint in _HINTS:
        _HINTS.remove(hint)


def missing_weights_message(weights: str, hint: Optional[WeightsHint] = None) -> str:
    """The error for a MODEL.WEIGHTS file that does not exist. The first sentence that ``hint`` or,
    after it, a registered hint (:func:`add_missing_weights_hint`) gives for the path is appended."""
    message = f"MODEL.WEIGHTS = {weights!r}: no such file"
    if not os.path.isabs(weights):
        message += f" (relative paths are read from the current directory, {os.getcwd()})"
    for candidate in ([hint] if hint is not None else []) + list(_HINTS):
        sentence = candidate(weights)
        if sentence:
            return f"{message}. {sentence}"
    return message
