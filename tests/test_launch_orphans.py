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


# ---- a worker that dies: the launcher's output ends with the line that names it ------------------
LATE_LINE = "a line the dead worker's child prints after its parent died"


def _print_late(started):
    started.set()
    time.sleep(1.5)
    print(LATE_LINE, file=sys.stderr, flush=True)


def _die_leaving_a_child():
    """Rank 1 starts a child process, then is SIGKILLed; rank 0 works on until it is stopped."""
    import multiprocessing

    import torch.distributed as dist

    if dist.get_rank() == 1:
        context = multiprocessing.get_context("spawn")
        started = context.Event()
        context.Process(target=_print_late, args=(started,)).start()
        started.wait(60)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)


LAUNCH = """
import sys
from d2_bnstats.d2.launch import launch
from tests.test_launch_orphans import _die_leaving_a_child
launch(_die_leaving_a_child, 2)
"""


@pytest.mark.slow
def test_the_launcher_output_ends_with_the_dead_worker_not_with_what_its_children_print():
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", LAUNCH], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, start_new_session=True)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 1
    assert LATE_LINE in lines, "the child did not outlive its parent: the test tested nothing"
    assert lines[-1].endswith("process 1 terminated with signal SIGKILL"), lines[-5:]
    assert time.monotonic() - started < 120  # rank 0 was stopped, not waited for
