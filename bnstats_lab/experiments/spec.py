"""What an experiment is: a declared table of cells (config × overrides), seeds, and the
inference-statistics strategies each trained checkpoint is evaluated under.

A :class:`Cell` is one training recipe; with a seed it is one trained checkpoint, evaluated once per
strategy with the comparison tool's library entry. A cell made by :func:`evaluation_of` trains
nothing: it evaluates another experiment's checkpoints under other strategies. ``factors`` describe the cell for the report's
tables (setting, images per batch, scenes, norm, ...). Everything here is plain data, so an
experiment's declaration reads as its protocol.
"""
import dataclasses
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

Factor = Union[str, int, float]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training recipe: ``config`` with ``overrides`` (``KEY VALUE`` pairs, as on the command
    line); trained once per seed (``SEED`` is set by the runner) and evaluated under
    ``strategies`` (comparison-tool specs, e.g. ``"precise_bn:500"``)."""

    name: str
    config: str
    overrides: Tuple[str, ...] = ()
    strategies: Tuple[str, ...] = ("ema",)
    factors: Tuple[Tuple[str, Factor], ...] = ()
    # comparison options: training images for PreciseBN / offline EvalNorm, discrepancy images
    compare_options: Tuple[str, ...] = ()
    num_processes: int = 1  # training processes (gloo on CPU): SyncBN over 2 processes × 1 image
    # (experiment, cell): evaluate that cell's checkpoint of the same seed instead of training one;
    # config and overrides must then be that cell's (:func:`evaluation_of` copies them)
    checkpoint_of: Optional[Tuple[str, str]] = None
    # with checkpoint_of: evaluate the checkpoint saved after this many iterations instead of the final one
    checkpoint_iteration: Optional[int] = None
    # iterations whose checkpoints the training keeps (for evaluation cells of intermediate checkpoints)
    keep_iterations: Tuple[int, ...] = ()

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ValueError(f"cell name {self.name!r}: use lower-case letters, digits, '_', '-', '.'")
        if len(self.overrides) % 2:
            raise ValueError(f"cell {self.name}: overrides must be KEY VALUE pairs, got {list(self.overrides)}")
        if "SEED" in self.overrides[::2] or "OUTPUT_DIR" in self.overrides[::2]:
            raise ValueError(f"cell {self.name}: SEED and OUTPUT_DIR are set by the runner, not by overrides")
        if not self.strategies:
            raise ValueError(f"cell {self.name}: give at least one strategy")
        if self.num_processes < 1:
            raise ValueError(f"cell {self.name}: num_processes must be >= 1, got {self.num_processes}")
        if self.checkpoint_of is not None and (len(self.checkpoint_of) != 2 or not all(self.checkpoint_of)):
            raise ValueError(f"cell {self.name}: checkpoint_of is (experiment, cell), got {self.checkpoint_of!r}")
        if self.checkpoint_iteration is not None and (self.checkpoint_of is None or self.checkpoint_iteration < 1):
            raise ValueError(f"cell {self.name}: checkpoint_iteration ({self.checkpoint_iteration!r}) needs "
                             "checkpoint_of and a number of iterations >= 1")
        if any(not isinstance(i, int) or i < 1 for i in self.keep_iterations):
            raise ValueError(f"cell {self.name}: keep_iterations are numbers of iterations >= 1, got "
                             f"{self.keep_iterations!r}")

    @property
    def factor_dict(self) -> Dict[str, Factor]:
        return dict(self.factors)


def evaluation_of(experiment: str, source: Cell, strategies: Tuple[str, ...], compare_options: Tuple[str, ...] = (),
                  factors: Tuple[Tuple[str, Factor], ...] = (), iteration: Optional[int] = None,
                  name: Optional[str] = None) -> Cell:
    """A cell that evaluates ``source``'s checkpoints (cell of ``experiment``, one per seed) under other
    ``strategies``, without training: same name (or ``name``), config, overrides and factors (plus
    ``factors``, which replace source factors of the same key). With ``iteration``, the checkpoint saved
    after that many iterations (``source`` must keep it: :attr:`Cell.keep_iterations`)."""
    if iteration is not None and iteration not in source.keep_iterations:
        raise ValueError(f"cell {source.name} does not keep its checkpoint at iteration {iteration} "
                         f"(keep_iterations: {list(source.keep_iterations)})")
    replaced = {k for k, _ in factors}
    merged = tuple((k, v) for k, v in source.factors if k not in replaced) + tuple(factors)
    return Cell(name or source.name, source.config, source.overrides, strategies, merged,
                compare_options or source.compare_options, source.num_processes, (experiment, source.name),
                checkpoint_iteration=iteration)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A named table of cells, each trained once per seed."""

    name: str
    description: str
    cells: Tuple[Cell, ...]
    seeds: Tuple[int, ...] = (0, 1, 2)
    # files the cells need, each with the command that makes it (run by the runner when missing)
    requires: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    # (strategy a, strategy b) pairs whose paired difference a − b the report tabulates, besides each
    # strategy's difference to the report's reference (EMA)
    comparisons: Tuple[Tuple[str, str], ...] = ()

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ValueError(f"experiment name {self.name!r}: use lower-case letters, digits, '_', '-', '.'")
        names = [c.name for c in self.cells]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"experiment {self.name}: cells declared twice: {duplicates}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"experiment {self.name}: seeds must be distinct and non-empty, got {self.seeds}")
        declared = {s for c in self.cells for s in c.strategies}
        for pair in self.comparisons:
            unknown = [s for s in pair if s not in declared] if len(pair) == 2 else list(pair)
            if len(pair) != 2 or unknown:
                raise ValueError(f"experiment {self.name}: a comparison is two strategies of its cells, got {pair!r}"
                                 + (f" ({', '.join(unknown)} in no cell)" if len(pair) == 2 else ""))

    def cell(self, name: str) -> Cell:
        for cell in self.cells:
            if cell.name == name:
                return cell
        raise KeyError(f"experiment {self.name} has no cell {name!r}; cells: {', '.join(c.name for c in self.cells)}")

    def select(self, cells: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None) -> List[Tuple[Cell, int]]:
        """The (cell, seed) runs in order: seed-major, so that every cell has one seed before any has two."""
        chosen = [self.cell(n) for n in cells] if cells else list(self.cells)
        if seeds:
            unknown = sorted(set(seeds) - set(self.seeds))
            if unknown:
                raise ValueError(f"experiment {self.name}: seeds {unknown} are not declared; declared: {list(self.seeds)}")
        run_seeds = [s for s in self.seeds if not seeds or s in seeds]
        return [(cell, seed) for seed in run_seeds for cell in chosen]
