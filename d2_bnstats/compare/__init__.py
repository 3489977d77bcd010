"""The comparison of inference-statistics strategies for one trained checkpoint, as a package
(``tools/compare_bn_stats.py`` is its command line).

For every strategy (EMA, PreciseBN over N images, batch statistics at test with k images per test
batch, EvalNorm learned / 1/B² / 1/B / offline, and any strategy added with :func:`register_strategy`)
the checkpoint is COCO-evaluated from a fresh copy of the loaded model; one table (bbox AP, AP50,
AP75, APs, APm, APl; segm too with masks), a JSON file, a bar plot and a per-layer train–test
discrepancy report (EvalNorm paper, Figure 1) are written.

Modules: :mod:`.strategies` (what a strategy is, the built-in ones), :mod:`.registry` (spec names ->
strategies), :mod:`.comparison` (:func:`compare`: load, evaluate each strategy, write), :mod:`.discrepancy`
(train–test discrepancy per layer), :mod:`.report` (tables, JSON), :mod:`.plots` (figures),
:mod:`.cli` (the command line).
"""
from .cli import argument_parser, main, parse_args, run
from .discrepancy import capture_layer_inputs, discrepancy_report
from .registry import (
    build_strategy,
    default_strategy_specs,
    register_strategy,
    registered_strategies,
    unregister_strategy,
)
from .report import format_discrepancy, format_table
from .comparison import compare, evaluate_model, load_model
from .strategies import (
    EVALNORM_MODES,
    BatchStatsStrategy,
    CompareContext,
    EMAStrategy,
    EvalNormOfflineStrategy,
    EvalNormPreciseBNStrategy,
    EvalNormStrategy,
    PreciseBNStrategy,
    Strategy,
)

__all__ = [
    "argument_parser",
    "BatchStatsStrategy",
    "build_strategy",
    "capture_layer_inputs",
    "compare",
    "CompareContext",
    "default_strategy_specs",
    "discrepancy_report",
    "EMAStrategy",
    "evaluate_model",
    "EVALNORM_MODES",
    "EvalNormOfflineStrategy",
    "EvalNormPreciseBNStrategy",
    "EvalNormStrategy",
    "format_discrepancy",
    "format_table",
    "load_model",
    "main",
    "parse_args",
    "PreciseBNStrategy",
    "register_strategy",
    "registered_strategies",
    "run",
    "Strategy",
    "unregister_strategy",
]
