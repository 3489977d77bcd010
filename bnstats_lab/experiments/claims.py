"""The papers' claims the experiments test, declared once: which cells, which two strategies, which sign.

A :class:`Claim` compares two inference strategies of the comparison tool (``"ema"``,
``"evalnorm_learned"``, ``"precise_bn:500"``, ...) on the same trained checkpoints: per seed the
difference ``strategy_a − strategy_b`` of one COCO metric, then the mean and the seeds' spread (see
:func:`bnstats_lab.experiments.report_stats.verdict` for the rule that turns them into "holds", "does not
hold" or "inconclusive"). ``factors`` selects the cells of ``experiment`` the claim is about: every
cell whose factors contain these key/value pairs is one row of the claims table, so a filter that
leaves out a factor (e.g. the setting) is checked in each cell that factor takes.

``expected_sign`` is +1 (a better than b), −1 (a worse than b) or 0 (no difference: the mean
difference lies within the seeds' spread).

The claims are tested on the benchmark's scenes (:data:`~bnstats_lab.experiments.catalog.BENCHMARK_SCENES`,
the diversity level chosen before any AP run); the other scene sets of ``e1`` are reported in its
tables but are not what the claims are judged on. :func:`e1_claims` gives the same claims for another
E1-shaped experiment (the COCO catalog's ``coco_e1``).

A :class:`TrainingsClaim` compares two different trainings (MABN against BN, say), which share no
checkpoint: the difference of the two cells' means over seeds, judged against the spread of the
difference of two independent trainings (:func:`bnstats_lab.experiments.report_stats.unpaired_difference`).
"""
import dataclasses
from typing import Any, Mapping, Tuple

from .catalog import BENCHMARK_SCENES

__all__ = ["Claim", "CLAIMS", "converged_claims", "e1_claims", "e2_claims", "EVALNORM", "MABN", "PaperTable", "PAPER_TABLES",
           "RETHINKING", "TrainingsClaim", "TrendClaim", "trend_claims"]

EVALNORM = "Singh & Shrivastava, EvalNorm: Estimating Batch Normalization Statistics for Evaluation, ICCV 2019"
RETHINKING = "Wu & Johnson, Rethinking \"Batch\" in BatchNorm, 2021"
MABN = ("Yan et al., Towards Stabilizing Batch Statistics in Backward Propagation of Batch Normalization, "
        "ICLR 2020")


@dataclasses.dataclass(frozen=True)
class Claim:
    id: str
    paper: str  # the citation: authors, title, venue, the table or section
    text: str  # the claim in words, with the paper's own numbers
    experiment: str
    factors: Mapping[str, Any]  # the cells: those whose factors contain all these pairs
    strategy_a: str
    strategy_b: str
    expected_sign: int  # +1: a > b; -1: a < b; 0: no difference
    metric: Tuple[str, str] = ("bbox", "AP")
    # declared with the protocol's revision: judged by the revised rule only
    declared_with_revision: bool = False

    def __post_init__(self):
        if self.expected_sign not in (-1, 0, 1):
            raise ValueError(f"claim {self.id}: expected_sign must be -1, 0 or +1, got {self.expected_sign!r}")
        if len(self.metric) != 2:
            raise ValueError(f"claim {self.id}: metric is (task, name), e.g. ('bbox', 'AP'); got {self.metric!r}")

    def matches(self, factors: Mapping[str, Any]) -> bool:
        """Whether a cell with these factors is one this claim is about."""
        return all(k in factors and factors[k] == v for k, v in self.factors.items())


def e1_claims(experiment: str = "e1", scenes: Any = BENCHMARK_SCENES) -> Tuple[Claim, ...]:
    """The claims judged on an E1-shaped ``experiment`` (cells with the factors setting,
    images_per_batch and scenes), on its cells of ``scenes``."""
    return (
        Claim(
            "evalnorm-scratch-2img", f"{EVALNORM}, Table 2(a)",
            "From random initialization at 2 images per batch, EvalNorm with learned α̂, β̂ beats EMA statistics "
            "(Faster R-CNN R-50 on COCO: 22.0 → 23.5 AP, +1.5).",
            experiment, {"setting": "scratch", "images_per_batch": 2, "scenes": scenes},
            "evalnorm_learned", "ema", +1),
        Claim(
            "evalnorm-finetune-2img", f"{EVALNORM}, Table 2(d)",
            "With fine-tuned BN at 2 images per batch, EvalNorm with learned α̂, β̂ beats EMA statistics "
            "(24.8 → 30.2 AP, +5.4).",
            experiment, {"setting": "finetune", "images_per_batch": 2, "scenes": scenes},
            "evalnorm_learned", "ema", +1),
        Claim(
            "evalnorm-8img-equal", f"{EVALNORM}, Table 2(a), (d)",
            "At 8 images per batch EvalNorm and EMA statistics are on par (Δ 0.0 AP from random init, +0.2 with "
            "fine-tuned BN).",
            experiment, {"images_per_batch": 8, "scenes": scenes},
            "evalnorm_learned", "ema", 0),
        Claim(
            "precise-bn-2img", f"{RETHINKING}, §3",
            "Population statistics from PreciseBN (the fixed final weights) are at least as good as EMA statistics, "
            "which lag the weights and vary between checkpoints.",
            experiment, {"images_per_batch": 2, "scenes": scenes},
            "precise_bn:500", "ema", +1),
        Claim(
            "batch-stats-2img", f"{RETHINKING}, §4 (train–test inconsistency)",
            "At a small batch, normalizing with mini-batch statistics at test time (k = 2, the training batch) "
            "reduces the train–test inconsistency and beats EMA statistics.",
            experiment, {"images_per_batch": 2, "scenes": scenes},
            "batch_stats:2", "ema", +1),
        Claim(
            "evalnorm-offline-2img", f"{EVALNORM}, Table 1",
            "EvalNorm with α̂, β̂ estimated offline after training beats EMA statistics at a small batch "
            "(ResNet-50 on ImageNet at 2 samples/GPU: 64.80 → 71.03 top-1), on par with online estimation.",
            experiment, {"images_per_batch": 2, "scenes": scenes},
            "evalnorm_offline:500", "ema", +1),
    )


@dataclasses.dataclass(frozen=True)
class TrainingsClaim:
    """A claim about two trainings: ``strategy_a`` on the cells of ``experiment`` whose factors contain
    ``factors`` against ``strategy_b`` on the cell of ``experiment_b`` whose factors contain
    ``factors_b`` and agree with the first cell on every factor named in ``shared`` (one row per
    matching cell of ``experiment``). Not paired: the two cells are different models."""

    id: str
    paper: str
    text: str
    experiment: str
    factors: Mapping[str, Any]
    strategy_a: str
    experiment_b: str
    factors_b: Mapping[str, Any]
    strategy_b: str
    expected_sign: int
    shared: Tuple[str, ...] = ("setting",)
    metric: Tuple[str, str] = ("bbox", "AP")

    __post_init__ = Claim.__post_init__
    matches = Claim.matches

    def matches_b(self, factors_a: Mapping[str, Any], factors_b: Mapping[str, Any]) -> bool:
        """Whether a cell of ``experiment_b`` with ``factors_b`` is the counterpart of an ``experiment``
        cell with ``factors_a``."""
        return (all(k in factors_b and factors_b[k] == v for k, v in self.factors_b.items())
                and all(factors_a.get(k) == factors_b.get(k) for k in self.shared))


def e2_claims(scenes: Any = BENCHMARK_SCENES) -> Tuple[TrainingsClaim, ...]:
    """E2's claims: its trainings against E1's BN cells (EvalNorm layers trained as BN, EMA statistics)."""
    bn_2img = {"images_per_batch": 2, "scenes": scenes}
    return (
        TrainingsClaim(
            "mabn-beats-bn-2img", f"{MABN}, the authors' COCO results",
            "At 2 images per batch MABN beats BN (Mask R-CNN R-50-FPN from scratch: BN 32.4 → MABN 36.5 box AP).",
            "e2", {"norm": "MABN", "arch": "frcnn", "scenes": scenes}, "ema", "e1", bn_2img, "ema", +1),
        TrainingsClaim(
            "mabn-reaches-large-batch", f"{MABN}, abstract and the authors' COCO results",
            "MABN at 2 images per batch restores BN's large-batch accuracy (from scratch MABN 36.5 against "
            "SyncBN over 16 images 36.8 box AP; fine-tuned 38.4 against 38.3).",
            "e2", {"norm": "MABN", "arch": "frcnn", "scenes": scenes}, "ema",
            "e1", {"images_per_batch": 8, "scenes": scenes}, "ema", 0),
        TrainingsClaim(
            "frozen-bn-late-2img", f"{RETHINKING}, §4 (train–test inconsistency)",
            "At a small batch, switching to population statistics for the last part of training (FrozenBN late) "
            "reduces the train–test inconsistency and beats BN with EMA statistics.",
            "e2", {"norm": "BN, FrozenBN late", "arch": "frcnn", "scenes": scenes}, "ema", "e1", bn_2img, "ema", +1),
    )


@dataclasses.dataclass(frozen=True)
class TrendClaim:
    """A claim about how a paired difference ``strategy_a − strategy_b`` changes along the numeric
    factor ``x`` over the cells of ``experiment`` whose factors contain ``factors``: the least-squares
    slope of the per-seed differences against ``x``, judged by its 95% interval (sign +1: the
    difference grows with ``x``). Every matching cell needs the minimum number of seeds."""

    id: str
    paper: str
    text: str
    experiment: str
    factors: Mapping[str, Any]
    x: str
    strategy_a: str
    strategy_b: str
    expected_sign: int
    metric: Tuple[str, str] = ("bbox", "AP")

    __post_init__ = Claim.__post_init__
    matches = Claim.matches


DOSE_RESPONSE = "this project's dose-response experiment (declared before its runs)"


def trend_claims(experiment: str = "e1") -> Tuple[TrendClaim, ...]:
    """The dose-response claim: EvalNorm's gain over EMA grows with the scenes' appearance diversity."""
    return (
        TrendClaim(
            "evalnorm-gain-grows-with-diversity", DOSE_RESPONSE,
            "From random initialization at 2 images per batch, the gain of EvalNorm (learned α̂, β̂) over EMA "
            "statistics grows with the appearance diversity d of the scenes (d = 0, 0.5, 1, 2): the slope of the "
            "per-seed paired differences against d is positive.",
            experiment, {"setting": "scratch", "images_per_batch": 2}, "diversity",
            "evalnorm_learned", "ema", +1),
    )


CONVERGED_SUFFIX = "-converged"


def converged_claims(experiment: str = "e5", scenes: Any = BENCHMARK_SCENES) -> Tuple[Claim, ...]:
    """E1's claims judged again on the converged detectors of ``experiment`` (4x the schedule at 2
    images, the same epochs at 8), on their final checkpoints; the id gains ``-converged``. Only the
    claims whose two strategies those cells evaluate (not offline EvalNorm)."""
    out = []
    for claim in e1_claims(experiment, scenes):
        if claim.strategy_a == "evalnorm_offline:500":
            continue
        out.append(dataclasses.replace(
            claim, id=claim.id + CONVERGED_SUFFIX, factors=dict(claim.factors, checkpoint="final"),
            declared_with_revision=True,
            text=claim.text + " Judged on detectors trained to convergence (3200 iterations at 2 images, "
                              "800 at 8: the same epochs)."))
    return tuple(out)


def _each_followed_by_its_converged(claims: Tuple[Claim, ...], converged: Tuple[Claim, ...]) -> Tuple[Claim, ...]:
    by_id = {c.id[:-len(CONVERGED_SUFFIX)]: c for c in converged}
    return tuple(x for c in claims for x in ((c, by_id[c.id]) if c.id in by_id else (c,)))


CLAIMS: Tuple[Any, ...] = (_each_followed_by_its_converged(e1_claims(), converged_claims()) + e2_claims()
                           + trend_claims())


@dataclasses.dataclass(frozen=True)
class PaperTable:
    """A table in a paper's layout: rows are the values of the factor ``rows``, column groups the
    values of ``columns``; each group shows strategy ``b`` (the baseline), strategy ``a`` and the
    paired difference a − b (box AP), over the cells of ``experiment`` whose factors contain
    ``factors``."""

    title: str
    experiment: str
    factors: Mapping[str, Any]
    rows: str
    columns: str
    strategy_a: str
    strategy_b: str


def e1_paper_tables(experiment: str = "e1", scenes: Any = BENCHMARK_SCENES) -> Tuple[PaperTable, ...]:
    return (PaperTable(f"EvalNorm's Table 2 layout ({EVALNORM}): BN with EMA statistics against EvalNorm",
                       experiment, {"scenes": scenes}, "images_per_batch", "setting", "evalnorm_learned", "ema"),)


PAPER_TABLES: Tuple[PaperTable, ...] = e1_paper_tables()
