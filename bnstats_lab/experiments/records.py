"""Result records: one JSON file per trained checkpoint, ``<results>/<experiment>/<cell>/seed<k>.json``.

A record exists only once its cell has been trained and evaluated under every strategy: it is
written atomically at the very end, so a killed run leaves none and the runner redoes that cell. The
fields are listed in ``docs/results.md``; :func:`flatten` gives one row per strategy.
"""
import datetime
import hashlib
import json
import os
import subprocess
from typing import Dict, Iterator, List, Optional

from d2_bnstats.outputs import write_json

FORMAT = 1
REQUIRED = ("experiment", "cell", "seed", "strategies")


def record_path(results_root: str, experiment: str, cell: str, seed: int) -> str:
    return os.path.join(results_root, experiment, cell, f"seed{seed}.json")


def has_record(results_root: str, experiment: str, cell: str, seed: int) -> bool:
    return os.path.isfile(record_path(results_root, experiment, cell, seed))


def write_record(results_root: str, record: dict) -> str:
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"a result record needs {', '.join(missing)}")
    path = record_path(results_root, record["experiment"], record["cell"], record["seed"])
    return write_json(path, dict(record, format=FORMAT), indent=1, sort_keys=True)


def read_record(path: str) -> dict:
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"result record {path} cannot be read: {e}") from None
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"result record {path} lacks {', '.join(missing)}")
    return record


def iter_records(results_root: str, experiment: Optional[str] = None) -> Iterator[dict]:
    base = os.path.join(results_root, experiment) if experiment else results_root
    for folder, _, files in sorted(os.walk(base)):
        for name in sorted(files):
            if name.startswith("seed") and name.endswith(".json"):
                yield read_record(os.path.join(folder, name))


def flatten(record: dict) -> List[dict]:
    """One row per strategy: experiment, cell, seed, factors, strategy and its COCO numbers."""
    rows = []
    for entry in record["strategies"]:
        row = {"experiment": record["experiment"], "cell": record["cell"], "seed": record["seed"]}
        row.update(record.get("factors", {}))
        row.update({k: v for k, v in entry.items() if k not in ("bbox", "segm")})
        for task in ("bbox", "segm"):
            for metric, value in (entry.get(task) or {}).items():
                row[f"{task}_{metric}"] = value
        rows.append(row)
    return rows


def config_hash(config_text: str) -> str:
    """SHA-256 of a full config dump: equal hashes mean the same training recipe."""
    return hashlib.sha256(config_text.encode("utf-8")).hexdigest()


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
