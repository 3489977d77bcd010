"""Keeping EvalNorm's alpha_hat, beta_hat in [0, 1]: a projection after every optimiser step, per model.

alpha_hat, beta_hat are interpolation weights (eqs. 7-8 of the EvalNorm paper) and only mean
something in [0, 1]. They are plain 0-dim parameters trained by whatever optimiser trains the model;
after each step of an optimiser, :func:`attach_projection_hook` clamps those of them that this
optimiser holds back into [0, 1] (projected gradient descent). The forward pass uses the clamped
value with a straight-through gradient (:func:`d2_bnstats.layers.evalnorm_math.unit_interval`), so a
parameter sitting on a bound still receives gradient.

Constructing an :class:`~d2_bnstats.layers.evalnorm.EvalNorm2d` installs nothing. A layer that
computes L_aux in a training forward joins a process-wide set of learning layers (held weakly), and
one process-wide optimizer step post hook, installed then, projects the alpha_hat, beta_hat of those
layers that the stepping optimiser holds (:func:`watch_learning_layer`): a plain PyTorch loop and a
copy of a model (``copy.deepcopy``, ``torch.save``/``torch.load`` of the whole module) are projected
as the model the plug-in built, and another model's optimiser leaves them alone.
:func:`attach_projection_hook` attaches the same projection to one model, for all its layers, also
before any of them has trained (the plug-in's model transform does it for every model it builds). The hook is one of
torch's optimizer step post hooks (called after ``step()`` of every optimiser, whatever the loop),
holds the model weakly (it goes away with the model) and acts only on the EvalNorm layers the model
has *at the time of the step* (layers added later by a conversion are included) whose parameters the
stepping optimiser holds.

This module imports torch only.
"""
import weakref
from typing import Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

# model -> its hook; weak keys, so neither the table nor the hook keeps a model alive
_HOOKS: "weakref.WeakKeyDictionary[nn.Module, ProjectionHook]" = weakref.WeakKeyDictionary()


class ProjectionHook:
    """The projection of one model's alpha_hat, beta_hat (see the module docstring); ``remove()``
    uninstalls it. Create it with :func:`attach_projection_hook`."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)
        self._handle = register_optimizer_step_post_hook(self._project)
        # uninstalled when the model is collected (the hook refers to the model weakly only)
        self._finalizer = weakref.finalize(model, self._handle.remove)
        self.removed = False

    @property
    def model(self) -> Optional[nn.Module]:
        """The model, or None once it has been collected."""
        return self._model()

    def remove(self) -> None:
        """Uninstall the hook (idempotent); a later :func:`attach_projection_hook` installs a new one."""
        if self.removed:
            return
        self.removed = True
        self._finalizer()  # removes the torch hook, once
        model = self._model()
        if model is not None and _HOOKS.get(model) is self:
            del _HOOKS[model]

    def _project(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        model = self._model()
        if model is None:
            return
        from .evalnorm import evalnorm_layers  # evalnorm imports this module

        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = [p for _, layer in evalnorm_layers(model) for p in (layer.alpha_hat, layer.beta_hat) if id(p) in held]
        if params:
            with torch.no_grad():
                for p in params:
                    p.clamp_(0.0, 1.0)


# EvalNorm layers that computed L_aux (their alpha_hat, beta_hat may be trained), held weakly
_LEARNING: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_WATCH = {"handle": None}


def _project_learning_layers(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not _LEARNING:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = [p for layer in list(_LEARNING) for p in (layer.alpha_hat, layer.beta_hat) if id(p) in held]
    if params:
        with torch.no_grad():
            for p in params:
                p.clamp_(0.0, 1.0)


def watch_learning_layer(layer: nn.Module) -> None:
    """Project ``layer``'s alpha_hat, beta_hat after every step of an optimiser that holds them
    (called by the layer when it computes L_aux; see the module docstring)."""
    if _WATCH["handle"] is None:
        _WATCH["handle"] = register_optimizer_step_post_hook(_project_learning_layers)
    _LEARNING.add(layer)


def attach_projection_hook(model: nn.Module) -> ProjectionHook:
    """Keep the alpha_hat, beta_hat of ``model``'s EvalNorm layers in [0, 1] after every optimiser
    step (see the module docstring). Idempotent: a second call for the same model returns the same
    hook; ``hook.remove()`` uninstalls it."""
    existing = _HOOKS.get(model)
    if existing is not None and not existing.removed:
        return existing
    hook = ProjectionHook(model)
    _HOOKS[model] = hook
    return hook
