"""Workers of a multi-process run end with their launcher, also when it is killed with SIGKILL
(it cannot clean up then): a real 2-process ``tools/train_net.py`` run on the tiny fashion-scenes
split with one data-loader worker per process (the configs' setting), started the way a long run
is started in the background (``nohup`` or ``&`` in a script: SIGINT ignored), the launcher killed
once both processes train; 10 s later no process the run started is alive (training processes,
their data-loader workers, multiprocessing's resource tracker).

torch's ``spawn`` asks Linux for SIGINT in each worker when the launcher ends. A run started in
the background ignores SIGINT, so its workers used to train on; in the foreground they usually,
not always, ended within 10 s."""
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import REPO, tiny_opts

FRCNN_BN = os.path.join(REPO, "configs", "cpu", "frcnn_r18_bn_2img.yaml")
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads processes from /proc")


def alive(pid):
    """Running, or stopped, but not a zombie (an ended process its new parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def started_by(launcher_pid):
    """{pid: parent pid} of the processes in the launcher's process group, the launcher excepted."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == launcher_pid:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[3]) == launcher_pid:  # process group id
            found[int(entry)] = int(fields[1])
    return found


def training_processes(launcher_pid):
    """Children of the launcher that have children of their own (data-loader workers)."""
    members = started_by(launcher_pid)
    return {ppid for ppid in members.values() if members.get(ppid) == launcher_pid}


def wait_for(condition, timeout, what, launcher, log):
    deadline = time.monotonic() + timeout
    while not condition():
        if launcher.poll() is not None:
            raise AssertionError(f"the launcher ended before {what} (exit {launcher.returncode}):\n{log()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s:\n{log()}")
        time.sleep(0.5)


@pytest.mark.slow
def test_killing_the_launcher_ends_its_workers(datasets_root, tmp_path):
    opts = tiny_opts(tmp_path / "out", max_iter=100000, **{
        "DATASETS.TEST": "()", "SOLVER.IMS_PER_BATCH": 4, "DATALOADER.NUM_WORKERS": 1,
    })
    env = dict(
        os.environ, DETECTRON2_DATASETS=datasets_root, PYTHONWARNINGS="ignore", PYTHONPATH=REPO, OMP_NUM_THREADS="1"
    )
    stdout = tmp_path / "launcher.log"
    with open(stdout, "wb") as out:
        launcher = subprocess.Popen(
            [sys.executable, TRAIN_NET, "--config", FRCNN_BN, "--num-gpus", "2"] + opts,
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as nohup and `&` do
        )
    workers = []
    try:
        def log():
            return stdout.read_text(errors="replace")[-4000:]

        # rank 0 trains (the processes log to the launcher's output), both processes load data
        wait_for(lambda: "Starting training" in log(), 600, "training", launcher, log)
        wait_for(lambda: len(training_processes(launcher.pid)) == 2, 300, "2 training processes", launcher, log)
        workers = sorted(started_by(launcher.pid))
        assert len(workers) >= 4 and all(alive(pid) for pid in workers)  # with the 2 data-loader workers

        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        time.sleep(10)
        survivors = [pid for pid in workers if alive(pid)]
        assert not survivors, f"processes {survivors} of the killed launcher {launcher.pid} still run 10 s later"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=30)
        for pid in workers:  # only processes this test started, if the check above failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
