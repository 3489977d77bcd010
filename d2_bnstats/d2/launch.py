"""Multi-process launch that also works on CPU-only machines (gloo).

detectron2's ``launch`` spawns one process per GPU. Older versions (the 2022 snapshot) assert that
CUDA is available and hard-code NCCL; newer ones fall back to gloo. This wrapper delegates to
detectron2 whenever CUDA is available and otherwise runs the same recipe with gloo, so that
``--num-gpus 2`` on a CPU machine means "2 processes", on every detectron2 version.

Workers end with their launcher: killed with SIGKILL, a launcher cannot stop its workers itself.
torch's ``spawn`` asks Linux to send each worker SIGINT when the launcher ends, which is not
enough: a run started in the background (``nohup``, ``&`` in a script) ignores SIGINT and its
workers would train on, and a worker that does get KeyboardInterrupt can take well over 10 s to
exit. Each worker therefore watches the launcher itself (:func:`exit_with_parent`) and ends, with
the processes it started, as soon as the launcher does.

A worker that dies (killed, out of memory) leaves its own children behind (data-loader workers, a
process still starting), and they print their errors when they notice, e.g. "pickle data was
truncated" from a child whose start was cut short, after the launcher has reported the dead
worker. The launcher therefore adopts such orphans (Linux: it is a "child subreaper" while the
workers run) and, when a worker fails, waits briefly for them to end (then ends them) before it
raises torch's exception, so the last line of a run's output names the rank and the signal or
error (:func:`collecting_orphans`).

A worker whose function returns leaves no process group behind (:func:`ending_the_process_group`):
one still alive when the interpreter shuts down can abort the process (gloo's threads still hold
tensors, "terminate called without an active exception", SIGABRT) after all its work is done.
"""
import contextlib
import ctypes
import functools
import inspect
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from .library_noise import silence_library_noise
from datetime import timedelta
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

DEFAULT_TIMEOUT = timedelta(minutes=30)
logger = logging.getLogger(__name__)


def launch(
    main_func,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = None,
    args=(),
    timeout: timedelta = DEFAULT_TIMEOUT,
):
    """Like ``detectron2.engine.launch``; ``num_gpus_per_machine`` is processes per machine on CPU."""
    if num_gpus_per_machine < 1 or num_machines < 1:
        raise ValueError(
            f"--num-gpus and --num-machines must be >= 1, got {num_gpus_per_machine} and {num_machines}"
        )
    launcher_pid = os.getpid()
    if torch.cuda.is_available():
        kwargs = dict(num_machines=num_machines, machine_rank=machine_rank, dist_url=dist_url, args=args)
        if "timeout" in inspect.signature(d2_launch).parameters:  # older detectron2 has no timeout
            kwargs["timeout"] = timeout
        guarded = functools.partial(_run_tied_to_launcher, launcher_pid, main_func)
        with collecting_orphans(enabled=num_machines * num_gpus_per_machine > 1):
            return d2_launch(guarded, num_gpus_per_machine, **kwargs)
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' only works on one machine; pass --dist-url tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    with collecting_orphans():
        mp.spawn(
            _cpu_worker,
            nprocs=num_gpus_per_machine,
            args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout, launcher_pid),
            daemon=False,
        )


_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def _set_child_subreaper(on: bool) -> bool:
    """Make this process adopt its orphaned descendants (Linux); False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _children() -> Optional[List[int]]:
    """This process's children (Linux /proc), None where they cannot be listed."""
    pids = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                pids.extend(int(pid) for pid in f.read().split())
    except OSError:
        return None
    return pids


def _is_multiprocessing_helper(pid: int) -> bool:
    # multiprocessing's resource tracker and forkserver serve the launcher and end with it
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read()
    except OSError:
        return True
    return b"resource_tracker" in command or b"forkserver" in command


def _reap(pid: int) -> bool:
    """Whether ``pid`` (an adopted orphan) has ended; collects its exit status."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


def _end_orphans(grace: float, earlier: List[int]) -> None:
    """Wait up to ``grace`` seconds for the adopted orphans to end, then kill the rest. ``earlier``:
    this process's children from before the launch, which are none of the run's."""
    deadline = time.monotonic() + grace
    while True:
        children = _children()
        if children is None:  # cannot list them: give them the grace period to print and end
            time.sleep(grace)
            return
        orphans = [pid for pid in children
                   if pid not in earlier and not _is_multiprocessing_helper(pid) and not _reap(pid)]
        if not orphans:
            return
        if time.monotonic() > deadline:
            for pid in orphans:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in orphans:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            return
        time.sleep(0.05)


@contextlib.contextmanager
def collecting_orphans(enabled: bool = True, grace: float = 5.0):
    """While the block runs the workers, adopt the processes a dead worker leaves behind; if the
    block raises torch's exception for a failed worker, first let those processes end (up to
    ``grace`` seconds, then kill them), so that their output comes before the exception's."""
    earlier = (_children() or []) if enabled else []
    adopting = enabled and _set_child_subreaper(True)
    try:
        yield
    except (mp.ProcessExitedException, mp.ProcessRaisedException):
        if enabled:
            _end_orphans(grace if adopting else min(grace, 2.0), earlier)
        raise
    finally:
        if adopting:
            _set_child_subreaper(False)


def launch_from_args(main_func, args):
    """:func:`launch` ``main_func(args)`` with the launch flags of ``default_argument_parser``
    (``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``)."""
    return launch(main_func, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                  dist_url=args.dist_url, args=(args,))


def _free_port() -> int:
    # the port may be taken again before the workers bind it; detectron2 accepts the same race
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _run_tied_to_launcher(launcher_pid, main_func, *args):
    """``main_func(*args)``, in a worker that ends with its launcher (detectron2 calls it in the
    launcher itself for a single process: then there is nothing to watch)."""
    silence_library_noise()
    if os.getpid() == launcher_pid:
        return main_func(*args)
    exit_with_parent(launcher_pid)
    with ending_the_process_group():
        return main_func(*args)


@contextlib.contextmanager
def ending_the_process_group():
    """Once the block has returned in every process, destroy the default process group (and with it
    detectron2's per-machine group), so that none is left for the interpreter's shutdown.

    Only after success: a worker that raises leaves the group as it is, since waiting for the other
    processes at a barrier could hang where one of them has died; torch ends the run then anyway.
    """
    yield
    if dist.is_available() and dist.is_initialized():
        comm.synchronize()  # no process destroys the group while another still uses it
        dist.destroy_process_group()


def exit_with_parent(parent_pid: int, poll_interval: float = 0.5) -> None:
    """End this process, and the processes it started with multiprocessing (data-loader workers),
    as soon as its parent process ``parent_pid`` ends.

    A daemon thread waits on multiprocessing's pipe to the parent, which closes when the parent
    ends (in a process not started by multiprocessing: polls the parent id, which changes when the
    parent ends, on POSIX). It then kills the children first: a data-loader worker still starting
    up would not notice that its parent has gone (torch's worker watchdog compares with the parent
    id it sees once started).
    """
    parent = multiprocessing.parent_process()

    def watch():
        if parent is not None:
            parent.join()  # returns when the pipe to the parent closes
        while parent is None and os.getppid() == parent_pid:
            time.sleep(poll_interval)
        for child in multiprocessing.active_children():
            child.kill()
        # no logging: its locks may be held by the main thread, which is not coming back
        os.write(2, f"process {os.getpid()}: its launcher (pid {parent_pid}) has ended; exiting\n".encode())
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


def _cpu_worker(
    local_rank, main_func, world_size, per_machine, machine_rank, dist_url, args, timeout, launcher_pid
):
    exit_with_parent(launcher_pid)
    silence_library_noise()
    global_rank = machine_rank * per_machine + local_rank
    # Share the cores between the processes instead of oversubscribing them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_machine))
    try:
        dist.init_process_group(
            backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout
        )
    except Exception:
        logger.error("could not initialise the gloo process group at %s", dist_url)
        raise
    setup_local_process_group(per_machine, machine_rank)
    comm.synchronize()
    with ending_the_process_group():
        main_func(*args)


def setup_local_process_group(per_machine: int, machine_rank: int) -> None:
    """Create detectron2's per-machine process group (its API differs between versions)."""
    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(per_machine)
        return
    num_machines = dist.get_world_size() // per_machine
    for i in range(num_machines):
        group = dist.new_group(list(range(i * per_machine, (i + 1) * per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
