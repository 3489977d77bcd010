"""The distribution as a detectron2 user gets it: the wheel is built from a copy of the package's files,
installed (not editable) into a fresh virtual environment that sees torch, detectron2 and the other
dependencies but neither this repository nor any install of it, and used from a folder outside the
repository: a packaged config found by name, one training iteration and a COCO evaluation on a tiny
data set, and ``--help`` of every command."""
import email
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import yaml

import d2_bnstats
from d2_bnstats.d2.train import load_config

from .conftest import REPO

COMMANDS = ("d2-bnstats-train", "d2-bnstats-lazy-train", "d2-bnstats-compare", "d2-bnstats-estimate-evalnorm",
            "d2-bnstats-convert-mabn", "d2-bnstats-deploy")
# what the project's environment has that the fresh one must not see: the plug-in and the lab (editable
# installs, their metadata and the .pth files that put a checkout on sys.path)
HIDDEN = ("d2_bnstats", "bnstats_lab", "__editable__", "_d2_bnstats", "easy-install.pth")
PACKAGE_FILES = ("setup.py", "README.md", "LICENSE", "NOTICE", "d2_bnstats")

pytestmark = pytest.mark.slow


def _run(cmd, cwd, env, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel, built offline from a copy of the files setup.py packages (the repository stays as it is)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in PACKAGE_FILES:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(source),
          "-w", str(work / "dist")], cwd=str(work), env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    (path,) = (work / "dist").glob("d2_bnstats-*.whl")
    return path


def test_the_wheel_holds_the_plugin_its_configs_and_licence_not_the_lab(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    info = f"d2_bnstats-{d2_bnstats.__version__}.dist-info"
    assert tops == {"d2_bnstats", info}, tops
    for name in ("d2_bnstats/model_zoo/configs/frcnn_r50_evalnorm_2img.yaml",
                 "d2_bnstats/model_zoo/configs/Base-RCNN-FPN.yaml",
                 "d2_bnstats/model_zoo/configs/cpu/frcnn_r18_evalnorm_2img.yaml",
                 "d2_bnstats/model_zoo/configs/lazy/cpu/faster_rcnn_R_18_FPN_fashion_evalnorm.py",
                 f"{info}/licenses/LICENSE", f"{info}/entry_points.txt"):
        assert name in names, name
    configs = [n for n in names if n.startswith("d2_bnstats/model_zoo/configs/") and n.endswith((".yaml", ".py"))]
    assert len(configs) == len(d2_bnstats.model_zoo.available_configs())
    metadata = email.message_from_bytes(zipfile.ZipFile(wheel).read(f"{info}/METADATA"))
    assert metadata["Version"] == d2_bnstats.__version__ and metadata["License"] == "Apache-2.0"
    assert metadata["Requires-Python"] and any(r.startswith("torch") for r in metadata.get_all("Requires-Dist"))
    assert "License :: OSI Approved :: Apache Software License" in metadata.get_all("Classifier")
    assert metadata["Description-Content-Type"] == "text/markdown" and "## Install from a wheel" in metadata.get_payload()
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert all(command in entry_points for command in COMMANDS)


def _dependencies_folder(folder):
    """A folder of links to everything in this environment's site-packages but the plug-in and the lab
    (a .pth file naming it gives a fresh venv torch, detectron2, ...; .pth files in it are not run)."""
    folder.mkdir()
    sources = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    for packages in dict.fromkeys(sources):
        for name in sorted(os.listdir(packages)):
            if any(hidden in name for hidden in HIDDEN) or name.endswith(".pth") or (folder / name).exists():
                continue
            os.symlink(os.path.join(packages, name), folder / name)
    return folder


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """(venv, environment variables): a fresh venv with the wheel installed and the dependencies visible."""
    work = tmp_path_factory.mktemp("venv")
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=str(work), env=dict(os.environ))
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=str(work), env=dict(os.environ)).stdout.strip()
    with open(os.path.join(purelib, "project_dependencies.pth"), "w") as f:
        f.write(str(_dependencies_folder(work / "dependencies")) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
         cwd=str(work), env=env)
    return venv, env


def test_from_outside_the_repository_the_packaged_config_trains_evaluates_and_every_command_answers(
        installed, datasets_root, tmp_path):
    venv, env = installed
    outside = tmp_path / "user"
    outside.mkdir()
    python = str(venv / "bin" / "python")
    probe = _run([python, "-c", (
        "import importlib.util, json, d2_bnstats\n"
        "from d2_bnstats import model_zoo\n"
        "print(json.dumps({'plugin': d2_bnstats.__file__, 'version': d2_bnstats.__version__,\n"
        "                  'lab': importlib.util.find_spec('bnstats_lab') is not None,\n"
        "                  'config': model_zoo.get_config_file('frcnn_r50_evalnorm_2img.yaml'),\n"
        "                  'norm': model_zoo.get_config('frcnn_r50_evalnorm_2img.yaml').MODEL.RESNETS.NORM}))\n")],
        cwd=str(outside), env=env)
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert found["plugin"].startswith(str(venv)) and found["config"].startswith(str(venv)), found
    assert found["version"] == d2_bnstats.__version__ and not found["lab"] and found["norm"] == "EvalNorm", found

    helps = {command: subprocess.Popen([str(venv / "bin" / command), "--help"], cwd=str(outside), env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for command in COMMANDS}  # side by side: each start imports torch and detectron2
    for command, proc in helps.items():
        text, errors = proc.communicate(timeout=600)
        assert proc.returncode == 0 and text.startswith("usage: " + command) and "--config-file" in text, errors[-2000:]
        assert not errors, errors[-2000:]  # and says nothing else (no library warnings)

    # the mission's use: the packaged EvalNorm 2-image config, a data set of the user's own, 1 iteration + COCO eval
    scenes = os.path.join(datasets_root, "fashion_scenes", "fashion_scenes_tiny")
    output = outside / "run"
    train = _run([str(venv / "bin" / "d2-bnstats-train"), "--config-file", "bnstats://cpu/frcnn_r18_evalnorm_2img.yaml",
                  "--register-coco", "my_train", os.path.join(scenes, "train.json"), os.path.join(scenes, "train"),
                  "--register-coco", "my_val", os.path.join(scenes, "val.json"), os.path.join(scenes, "val"),
                  "DATASETS.TRAIN", "('my_train',)", "DATASETS.TEST", "('my_val',)", "SOLVER.MAX_ITER", "1",
                  "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0", "DATALOADER.NUM_WORKERS", "0",
                  "OUTPUT_DIR", str(output)], cwd=str(outside), env=env)
    log = train.stdout + train.stderr
    assert "Evaluation results for bbox" in log, log[-3000:]
    for noise in ("torch.jit.script", "torch.meshgrid", "No CUDA runtime"):  # libraries' messages, silenced
        assert noise not in log, log[-3000:]
    assert (output / "model_final.pth").is_file()
    assert (output / "inference" / "my_val" / "coco_instances_results.json").is_file()
    metrics = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines() if line.strip()]
    assert any(isinstance(m.get("bbox/AP"), float) for m in metrics), metrics[-1]
    # the run's config is the clone's configs/cpu/frcnn_r18_evalnorm_2img.yaml with these overrides
    used = yaml.safe_load((output / "config.yaml").read_text())
    reference = yaml.safe_load(load_config(os.path.join(REPO, "configs", "cpu", "frcnn_r18_evalnorm_2img.yaml"), [
        "DATASETS.TRAIN", "('my_train',)", "DATASETS.TEST", "('my_val',)", "SOLVER.MAX_ITER", "1",
        "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(output),
    ]).dump())
    assert used["MODEL"] == reference["MODEL"] and used["SOLVER"] == reference["SOLVER"]
    assert used["MODEL"]["RESNETS"]["NORM"] == used["MODEL"]["FPN"]["NORM"] == "EvalNorm"
    assert not os.path.exists(os.path.join(str(outside), "output")), "the run wrote outside OUTPUT_DIR"
