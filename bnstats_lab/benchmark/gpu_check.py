"""The report of ``scripts/gpu_check.sh``: the machine, the ``cuda`` tests, the per-layer and the
end-to-end GPU benchmark, and the GPU targets, gathered into one JSON and one markdown file.

    python -m bnstats_lab.benchmark.gpu_check environment WORK/environment.json
    python -m bnstats_lab.benchmark.gpu_check report WORK OUTPUT [--dry-run]

``report`` reads from WORK what the script's steps wrote there (``environment.json``,
``cuda_tests.xml``: pytest's JUnit XML, ``layers.json``: ``tools/benchmark_norms.py --json``,
``e2e/results.json``: ``tools/benchmark.py``, ``steps.json``: each step's exit status and seconds)
and writes ``gpu_check.json`` and ``gpu_check.md`` to OUTPUT (a missing part is reported as
missing, not an error). Targets (docs/benchmarks.md, GPU): training ratios to BN and inference
ratios to FrozenBN as in :data:`.models.GPU_TRAIN_TARGETS` / :data:`.models.GPU_INFERENCE_TARGETS`,
peak memory of every norm at most :data:`.models.GPU_MEMORY_TARGET` times BN's, all measured in the
same run. A dry run (``--dry-run``, the script's ``--cpu-dry-run``) goes through the same steps on
the CPU at tiny sizes: its numbers are no GPU figures and its targets are not judged.
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional

from .models import GPU_MEMORY_TARGET


def _run(cmd: List[str]) -> Optional[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Versions of what the check runs on: python, torch, CUDA, cuDNN, the GPU and its driver."""
    import torch

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
           "nvidia_smi": _run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm", "--format=csv,noheader"])}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gib=props.total_memory / 2**30,
                   cudnn=torch.backends.cudnn.version())
    for module in ("detectron2", "fvcore", "numpy", "PIL", "pycocotools", "torchvision"):
        try:
            env[module] = getattr(__import__(module), "__version__", "installed")
        except Exception as e:  # what failed to import is itself a finding of the check
            env[module] = f"not importable: {type(e).__name__}: {e}"
    return env


def read_junit(path: str) -> Optional[dict]:
    """Counts of a pytest JUnit XML (passed, failed, errors, skipped, xfailed) and the failures."""
    if not os.path.isfile(path):
        return None
    counts = dict(passed=0, failed=0, errors=0, skipped=0, xfailed=0)
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            tag = "failure" if "failure" in kinds else "error"
            counts["failed" if tag == "failure" else "errors"] += 1
            failures.append({"test": name, "message": (kinds[tag].get("message") or "")[:600]})
        elif "skipped" in kinds:
            kind = "xfailed" if (kinds["skipped"].get("type") or "").endswith("xfail") else "skipped"
            counts[kind] += 1
        else:
            counts["passed"] += 1
    return {"counts": counts, "failures": failures}


def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def layer_summary(layers: Optional[dict]) -> List[dict]:
    """Per norm: the median over shapes of train / BN and eval / FrozenBN, and the range."""
    if not layers:
        return []
    by_norm: Dict[str, List[dict]] = {}
    for row in layers["rows"]:
        by_norm.setdefault(row["norm"], []).append(row)
    out = []
    for norm, rows in by_norm.items():
        train = [r["train_ratio"] for r in rows if r.get("train_ratio") is not None]
        ev = [r["eval_ratio"] for r in rows if r.get("eval_ratio") is not None]
        out.append({"norm": norm, "shapes": len(rows),
                    "train_ratio_median": statistics.median(train) if train else None,
                    "train_ratio_max": max(train) if train else None,
                    "eval_ratio_median": statistics.median(ev) if ev else None,
                    "eval_ratio_max": max(ev) if ev else None,
                    "skipped": next((r["skipped"] for r in rows if r.get("skipped")), None)})
    return out


def target_checks(e2e: Optional[dict]) -> List[dict]:
    """Every GPU target with the measured ratio: training and inference rows that carry a target,
    and the peak memory of every norm against BN's."""
    if not e2e:
        return []
    checks = []
    for table, ref in (("train", "BN"), ("inference", "FrozenBN")):
        for r in e2e.get(table, []):
            if r.get("target") is not None:
                checks.append({"what": f"{table} {r['norm']} / {ref}", "ratio": r.get("ratio"), "target": r["target"],
                               "met": r.get("meets_target")})
    for r in e2e.get("memory", []):
        if r["norm"] != "BN" and not r.get("skipped"):
            ratio = r.get("ratio")
            checks.append({"what": f"peak memory {r['norm']} / BN", "ratio": ratio, "target": GPU_MEMORY_TARGET,
                           "met": None if ratio is None else ratio <= GPU_MEMORY_TARGET})
    return checks


def tests_ok(tests: Optional[dict], dry_run: bool) -> bool:
    """On a GPU: tests ran and none failed. In a dry run: every cuda test skipped (none may count
    as passed where there is no GPU)."""
    if not tests:
        return False
    c = tests["counts"]
    if dry_run:
        return c["skipped"] > 0 and c["passed"] == c["failed"] == c["errors"] == c["xfailed"] == 0
    return c["passed"] > 0 and c["failed"] == c["errors"] == 0


def build_report(work: str, dry_run: bool) -> dict:
    e2e = _read_json(os.path.join(work, "e2e", "results.json"))
    layers = _read_json(os.path.join(work, "layers.json"))
    return {
        "dry_run": dry_run,
        "environment": _read_json(os.path.join(work, "environment.json")),
        "steps": _read_json(os.path.join(work, "steps.json")),
        "cuda_tests": read_junit(os.path.join(work, "cuda_tests.xml")),
        "layers": layers,
        "layer_summary": layer_summary(layers),
        "e2e": e2e,
        "targets": [] if dry_run else target_checks(e2e),
    }


def _f(v, pattern: str) -> str:
    return "" if v is None else pattern.format(v)


def format_markdown(report: dict) -> str:
    from tabulate import tabulate

    parts = ["# GPU check" + (" (CPU dry run: tiny sizes, no GPU figures)" if report["dry_run"] else "")]
    env = report.get("environment") or {}
    parts.append("Machine: " + ", ".join(f"{k} {env.get(k)}" for k in
                                         ("gpu", "driver", "torch", "torch_cuda", "cudnn", "python", "detectron2")))
    steps = report.get("steps") or {}
    if steps:
        parts.append(tabulate([[k, v.get("status"), _f(v.get("seconds"), "{:.0f}")] for k, v in steps.items()],
                              headers=["step", "exit status", "s"], tablefmt="github"))
    tests = report.get("cuda_tests")
    if tests:
        parts.append("## cuda tests\n\n" + ", ".join(f"{v} {k}" for k, v in tests["counts"].items()))
        if tests["failures"]:
            parts.append("\n".join(f"- {f['test']}: {f['message'].splitlines()[0] if f['message'] else ''}"
                                   for f in tests["failures"]))
    else:
        parts.append("## cuda tests\n\nno result (the step did not write its JUnit XML)")
    if report["layer_summary"]:
        parts.append("## Per layer: median and max over the shapes (R-50 at 800 px on the GPU)")
        parts.append(tabulate([[r["norm"], _f(r["train_ratio_median"], "{:.2f}x"), _f(r["train_ratio_max"], "{:.2f}x"),
                                _f(r["eval_ratio_median"], "{:.2f}x"), _f(r["eval_ratio_max"], "{:.2f}x"), r["skipped"] or ""]
                               for r in report["layer_summary"]],
                              headers=["norm", "train / BN", "max", "eval / FrozenBN", "max", "note"], tablefmt="github"))
    if report.get("e2e"):
        from .report import format_report

        parts.append("## End to end\n\n" + format_report(report["e2e"]))
    if report["targets"]:
        parts.append("## Targets")
        parts.append(tabulate([[t["what"], _f(t["ratio"], "{:.3f}x"), f"<= {t['target']:.2f}x",
                                {True: "met", False: "MISSED", None: "not measured"}[t["met"]]] for t in report["targets"]],
                              headers=["ratio", "measured", "target", ""], tablefmt="github"))
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "environment":
        with open(argv[1], "w") as f:
            json.dump(environment(), f, indent=1)
        return 0
    if len(argv) in (3, 4) and argv[0] == "report" and argv[3:] in ([], ["--dry-run"]):
        work, output = argv[1], argv[2]
        dry_run = argv[3:] == ["--dry-run"]
        report = build_report(work, dry_run)
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=1)
        text = format_markdown(report)
        with open(os.path.join(output, "gpu_check.md"), "w") as f:
            f.write(text)
        print(text)
        return 0 if tests_ok(report["cuda_tests"], dry_run) else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
