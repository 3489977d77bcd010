"""The results report (bnstats_lab.experiments.report): statistics, verdicts, tables, figures, the page.

Synthetic records with chosen AP values are written as JSON files; every mean, standard deviation
and paired difference is recomputed here with the ``statistics`` module from the chosen values.
No training.
"""
import json
import math
import os
import statistics

import pytest

from bnstats_lab.experiments import report, report_stats
from bnstats_lab.experiments.catalog import load_experiments
from bnstats_lab.experiments.claims import CLAIMS, Claim, TrainingsClaim, TrendClaim
from bnstats_lab.experiments.spec import Cell, Experiment

EXP = "ex"
# cell -> factors; AP per strategy per seed (None: the strategy is unavailable on that seed)
FACTORS = {
    "scratch_2img": {"setting": "scratch", "images_per_batch": 2, "scenes": "d100", "diversity": 1.0},
    "scratch_8img": {"setting": "scratch", "images_per_batch": 8, "scenes": "d100", "diversity": 1.0},
    "finetune_2img": {"setting": "finetune", "images_per_batch": 2, "scenes": "d100", "diversity": 1.0},
    "scratch_2img_plain": {"setting": "scratch", "images_per_batch": 2, "scenes": "default", "diversity": 0.0},
}
AP = {
    # paired differences 1.0, 1.5, 0.5 with a large spread across seeds: pairing matters
    "scratch_2img": {"ema": [20.0, 25.0, 30.0], "evalnorm_learned": [21.0, 26.5, 30.5],
                     "precise_bn:500": [20.2, 24.0, 30.1]},
    "scratch_8img": {"ema": [31.0, 32.0, 36.0], "evalnorm_learned": [31.5, 31.0, 36.2],
                     "precise_bn:500": [31.0, 32.5, 36.0]},
    # seed 1 has no evalnorm_learned: it drops out of the paired difference
    "finetune_2img": {"ema": [10.0, 12.0, 17.0], "evalnorm_learned": [14.0, None, 20.0],
                      "precise_bn:500": [10.5, 11.0, 17.5]},
    "scratch_2img_plain": {"ema": [26.0], "evalnorm_learned": [26.4], "precise_bn:500": [26.1]},
}
DISCREPANCY = {"scratch_2img": [0.30, 0.34, 0.29], "scratch_8img": [0.11, 0.12, 0.10],
               "finetune_2img": [0.25, 0.27, 0.26], "scratch_2img_plain": [0.05]}


def make_record(experiment, cell, seed, factors, aps, discrepancy=None, segm=None, loss=None):
    strategies = []
    for name, ap in aps.items():
        if ap is None:
            strategies.append({"strategy": name, "description": name, "available": False,
                               "reason": f"{name} does not apply", "test_batch_size": 1})
            continue
        entry = {"strategy": name, "description": name, "available": True, "reason": None, "test_batch_size": 1,
                 "bbox": {"AP": ap, "AP50": ap + 20.0, "AP75": ap - 1.0},
                 "discrepancy_l1": discrepancy if name == "ema" else None}
        if segm is not None:
            entry["segm"] = {"AP": segm[name], "AP50": segm[name] + 15.0, "AP75": segm[name] - 2.0}
        strategies.append(entry)
    return {"format": 1, "experiment": experiment, "cell": cell, "seed": seed, "factors": dict(factors),
            "config": "configs/cpu/x.yaml", "overrides": [], "config_hash": "0" * 64, "commit": "abc123",
            "dirty": False, "evaluation_seconds": 1.0, "wall_seconds": 2.0,
            "train": {"iterations": 10, "final_losses": {} if loss is None else {"total_loss": loss}},
            "created": "2026-01-01T00:00:00Z", "strategies": strategies}


def write_record(root, record):
    folder = os.path.join(root, record["experiment"], record["cell"])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"seed{record['seed']}.json")
    with open(path, "w") as f:
        json.dump(record, f, sort_keys=True)
    return path


@pytest.fixture
def results(tmp_path):
    root = str(tmp_path / "results")
    for cell, per_strategy in AP.items():
        for seed in range(len(per_strategy["ema"])):
            aps = {name: values[seed] for name, values in per_strategy.items()}
            write_record(root, make_record(EXP, cell, seed, FACTORS[cell], aps, DISCREPANCY[cell][seed]))
    return root


def ap(cell, strategy):
    return [v for v in AP[cell][strategy] if v is not None]


# ------------------------------------------------------------------------------------------ loading
def test_load_records_reads_every_seed_file_sorted(results):
    records = report.load_records(results)
    assert [(r["cell"], r["seed"]) for r in records] == sorted(
        (cell, seed) for cell in AP for seed in range(len(AP[cell]["ema"])))


def test_rows_one_per_strategy_with_metrics(results):
    records = report.load_records(results)
    rows = report.rows(records)
    assert len(rows) == sum(len(r["strategies"]) for r in records) == 30
    row = next(r for r in rows if (r["cell"], r["seed"], r["strategy"]) == ("scratch_2img", 1, "evalnorm_learned"))
    assert row["factors"] == FACTORS["scratch_2img"]
    assert (row["bbox_AP"], row["bbox_AP50"], row["bbox_AP75"]) == (26.5, 46.5, 25.5)
    assert row["segm_AP"] is None and row["available"] is True
    missing = next(r for r in rows if (r["cell"], r["seed"], r["strategy"]) == ("finetune_2img", 1, "evalnorm_learned"))
    assert missing["available"] is False and missing["bbox_AP"] is None and "does not apply" in missing["reason"]
    ema = next(r for r in rows if (r["cell"], r["seed"], r["strategy"]) == ("scratch_8img", 2, "ema"))
    assert ema["discrepancy_l1"] == DISCREPANCY["scratch_8img"][2]


def test_rows_carry_mask_ap(tmp_path):
    segm = {"ema": 18.0, "evalnorm_learned": 19.5}
    record = make_record(EXP, "m", 0, {"setting": "scratch"}, {"ema": 20.0, "evalnorm_learned": 21.0}, segm=segm)
    rows = {r["strategy"]: r for r in report.rows([record])}
    assert rows["evalnorm_learned"]["segm_AP"] == 19.5 and rows["ema"]["segm_AP75"] == 16.0


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    (json.dumps({"format": 1, "experiment": EXP, "cell": "c", "seed": 0, "factors": {}}), "strategies"),
    (json.dumps([1, 2]), "not a JSON object"),
    (json.dumps({"format": 1, "experiment": EXP, "cell": "c", "seed": 0, "factors": {},
                 "strategies": [{"strategy": "ema", "available": True}]}), "no numeric bbox AP"),
    (json.dumps({"format": 1, "experiment": EXP, "cell": "c", "seed": 0, "factors": {}, "strategies": [],
                 "evalnorm_layers": [{"layer": "x", "alpha_hat": "high"}]}), "evalnorm_layers must be a list"),
])
def test_malformed_record_raises_naming_the_file(results, content, expected):
    folder = os.path.join(results, EXP, "c")
    os.makedirs(folder)
    bad = os.path.join(folder, "seed0.json")
    with open(bad, "w") as f:
        f.write(content)
    with pytest.raises(report.RecordError) as info:
        report.load_records(results)
    assert bad in str(info.value) and expected in str(info.value)


def test_record_in_the_wrong_folder_is_refused(results):
    record = make_record(EXP, "scratch_2img", 7, FACTORS["scratch_2img"], {"ema": 1.0})
    path = os.path.join(results, EXP, "scratch_8img", "seed7.json")
    with open(path, "w") as f:
        json.dump(record, f)
    with pytest.raises(report.RecordError, match="belongs at") as info:
        report.load_records(results)
    assert path in str(info.value)


# --------------------------------------------------------------------------------------- statistics
def test_summarize_matches_statistics_module(results):
    records = report.load_records(results)
    summary = {(s["cell"], s["strategy"]): s for s in report.summarize(records, EXP)}
    assert set(summary) == {(c, s) for c in AP for s in AP[c]}
    for (cell, strategy), s in summary.items():
        values = ap(cell, strategy)
        assert s["n"] == len(values) and s["bbox"]["values"] == values
        assert s["bbox"]["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
        if len(values) > 1:
            assert s["bbox"]["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
        else:
            assert s["bbox"]["std"] is None
        assert s["segm"] is None
    assert summary[("finetune_2img", "evalnorm_learned")]["n"] == 2
    assert summary[("finetune_2img", "evalnorm_learned")]["seeds"] == [0, 2]
    disc = summary[("scratch_2img", "ema")]["discrepancy_l1"]
    assert disc["mean"] == pytest.approx(statistics.mean(DISCREPANCY["scratch_2img"]))
    assert disc["std"] == pytest.approx(statistics.stdev(DISCREPANCY["scratch_2img"]))
    # table order: settings in the config matrix's order, then images per batch, then the rest
    cells = list(dict.fromkeys(s["cell"] for s in report.summarize(records, EXP)))
    assert cells == ["scratch_2img", "scratch_2img_plain", "scratch_8img", "finetune_2img"]


def test_paired_difference_is_per_seed(results):
    records = report.load_records(results)
    d = report.paired_difference(records, EXP, "scratch_2img", "evalnorm_learned", "ema")
    diffs = [a - b for a, b in zip(AP["scratch_2img"]["evalnorm_learned"], AP["scratch_2img"]["ema"])]
    assert d["n"] == 3 and d["seeds"] == [0, 1, 2] and d["values"] == pytest.approx(diffs)
    assert d["mean"] == pytest.approx(statistics.mean(diffs)) and d["std"] == pytest.approx(statistics.stdev(diffs))
    # pairing: the std of the differences (0.5) is far below the seeds' spread of either strategy (5)
    assert d["std"] == pytest.approx(0.5) and statistics.stdev(AP["scratch_2img"]["ema"]) == pytest.approx(5.0)

    d = report.paired_difference(records, EXP, "finetune_2img", "evalnorm_learned", "ema")
    assert d["seeds"] == [0, 2] and d["values"] == pytest.approx([4.0, 3.0])
    assert d["mean"] == pytest.approx(3.5) and d["std"] == pytest.approx(statistics.stdev([4.0, 3.0]))

    d = report.paired_difference(records, EXP, "scratch_2img_plain", "evalnorm_learned", "ema")
    assert d["n"] == 1 and d["std"] is None and d["mean"] == pytest.approx(0.4)
    d = report.paired_difference(records, EXP, "no_such_cell", "evalnorm_learned", "ema")
    assert d["n"] == 0 and d["mean"] is None
    d = report.paired_difference(records, EXP, "scratch_2img", "ema", "ema", metric=("bbox", "AP75"))
    assert d["values"] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("mean, std, n, sign, expected", [
    (1.0, 0.5, 3, +1, "holds"),
    (-1.0, 0.5, 3, +1, "does not hold"),
    (-1.0, 0.5, 3, -1, "holds"),
    (1.0, 0.5, 3, -1, "does not hold"),
    (0.4, 0.5, 3, +1, "inconclusive"),  # smaller than the seeds' spread
    (0.5, 0.5, 3, +1, "inconclusive"),  # |mean| == std: not larger than the spread
    (0.51, 0.5, 2, +1, "holds"),
    (5.0, None, 1, +1, "inconclusive"),  # one seed: no spread
    (5.0, 0.0, 1, +1, "inconclusive"),
    (0.2, 0.5, 3, 0, "holds"),  # no difference claimed, none larger than the spread
    (-0.5, 0.5, 3, 0, "holds"),
    (1.0, 0.5, 3, 0, "does not hold"),
    (0.0, 0.0, 1, 0, "inconclusive"),
    (float("nan"), 0.5, 3, +1, "inconclusive"),
])
def test_spread_verdict_rule_before_the_revision(mean, std, n, sign, expected):
    assert report_stats.spread_verdict(mean, std, n, sign) == expected


# t quantiles (0.975 and 0.95) from published tables, the independent reference of the intervals
T975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445}
T95 = {1: 6.313752, 2: 2.919986, 3: 2.353363, 4: 2.131847}


def paired(values):
    """A paired difference with its t intervals computed here from the table above."""
    n = len(values)
    mean = statistics.mean(values)
    se = statistics.stdev(values) / math.sqrt(n) if n > 1 else None
    out = {"n": n, "mean": mean, "ci95": None, "ci90": None}
    if se is not None and n - 1 in T975:
        out["ci95"] = (mean - T975[n - 1] * se, mean + T975[n - 1] * se)
        out["ci90"] = (mean - T95[n - 1] * se, mean + T95[n - 1] * se)
    return out


@pytest.mark.parametrize("values, sign, expected", [
    ([2.6, 3.0, 3.2], +1, "holds"),  # interval well above 0
    ([2.6, 3.0, 3.2], -1, "does not hold"),
    ([-0.35, 0.56, 0.58], +1, "inconclusive"),  # mean 0.26: the interval contains 0
    ([0.02, 0.44, 0.68], +1, "inconclusive"),  # mean > sd (the old rule's "holds"), interval still contains 0
    ([0.44, 0.26], +1, "inconclusive"),  # two seeds: too few whatever the interval
    ([0.1, -0.1, 0.05, 0.0], 0, "holds"),  # 90% interval inside ±0.5
    ([-0.02, 0.77, 0.4], 0, "inconclusive"),  # on par by the old rule; its interval reaches beyond 0.5
    ([2.0, 2.2, 2.1], 0, "does not hold"),  # the 95% interval lies beyond +0.5
])
def test_verdict_rule_from_intervals(values, sign, expected):
    assert report.verdict(paired(values), sign) == expected


def test_verdict_intervals_match_the_difference_functions(results):
    records = report.load_records(results)
    d = report.paired_difference(records, EXP, "scratch_2img", "evalnorm_learned", "ema")
    reference = paired(d["values"])
    assert d["ci95"] == pytest.approx(reference["ci95"], abs=1e-5)
    assert d["ci90"] == pytest.approx(reference["ci90"], abs=1e-5)


def test_verdict_refuses_other_signs():
    with pytest.raises(ValueError, match="expected_sign"):
        report.verdict(paired([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError, match="expected_sign"):
        report_stats.spread_verdict(1.0, 0.5, 3, 2)


# ------------------------------------------------------------------------------------------- claims
def claim(cid, factors, a="evalnorm_learned", b="ema", sign=+1):
    return Claim(cid, "A. Author, Paper, 2020, Table 9", f"text of {cid}", EXP, factors, a, b, sign)


def test_claims_measured_not_run_and_unavailable(results):
    records = report.load_records(results)
    claims = [
        claim("c-2img", {"setting": "scratch", "images_per_batch": 2, "scenes": "d100"}),
        claim("c-8img", {"images_per_batch": 8}, sign=0),
        claim("c-missing", {"setting": "frozen"}),
        claim("c-nostrategy", {"images_per_batch": 2, "scenes": "d100"}, a="batch_stats:2"),
    ]
    planned = [Experiment(EXP, "synthetic", (
        Cell("frozen_2img", "x.yaml", factors=(("setting", "frozen"), ("images_per_batch", 2))),))]
    rows = {r["claim"].id: r for r in report.evaluate_claims(records, claims)}
    diffs = [a - b for a, b in zip(AP["scratch_2img"]["evalnorm_learned"], AP["scratch_2img"]["ema"])]
    row = rows["c-2img"]
    assert row["cell"] == "scratch_2img" and row["status"] == "measured"
    # differences 1.0, 1.5, 0.5: mean twice their sd, but the 95% interval [-0.24, +2.24] contains 0
    assert row["verdict"] == report.verdict(paired(diffs), +1) == "inconclusive"
    assert row["previous_verdict"] == report_stats.spread_verdict(
        statistics.mean(diffs), statistics.stdev(diffs), 3, +1) == "holds"
    diffs8 = [a - b for a, b in zip(AP["scratch_8img"]["evalnorm_learned"], AP["scratch_8img"]["ema"])]
    assert abs(statistics.mean(diffs8)) <= statistics.stdev(diffs8)  # the chosen values are within the spread
    assert rows["c-8img"]["previous_verdict"] == "holds"  # "on par" by the old rule; the 90% interval is ±1.3 wide
    assert rows["c-8img"]["verdict"] == report.verdict(paired(diffs8), 0) == "inconclusive"
    assert rows["c-missing"]["status"] == "not run" and rows["c-missing"]["cell"] is None
    assert rows["c-nostrategy"]["status"] == "not available"
    assert "batch_stats:2 not evaluated" in rows["c-nostrategy"]["reason"]
    # a declared cell without records is "not run", by name
    rows = [r for r in report.evaluate_claims(records, claims, planned) if r["claim"].id == "c-missing"]
    assert [(r["cell"], r["status"]) for r in rows] == [("frozen_2img", "not run")]
    # a filter without the setting gives one row per matching cell
    rows = [r for r in report.evaluate_claims(records, [claim("c-any", {"images_per_batch": 2, "scenes": "d100"})])]
    assert sorted(r["cell"] for r in rows) == ["finetune_2img", "scratch_2img"]


def test_declared_claims_match_declared_cells():
    """Each claim of claims.py selects at least one cell of the lab's catalog that is evaluated under
    both of its strategies: a filter with a misspelt factor value would otherwise stay "not run"."""
    experiments = load_experiments()
    assert len(CLAIMS) >= 9 and len({c.id for c in CLAIMS}) == len(CLAIMS)
    for c in CLAIMS:
        assert c.experiment in experiments, c.id
        if isinstance(c, TrendClaim):  # the project's own hypothesis: at least 3 levels, each with both strategies
            cells = [cell for cell in experiments[c.experiment].cells
                     if c.matches(cell.factor_dict) and {c.strategy_a, c.strategy_b} <= set(cell.strategies)]
            assert len({cell.factor_dict[c.x] for cell in cells}) >= 3, c.id
            continue
        assert any(word in c.paper for word in ("ICCV 2019", "ICLR 2020", "2021")), c.id
        if isinstance(c, TrainingsClaim):
            cells = [cell for cell in experiments[c.experiment].cells
                     if c.matches(cell.factor_dict) and c.strategy_a in cell.strategies]
            assert cells, f"claim {c.id}: no cell of {c.experiment} matches {dict(c.factors)} with {c.strategy_a}"
            for cell in cells:  # each has exactly one counterpart, evaluated under strategy_b
                counterparts = [other for other in experiments[c.experiment_b].cells
                                if c.matches_b(cell.factor_dict, other.factor_dict)]
                assert len(counterparts) == 1, (c.id, cell.name, [o.name for o in counterparts])
                assert c.strategy_b in counterparts[0].strategies, (c.id, counterparts[0].name)
            continue
        cells = [cell for cell in experiments[c.experiment].cells
                 if c.matches(cell.factor_dict) and {c.strategy_a, c.strategy_b} <= set(cell.strategies)]
        assert cells, f"claim {c.id}: no cell of {c.experiment} matches {dict(c.factors)} with both strategies"


# two trainings: cells of another experiment against the synthetic experiment's cells
EXP_B = "other"
FACTORS_B = {"mabn_scratch": {"setting": "scratch", "images_per_batch": 2, "scenes": "d100", "norm": "MABN"},
             "mabn_finetune": {"setting": "finetune", "images_per_batch": 2, "scenes": "d100", "norm": "MABN"}}
AP_B = {"mabn_scratch": [33.0, 35.5], "mabn_finetune": [19.0]}


def trainings_claim(cid, factors_b, sign=+1, factors=None):
    return TrainingsClaim(cid, "A. Author, Paper, ICLR 2020", f"text of {cid}", EXP_B, factors or {"norm": "MABN"},
                          "ema", EXP, factors_b, "ema", sign)


def test_claims_about_two_trainings(results):
    """A claim about two trainings: the difference of the cells' means against √(sd_a² + sd_b²), each
    cell with its counterpart of the same setting; one seed in either cell is inconclusive; a
    counterpart without records is "not run"; an unconverged 8-image counterpart makes it inconclusive."""
    for cell, values in AP_B.items():
        for seed, value in enumerate(values):
            write_record(results, make_record(EXP_B, cell, seed, FACTORS_B[cell], {"ema": value}))
    records = report.load_records(results)
    rows = {r["cell"]: r for r in report.evaluate_claims(records, [trainings_claim("t-2img", {"images_per_batch": 2,
                                                                                                "scenes": "d100"})])}
    assert sorted(rows) == ["mabn_finetune", "mabn_scratch"]
    row = rows["mabn_scratch"]
    a, b = AP_B["mabn_scratch"], AP["scratch_2img"]["ema"]
    mean = statistics.mean(a) - statistics.mean(b)
    spread = (statistics.stdev(a) ** 2 + statistics.stdev(b) ** 2) ** 0.5
    assert row["cell_b"] == "scratch_2img" and row["status"] == "measured"
    assert row["difference"]["mean"] == pytest.approx(mean) and row["difference"]["std"] == pytest.approx(spread)
    assert row["difference"]["n"] == 2 and abs(mean) > spread  # the chosen values exceed their spread
    assert row["previous_verdict"] == "holds" and row["verdict"] == "inconclusive"  # 2 seeds are too few now
    low, high = row["difference"]["ci95"]
    assert low < mean < high
    # paired by seed it would be a different number: the rule does not pair different trainings
    paired = statistics.mean([x - y for x, y in zip(a, b)])
    assert paired != pytest.approx(mean)
    one_seed = rows["mabn_finetune"]
    assert one_seed["cell_b"] == "finetune_2img" and one_seed["difference"]["std"] is None
    assert one_seed["verdict"] == "inconclusive"

    # the counterpart is declared but has no records: "not run", naming it
    planned = [Experiment(EXP, "synthetic", (Cell("frozen_2img", "x.yaml", factors=(
        ("setting", "frozen"), ("images_per_batch", 2), ("scenes", "d100"))),))]
    frozen = trainings_claim("t-frozen", {"images_per_batch": 2, "scenes": "d100"},
                             factors={"norm": "FrozenBN"})
    write_record(results, make_record(EXP_B, "frozenbn_frozen", 0, {"setting": "frozen", "images_per_batch": 2,
                                                                      "scenes": "d100", "norm": "FrozenBN"},
                                      {"ema": 30.0}))
    records = report.load_records(results)
    row = report.evaluate_claims(records, [frozen], planned)[0]
    assert (row["status"], row["cell_b"]) == ("not run", "frozen_2img")
    # no counterpart at all: not available, saying so
    row = report.evaluate_claims(records, [frozen])[0]
    assert row["status"] == "not available" and f"no cell of {EXP}" in row["reason"]

    # against the 8-image cell, which is unconverged by the loss rule: inconclusive with the note
    losses = {"scratch_2img": 0.8, "scratch_8img": 1.2}
    for cell, loss in losses.items():
        for seed in range(3):
            aps = {name: values[seed] for name, values in AP[cell].items()}
            write_record(results, make_record(EXP, cell, seed, FACTORS[cell], aps, loss=loss))
    records = report.load_records(results)
    large = trainings_claim("t-8img", {"images_per_batch": 8}, sign=0, factors={"norm": "MABN", "setting": "scratch"})
    row = report.evaluate_claims(records, [large])[0]
    assert row["cell_b"] == "scratch_8img" and row["verdict"] == "inconclusive" and "unconverged" in row["note"]

    text = report.render_markdown(records, [trainings_claim("t-2img", {"images_per_batch": 2, "scenes": "d100"})])
    line = next(x for x in text.splitlines() if x.startswith("| **t-2img**: text of t-2img"))
    low, high = report.evaluate_claims(
        records, [trainings_claim("t-2img", {"images_per_batch": 2, "scenes": "d100"})])[0]["difference"]["ci95"]
    assert f"{mean:+.2f} [{low:+.2f}, {high:+.2f}] (2 vs 3 seeds)" in line and f"b = ema of {EXP}/scratch_2img" in line
    assert line.rstrip().endswith("| inconclusive | holds |")


# -------------------------------------------------------------------------------------- convergence
def test_convergence_check_on_the_batch_size_axis(results):
    """An 8-image cell whose final loss exceeds 1.1x its 2-image counterpart's is unconverged: marked
    in the tables, and a claim judged on it is inconclusive whatever its difference."""
    losses = {"scratch_2img": [0.80, 0.90, 1.00], "scratch_8img": [1.10, 1.00, 0.90],
              "finetune_2img": [0.5, 0.5, 0.5], "scratch_2img_plain": [0.7]}
    for cell, per_strategy in AP.items():
        for seed in range(len(per_strategy["ema"])):
            aps = {name: values[seed] for name, values in per_strategy.items()}
            write_record(results, make_record(EXP, cell, seed, FACTORS[cell], aps, DISCREPANCY[cell][seed],
                                              loss=losses[cell][seed]))
    records = report.load_records(results)
    checked = report.convergence(records, EXP)
    assert list(checked) == ["scratch_8img"]  # the other cells are at 2 images
    ratio = statistics.mean(losses["scratch_8img"]) / statistics.mean(losses["scratch_2img"])
    assert checked["scratch_8img"]["reference_cell"] == "scratch_2img"
    assert checked["scratch_8img"]["ratio"] == pytest.approx(ratio) and ratio > 1.1
    assert checked["scratch_8img"]["converged"] is False
    assert report.convergence(records, EXP, ratio=1.2)["scratch_8img"]["converged"] is True

    equal = claim("c-8img", {"images_per_batch": 8}, sign=0)
    row = report.evaluate_claims(records, [equal])[0]
    assert row["difference"]["n"] == 3 and row["verdict"] == "inconclusive" and "unconverged" in row["note"]
    text = report.render_markdown(records, [equal])
    assert "| scratch_8img (unconverged) |" in text and "inconclusive (unconverged" in text


def test_converged_claims_judge_final_checkpoints_by_the_revised_rule_only(tmp_path):
    """The converged detectors' claims: one row per final checkpoint cell (the 2-image cell's
    intermediate checkpoints are not judged), the 8-image cell checked for convergence against the
    long 2-image cell (same epochs) and not its intermediate checkpoints, and no verdict under the
    rule before the revision (they were declared with it)."""
    from bnstats_lab.experiments.claims import converged_claims
    root = str(tmp_path / "results")
    base = {"setting": "scratch", "scenes": "d200", "diversity": 2.0, "norm": "EvalNorm"}
    cells = {  # cell -> (extra factors, ema per seed, evalnorm_learned per seed, detection loss)
        "scratch_2img_3200it": ({"images_per_batch": 2, "checkpoint": "final"}, [30.0, 32.0, 31.0], [37.0, 40.0, 38.0], 0.50),
        "scratch_2img_3200it_at800": ({"images_per_batch": 2, "checkpoint": "after 800 iterations"},
                                      [6.0, 6.5, 5.5], [8.0, 9.5, 7.0], 0.90),
        "scratch_8img_800it": ({"images_per_batch": 8, "checkpoint": "final"}, [40.0, 41.0, 39.0], [40.1, 41.2, 38.9], 0.52),
    }
    for cell, (extra, ema, learned, loss) in cells.items():
        for seed in range(3):
            record = make_record("e5", cell, seed, dict(base, **extra),
                                 {"ema": ema[seed], "evalnorm_learned": learned[seed]}, loss=loss)
            record["train"]["final_losses"]["detection_loss"] = loss
            write_record(root, record)
    records = report.load_records(root)
    claims = {c.id: c for c in converged_claims("e5", "d200")}
    assert set(claims) == {"evalnorm-scratch-2img-converged", "evalnorm-finetune-2img-converged",
                           "evalnorm-8img-equal-converged", "precise-bn-2img-converged", "batch-stats-2img-converged"}
    rows = report.evaluate_claims(records, [claims["evalnorm-scratch-2img-converged"]])
    assert [r["cell"] for r in rows] == ["scratch_2img_3200it"]
    differences = [7.0, 8.0, 7.0]
    assert rows[0]["difference"]["mean"] == pytest.approx(statistics.mean(differences))
    assert rows[0]["verdict"] == "holds" and rows[0]["previous_verdict"] is None
    equal = report.evaluate_claims(records, [claims["evalnorm-8img-equal-converged"]])
    assert [r["cell"] for r in equal] == ["scratch_8img_800it"]
    assert "note" not in equal[0]  # 0.52 / 0.50 = 1.04x: converged against the final 2-image cell
    assert equal[0]["verdict"] == "holds"  # differences +0.1, +0.2, -0.1: 90% interval inside +-0.5
    text = report.render_markdown(records, [claims["evalnorm-8img-equal-converged"]])
    assert "| holds | — (declared with the revision) |" in text


# ----------------------------------------------------------------------------------------- markdown
def _table_row(markdown, first_cell):
    rows = [line for line in markdown.splitlines() if line.startswith(f"| {first_cell} |")]
    assert rows, f"no table row for {first_cell}"
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_markdown_tables_and_not_run(results):
    records = report.load_records(results)
    planned = [Experiment(EXP, "synthetic", tuple(
        Cell(name, "x.yaml", strategies=("ema", "evalnorm_learned", "precise_bn:500"), factors=tuple(f.items()))
        for name, f in list(FACTORS.items()) + [("frozen_2img", {"setting": "frozen", "images_per_batch": 2,
                                                                   "scenes": "d100", "diversity": 1.0})]))]
    claims = [claim("c-2img", {"setting": "scratch", "images_per_batch": 2, "scenes": "d100"}),
              claim("c-frozen", {"setting": "frozen"}),
              Claim("c-other", "B. Author, 2021", "elsewhere", "e9", {"images_per_batch": 2}, "a", "b", +1)]
    text = report.render_markdown(records, claims, experiments=planned)
    row = _table_row(text, "scratch_2img")  # the AP table comes first
    values = AP["scratch_2img"]["ema"]
    assert row[:5] == ["scratch_2img", "scratch", "2", "d100", "1.0"]
    assert row[5] == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (3)"
    assert _table_row(text, "scratch_2img_plain")[5] == "26.00 (1)"
    assert _table_row(text, "frozen_2img")[5:] == ["not run"] * 3
    finetune = [line for line in text.splitlines() if line.startswith("| finetune_2img |")]
    assert finetune[0].split("|")[7].strip() == "17.00 ± 4.24 (2)"  # evalnorm_learned: seeds 0 and 2
    # the paired-difference table: evalnorm_learned − ema
    assert finetune[1].split("|")[6].strip() == f"+3.50 ± {statistics.stdev([4.0, 3.0]):.2f} (2)"
    claim_rows = [line for line in text.splitlines() if line.startswith("| **c-")]
    assert claim_rows[0].endswith("| +1.00 [-0.24, +2.24] (3) | inconclusive | holds |")
    assert claim_rows[1].endswith("| not run | not run |") and "frozen_2img" in claim_rows[1]
    assert "### Experiment e9" in text and claim_rows[2].endswith("| not run | not run |")
    # without the declaration the cell is still "not run" in the claims table
    text = report.render_markdown(records, claims[1:2])
    assert [line for line in text.splitlines() if line.startswith("| **c-")][0].endswith("| not run | not run |")


def test_cells_whose_seeds_started_from_different_weights_are_named(results):
    records = report.load_records(results)
    assert report.mixed_starting_weights(records) == []  # no record names a weights file
    for r in records:
        if r["cell"] == "finetune_2img":
            r["initial_weights"] = {"path": "backbone.pkl", "sha256": "ab" * 32 if r["seed"] else "cd" * 32, "bytes": 1}
        elif r["cell"] == "scratch_2img":
            r["initial_weights"] = {"path": "backbone.pkl", "sha256": "ef" * 32, "bytes": 1}
    assert report.mixed_starting_weights(records) == [("finetune_2img", 2)]
    text = report.render_markdown(records, [])
    assert "Seeds of finetune_2img started from 2 different pre-trained weights files" in text
    assert "Seeds of scratch_2img" not in text


def test_tables_in_the_papers_layout(results):
    from bnstats_lab.experiments.claims import PaperTable

    records = report.load_records(results)
    layout = PaperTable("Table 2 layout", EXP, {"scenes": "d100"}, "images_per_batch", "setting", "evalnorm_learned", "ema")
    text = report.render_markdown(records, (), paper_tables=[layout])
    section = text.split("### In the papers' layout")[1]
    assert "| images_per_batch | scratch: ema | scratch: evalnorm_learned | scratch: Δ (paired) | finetune: ema |" in section
    two, eight = _table_row(section, "2"), _table_row(section, "8")
    values = AP["scratch_2img"]["ema"]
    assert two[1] == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (3)"
    assert two[3] == "+1.00 ± 0.50 (3)"  # paired: 1.0, 1.5, 0.5
    assert two[6] == f"+3.50 ± {statistics.stdev([4.0, 3.0]):.2f} (2)"  # finetune, seeds 0 and 2
    assert eight[4:] == ["not run"] * 3  # no fine-tuned 8-image cell
    assert "scratch_2img_plain" not in section and "### In the papers' layout" not in report.render_markdown(records, ())


def test_declared_comparisons_get_their_paired_difference_table(results):
    records = report.load_records(results)
    declared = [Experiment(EXP, "synthetic", tuple(
        Cell(name, "x.yaml", strategies=("ema", "evalnorm_learned", "precise_bn:500"), factors=tuple(f.items()))
        for name, f in FACTORS.items()), comparisons=(("evalnorm_learned", "precise_bn:500"),))]
    text = report.render_markdown(records, (), experiments=declared)
    section = text.split("Paired difference evalnorm_learned − precise_bn:500, box AP")[1]
    row = _table_row(section, "scratch_2img")
    differences = [a - b for a, b in zip(AP["scratch_2img"]["evalnorm_learned"], AP["scratch_2img"]["precise_bn:500"])]
    assert row[-1] == f"{statistics.mean(differences):+.2f} ± {statistics.stdev(differences):.2f} (3)"
    assert _table_row(section, "finetune_2img")[-1].endswith("(2)")  # seed 1 lacks evalnorm_learned
    assert "Paired difference evalnorm_learned − precise_bn:500" not in report.render_markdown(records, ())


def test_markdown_renders_without_any_record():
    text = report.render_markdown([], CLAIMS)
    claim_rows = [line for line in text.splitlines() if line.startswith("| **")]
    assert len(claim_rows) == len(CLAIMS) and all(r.endswith("| not run | not run |") for r in claim_rows)


# ------------------------------------------------------------------------------------------ figures
def test_figures_written_and_linked(results, tmp_path):
    records = report.load_records(results)
    figures_dir = str(tmp_path / "docs" / "results")
    figures = report.make_figures(records, figures_dir)
    paths = figures[EXP]
    assert [os.path.basename(p) for p in paths] == [f"{EXP}_ap_vs_images_per_batch.png",
                                                    f"{EXP}_discrepancy_vs_diversity.png"]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(path) > 1000
    text = report.render_markdown(records, [], markdown_dir=str(tmp_path / "docs"), figures=figures)
    assert f"(results/{EXP}_ap_vs_images_per_batch.png)" in text


def test_precise_bn_images_figure_when_several_n(tmp_path):
    records = [make_record("e3", cell, seed, {"images_per_batch": 2, "setting": cell},
                           {"ema": 10.0 + seed, "precise_bn:20": 8.0 + seed, "precise_bn:500": 11.0 + seed})
               for cell in ("scratch", "finetune") for seed in (0, 1)]
    figures = report.make_figures(records, str(tmp_path / "fig"))
    (path,) = figures["e3"]
    assert os.path.basename(path) == "e3_ap_vs_precise_bn_images.png"
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    one_n = [make_record("e3", "scratch", 0, {"images_per_batch": 2}, {"ema": 10.0, "precise_bn:500": 11.0})]
    assert report.make_figures(one_n, str(tmp_path / "fig1")) == {}


def test_gain_vs_iterations_figure_for_checkpoints_along_one_training(tmp_path):
    """Cells that are checkpoints of one training (factor ``checkpoint``, different iterations) get
    the gain-over-EMA figure, one panel per training; a cell alone at its iterations (the 8-image
    run) is not a line and gets none."""
    from bnstats_lab.experiments import report_figures
    records = []
    for setting in ("scratch", "finetune"):
        for iterations, checkpoint in ((800, "after 800 iterations"), (3200, "final")):
            for seed in (0, 1):
                record = make_record("e5", f"{setting}_2img_{checkpoint[:5]}", seed,
                                     {"setting": setting, "images_per_batch": 2, "checkpoint": checkpoint},
                                     {"ema": 10.0 + iterations / 100, "evalnorm_learned": 12.0 + iterations / 100 + seed})
                record["train"]["iterations"] = iterations
                records.append(record)
    alone = make_record("e5", "scratch_8img", 0, {"setting": "scratch", "images_per_batch": 8, "checkpoint": "final"},
                        {"ema": 40.0, "evalnorm_learned": 40.1})
    alone["train"]["iterations"] = 800
    groups = report_figures._runs_along_iterations(records + [alone], "e5")
    assert sorted(sorted(g.items()) for g in groups.values()) == [
        [(800, "finetune_2img_after"), (3200, "finetune_2img_final")],
        [(800, "scratch_2img_after"), (3200, "scratch_2img_final")]]
    figures = report.make_figures(records + [alone], str(tmp_path / "fig"))
    path = [p for p in figures["e5"] if p.endswith("e5_gain_vs_iterations.png")]
    assert len(path) == 1
    with open(path[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert report_figures._runs_along_iterations([alone], "e5") == {}


def test_evalnorm_weights_figure_from_trained_records(tmp_path):
    records = []
    for images in (2, 8):
        for seed in (0, 1):
            record = make_record("e1", f"scratch_{images}img", seed, {"images_per_batch": images}, {"ema": 10.0})
            record["evalnorm_layers"] = [
                {"layer": f"backbone.bottom_up.res{i}.0.conv1.norm", "alpha_hat": 0.5 / images + 0.01 * seed,
                 "beta_hat": 0.6 / images, "batch_size": float(images)} for i in (2, 3, 4, 5)]
            records.append(record)
    evaluated = make_record("e4", "scratch_2img", 0, {"images_per_batch": 2}, {"ema": 10.0})
    evaluated["evalnorm_layers"] = records[0]["evalnorm_layers"]
    evaluated["train"]["checkpoint_of"] = "e1/scratch_2img"  # the same checkpoint: no second figure
    figures = report.make_figures(records + [evaluated], str(tmp_path / "fig"))
    assert [os.path.basename(p) for p in figures["e1"]] == ["e1_ap_vs_images_per_batch.png", "e1_evalnorm_alpha_beta.png"]
    assert "e4" not in figures
    with open(figures["e1"][1], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_no_figure_without_the_factors(tmp_path):
    record = make_record(EXP, "one", 0, {"setting": "scratch", "images_per_batch": 2}, {"ema": 20.0})
    assert report.make_figures([record], str(tmp_path / "fig")) == {}
    assert not (tmp_path / "fig").exists()


# -------------------------------------------------------------------------------------------- page
def test_write_report_keeps_hand_written_text_and_is_idempotent(results, tmp_path):
    md = tmp_path / "docs" / "results.md"
    md.parent.mkdir()
    before = "# Results\n\n## Protocol\nHand-written protocol.\n\n"
    after = "\n\n## Discussion\nHand-written discussion.\n"
    md.write_text(before + report.BEGIN + "\nold generated text\n" + report.END + after)
    figures_dir = str(tmp_path / "docs" / "results")
    path, figure_paths, n = report.write_report(results, str(md), figures_dir, claims=[])
    first = md.read_text()
    assert path == str(md) and n == 10 and len(figure_paths) == 2
    assert first.startswith(before + report.BEGIN + "\n") and first.endswith(report.END + after)
    assert "old generated text" not in first and "| scratch_2img |" in first
    assert f"(results/{EXP}_ap_vs_images_per_batch.png)" in first
    report.write_report(results, str(md), figures_dir, claims=[])
    assert md.read_text() == first


def test_write_report_new_file_and_file_without_markers(results, tmp_path):
    md = tmp_path / "new" / "results.md"
    report.write_report(results, str(md), str(tmp_path / "fig"), claims=[])
    text = md.read_text()
    assert text.startswith("# Results") and text.count(report.BEGIN) == 1 and text.rstrip().endswith(report.END)

    plain = tmp_path / "plain.md"
    plain.write_text("# Notes\nkept\n")
    report.write_report(results, str(plain), str(tmp_path / "fig"), claims=[])
    once = plain.read_text()
    assert once.startswith("# Notes\nkept\n\n" + report.BEGIN)
    report.write_report(results, str(plain), str(tmp_path / "fig"), claims=[])
    assert plain.read_text() == once


def test_write_report_refuses_broken_markers(results, tmp_path):
    md = tmp_path / "results.md"
    broken = f"intro\n{report.END}\nmiddle\n{report.BEGIN}\n"
    md.write_text(broken)
    with pytest.raises(ValueError, match="markers") as info:
        report.write_report(results, str(md), str(tmp_path / "fig"), claims=[])
    assert str(md) in str(info.value) and md.read_text() == broken


def test_main_prints_what_it_wrote(results, tmp_path, capsys):
    catalog = tmp_path / "catalog.py"
    catalog.write_text("EXPERIMENTS = []\n")
    md = tmp_path / "docs" / "results.md"
    assert report.main(["--results", results, "--output", str(md), "--figures", str(tmp_path / "docs" / "fig"),
                        "--catalog", str(catalog)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {md} (10 records)" in out and f"{EXP}_ap_vs_images_per_batch.png" in out
    assert report.BEGIN in md.read_text()
    # a malformed record: an error naming it, exit status 1, the page untouched
    bad = os.path.join(results, EXP, "scratch_2img", "seed9.json")
    with open(bad, "w") as f:
        f.write("{")
    before = md.read_text()
    assert report.main(["--results", results, "--output", str(md), "--figures", str(tmp_path / "docs" / "fig"),
                        "--catalog", str(catalog)]) == 1
    assert bad in capsys.readouterr().err and md.read_text() == before


# ----------------------------------------------------------------------------- README which-norm table
from bnstats_lab.experiments import report_readme  # noqa: E402
from bnstats_lab.experiments.catalog import BENCHMARK_SCENES  # noqa: E402

E1_FIVE = ("ema", "precise_bn:500", "evalnorm_learned", "evalnorm_offline:500", "batch_stats:2")
# (experiment, cell) -> per strategy, box AP per seed (None: unavailable on that seed)
README_AP = {
    ("e1", f"scratch_2img_{BENCHMARK_SCENES}"): dict(zip(E1_FIVE, (
        [20.0, 24.0, 31.0], [21.5, 24.5, 30.0], [22.0, 26.0, 33.5], [19.0, 25.5, 31.0], [10.0, 12.5, 11.0]))),
    # seed 1 has no learned EvalNorm: the entry and the paired difference use seeds 0 and 2;
    # batch statistics are unavailable on every seed: "n/a"
    ("e1", f"finetune_2img_{BENCHMARK_SCENES}"): dict(zip(E1_FIVE, (
        [30.0, 33.0, 35.0], [30.5, 32.0, 36.0], [33.0, None, 37.5], [31.0, 33.0, 35.5], [None, None, None]))),
    ("e1", f"scratch_8img_{BENCHMARK_SCENES}"): {"ema": [40.0, 42.0, 47.0]},
    # same factors but the plain scenes: must not appear in the table
    ("e1", "scratch_2img_default"): dict(zip(E1_FIVE, ([90.0], [90.0], [90.0], [90.0], [90.0]))),
    ("e2", "gn_scratch"): {"ema": [18.0, 23.0, 21.0], "precise_bn:500": [18.5, 22.0, 21.0]},
    ("e2", "frozenbn_frozen"): {"ema": [27.25]},
    ("e2", "mask_gn_scratch"): {"ema": [99.0, 99.0]},  # Mask R-CNN: not the GN row's cell
}


@pytest.fixture
def lab_results(tmp_path):
    """Records of a few of the lab's declared e1/e2 cells, with their declared factors."""
    experiments = load_experiments()
    root = str(tmp_path / "results")
    for (experiment, cell), per_strategy in README_AP.items():
        factors = experiments[experiment].cell(cell).factor_dict
        for seed in range(len(next(iter(per_strategy.values())))):
            aps = {name: values[seed] for name, values in per_strategy.items()}
            write_record(root, make_record(experiment, cell, seed, factors, aps))
    return root, experiments


def _expected(values, signed=False):
    """ "mean ± std (n)" of the available values, computed with the statistics module."""
    values = [v for v in values if v is not None]
    mean = format(statistics.mean(values), "+.2f" if signed else ".2f")
    return f"{mean} (1)" if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.2f} ({len(values)})"


def _difference(a, b):
    """ "mean [95% interval] (n)" of the paired differences, the interval from the t table above."""
    d = paired([x - y for x, y in zip(a, b) if x is not None and y is not None])
    return f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] ({d['n']})"


def test_readme_table_entries_match_statistics_module(lab_results):
    root, experiments = lab_results
    text = report_readme.render_which_norm(report.load_records(root), experiments)
    scratch, finetune = README_AP[("e1", f"scratch_2img_{BENCHMARK_SCENES}")], \
        README_AP[("e1", f"finetune_2img_{BENCHMARK_SCENES}")]
    labels = {"ema": "BN + EMA statistics", "precise_bn:500": "BN + PreciseBN",
              "evalnorm_learned": "EvalNorm (learned)",
              "evalnorm_offline:500": "EvalNorm offline", "batch_stats:2": "batch statistics at test"}
    for strategy, label in labels.items():
        row = _table_row(text, label)
        assert row[1] == _expected(scratch[strategy]), label
        expected_finetune = "n/a" if strategy == "batch_stats:2" else _expected(finetune[strategy])
        assert row[2] == expected_finetune, label
        if strategy == "ema":
            assert row[3] == ""  # the reference itself
            continue
        expected_diff = ["n/a" if strategy == "batch_stats:2" and setting is finetune
                         else _difference(setting[strategy], setting["ema"]) for setting in (scratch, finetune)]
        assert row[3] == " / ".join(expected_diff), label
    # learned EvalNorm fine-tuned: seeds 0 and 2 only, paired per seed (3.0 and 2.5)
    assert _table_row(text, "EvalNorm (learned)")[3].endswith(" / " + _difference([3.0, 2.5], [0.0, 0.0]))
    gn = _table_row(text, "GN")
    assert gn[1] == _expected(README_AP[("e2", "gn_scratch")]["ema"]) and gn[3] == ""  # another training: no Δ
    assert _table_row(text, "FrozenBN (frozen setting)")[1:] == ["—", "27.25 (1)", ""]
    reference = _table_row(text, "8 images per batch, BN + EMA (large-batch reference)")
    assert reference[1] == _expected(README_AP[("e1", f"scratch_8img_{BENCHMARK_SCENES}")]["ema"])
    assert reference[2] == "not run" and reference[3] == ""
    assert "90.00" not in text and "99.00" not in text  # other scenes, Mask R-CNN: not these rows' cells


def test_which_norm_entries_and_figure(lab_results, tmp_path):
    """The table's data: statistics per row and setting, the status of what was not measured, the
    paired difference only for strategies on the same checkpoints; the figure draws it."""
    from bnstats_lab.experiments.report_figures import plot_which_norm

    root, experiments = lab_results
    entries = report_readme.which_norm_entries(report.load_records(root), experiments)
    by_label = {item["row"].label: item["settings"] for item in entries}
    scratch = README_AP[("e1", f"scratch_2img_{BENCHMARK_SCENES}")]
    learned = by_label["EvalNorm (learned)"][0]
    assert learned["cell"] == f"scratch_2img_{BENCHMARK_SCENES}" and learned["status"] == "measured"
    assert learned["bbox"]["mean"] == pytest.approx(statistics.mean(scratch["evalnorm_learned"]))
    diffs = [a - b for a, b in zip(scratch["evalnorm_learned"], scratch["ema"])]
    assert learned["difference"]["std"] == pytest.approx(statistics.stdev(diffs))
    assert by_label["GN"][0]["difference"] is None  # another training
    assert by_label["batch statistics at test"][1]["status"] == "n/a"
    assert [e["status"] for e in by_label["FrozenBN (frozen setting)"]] == ["—", "measured"]
    assert by_label["MABN"][0]["status"] == "not run" and by_label["MABN"][0]["cell"] == "mabn_scratch"
    path = plot_which_norm(entries, report_readme.SETTINGS, str(tmp_path / "w.png"), "title")
    assert os.path.getsize(path) > 0


def test_readme_table_not_run_and_the_line_under_it(lab_results):
    root, experiments = lab_results
    text = report_readme.render_which_norm([], experiments)
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(report_readme.ROWS) <= 17  # every norm the project ships, one row each
    for line in rows:
        entries = [c.strip() for c in line.strip("|").split("|")][1:3]
        assert set(entries) <= {"not run", "—"} and "not run" in entries, line
    text = report_readme.render_which_norm(report.load_records(root), experiments)
    for label in ("MABN", "SyncBN 2×1", "GhostBN head", "FrozenBN late"):
        assert _table_row(text, label)[1:] == ["not run", "not run", ""], label
    assert _table_row(text, "GN")[2] == "not run"
    line = text.rstrip("\n").splitlines()[-1]
    assert "an interval that contains 0, or fewer than 3 seeds, is inconclusive" in line
    assert f"scenes {BENCHMARK_SCENES}" in line and "[docs/results.md](docs/results.md)" in line
    # the seed counts as they are: the entries have 1 to 3 seeds, 3 declared
    assert "3 seeds declared, 1 to 3 run per entry" in line
    # a row no declared or recorded cell matches is "not run" too
    assert _table_row(report_readme.render_which_norm([], ()), "GN")[1:3] == ["not run", "not run"]


def test_readme_rows_that_match_two_cells_are_refused():
    twins = Experiment("e2", "twins", tuple(
        Cell(name, "x.yaml", factors=(("setting", "scratch"), ("images_per_batch", 2), ("scenes", BENCHMARK_SCENES),
                                       ("norm", "GN"), ("arch", "frcnn"))) for name in ("gn_a", "gn_b")))
    with pytest.raises(ValueError, match="gn_a"):
        report_readme.render_which_norm([], [twins])


README_BEFORE = "# Project\n\nIntro.\n\n## Which norm at 2 images per GPU\n\n"
README_AFTER = "\n\n## Installing\n\nKept as written.\n"


def test_write_report_rewrites_only_the_readme_section(lab_results, tmp_path):
    root, experiments = lab_results
    readme = tmp_path / "README.md"
    readme.write_text(README_BEFORE + report_readme.BEGIN + "\nold table\n" + report_readme.END + README_AFTER)
    md = tmp_path / "docs" / "results.md"
    report.write_report(root, str(md), str(tmp_path / "docs" / "results"), claims=[],
                        experiments=list(experiments.values()), readme=str(readme))
    text = readme.read_text()
    assert text.startswith(README_BEFORE + report_readme.BEGIN + "\n")
    assert text.endswith(report_readme.END + README_AFTER)
    assert "old table" not in text and "| BN + EMA statistics |" in text
    assert "(docs/results.md)" in text  # the link is relative to the README
    report.write_report(root, str(md), str(tmp_path / "docs" / "results"), claims=[],
                        experiments=list(experiments.values()), readme=str(readme))
    assert readme.read_text() == text


def test_readme_without_markers_is_untouched(lab_results, tmp_path, capsys):
    root, _ = lab_results
    readme = tmp_path / "README.md"
    plain = README_BEFORE + "no markers here" + README_AFTER
    readme.write_text(plain)
    before = os.stat(readme).st_mtime_ns
    md = tmp_path / "docs" / "results.md"
    report.write_report(root, str(md), str(tmp_path / "fig"), claims=[], readme=str(readme))
    assert readme.read_text() == plain and md.exists()
    # main: the README beside docs/ is the default; without markers it prints a note and leaves it
    assert report.main(["--results", root, "--output", str(md), "--figures", str(tmp_path / "fig")]) == 0
    assert "has no <!-- which-norm:begin -->" in capsys.readouterr().out
    assert readme.read_text() == plain and os.stat(readme).st_mtime_ns == before
    assert report_readme.write_readme(str(readme), "| a table |\n") is False and readme.read_text() == plain


def test_main_writes_the_default_readme_and_refuses_broken_markers(lab_results, tmp_path, capsys):
    root, _ = lab_results
    readme = tmp_path / "README.md"
    readme.write_text(README_BEFORE + report_readme.BEGIN + "\n" + report_readme.END + README_AFTER)
    md = tmp_path / "docs" / "results.md"
    args = ["--results", root, "--output", str(md), "--figures", str(tmp_path / "fig")]
    assert report.main(args) == 0
    assert "(which-norm table)" in capsys.readouterr().out
    assert "| GN | " + _expected(README_AP[("e2", "gn_scratch")]["ema"]) in readme.read_text()
    # the page carries the same table (without the link to itself) and the figure, before the claims
    page = md.read_text()
    section = page.split("### Which norm at 2 images per GPU")[1].split("### Claims")[0]
    assert "| GN | " + _expected(README_AP[("e2", "gn_scratch")]["ema"]) in section
    assert "](results.md)" not in section and "![which_norm_2img](../fig/which_norm_2img.png)" in section
    assert (tmp_path / "fig" / "which_norm_2img.png").stat().st_size > 0
    # --readme '' leaves it alone
    readme.write_text(README_BEFORE + report_readme.BEGIN + "\nmine\n" + report_readme.END + README_AFTER)
    assert report.main(args + ["--readme", ""]) == 0 and "mine" in readme.read_text()
    # markers out of order: an error, and neither file is written
    broken = README_BEFORE + report_readme.END + "\n" + report_readme.BEGIN + README_AFTER
    readme.write_text(broken)
    edited = "# Results\n\n" + report.BEGIN + "\nhand-made\n" + report.END + "\n"
    md.write_text(edited)
    assert report.main(args) == 1
    assert "markers" in capsys.readouterr().err
    assert readme.read_text() == broken and md.read_text() == edited


def test_main_with_another_catalog_judges_its_claims_and_leaves_the_readme(lab_results, tmp_path, capsys):
    root, _ = lab_results
    readme = tmp_path / "README.md"
    untouched = README_BEFORE + report_readme.BEGIN + "\nmine\n" + report_readme.END + README_AFTER
    readme.write_text(untouched)
    md = tmp_path / "docs" / "results_coco.md"
    args = ["--results", root, "--output", str(md), "--figures", str(tmp_path / "fig"),
            "--catalog", "bnstats_lab.experiments.catalog_coco"]
    assert report.main(args) == 0
    assert "which-norm" not in capsys.readouterr().out and readme.read_text() == untouched
    text = md.read_text()
    assert "### Experiment coco_e1" in text and "| coco_e1/scratch_2img |" in text
    assert "e1/scratch_2img_d200" not in text.split("### Claims")[1]  # the lab's claims are not judged there
    assert "### Which norm" not in text and not (tmp_path / "fig" / "which_norm_2img.png").exists()


# ------------------------------------------------------------------------------------ dose-response
def test_trend_claim_slope_interval_and_figure(results, tmp_path):
    """The slope of the per-seed differences against the factor, against a direct least-squares fit;
    inconclusive while a level has fewer than 3 seeds; the figure is drawn once two levels exist."""
    from bnstats_lab.experiments.claims import TrendClaim
    from bnstats_lab.experiments.report_figures import make_trend_figures
    from bnstats_lab.intervals import t_quantile

    records = report.load_records(results)
    claim = TrendClaim("gain", "ours", "grows", EXP, {"setting": "scratch", "images_per_batch": 2}, "diversity",
                       "evalnorm_learned", "ema", +1)
    row = report.evaluate_claims(records, [claim])[0]
    # scratch_2img (diversity 1, 3 seeds: differences 1.0, 1.5, 0.5) and the plain scenes (diversity 0, 1 seed: 0.4)
    x = [1.0, 1.0, 1.0, 0.0]
    y = [1.0, 1.5, 0.5, 0.4]
    mx, my = statistics.mean(x), statistics.mean(y)
    sxx = sum((v - mx) ** 2 for v in x)
    slope = sum((u - mx) * (v - my) for u, v in zip(x, y)) / sxx
    rss = sum((v - my - slope * (u - mx)) ** 2 for u, v in zip(x, y))
    half = t_quantile(0.975, 2) * math.sqrt(rss / 2 / sxx)
    assert row["status"] == "measured" and row["trend"]["slope"] == pytest.approx(slope)
    assert row["trend"]["ci95"] == pytest.approx((slope - half, slope + half))
    assert row["verdict"] == "inconclusive" and "fewer than 3" in row["note"]  # the plain scenes have one seed
    # three seeds at diversity 0 with a clearly smaller gain (−0.6, −0.5, −0.7): a positive slope
    for seed, (ema, learned) in ((0, (26.0, 25.4)), (1, (26.0, 25.5)), (2, (26.0, 25.3))):
        write_record(results, make_record(EXP, "scratch_2img_plain", seed, FACTORS["scratch_2img_plain"],
                                          {"ema": ema, "evalnorm_learned": learned, "precise_bn:500": ema}))
    records = report.load_records(results)
    row = report.evaluate_claims(records, [claim])[0]
    assert row["trend"]["ci95"][0] > 0 and row["verdict"] == "holds"
    paths = make_trend_figures(records, [claim], (), str(tmp_path / "fig"))
    (path,) = paths[EXP]
    assert path.endswith(f"{EXP}_gain_vs_diversity.png") and os.path.getsize(path) > 0


def test_per_checkpoint_test_image_intervals_table(results):
    """Records that carry the comparison tool's intervals get a per-checkpoint table; others none."""
    records = report.load_records(results)
    assert "Per checkpoint, on its test images" not in report.render_markdown(records, [])
    aps = {name: values[1] for name, values in AP["scratch_2img"].items()}
    record = make_record(EXP, "scratch_2img", 1, FACTORS["scratch_2img"], aps)
    for entry in record["strategies"]:
        if entry["strategy"] == "evalnorm_learned":
            entry["versus_ema"] = {"difference": 1.5, "low": 0.25, "high": 2.75, "rounds": 1000}
    write_record(results, record)
    text = report.render_markdown(report.load_records(results), [])
    assert "Per checkpoint, on its test images" in text
    assert _table_row(text, "scratch_2img")  # the AP table's row comes first; the interval row follows
    line = next(x for x in text.splitlines() if x.startswith("| scratch_2img | 1 |"))
    assert line == "| scratch_2img | 1 | +1.50 [+0.25, +2.75] |"
