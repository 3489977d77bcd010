"""Per-level ("domain-specific") statistics for a norm shared across input domains, e.g. FPN levels.

A RetinaNet head applies the same convolutions and norms to every FPN level. The levels are different
domains (object scale, feature statistics), so one set of population statistics for all of them is
inconsistent with what each level saw in training; Wu & Johnson 2021 ("Rethinking 'Batch' in
BatchNorm", §5.2, Table 6) keep one set of statistics per level and share the affine parameters.
detectron2's ``CycleBatchNormList`` does this for plain BN/SyncBN only.

:class:`PerLevelNorm` does it for *any* norm module: it holds L copies of the norm (``levels``), made
with ``copy.deepcopy``; every **parameter** (the affine γ, β and any other learned parameter, e.g.
EvalNorm's α/β) is the *same* ``nn.Parameter`` object in all copies — shared, trained once — while
every **buffer** (running statistics, counters, ring buffers) is per copy. Call i (counting from the
last :meth:`reset`) goes to copy ``i mod L``; :func:`wrap_per_level` resets the counters from a forward
pre-hook of the head, so call i of a head forward is level i even after an interrupted forward. Each
copy therefore runs exactly once per head forward, which is what PreciseBN and the
population-statistics protocol need (fvcore's ``update_bn_stats`` sees L ordinary BN layers).

State dict: ``<prefix>levels.<i>.<name>``; shared parameters appear under every level (as for any
tied parameter in torch); ``<prefix>_extra_state`` is the level the next call goes to (torch's extra
state, an int64 tensor), so a module reloaded between two calls of one head forward (a standalone
wrapper, or a checkpoint taken inside a forward) sends the next call to the same level as the
original. The class's ``_version`` (torch's checkpoint version, in the file's metadata) is 3;
files of versions 1 and 2 have the same layout without the level, which loads as 0 (the
state between head forwards). Besides its own files, loading accepts two
layouts written by other modules at the same prefix (their metadata carries *their* class's version,
which says nothing about this layout, so these are recognised by the absence of ``levels.`` keys):
the un-wrapped norm's keys (``<prefix><name>``: copied into every level, e.g. fine-tuning from a
model with shared statistics) and a per-level list of norms (``<prefix><i>.<name>`` per level, shared
parameters as ``<prefix><name>``; the layout of detectron2's ``CycleBatchNormList``).
"""
import copy
import re
from typing import Callable, List, Optional

import torch
from torch import nn

_LEVEL_KEY = re.compile(r"^(\d+)\.(.+)$")
_EXTRA_STATE_KEY = "_extra_state"  # where torch's state_dict puts get_extra_state()


class PerLevelNorm(nn.Module):
    """L copies of ``norm`` sharing its parameters, used in turn (see module docstring)."""

    _version = 3

    def __init__(self, norm: nn.Module, num_levels: int):
        super().__init__()
        if not isinstance(num_levels, int) or num_levels < 1:
            raise ValueError(f"num_levels must be a positive integer, got {num_levels!r}")
        copies = [norm] + [copy.deepcopy(norm) for _ in range(num_levels - 1)]
        for other in copies[1:]:
            share_parameters(norm, other)
        self.levels = nn.ModuleList(copies)
        self._next = 0
        self.register_load_state_dict_pre_hook(_accept_other_layouts)

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def reset(self) -> None:
        """The next call goes to level 0."""
        self._next = 0

    def forward(self, x):
        norm = self.levels[self._next]
        self._next = (self._next + 1) % len(self.levels)
        return norm(x)

    def extra_repr(self):
        return f"num_levels={len(self.levels)}, shared parameters, per-level buffers"

    def get_extra_state(self) -> torch.Tensor:
        """The level of the next call (a CPU int64 tensor: checkpointers take tensors)."""
        return torch.tensor(self._next, dtype=torch.int64)

    def set_extra_state(self, state) -> None:
        level = int(state)
        if not 0 <= level < len(self.levels):
            raise ValueError(
                f"PerLevelNorm: the state's next level is {level}, but this module has {len(self.levels)} levels"
            )
        self._next = level

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # other layouts first: an un-wrapped norm's own extra state must go to the levels, not here
        _accept_other_layouts(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        # versions 1-2 and the other layouts hold no level: the next call goes to level 0
        state_dict.setdefault(prefix + _EXTRA_STATE_KEY, torch.zeros((), dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def _accept_other_layouts(module: PerLevelNorm, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Load pre-hook: rename the foreign layouts of the module docstring to ``levels.<i>.<name>``."""
    ours = prefix + "levels."
    if any(k.startswith(ours) for k in state_dict):
        return  # this class's layout (versions 1 to 3)
    levels = len(module.levels)
    level_names = set(module.levels[0].state_dict(keep_vars=True))
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        match = _LEVEL_KEY.match(rest)
        if match and int(match.group(1)) < levels and match.group(2) in level_names:
            state_dict[f"{ours}{match.group(1)}.{match.group(2)}"] = state_dict.pop(key)  # per-level list
        elif rest in level_names:
            value = state_dict.pop(key)
            for i in range(levels):
                state_dict[f"{ours}{i}.{rest}"] = value


def share_parameters(source: nn.Module, target: nn.Module) -> None:
    """Make every parameter of ``target`` the same object as the same-named parameter of ``source``
    (the two must have the same structure, e.g. ``target`` a deep copy of ``source``)."""
    source_modules = dict(source.named_modules())
    for name, module in target.named_modules():
        for pname in list(module._parameters):
            shared = source_modules[name]._parameters[pname]
            module._parameters[pname] = shared


def keeps_statistics(module: nn.Module) -> bool:
    """Whether per-level copies of ``module`` make sense: it owns buffers that training changes.

    True for layers that implement the population-statistics protocol (``set_population_statistics``)
    and for every module owning buffers of its own: BatchNorm-type layers with running statistics,
    third-party stateful norms. False for stateless norms (GN, LN) and BN without running statistics.
    A module whose buffers are fixed parameters (a frozen BN) is excluded by the caller's predicate.
    """
    if hasattr(module, "set_population_statistics"):
        return True
    return any(True for _ in module.buffers(recurse=False))


def wrap_per_level(
    head: nn.Module,
    num_levels: int,
    predicate: Callable[[nn.Module], bool] = keeps_statistics,
    build: Optional[Callable[[nn.Module], Optional[nn.Module]]] = None,
    leave: Optional[Callable[[nn.Module], bool]] = None,
) -> List[PerLevelNorm]:
    """Replace, in place, every outermost module of ``head`` for which ``predicate`` holds by a
    :class:`PerLevelNorm` with ``num_levels`` levels, and reset the level counters at the start of
    every ``head`` forward. ``build(module)`` may supply the norm to copy instead of ``module`` (e.g. to
    rebuild a per-level list of norms); a module for which ``leave`` holds (and ``build`` gave None)
    is kept as it is and not searched. Returns the wrappers (already wrapped ones included)."""
    wrappers: List[PerLevelNorm] = []

    def visit(parent: nn.Module):
        for name, child in list(parent.named_children()):
            if isinstance(child, PerLevelNorm):
                wrappers.append(child)
                continue
            replacement = build(child) if build is not None else None
            if replacement is None and leave is not None and leave(child):
                continue
            if replacement is None and predicate(child):
                replacement = child
            if replacement is not None:
                wrapper = PerLevelNorm(replacement, num_levels)
                setattr(parent, name, wrapper)
                wrappers.append(wrapper)
            else:
                visit(child)

    visit(head)
    if wrappers and not getattr(head, "_d2_bnstats_per_level_hook", False):
        head.register_forward_pre_hook(_reset_levels)
        head._d2_bnstats_per_level_hook = True
    return wrappers


def _reset_levels(head, inputs):
    for module in head.modules():
        if isinstance(module, PerLevelNorm):
            module.reset()
