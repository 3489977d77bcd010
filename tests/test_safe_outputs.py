"""Output files: written atomically through one helper (d2_bnstats.outputs), never over an input.

The helper on its own (whole file or old file, temporary files cleaned up, errors that name the file,
links, permissions, every format), then the tools: an --output that is the weights or the config file
is refused before any work, a write that fails on a full file system (simulated with a file-size limit
for this process) keeps the previous file, and the comparison run in a training folder leaves that
run's config.yaml and log.txt alone.
"""
import contextlib
import errno
import importlib.util
import json
import os
import pickle
import resource
import signal

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer

from d2_bnstats.d2.train import load_config
from d2_bnstats.outputs import (
    OutputIsInputError,
    OutputWriteError,
    atomic_write,
    check_outputs,
    save_figure,
    save_pickle,
    save_torch,
    write_json,
    write_text,
    write_yaml,
)

from .conftest import REPO, tiny_opts

BN_CPU = os.path.join(REPO, "configs", "cpu", "frcnn_r18_bn_2img.yaml")
MABN_CPU = os.path.join(REPO, "configs", "cpu", "frcnn_r18_mabn_2img.yaml")
SMALL = {"MODEL.FPN.OUT_CHANNELS": 32, "MODEL.ROI_BOX_HEAD.FC_DIM": 64, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32}
PREVIOUS = b"the previous file: must survive a failed or refused write"


def leftovers(folder):
    """Files in ``folder`` other than the expected outputs: temporary files a write left behind."""
    return sorted(n for n in os.listdir(folder) if ".tmp" in n)


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def small_opts(output_dir, **extra):
    return tiny_opts(output_dir, **{**SMALL, **extra})


def save_model(config, opts, path):
    model = DefaultTrainer.build_model(load_config(config, opts))
    torch.save({"model": model.state_dict()}, path)
    return path


@contextlib.contextmanager
def file_size_limit(limit):
    """Inside: this process may write files of at most ``limit`` bytes, as on a full disk; writes past
    it fail with EFBIG instead of killing the process with SIGXFSZ. The soft limit only, restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


# ------------------------------------------------------------------------------ the helper
def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "out.json"
    path.write_bytes(PREVIOUS)
    with pytest.raises(ZeroDivisionError):
        with atomic_write(str(path)) as f:
            f.write("half of the new content")
            1 / 0
    assert path.read_bytes() == PREVIOUS and leftovers(tmp_path) == []
    with pytest.raises(TypeError):  # not serializable: nothing is written
        write_json(str(path), {"x": object()})
    assert path.read_bytes() == PREVIOUS and leftovers(tmp_path) == []
    write_json(str(path), {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1} and leftovers(tmp_path) == []


def test_a_write_that_hits_the_file_size_limit_names_the_file_and_keeps_the_previous_one(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(PREVIOUS)
    with pytest.raises(OutputWriteError) as info, file_size_limit(100_000):
        save_torch({"model": torch.zeros(1_000_000)}, str(path))
    assert info.value.filename == str(path) and f"could not write {path}" in str(info.value)
    assert "unchanged" in str(info.value) and isinstance(info.value.__cause__, (RuntimeError, OSError))
    assert path.read_bytes() == PREVIOUS and leftovers(tmp_path) == []


def test_an_os_error_keeps_its_errno(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutputWriteError) as info:
        write_text(str(tmp_path / "a.txt"), "x")
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert str(tmp_path / "a.txt") in str(info.value) and "No space left" in str(info.value)
    assert not (tmp_path / "a.txt").exists() and leftovers(tmp_path) == []


def test_every_format_round_trips_and_creates_the_folder(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import yaml

    out = tmp_path / "new" / "folder"
    write_text(str(out / "a.md"), "table\n")
    write_json(str(out / "a.json"), {"ap": 1.5})
    write_yaml(str(out / "a.yaml"), {"MODEL": {"NORM": "BN"}})
    write_yaml(str(out / "b.yaml"), "MODEL:\n  NORM: GN\n")
    save_torch({"t": torch.arange(3)}, str(out / "a.pth"))
    save_pickle({"model": {"w": [1, 2]}}, str(out / "a.pkl"))
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    save_figure(fig, str(out / "a.png"), dpi=50)
    plt.close(fig)
    assert (out / "a.md").read_text() == "table\n"
    assert json.loads((out / "a.json").read_text()) == {"ap": 1.5}
    assert yaml.safe_load((out / "a.yaml").read_text()) == {"MODEL": {"NORM": "BN"}}
    assert yaml.safe_load((out / "b.yaml").read_text()) == {"MODEL": {"NORM": "GN"}}
    assert torch.equal(torch.load(out / "a.pth", weights_only=True)["t"], torch.arange(3))
    assert pickle.loads((out / "a.pkl").read_bytes()) == {"model": {"w": [1, 2]}}
    assert (out / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert leftovers(out) == []


def test_new_files_get_the_usual_permissions_and_links_are_written_through(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(str(tmp_path / "a.txt"), "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "model.pth").write_bytes(PREVIOUS)
    os.symlink(tmp_path / "real" / "model.pth", tmp_path / "link.pth")
    write_text(str(tmp_path / "link.pth"), "new")
    assert os.path.islink(tmp_path / "link.pth") and (tmp_path / "real" / "model.pth").read_text() == "new"


def test_outputs_that_are_inputs_are_refused_under_any_name(tmp_path, monkeypatch):
    weights = tmp_path / "model.pth"
    weights.write_bytes(PREVIOUS)
    (tmp_path / "sub").mkdir()
    os.symlink(weights, tmp_path / "link.pth")
    os.link(weights, tmp_path / "hard.pth")
    monkeypatch.chdir(tmp_path)
    for alias in ("model.pth", str(weights), "sub/../model.pth", "./sub/../link.pth", "hard.pth"):
        with pytest.raises(OutputIsInputError, match="MODEL.WEIGHTS") as info:
            check_outputs({"--output": alias}, {"MODEL.WEIGHTS": str(weights)})
        assert alias in str(info.value)
    with pytest.raises(OutputIsInputError, match="same file"):  # two outputs, one file
        check_outputs({"--output": "new.json", "--report": "sub/../new.json"}, {})
    check_outputs({"--output": "other.pth", "--report": None}, {"MODEL.WEIGHTS": str(weights), "url": "detectron2://x.pkl"})


# ------------------------------------------------------------------------------ the tools
def test_estimate_evalnorm_refuses_to_overwrite_its_weights(datasets_root, tmp_path):
    opts = small_opts(tmp_path)
    weights = save_model(BN_CPU, opts, str(tmp_path / "bn.pth"))
    before = open(weights, "rb").read()
    with pytest.raises(SystemExit) as info:
        load_tool("estimate_evalnorm").main(["--config-file", BN_CPU, "--images", "2", "--ims-per-batch", "2",
                                             "--output", weights] + opts + ["MODEL.WEIGHTS", weights])
    assert "MODEL.WEIGHTS" in str(info.value.code) and weights in str(info.value.code)
    assert open(weights, "rb").read() == before and not os.path.exists(tmp_path / "bn.yaml")


def test_estimate_evalnorm_refuses_to_overwrite_its_config_file(datasets_root, tmp_path):
    # the config written next to the checkpoint (<output>.yaml) would replace the config file read
    opts = small_opts(tmp_path)
    weights = save_model(BN_CPU, opts, str(tmp_path / "bn.pth"))
    config = tmp_path / "cfg" / "run.yaml"
    config.parent.mkdir()
    config.write_text(open(BN_CPU).read().replace("_BASE_: \"", f"_BASE_: \"{os.path.dirname(BN_CPU)}/"))
    config_text = config.read_text()
    with pytest.raises(SystemExit) as info:
        load_tool("estimate_evalnorm").main(["--config-file", str(config), "--images", "2", "--ims-per-batch", "2",
                                             "--output", str(tmp_path / "cfg" / "run.pth")] + opts + ["MODEL.WEIGHTS", weights])
    assert "config file" in str(info.value.code) and str(config) in str(info.value.code)
    assert config.read_text() == config_text and not os.path.exists(tmp_path / "cfg" / "run.pth")


def test_convert_to_mabn_refuses_to_overwrite_its_weights(datasets_root, tmp_path):
    opts = tiny_opts(tmp_path)
    bn = ["MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN", "MODEL.ROI_BOX_HEAD.NORM", "BN"]
    weights = save_model(MABN_CPU, opts + bn, str(tmp_path / "bn.pth"))
    before = open(weights, "rb").read()
    tool = load_tool("convert_to_mabn")
    with pytest.raises(SystemExit) as info:
        tool.main(["--config", MABN_CPU, "--weights", weights, "--output", weights,
                   "--calibration-images", "0", "--compare-images", "0"] + opts)
    assert "--weights" in str(info.value.code) and weights in str(info.value.code)
    assert open(weights, "rb").read() == before


def test_estimate_evalnorm_on_a_full_disk_keeps_the_previous_checkpoint_and_names_it(datasets_root, tmp_path):
    opts = small_opts(tmp_path)
    weights = save_model(BN_CPU, opts, str(tmp_path / "bn.pth"))
    out = tmp_path / "out" / "model_evalnorm.pth"
    out.parent.mkdir()
    out.write_bytes(PREVIOUS)
    tool = load_tool("estimate_evalnorm")
    with pytest.raises(SystemExit) as info, file_size_limit(1_000_000):
        tool.main(["--config-file", BN_CPU, "--images", "2", "--ims-per-batch", "2", "--output", str(out)]
                  + opts + ["MODEL.WEIGHTS", weights])
    assert f"could not write {out}" in str(info.value.code)
    assert out.read_bytes() == PREVIOUS and leftovers(out.parent) == []
    assert not (out.parent / "model_evalnorm.yaml").exists()  # the config goes with its checkpoint only


def test_convert_to_mabn_on_a_full_disk_keeps_the_previous_checkpoint_and_names_it(datasets_root, tmp_path):
    bn = ["MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN", "MODEL.ROI_BOX_HEAD.NORM", "BN"]
    weights = save_model(MABN_CPU, tiny_opts(tmp_path) + bn, str(tmp_path / "bn.pth"))
    out = tmp_path / "out" / "mabn.pth"
    out.parent.mkdir()
    out.write_bytes(PREVIOUS)
    tool = load_tool("convert_to_mabn")
    with pytest.raises(SystemExit) as info, file_size_limit(1_000_000):
        tool.main(["--config", MABN_CPU, "--weights", weights, "--output", str(out),
                   "--calibration-images", "0", "--compare-images", "0"] + tiny_opts(tmp_path))
    assert f"could not write {out}" in str(info.value.code)
    assert out.read_bytes() == PREVIOUS and leftovers(out.parent) == []


def test_the_comparison_in_a_training_folder_keeps_that_runs_config_and_log(datasets_root, tmp_path):
    from d2_bnstats.compare import main, parse_args

    run = tmp_path / "run"
    run.mkdir()
    model = DefaultTrainer.build_model(load_config(BN_CPU, small_opts(run)))
    DetectionCheckpointer(model, save_dir=str(run)).save("model_final")
    (run / "config.yaml").write_bytes(PREVIOUS)
    (run / "log.txt").write_bytes(PREVIOUS)
    main(parse_args(["--config-file", BN_CPU] + small_opts(run, **{"MODEL.WEIGHTS": run / "model_final.pth"})
                    + ["--output", str(run), "--strategies", "ema", "--max-images", "1",
                       "--discrepancy-images", "0", "--no-plots"]))
    assert (run / "config.yaml").read_bytes() == PREVIOUS and (run / "log.txt").read_bytes() == PREVIOUS
    assert json.loads((run / "compare.json").read_text())["strategies"][0]["available"]
    written = load_config(str(run / "compare_config.yaml"))
    assert written.OUTPUT_DIR == str(run) and written.MODEL.WEIGHTS == str(run / "model_final.pth")
    assert leftovers(run) == []
