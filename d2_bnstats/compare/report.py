"""The comparison's text and JSON output: the COCO table per test set, the discrepancy table, and
``compare.md`` / ``compare.json`` (written atomically)."""
import math
import os
import re
import unicodedata

import torch

from ..outputs import write_json, write_text

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def slug(text: str) -> str:
    """A file-name-safe form of a strategy or layer name. Compatibility forms first (NFKD: "1/B²" →
    "1/B2"), so that names differing by such a character keep different folders."""
    return re.sub(r"[^A-Za-z0-9]+", "_", unicodedata.normalize("NFKD", text)).strip("_").lower()


def _result_cells(strategy: dict, dataset: str, tasks) -> list:
    res = (strategy.get("results") or {}).get(dataset, {})
    values = []
    for t in tasks:
        for m in METRICS:
            v = res.get(t, {}).get(m)
            values.append("" if v is None else f"{v:.2f}")
    return values


def format_table(summary: dict) -> str:
    from tabulate import tabulate

    tables = []
    for dataset in summary["datasets"]:
        tasks = summary["tasks"]
        headers = ["strategy", "k"] + [f"{t} {m}" for t in tasks for m in METRICS] + ["note"]
        rows = []
        for s in summary["strategies"]:
            note = "" if s["available"] else f"unavailable: {s['reason']}"
            rows.append([s["name"], s["test_batch_size"] if s["available"] else ""]
                        + _result_cells(s, dataset, tasks) + [note])
        subset = f" (first {summary['max_images']} images)" if summary["max_images"] else ""
        tables.append(f"COCO results on {dataset}{subset}\n" + tabulate(rows, headers=headers, tablefmt="github"))
    return "\n\n".join(tables)


def strategy_names(rows) -> list:
    """The strategies of a discrepancy report's rows, in order of first appearance."""
    names = []
    for r in rows:
        names += [n for n in r["l1"] if n not in names]
    return names


def format_discrepancy(report: dict) -> str:
    from tabulate import tabulate

    rows = report.get("layers") or []
    if not rows:
        return f"train–test discrepancy: {report.get('note', 'no layers')}"
    names = strategy_names(rows)
    table = [[r["name"]] + ["n/a" if r["l1"].get(n) is None else f"{r['l1'][n]:.4f}" for n in names] for r in rows]
    means = []
    for n in names:
        vals = [r["l1"][n] for r in rows if r["l1"].get(n) is not None]
        means.append(f"{sum(vals) / len(vals):.4f}" if vals else "n/a")
    table.append(["(mean over layers)"] + means)
    return (f"train–test discrepancy: mean |x̂_train − x̂_eval| per layer, same inputs "
            f"({report['images']} images of {report['dataset']}, {report['train_batch_images']} per training batch)\n"
            + tabulate(table, headers=["layer"] + names, tablefmt="github"))


def finite(value):
    """NaN/inf (e.g. COCO's APs when a split has no small objects) -> None, so the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def format_versus_ema(versus: dict) -> str:
    """Each strategy's box AP difference to EMA with its paired bootstrap interval, and the
    recommendation line."""
    from tabulate import tabulate

    rows = [[name, f"{r['difference']:+.2f}", f"[{r['low']:+.2f}, {r['high']:+.2f}]",
             "yes" if r["low"] > 0 else ("below EMA" if r["high"] < 0 else "no (interval contains 0)")]
            for name, r in versus["strategies"].items()]
    table = tabulate(rows, headers=["strategy", "Δ box AP vs EMA", "95% interval", "beats EMA"], tablefmt="github")
    return (f"Difference to EMA on the same checkpoint ({versus['dataset']}; 95% paired bootstrap over its test "
            f"images, {versus['rounds']} draws)\n{table}\n\nRecommendation: {versus['recommendation']['text']}")


def write_text_and_json(summary: dict, output_dir: str) -> str:
    """Write ``compare.md`` (COCO and discrepancy tables, the differences to EMA with their intervals
    and the recommendation) and ``compare.json`` (the summary); returns the text."""
    text = format_table(summary) + "\n\n" + format_discrepancy(summary["discrepancy"])
    if summary.get("versus_ema"):
        text += "\n\n" + format_versus_ema(summary["versus_ema"])
    write_text(os.path.join(output_dir, "compare.md"), text + "\n")
    write_json(os.path.join(output_dir, "compare.json"), finite(summary), indent=1, default=json_default)
    return text
