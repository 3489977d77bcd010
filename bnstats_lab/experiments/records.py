"""Result records: one JSON file per trained checkpoint, ``<results>/<experiment>/<cell>/seed<k>.json``.

The one place that writes, reads and validates them. A record exists only once its cell has been
trained and evaluated under every strategy: it is written atomically at the very end, so a killed
run leaves none and the runner redoes that cell. The fields are listed in ``docs/results.md``.

Reading is strict: :func:`read_record` (and :func:`iter_records`, :func:`load_records` built on it)
raises :class:`RecordError`, naming the file, for a record that is not valid JSON, lacks a required
key, has a field of the wrong type or lies in a folder other than its experiment/cell/seed.
:func:`rows` gives one flat row per (record, strategy).
"""
import datetime
import fnmatch
import hashlib
import json
import os
import subprocess
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from d2_bnstats.outputs import write_json

__all__ = [
    "FORMAT",
    "evalnorm_parameters",
    "METRICS",
    "RecordError",
    "record_path",
    "has_record",
    "write_record",
    "read_record",
    "iter_records",
    "load_records",
    "rows",
    "strategy_entry",
    "metric_value",
    "is_number",
    "config_hash",
    "initial_weights",
    "source_version",
    "now",
]

FORMAT = 1
# what a reader needs; the writer adds ``format`` itself and asks only for the keys that place a record
REQUIRED = ("format", "experiment", "cell", "seed", "factors", "strategies")
REQUIRED_TO_WRITE = ("experiment", "cell", "seed", "strategies")
METRICS = ("AP", "AP50", "AP75")


class RecordError(ValueError):
    """A result record that cannot be used; the message names the file."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"result record {path}: {problem}")
        self.path = path


# ------------------------------------------------------------------------------------------ writing
def record_path(results_root: str, experiment: str, cell: str, seed: int) -> str:
    return os.path.join(results_root, experiment, cell, f"seed{seed}.json")


def has_record(results_root: str, experiment: str, cell: str, seed: int) -> bool:
    return os.path.isfile(record_path(results_root, experiment, cell, seed))


def write_record(results_root: str, record: dict) -> str:
    missing = [k for k in REQUIRED_TO_WRITE if k not in record]
    if missing:
        raise ValueError(f"a result record needs {', '.join(missing)}")
    path = record_path(results_root, record["experiment"], record["cell"], record["seed"])
    return write_json(path, dict(record, format=FORMAT), indent=1, sort_keys=True)


# ------------------------------------------------------------------------------- reading, validation
def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _problems(record) -> List[str]:
    if not isinstance(record, dict):
        return [f"not a JSON object but {type(record).__name__}"]
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        return [f"lacks required keys: {', '.join(missing)}"]
    out = []
    if record["format"] != FORMAT:
        out.append(f"format {record['format']!r}; this report reads format {FORMAT}")
    for key in ("experiment", "cell"):
        if not isinstance(record[key], str) or not record[key]:
            out.append(f"{key} must be a non-empty string, got {record[key]!r}")
    if not isinstance(record["seed"], int) or isinstance(record["seed"], bool):
        out.append(f"seed must be an integer, got {record['seed']!r}")
    factors = record["factors"]
    if not isinstance(factors, dict):
        out.append(f"factors must be an object, got {type(factors).__name__}")
    else:
        out += [f"factor {k} must be a string or a number, got {v!r}" for k, v in factors.items()
                if not isinstance(v, (str, int, float)) or v is None]
    strategies = record["strategies"]
    if not isinstance(strategies, list):
        return out + [f"strategies must be a list, got {type(strategies).__name__}"]
    names = []
    for i, entry in enumerate(strategies):
        if not isinstance(entry, dict) or "strategy" not in entry or "available" not in entry:
            out.append(f"strategies[{i}] lacks required keys: strategy, available")
            continue
        name = entry["strategy"]
        names.append(name)
        bbox = entry.get("bbox")
        # an AP of None is an evaluation that defines none (e.g. one image without ground truth)
        if entry["available"] and not (isinstance(bbox, dict) and "AP" in bbox
                                       and (bbox["AP"] is None or is_number(bbox["AP"]))):
            out.append(f"strategy {name} is available but has no numeric bbox AP")
        for task in ("bbox", "segm"):
            values = entry.get(task)
            if values is not None and not (isinstance(values, dict) and all(
                    v is None or is_number(v) for v in values.values())):
                out.append(f"strategy {name}: {task} must map metric names to numbers, got {values!r}")
        if not (entry.get("discrepancy_l1") is None or is_number(entry["discrepancy_l1"])):
            out.append(f"strategy {name}: discrepancy_l1 must be a number or null, got {entry['discrepancy_l1']!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        out.append(f"strategies listed twice: {', '.join(map(str, duplicates))}")
    layers = record.get("evalnorm_layers")
    if layers is not None and not (isinstance(layers, list) and all(
            isinstance(e, dict) and isinstance(e.get("layer"), str)
            and all(is_number(e.get(k)) for k in ("alpha_hat", "beta_hat", "batch_size")) for e in layers)):
        out.append("evalnorm_layers must be a list of {layer, alpha_hat, beta_hat, batch_size}")
    return out


def evalnorm_parameters(checkpoint: str) -> List[Dict[str, object]]:
    """The learned α̂, β̂ and the batch size B of every EvalNorm layer in a detectron2 checkpoint
    (``<layer>.alpha_hat``, ``.beta_hat``, ``.norm_batch_size`` of its model state), backbone layers
    first (stem to the last stage), then the others in the checkpoint's order; [] without EvalNorm."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = state.get("model", state) if isinstance(state, dict) else {}
    names = [k[: -len(".alpha_hat")] for k in state if k.endswith(".alpha_hat")]
    names.sort(key=lambda n: 0 if ".bottom_up." in f".{n}." else 1)  # stable: the checkpoint's order within
    out = []
    for name in names:
        batch = state.get(f"{name}.norm_batch_size")
        out.append({"layer": name, "alpha_hat": round(float(state[f"{name}.alpha_hat"]), 6),
                    "beta_hat": round(float(state[f"{name}.beta_hat"]), 6),
                    "batch_size": float(batch) if batch is not None else 0.0})
    return out


def read_record(path: str) -> dict:
    """The record at ``path``, validated (see the module docstring); :class:`RecordError` otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except ValueError as e:
        raise RecordError(path, f"not valid JSON ({e})") from None
    except OSError as e:
        raise RecordError(path, f"cannot be read ({e.strerror or e})") from None
    problems = _problems(record)
    if problems:
        raise RecordError(path, "; ".join(problems))
    # the place is the key the runner uses to skip finished cells: a record copied into the wrong
    # folder would make the runner skip a cell and the report count one checkpoint twice
    folder = os.path.dirname(os.path.abspath(path))
    place = (os.path.basename(os.path.dirname(folder)), os.path.basename(folder), os.path.basename(path))
    content = (record["experiment"], record["cell"], f"seed{record['seed']}.json")
    if place != content:
        raise RecordError(path, f"says experiment {record['experiment']}, cell {record['cell']}, "
                                f"seed {record['seed']}, so it belongs at <results>/{'/'.join(content)}, "
                                f"not at .../{'/'.join(place)}")
    return record


def iter_records(results_root: str, experiment: Optional[str] = None) -> Iterator[dict]:
    """Every ``seed*.json`` under ``results_root`` (only ``<results_root>/<experiment>`` when given),
    read by :func:`read_record`, folder by folder in name order; nothing when the folder is missing."""
    base = os.path.join(results_root, experiment) if experiment else results_root
    for folder, dirs, files in os.walk(base):
        dirs.sort()
        for name in sorted(files):
            if fnmatch.fnmatch(name, "seed*.json"):
                yield read_record(os.path.join(folder, name))


def load_records(root: str = "results") -> List[dict]:
    """Every ``seed*.json`` under ``root`` (``<root>/<experiment>/<cell>/seed<k>.json``), sorted by
    experiment, cell and seed. A file that is not valid JSON, lacks a required key (``format``,
    ``experiment``, ``cell``, ``seed``, ``factors``, ``strategies``) or lies in a folder other than its
    experiment/cell raises :class:`RecordError` naming the file; a missing ``root`` raises
    ``FileNotFoundError``."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no results folder {root}")
    return sorted(iter_records(root), key=lambda r: (r["experiment"], r["cell"], r["seed"]))


# ------------------------------------------------------------------------------------------- access
def strategy_entry(record: dict, strategy: str) -> Optional[dict]:
    """The record's entry of ``strategy``, None when the record does not list it."""
    for entry in record["strategies"]:
        if entry["strategy"] == strategy:
            return entry
    return None


def metric_value(entry: Optional[dict], metric: Tuple[str, str]) -> Optional[float]:
    """The metric (task, name) of an available strategy entry, None when absent or unavailable."""
    if entry is None or not entry.get("available"):
        return None
    task, name = metric
    value = (entry.get(task) or {}).get(name)
    return float(value) if is_number(value) else None


def rows(records: Iterable[dict]) -> List[dict]:
    """One flat row per (experiment, cell, seed, strategy): the cell's ``factors`` (a dict), whether
    the strategy was available (and why not), box AP / AP50 / AP75 (``bbox_AP``, ...), mask AP
    (``segm_AP``, ..., None for Faster R-CNN) and ``discrepancy_l1``."""
    out = []
    for record in records:
        for entry in record["strategies"]:
            row = {"experiment": record["experiment"], "cell": record["cell"], "seed": record["seed"],
                   "factors": dict(record["factors"]), "strategy": entry["strategy"],
                   "available": bool(entry["available"]), "reason": entry.get("reason"),
                   "test_batch_size": entry.get("test_batch_size")}
            for task in ("bbox", "segm"):
                for name in METRICS:
                    row[f"{task}_{name}"] = metric_value(entry, (task, name))
            row["discrepancy_l1"] = entry.get("discrepancy_l1")
            out.append(row)
    return out


# ------------------------------------------------------------------------------------------ context
def config_hash(config_text: str) -> str:
    """SHA-256 of a full config dump: equal hashes mean the same training recipe."""
    return hashlib.sha256(config_text.encode("utf-8")).hexdigest()


def initial_weights(weights: str) -> Optional[Dict[str, object]]:
    """What a training started from (``MODEL.WEIGHTS``): ``None`` for random init; else the path and,
    for a local file, its size and SHA-256, so two records can be told to share a pre-trained backbone
    even when the file at that path is re-made between them (pre-training is not bit-reproducible)."""
    if not weights:
        return None
    if not os.path.isfile(weights):  # a URL or a model-zoo name: only the name is known here
        return {"path": weights, "sha256": None, "bytes": None}
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": weights, "sha256": digest.hexdigest(), "bytes": os.path.getsize(weights)}


def source_version(repo: str) -> Dict[str, object]:
    """The git commit of ``repo`` and whether tracked files differ from it (``unknown`` outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
