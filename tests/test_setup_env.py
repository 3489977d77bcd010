"""scripts/setup_env.sh: one test per row of the README's install table, and no real detectron2 replaced.

Nothing here installs anything. The decision tests run the script's ``--plan`` mode (which prints what a
refresh would do and changes nothing) against a stand-in venv in tmp_path: ``bin/python`` is a wrapper
around this interpreter whose PYTHONPATH holds a stand-in ``detectron2`` package. A package whose ``_C``
imports and is not the placeholder is what the script calls a real detectron2 (a compiled extension).

The end-to-end test runs the script itself (no option) on such a venv whose ``python -m pip`` only records
its arguments, and checks what pip was asked to do across runs: a source build, then runs without
D2_SOURCE that keep it.
"""
import hashlib
import os
import shutil
import stat
import subprocess
import sys

import pytest

import detectron2

from .conftest import REPO

SCRIPT = os.path.join(REPO, "scripts", "setup_env.sh")
PLACEHOLDER = os.path.join(REPO, "d2_bnstats", "compat", "detectron2_C_placeholder.py")
INSTALLED_D2 = os.path.dirname(os.path.abspath(detectron2.__file__))
COMPILED_STAND_IN = '"""Stands for detectron2\'s compiled extension: imports, and is not the placeholder."""\n'


def write_executable(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def python_wrapper(path, pythonpath, full=False, pip_log=None):
    """An interpreter that sees ``pythonpath`` first. Without ``full`` it runs with -S (no site-packages:
    no torch, no installed detectron2), which is all the decision needs. ``pip_log``: ``-m pip ...``
    only appends its arguments there (``pip show`` answers "not installed")."""
    pip = ""
    if pip_log is not None:
        pip = (f'if [[ "$1" == -m && "$2" == pip ]]; then\n'
               f'    shift 2; printf "%s\\n" "$*" >>"{pip_log}"\n'
               f'    [[ "$1" == show ]] && exit 1\n'
               f'    exit 0\nfi\n')
    flags = "" if full else " -S"
    return write_executable(
        path, f'#!/usr/bin/env bash\n{pip}PYTHONPATH="{pythonpath}" exec "{sys.executable}"{flags} "$@"\n')


def stand_in_detectron2(root, kind, model_zoo_configs=False):
    """A ``detectron2`` package under ``root``: "real" (its _C imports, not the placeholder), "real-full"
    (the same over the installed detectron2's modules, so that the whole plug-in imports), "placeholder"
    (the default set-up's snapshot: _C is the placeholder) or "broken" (_C fails to load)."""
    package = root / "detectron2"
    package.mkdir(parents=True)
    init = ""
    if kind == "real-full":
        init = (f"import os\n__path__.append({INSTALLED_D2!r})\n"
                f"_init = os.path.join({INSTALLED_D2!r}, '__init__.py')\n"
                f"exec(compile(open(_init).read(), _init, 'exec'))\n")
    (package / "__init__.py").write_text(init)
    if kind in ("real", "real-full"):
        (package / "_C.py").write_text(COMPILED_STAND_IN)
    elif kind == "placeholder":
        shutil.copy(PLACEHOLDER, package / "_C.py")
    elif kind == "broken":
        (package / "_C.py").write_text("raise ImportError('undefined symbol: _ZN3c10 (built against another torch)')\n")
    else:
        raise ValueError(kind)
    if model_zoo_configs:
        (package / "model_zoo" / "configs").mkdir(parents=True)
        (package / "model_zoo" / "configs" / "Base-RCNN-FPN.yaml").write_text("VERSION: 2\n")
    return str(package)


class Layout:
    """A venv (``venv/bin/python``) and a system interpreter (``system``), each seeing its own folder."""

    def __init__(self, tmp_path, venv=True, full=False):
        self.tmp = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.venv = tmp_path / "venv"
        self.venv_packages = tmp_path / "venv-packages"
        self.system_packages = tmp_path / "system-packages"
        self.pip_log = tmp_path / "pip.log"
        self.venv_packages.mkdir()
        self.system_packages.mkdir()
        self.fashion_mnist = tmp_path / "fashion-mnist"  # (so that no Debian package is ever installed)
        self.fashion_mnist.mkdir()
        if venv:
            python_wrapper(self.venv / "bin" / "python", self.venv_packages, full=full, pip_log=self.pip_log)
        self.system = python_wrapper(tmp_path / "system" / "python3", self.system_packages)

    def env(self, **extra):
        env = {k: v for k, v in os.environ.items() if k not in ("D2_SOURCE", "SETUP_FORCE", "FASHION_MNIST_DIR")}
        env.update(VENV=str(self.venv), PYTHON=str(self.system), FASHION_MNIST_DIR=str(self.fashion_mnist), **extra)
        return env

    def plan(self, **extra):
        proc = subprocess.run(["bash", SCRIPT, "--plan"], capture_output=True, text=True, env=self.env(**extra),
                              cwd=str(self.tmp), timeout=120)
        assert proc.returncode == 0, proc.stderr
        return dict(line.split("=", 1) for line in proc.stdout.splitlines())

    def run(self, *args, **extra):
        return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=self.env(**extra),
                              cwd=str(self.tmp), timeout=300)

    def pip_calls(self):
        return self.pip_log.read_text().splitlines() if self.pip_log.exists() else []


def d2_checkout(tmp_path):
    src = tmp_path / "detectron2-src"
    src.mkdir()
    (src / "setup.py").write_text("# a detectron2 checkout\n")
    return str(src)


def tree_digest(folder):
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(folder)):
        dirnames[:] = [d for d in sorted(dirnames) if d != "__pycache__"]
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            digest.update(path.encode() + open(path, "rb").read())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# Row "D2_SOURCE=/path/to/detectron2 make env": built, remembered, kept by later runs
# ------------------------------------------------------------------------------------------------
def test_d2_source_is_built_even_over_a_real_detectron2(tmp_path):
    layout = Layout(tmp_path)
    src = d2_checkout(tmp_path)
    plan = layout.plan(D2_SOURCE=src)
    assert plan["detectron2"] == f"build {src}" and plan["d2_source"] == src
    stand_in_detectron2(layout.venv_packages, "real")  # D2_SOURCE asks for a build: it replaces one
    assert layout.plan(D2_SOURCE=src)["detectron2"] == f"build {src}"


def test_a_remembered_source_build_is_kept_without_d2_source(tmp_path):
    layout = Layout(tmp_path)
    src = d2_checkout(tmp_path)
    with_source = layout.plan(D2_SOURCE=src)
    where = stand_in_detectron2(layout.venv_packages, "real")
    (layout.venv / ".d2_bnstats_d2_source").write_text(src + "\n")  # what a successful build leaves
    plan = layout.plan()
    assert plan["detectron2"] == f"keep {where}" and plan["model_zoo_configs"] == "untouched"
    # the remembered checkout counts as D2_SOURCE: a later `make` without it finds the stamp up to date
    assert plan["d2_source"] == src and plan["stamp"] == with_source["stamp"]
    assert layout.plan(SETUP_FORCE="1")["detectron2"] == f"build {src}"  # forced: rebuilt from the same checkout
    shutil.rmtree(where)  # the build was removed (or no longer loads): rebuilt, never the snapshot
    assert layout.plan()["detectron2"] == f"build {src}"


# ------------------------------------------------------------------------------------------------
# Row "detectron2 already importable (in .venv, or in the system Python)": used as it is
# ------------------------------------------------------------------------------------------------
def test_a_real_detectron2_in_the_venv_is_kept_even_when_forced(tmp_path):
    layout = Layout(tmp_path)
    where = stand_in_detectron2(layout.venv_packages, "real")
    for extra in ({}, {"SETUP_FORCE": "1"}):
        plan = layout.plan(**extra)
        assert plan["detectron2"] == f"keep {where}", extra
        assert plan["model_zoo_configs"] == "untouched" and plan["venv_flags"] == ""


def test_a_real_detectron2_in_the_system_python_gives_a_venv_that_sees_it(tmp_path):
    layout = Layout(tmp_path, venv=False)
    where = stand_in_detectron2(layout.system_packages, "real")
    plan = layout.plan()
    assert plan["venv_flags"] == "--system-site-packages" and plan["detectron2"] == f"keep {where}"
    src = d2_checkout(tmp_path)
    plan = layout.plan(D2_SOURCE=src)  # a source build goes into a venv of its own
    assert plan["venv_flags"] == "" and plan["detectron2"] == f"build {src}"


def test_a_detectron2_whose_extension_does_not_load_is_not_replaced(tmp_path):
    layout = Layout(tmp_path)
    where = stand_in_detectron2(layout.venv_packages, "broken")
    plan = layout.plan()
    assert plan["detectron2"].startswith(f"refuse detectron2 in {where} imports, but its compiled extension does not load")
    assert "undefined symbol" in plan["detectron2"] and "D2_SOURCE=" in plan["detectron2"]
    proc = layout.run()  # the set-up itself stops before touching anything
    assert proc.returncode == 1 and "compiled extension does not load" in proc.stderr
    assert layout.pip_calls() == [] and not (layout.venv / ".d2_bnstats_env_stamp").exists()


# ------------------------------------------------------------------------------------------------
# Row "otherwise": the snapshot, with its model-zoo configs
# ------------------------------------------------------------------------------------------------
def test_without_detectron2_the_snapshot_and_its_model_zoo_configs_are_chosen(tmp_path):
    layout = Layout(tmp_path)
    plan = layout.plan()
    assert plan["detectron2"] == "snapshot" and plan["model_zoo_configs"] == "install" and plan["venv_flags"] == ""
    fresh = Layout(tmp_path / "fresh", venv=False)
    stand_in_detectron2(fresh.system_packages, "placeholder")  # a snapshot in the system Python is not shared
    plan = fresh.plan()
    assert plan["venv_flags"] == "" and plan["detectron2"] == "snapshot"


def test_the_snapshot_gets_its_model_zoo_configs_once(tmp_path):
    layout = Layout(tmp_path)
    stand_in_detectron2(layout.venv_packages, "placeholder")
    plan = layout.plan()
    assert plan["detectron2"] == "snapshot" and plan["model_zoo_configs"] == "install"
    shutil.rmtree(layout.venv_packages / "detectron2")
    stand_in_detectron2(layout.venv_packages, "placeholder", model_zoo_configs=True)
    assert layout.plan()["model_zoo_configs"] == "present"


# ------------------------------------------------------------------------------------------------
# The set-up itself (pip only records): a source build persists; a real detectron2 is never touched
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow  # imports torch and the plug-in six times
def test_setup_builds_d2_source_once_then_keeps_the_build(tmp_path):
    layout = Layout(tmp_path, full=True)
    src = d2_checkout(tmp_path)
    # the stand-in for what `pip install <checkout>` would have built (pip is not run)
    where = stand_in_detectron2(layout.venv_packages, "real-full")
    before = tree_digest(where)

    proc = layout.run(D2_SOURCE=src)
    assert proc.returncode == 0, proc.stderr
    assert f"install --disable-pip-version-check -q --no-build-isolation {src}" in layout.pip_calls()
    assert (layout.venv / ".d2_bnstats_d2_source").read_text().strip() == src

    calls = len(layout.pip_calls())
    proc = layout.run()  # a later `make` without D2_SOURCE
    assert proc.returncode == 0 and "environment up to date" in proc.stderr, proc.stderr
    assert len(layout.pip_calls()) == calls

    (layout.venv / ".d2_bnstats_env_stamp").unlink()  # any refresh (e.g. a requirement changed) keeps the build
    proc = layout.run()
    assert proc.returncode == 0 and f"using the detectron2 already installed ({where})" in proc.stderr, proc.stderr
    refresh = layout.pip_calls()[calls:]
    assert refresh and not [c for c in refresh if "detectron2" in c or src in c or "torch.txt" in c or "download" in c]
    assert tree_digest(where) == before
