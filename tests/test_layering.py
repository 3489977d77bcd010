"""The package layering: the plug-in never reaches the lab, and its torch layers never reach detectron2.

    bnstats_lab  ->  d2_bnstats (d2/: detectron2 glue)  ->  d2_bnstats.layers (pure torch)

Checked twice: at run time (importing the plug-in and building a model loads no lab module) and
statically (no ``import`` statement under a package names a package it must not use, wherever the
statement is: module top, function body, ``try`` block).
"""
import ast
import os
import subprocess
import sys

from .conftest import REPO

PLUGIN = os.path.join(REPO, "d2_bnstats")


def _python_files(folder):
    for dirpath, dirnames, files in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def _imported_modules(path, root):
    """Absolute names of what every import statement of ``path`` imports (relative imports resolved
    against the package ``path`` is in, ``root`` being the folder that holds the top-level package)."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    parts = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
    package = parts[:-1]  # the package a module (or an __init__.py) is in
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = ".".join(package[: len(package) - (node.level - 1)])
                base = f"{parent}.{base}" if base else parent
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def _violations(folder, forbidden, root=REPO):
    """``"<file> imports <name>"`` for every import under ``folder`` of ``forbidden`` or a submodule of it."""
    files = list(_python_files(folder))
    assert files, f"no Python file under {folder}: the check would pass vacuously"
    out = []
    for path in files:
        for name in _imported_modules(path, root):
            if name == forbidden or name.startswith(forbidden + "."):
                out.append(f"{os.path.relpath(path, root)} imports {name}")
    return sorted(set(out))


def test_import_analysis_sees_every_form_of_import(tmp_path):
    """The checker itself: plain, aliased, from, relative and nested imports are all found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .. import bnstats_lab\n")
    (pkg / "mod.py").write_text(
        "import os, bnstats_lab.data as d\n"
        "from detectron2.layers import ShapeSpec\n"
        "from . import sibling\n"
        "def f():\n"
        "    try:\n"
        "        import bnstats_lab\n"
        "    except ImportError:\n"
        "        pass\n"
    )
    root = str(tmp_path)
    assert {"os", "pkg.sibling"} <= set(_imported_modules(str(pkg / "mod.py"), root))
    assert "pkg.bnstats_lab" in _imported_modules(str(pkg / "sub" / "__init__.py"), root)
    assert _violations(str(pkg), "bnstats_lab", root) == [
        "pkg/mod.py imports bnstats_lab", "pkg/mod.py imports bnstats_lab.data"]
    assert _violations(str(pkg), "detectron2", root) == [
        "pkg/mod.py imports detectron2.layers", "pkg/mod.py imports detectron2.layers.ShapeSpec"]
    assert _violations(os.path.join(REPO, "tools"), "bnstats_lab"), "the tools import the lab"


def test_importing_the_plugin_and_building_a_model_loads_no_lab_module():
    code = (
        "import sys\n"
        "import d2_bnstats\n"
        "from detectron2.config import get_cfg\n"
        "from detectron2.modeling import build_model\n"
        "cfg = get_cfg()\n"
        "d2_bnstats.add_bnstats_config(cfg)\n"
        "cfg.merge_from_file(sys.argv[1])\n"
        "cfg.MODEL.DEVICE = 'cpu'\n"
        "model = build_model(cfg)\n"
        "print('LAB:', sorted(m for m in sys.modules if m.split('.')[0] == 'bnstats_lab'))\n"
    )
    config = os.path.join(REPO, "configs", "cpu", "Base-R18-FPN-fashion.yaml")  # names fashion-scenes data sets
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, config], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LAB: []" in proc.stdout, proc.stdout


def test_the_plugin_never_imports_the_lab():
    assert _violations(PLUGIN, "bnstats_lab") == []


def test_the_layers_never_import_detectron2():
    assert _violations(os.path.join(PLUGIN, "layers"), "detectron2") == []
