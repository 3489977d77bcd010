"""Strategy names -> factories, so the tool's ``--strategies`` specs (``"kind"`` or ``"kind:argument"``,
e.g. ``"precise_bn:1000"``, ``"batch_stats:4"``) build :class:`~d2_bnstats.compare.strategies.Strategy`
objects, and other code can add its own strategies with :func:`register_strategy`."""
from typing import Callable, Dict, List, Optional

from .strategies import (
    EVALNORM_MODES,
    BatchStatsStrategy,
    EMAStrategy,
    EvalNormOfflineStrategy,
    EvalNormPreciseBNStrategy,
    EvalNormStrategy,
    PreciseBNStrategy,
    Strategy,
)

StrategyFactory = Callable[[Optional[str], Dict[str, object]], Strategy]
_STRATEGIES: Dict[str, StrategyFactory] = {}


def register_strategy(kind: str, factory: StrategyFactory, *, force: bool = False) -> StrategyFactory:
    """Register ``factory(argument, options) -> Strategy`` under ``kind``; a spec ``"kind:argument"``
    (e.g. ``"precise_bn:1000"``, ``"batch_stats:4"``) passes the text after the colon, or None."""
    if kind in _STRATEGIES and not force:
        raise ValueError(f"strategy {kind!r} is already registered; pass force=True to replace it")
    _STRATEGIES[kind] = factory
    return factory


def unregister_strategy(kind: str) -> StrategyFactory:
    """Remove ``kind`` (e.g. a strategy registered by a test); returns its factory."""
    if kind not in _STRATEGIES:
        raise KeyError(f"strategy {kind!r} is not registered; registered: {', '.join(_STRATEGIES)}")
    return _STRATEGIES.pop(kind)


def registered_strategies() -> List[str]:
    return list(_STRATEGIES)


def int_argument(kind: str, argument: Optional[str], default) -> int:
    """The integer after the colon of a spec, or ``default`` without one."""
    if argument is None:
        return int(default)
    try:
        return int(argument)
    except ValueError:
        raise ValueError(f"strategy {kind!r} takes an integer after the colon, got {argument!r}") from None


def build_strategy(spec: str, options: Dict[str, object]) -> Strategy:
    kind, _, argument = spec.partition(":")
    if kind not in _STRATEGIES:
        raise ValueError(f"unknown strategy {spec!r}; available: {', '.join(registered_strategies())} "
                         "(with an argument: precise_bn:N, batch_stats:K)")
    return _STRATEGIES[kind](argument or None, options)


def default_strategy_specs(options: Dict[str, object]) -> List[str]:
    """Every registered strategy once; batch statistics once per requested k."""
    specs = []
    for kind in registered_strategies():
        if kind == "batch_stats":
            specs += [f"batch_stats:{k}" for k in options["batch_sizes"]]
        else:
            specs.append(kind)
    return specs


def _evalnorm_factory(key: str) -> StrategyFactory:
    return lambda arg, opts: EvalNormStrategy(key)


register_strategy("ema", lambda arg, opts: EMAStrategy())
register_strategy(
    "precise_bn", lambda arg, opts: PreciseBNStrategy(int_argument("precise_bn", arg, opts["precise_bn_samples"]))
)
register_strategy(
    "batch_stats", lambda arg, opts: BatchStatsStrategy(int_argument("batch_stats", arg, opts["test_batch_size"]))
)
for _key in EVALNORM_MODES:
    register_strategy(_key, _evalnorm_factory(_key))
register_strategy(
    "evalnorm_precise_bn",
    lambda arg, opts: EvalNormPreciseBNStrategy(int_argument("evalnorm_precise_bn", arg, opts["precise_bn_samples"])),
)
register_strategy(
    "evalnorm_offline",
    lambda arg, opts: EvalNormOfflineStrategy(int_argument("evalnorm_offline", arg, opts["precise_bn_samples"])),
)
