#!/usr/bin/env python
"""Run detectron2's own tests with and without the plug-in and compare the outcomes, test by test.

Everything detectron2 accepts, the plug-in's build must accept: this runs detectron2's config,
modeling, engine, checkpoint, export and model-zoo tests from a detectron2 source checkout twice with
the same interpreter -- once as they are, once with ``d2_bnstats`` imported first (pytest's ``-p``
loads it as a plugin before any test module, so every detectron2 entry point is the patched one) --
and reports each test whose outcome differs (a module that fails to import counts as one errored test,
in both runs alike). Exit status 0 when every outcome is the same, 1 otherwise, 2 when a run passed no
test at all (the built detectron2 is not the one imported, say).

Usage (from this repository's root; the interpreter must import the detectron2 built from SRC, not
the checkout's own ``detectron2/`` folder, so the tests run from a temporary directory)::

    OMP_NUM_THREADS=1 python scripts/compare_detectron2_tests.py --detectron2-src SRC [--out DIR] [-k EXPR]

SRC is a detectron2 checkout (its ``tests/`` are run); build and install it first, e.g.
``MAX_JOBS=2 pip install --no-build-isolation --no-deps SRC``. ``--tests`` chooses other test paths
(relative to SRC); ``--out`` keeps both JUnit reports and the comparison (default: a temporary folder).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from typing import Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TESTS = (
    "tests/config",
    "tests/modeling",
    "tests/test_engine.py",
    "tests/test_checkpoint.py",
    "tests/test_export_torchscript.py",
    "tests/test_export_onnx.py",
    "tests/test_model_zoo.py",
)


def run_tests(python: str, src: str, tests: List[str], junit: str, with_plugin: bool, extra: List[str]) -> int:
    """One pytest run of ``tests`` (paths in ``src``) writing a JUnit report; returns pytest's status."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if with_plugin:
        paths.insert(0, REPO)
    else:  # the plug-in must not be importable by accident either
        paths = [p for p in paths if os.path.abspath(p) != REPO]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               "--continue-on-collection-errors", "--rootdir", os.path.join(src, "tests")]
    if with_plugin:
        command += ["-p", "d2_bnstats"]
    command += [os.path.join(src, t) for t in tests] + list(extra)
    with tempfile.TemporaryDirectory() as cwd:  # not SRC: its detectron2/ folder lacks the built extension
        return subprocess.call(command, cwd=cwd, env=env)


def outcomes(junit: str) -> Dict[str, str]:
    """test id -> "passed" / "failed" / "error" / "skipped" from a JUnit report."""
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        result[test] = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(kinds[0], kinds[0]) if kinds else "passed"
    return result


def compare(without: Dict[str, str], with_plugin: Dict[str, str]) -> List[Tuple[str, str, str]]:
    """(test, outcome without, outcome with) for every test whose outcome differs (or ran in one only)."""
    return [(t, without.get(t, "absent"), with_plugin.get(t, "absent"))
            for t in sorted(set(without) | set(with_plugin)) if without.get(t) != with_plugin.get(t)]


def summary(results: Dict[str, str]) -> str:
    counts: Dict[str, int] = {}
    for outcome in results.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectron2-src", required=True, help="a detectron2 checkout whose tests/ are run")
    parser.add_argument("--python", default=sys.executable, help="interpreter that imports the built detectron2")
    parser.add_argument("--tests", nargs="+", default=list(DEFAULT_TESTS), help="test paths relative to the checkout")
    parser.add_argument("--out", default=None, help="folder for the two JUnit reports and the comparison")
    parser.add_argument("-k", default=None, help="pytest -k expression, for both runs")
    args = parser.parse_args(argv)
    src = os.path.abspath(args.detectron2_src)
    if not os.path.isdir(os.path.join(src, "tests")):
        parser.error(f"--detectron2-src {args.detectron2_src}: no tests/ folder there (expected a detectron2 checkout)")
    missing = [t for t in args.tests if not os.path.exists(os.path.join(src, t))]
    if missing:
        parser.error(f"--tests: not in the checkout: {', '.join(missing)}")
    out = args.out or tempfile.mkdtemp(prefix="d2_tests_")
    os.makedirs(out, exist_ok=True)
    extra = ["-k", args.k] if args.k else []
    reports = {}
    for label, plugin in (("without", False), ("with", True)):
        junit = os.path.join(out, f"junit_{label}_plugin.xml")
        status = run_tests(args.python, src, args.tests, junit, plugin, extra)
        if not os.path.isfile(junit):
            print(f"pytest {label} the plug-in wrote no report (status {status})", file=sys.stderr)
            return 2
        reports[label] = outcomes(junit)
        print(f"{label} the plug-in: {summary(reports[label])}")
        if "passed" not in reports[label].values():
            print(f"no test passed {label} the plug-in: is the detectron2 built from {src} importable?", file=sys.stderr)
            return 2
    differences = compare(reports["without"], reports["with"])
    lines = [f"{test}: {a} without the plug-in, {b} with it" for test, a, b in differences]
    text = "\n".join(lines) if lines else "every test has the same outcome with and without the plug-in"
    with open(os.path.join(out, "comparison.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"reports: {out}")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
