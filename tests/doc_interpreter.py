"""The project's interpreter of the clone in which tests/test_docs.py runs the docs' shell commands.

The clone's ``.venv/bin/python`` is ``python doc_interpreter.py SETTINGS ARGS...`` (SETTINGS: a JSON
file written by the test). A script that SETTINGS lists (one of the tools the docs call) gets its tiny
arguments appended: its ``append`` words, then each of its ``unless_named`` overrides that the command
line does not set itself (a command that names its own data set keeps it). Every tool reads the words
it is given last (argparse's last flag wins, and so does the last ``KEY VALUE`` override), so the
documented command runs as written, at a tiny schedule. ``-W ACTION`` is dropped: the clone's
environment ignores warnings already (PYTHONWARNINGS). Anything else (``-c CODE``, ``-m MODULE``) is
the real interpreter's.

    python doc_interpreter.py serve SETTINGS      # the server below; prints "ready" once listening

Each command of the docs is a new process that imports torch and detectron2, a few seconds each,
dozens of times over. So a script runs in a process forked from a server that has imported them
once (SETTINGS' ``address``, a Unix socket): the client passes its stdin/stdout/stderr, its
arguments, folder and environment; the forked process runs the script as ``__main__`` (the project's
own modules are imported there, fresh for each command) and answers with its exit status. Processes
that a command starts itself (``--num-gpus 2``) are new interpreters, as they would be. Without a
server (or before Python 3.9, which lacks ``socket.send_fds``) the client runs the script in the real
interpreter.
"""
import json
import os
import socket
import sys


def tiny_arguments(args, tool):
    """The words appended to the arguments ``args`` of a script whose settings are ``tool``."""
    extra = list(tool.get("append", ()))
    for key, words in tool.get("unless_named", {}).items():
        if not any(a.startswith(key) for a in args):
            extra += words
    return extra


def client(settings_path, args):
    """``.venv/bin/python ARGS...``: a script forked from the server, anything else exec'd."""
    settings = json.load(open(settings_path))
    python = settings["python"]
    words = list(args)
    while words[:1] == ["-W"]:
        words = words[2:]
    if not words or words[0].startswith("-") or not words[0].endswith(".py"):
        os.execv(python, [python, *args])
    tool = settings["tools"].get(words[0])
    argv = words + (tiny_arguments(words[1:], tool) if tool else [])
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not hasattr(socket, "send_fds"):  # Python < 3.9
            raise OSError("no socket.send_fds")
        connection.connect(settings["address"])
    except OSError:
        os.execv(python, [python, *argv])
    socket.send_fds(connection, [b"r"], [0, 1, 2])
    connection.sendall(json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode())
    connection.shutdown(socket.SHUT_WR)
    answer = b""
    while True:
        chunk = connection.recv(64)
        if not chunk:
            break
        answer += chunk
    sys.exit(int(answer) if answer.strip() else 70)  # no answer: the forked process died (EX_SOFTWARE)


def _reap():
    """Collect the exit statuses of forked processes that have ended."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _run_script(request):
    """Run the script of ``request`` as ``python SCRIPT ARGS...`` would, in its folder and environment;
    its exit status."""
    import atexit
    import runpy
    import traceback

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python SCRIPT` sets it
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    return code & 0xFF


def _child(connection, fds):
    """The forked process: the client's stdin/stdout/stderr become its own, then the script runs; the
    exit status goes back to the client."""
    code = 70
    try:
        data = b""
        while True:
            chunk = connection.recv(1 << 16)
            if not chunk:
                break
            data += chunk
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        code = _run_script(json.loads(data))
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            connection.sendall(str(code).encode())
        finally:
            os._exit(code)


def serve(settings_path):
    """Import torch and detectron2 once, then fork a process per client (module docstring)."""
    settings = json.load(open(settings_path))
    import torch  # noqa: F401  (the imports every command would repeat)
    import detectron2.checkpoint  # noqa: F401
    import detectron2.data  # noqa: F401
    import detectron2.engine  # noqa: F401
    import detectron2.evaluation  # noqa: F401
    import detectron2.modeling  # noqa: F401

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(settings["address"])
    server.listen(16)
    print("ready", flush=True)
    while True:
        connection, _ = server.accept()
        _, fds, _, _ = socket.recv_fds(connection, 1, 3)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            server.close()
            _child(connection, fds)
        connection.close()
        for fd in fds:
            os.close(fd)
        _reap()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        client(sys.argv[1], sys.argv[2:])
