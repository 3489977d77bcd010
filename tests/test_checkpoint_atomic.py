"""Checkpoints survive a kill during a save, and ``--resume`` survives a damaged last checkpoint.

The kill is real: a child process rewrites ``model_final.pth`` over and over through the plug-in's
checkpointer and is SIGKILLed at several moments; each time the file on disk must load and be the
last or the next complete save, ``last_checkpoint`` must name it, and resuming must load it. The
test also proves that some kills landed inside a write (they leave the temporary file behind).
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from d2_bnstats.d2.checkpoint import AtomicCheckpointer, CheckpointError, resume_checkpoint, atomic_checkpointer
from d2_bnstats.d2.train import argument_parser, check_arguments
from d2_bnstats.outputs import remove_stale_temporaries

from .conftest import REPO, tiny_opts

# about 48 MB of float32: a save takes long enough for kills to land inside it
CHILD = textwrap.dedent(
    """
    import os
    import sys
    import torch
    from torch import nn
    from d2_bnstats.d2.checkpoint import AtomicCheckpointer

    os.makedirs(sys.argv[1])
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2000, 2000) for _ in range(3)])
    checkpointer = AtomicCheckpointer(model, sys.argv[1], save_to_disk=True)
    i = 0
    while True:
        checkpointer.save("model_final", iteration=i)
        print(i, flush=True)
        i += 1
    """
)


def _kill_during_saves(folder, delay):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder)], stdout=subprocess.PIPE, env=env, text=True, cwd=REPO
    )
    try:
        first = child.stdout.readline()  # one complete save (the previous good file)
        assert first.strip() == "0", f"the saving process did not start: {first!r}"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        rest = child.stdout.read()
    finally:
        child.kill()
        child.wait()
    done = [int(line) for line in (first + rest).split()]
    return max(done)


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_rewrite_leaves_the_previous_file(tmp_path):
    inside_a_write = 0
    for k, delay in enumerate((0.0, 0.05, 0.13, 0.23, 0.37)):
        folder = tmp_path / f"kill{k}"
        last_complete = _kill_during_saves(folder, delay)
        # the checkpoint's or last_checkpoint's temporary file: the kill came while one was written
        leftovers = [n for n in os.listdir(folder) if n.startswith(".model_final.pth.tmp-")]
        inside_a_write += any(n.startswith(".") for n in os.listdir(folder))

        # the file is complete: the last save reported, or the next one if it finished its rename
        state = torch.load(folder / "model_final.pth", map_location="cpu", weights_only=False)
        assert state["iteration"] in (last_complete, last_complete + 1)
        assert (folder / "last_checkpoint").read_text() == "model_final.pth"
        assert resume_checkpoint(str(folder)) == (str(folder / "model_final.pth"), None)

        # resuming loads it into a fresh model
        model = nn.Sequential(*[nn.Linear(2000, 2000) for _ in range(3)])
        loaded = AtomicCheckpointer(model, str(folder)).resume_or_load("", resume=True)
        assert loaded["iteration"] == state["iteration"]
        assert torch.equal(model[0].weight, state["model"]["0.weight"])

        # the next save removes what the killed writer left
        assert remove_stale_temporaries(str(folder / "model_final.pth")) == len(leftovers)
    assert inside_a_write >= 2, f"only {inside_a_write} of 5 kills landed inside a write: the test tested little"


def _save(path, iteration, mtime):
    torch.save({"model": nn.Linear(2, 2).state_dict(), "iteration": iteration}, path)
    os.utime(path, (mtime, mtime))


def test_resume_falls_back_from_a_damaged_last_checkpoint(tmp_path, caplog):
    _save(tmp_path / "model_0000001.pth", 1, 1000)
    _save(tmp_path / "model_0000003.pth", 3, 2000)
    full = (tmp_path / "model_0000003.pth").read_bytes()
    (tmp_path / "model_final.pth").write_bytes(full[: len(full) // 2])  # what an in-place write left
    (tmp_path / "last_checkpoint").write_text("model_final.pth")

    path, warning = resume_checkpoint(str(tmp_path))
    assert path == str(tmp_path / "model_0000003.pth")
    assert "model_final.pth" in warning and "truncated" in warning and "model_0000003.pth" in warning
    assert "\n" not in warning

    model = nn.Linear(2, 2)
    with caplog.at_level("WARNING"):
        loaded = AtomicCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert loaded["iteration"] == 3
    assert any("newest readable checkpoint" in r.getMessage() for r in caplog.records)

    # an empty file (a kill right after open) and a missing one fall back too
    (tmp_path / "model_0000003.pth").write_bytes(b"")
    assert resume_checkpoint(str(tmp_path))[0] == str(tmp_path / "model_0000001.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    path, warning = resume_checkpoint(str(tmp_path))
    assert path == str(tmp_path / "model_0000001.pth") and "does not exist" in warning


def test_resume_without_a_readable_checkpoint_stops_with_one_line(tmp_path, datasets_root):
    (tmp_path / "model_final.pth").write_bytes(b"")
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    with pytest.raises(CheckpointError) as error:
        resume_checkpoint(str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and "model_final.pth" in message and "empty" in message
    assert "last_checkpoint" in message

    # the tool says it in the launching process, before anything runs
    args = argument_parser().parse_args(
        ["--config-file", os.path.join(REPO, "configs", "cpu", "frcnn_r18_bn_2img.yaml"), "--resume",
         *tiny_opts(tmp_path)]
    )
    with pytest.raises(SystemExit) as stop:
        check_arguments(args)
    assert str(stop.value).startswith("train_net: cannot resume from") and "\n" not in str(stop.value)

    # nothing to resume: no pointer file
    os.remove(tmp_path / "last_checkpoint")
    assert resume_checkpoint(str(tmp_path)) == (None, None)


def test_save_writes_what_detectron2_writes_and_tags_after_the_file(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    ours = atomic_checkpointer(DetectionCheckpointer(model, str(tmp_path / "a"), save_to_disk=True, optimizer=optimizer))
    reference = DetectionCheckpointer(model, str(tmp_path / "b"), save_to_disk=True, optimizer=optimizer)
    os.makedirs(tmp_path / "b")
    ours.save("model_0000004", iteration=4)
    reference.save("model_0000004", iteration=4)
    a = torch.load(tmp_path / "a" / "model_0000004.pth", weights_only=False)
    b = torch.load(tmp_path / "b" / "model_0000004.pth", weights_only=False)
    assert a.keys() == b.keys() == {"model", "optimizer", "iteration"}
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert a["optimizer"]["state"][0]["momentum_buffer"].equal(b["optimizer"]["state"][0]["momentum_buffer"])
    assert (tmp_path / "a" / "last_checkpoint").read_text() == "model_0000004.pth"
    # ordinary permissions (0o666 minus the umask), as detectron2's own write gives
    assert (os.stat(tmp_path / "a" / "model_0000004.pth").st_mode & 0o777) == (
        os.stat(tmp_path / "b" / "model_0000004.pth").st_mode & 0o777
    )


@pytest.mark.slow
def test_train_net_killed_while_it_rewrites_model_final_resumes(datasets_root, tmp_path):
    """The whole tool: a finished 2-iteration run is extended with ``--resume SOLVER.MAX_ITER 3`` and
    SIGKILLed as soon as the new ``model_final.pth`` is being written (its temporary file exists);
    the old file is intact, ``last_checkpoint`` names it, and ``--resume`` finishes the run."""
    out = tmp_path / "run"
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root, PYTHONWARNINGS="ignore", PYTHONPATH=REPO,
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config",
               os.path.join(REPO, "configs", "cpu", "frcnn_r18_bn_2img.yaml")]

    def train(max_iter, resume):
        return command + (["--resume"] if resume else []) + tiny_opts(out, max_iter=max_iter, **{"DATASETS.TEST": "()"})

    first = subprocess.run(train(2, False), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    good = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert good["iteration"] == 1

    extended = subprocess.Popen(train(3, True), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not any(n.startswith(".model_final.pth.tmp-") for n in os.listdir(out)):
            assert extended.poll() is None, "the run ended before it rewrote model_final.pth"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        extended.send_signal(signal.SIGKILL)  # inside the save
        extended.wait(timeout=60)
    finally:
        if extended.poll() is None:
            extended.kill()
            extended.wait()
    kept = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert kept["iteration"] == 1
    assert all(torch.equal(v, good["model"][k]) for k, v in kept["model"].items())
    assert (out / "last_checkpoint").read_text() == "model_final.pth"

    resumed = subprocess.run(train(3, True), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["iteration"] == 2
    assert not [n for n in os.listdir(out) if n.startswith(".model_final.pth.tmp-")]  # the killed save's file is gone
