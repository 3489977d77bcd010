"""Writing output files: atomically, never over an input, with errors that name the file.

Every file the plug-in's tools and hooks write goes through :func:`atomic_write` (or one of the
writers built on it: text, JSON, YAML, ``torch.save``, pickle, matplotlib figures), or, for writers
that take a file name (TorchScript, ONNX), :func:`atomic_path`. The content goes
to a temporary file in the destination's own folder, is flushed and ``fsync``-ed, and is then moved
over the destination with ``os.replace``, which is atomic within one file system; the folder is
``fsync``-ed too, so that the rename survives a crash. A reader therefore sees either the old file or
the complete new one. A failure (full disk, quota, file-size limit, an exception while serializing)
leaves the old file untouched and no temporary file behind, and is raised as
:class:`OutputWriteError`, an ``OSError`` whose message names the destination (torch's own writer
reports a full disk as a ``RuntimeError`` without the file name). A destination that is a symbolic
link is written through the link: the file it points to is replaced, the link stays.

:func:`check_output_folder` refuses, before any work is done, an output folder that is a file, lies
under a file or cannot be created or written. :func:`check_outputs` refuses, before any work is done, an output that is the same file as one of the
inputs or as another output, also when the names differ (relative paths, ``..``, symbolic or hard
links), so that a tool never overwrites the checkpoint or config it reads.

Plain Python: no detectron2; torch, matplotlib and yaml are imported only by the writer that needs them.
"""
import contextlib
import json
import os
import pickle
import secrets
from typing import IO, Any, Iterator, Mapping, Optional

__all__ = [
    "OutputWriteError",
    "OutputIsInputError",
    "atomic_path",
    "atomic_write",
    "write_text",
    "write_json",
    "write_yaml",
    "save_torch",
    "save_pickle",
    "save_figure",
    "same_file",
    "check_outputs",
    "check_output_file",
    "check_output_folder",
    "OutputFolderError",
    "remove_stale_temporaries",
]


class OutputWriteError(OSError):
    """Writing ``path`` failed; the destination was left as it was. ``errno`` is the underlying
    error's when it was an ``OSError`` (e.g. ``ENOSPC``, ``EFBIG``), the cause is chained."""

    def __init__(self, path: str, cause: BaseException):
        errno = cause.errno if isinstance(cause, OSError) else None
        detail = cause.strerror if isinstance(cause, OSError) and cause.strerror else f"{type(cause).__name__}: {cause}"
        message = f"could not write {path}: {detail}{_free_space_note(path)}; the previous file (if any) is unchanged"
        super().__init__(errno, message)
        self.filename = path

    def __str__(self) -> str:  # OSError's own form would repeat the file name
        return self.strerror


class OutputIsInputError(ValueError):
    """An output path names the same file as an input (or as another output)."""


class OutputFolderError(ValueError):
    """An output folder that cannot be one: it, or a folder above it, is a file, or the folder that
    would hold it is not writable. The message is one line naming the path."""


def _free_space_note(path: str) -> str:
    try:
        stat = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except (OSError, AttributeError):  # no statvfs on Windows
        return ""
    free = stat.f_bavail * stat.f_frsize
    return f" ({free / 2 ** 20:.1f} MiB free on that file system)"


def _destination(path: str) -> str:
    # a symbolic link is written through: replace the file it points to, keep the link
    return os.path.realpath(path) if os.path.islink(path) else path


def _open_temporary(folder: str, name: str) -> str:
    """Create an empty, new temporary file next to the destination (mode 0o666 minus the umask, as
    ``open(path, "w")`` would give the destination)."""
    while True:
        tmp = os.path.join(folder, f"{_temporary_prefix(name)}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _temporary_prefix(dest: str) -> str:
    return f".{os.path.basename(dest)}.tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's process, or no signals here: assume alive
        return True
    return True


def remove_stale_temporaries(path: str) -> int:
    """Remove the temporary files that writers of ``path`` on this machine left when they were killed
    (SIGKILL, power loss) before they could clean up: those whose writer process no longer runs.
    Returns how many were removed. Writers still running are left alone."""
    dest = _destination(os.fspath(path))
    folder = os.path.dirname(os.path.abspath(dest))
    prefix = _temporary_prefix(dest)
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, name))
            removed += 1
    return removed


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """``with atomic_path(path) as tmp: writer(tmp)``: for writers that take a file name rather than
    a file object (``torch.jit.save``, ``torch.onnx.export``). ``tmp`` names an empty temporary file
    next to ``path`` with the permissions an ordinary write of ``path`` would give it; when the block
    ends without an exception it is fsync-ed and moved over ``path``, otherwise removed (the errors
    as for :func:`atomic_write`). The folder is created if needed."""
    if not path:
        raise ValueError("atomic write: empty output path")
    dest = _destination(os.fspath(path))
    folder = os.path.dirname(os.path.abspath(dest))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = _open_temporary(folder, os.path.basename(dest))
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
        tmp = None
        _fsync_folder(folder)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if isinstance(exc, OutputWriteError):
            raise
        # OSError: the file system; RuntimeError: torch's zip writer reports a full disk this way
        if isinstance(exc, (OSError, RuntimeError)):
            raise OutputWriteError(path, exc) from exc
        add_note = getattr(exc, "add_note", None)  # Python >= 3.11
        if add_note is not None and isinstance(exc, Exception):
            add_note(f"while writing {path} (not written; the previous file, if any, is unchanged)")
        raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", encoding: Optional[str] = "utf-8") -> Iterator[IO]:
    """``with atomic_write(path, "wb") as f: ...``: the file object of a temporary file that replaces
    ``path`` when the block ends without an exception (module docstring). The folder is created if
    needed. ``mode`` is "w" (text) or "wb" (binary)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    if not path:
        raise ValueError("atomic_write: empty output path")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()


def write_text(path: str, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_write(path, "w") as f:
        f.write(text)
    return path


def write_json(path: str, data: Any, **dump_kwargs) -> str:
    """``json.dump(data, ...)`` into ``path`` atomically (``indent=1`` unless given); returns ``path``.
    The data is serialized before the file is touched, so an unserializable value writes nothing."""
    dump_kwargs.setdefault("indent", 1)
    return write_text(path, json.dumps(data, **dump_kwargs) + "\n")


def write_yaml(path: str, data: Any) -> str:
    """A YAML file: ``data`` is a string already in YAML (e.g. a detectron2 ``CfgNode.dump()``) or
    plain data for ``yaml.safe_dump``; returns ``path``."""
    if not isinstance(data, str):
        import yaml

        data = yaml.safe_dump(data, sort_keys=False)
    return write_text(path, data)


def save_torch(obj: Any, path: str) -> str:
    """``torch.save(obj, path)`` atomically; returns ``path``."""
    import torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
    return path


def save_pickle(obj: Any, path: str, protocol: Optional[int] = None) -> str:
    """``pickle.dump(obj, ...)`` into ``path`` atomically (detectron2's model-zoo ``.pkl``); returns ``path``."""
    with atomic_write(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def save_figure(fig, path: str, **savefig_kwargs) -> str:
    """``fig.savefig(path, ...)`` (matplotlib) atomically; the format is the file extension unless
    ``format=`` is given. Returns ``path``."""
    if "format" not in savefig_kwargs:
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        if not ext:
            raise ValueError(f"save_figure: {path} has no extension; pass format=")
        savefig_kwargs["format"] = ext
    with atomic_write(path, "wb") as f:
        fig.savefig(f, **savefig_kwargs)
    return path


# ------------------------------------------------------------------------------ outputs vs inputs
def _is_local(path: Optional[str]) -> bool:
    return bool(path) and "://" not in str(path)


def same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one file: the same inode when both exist (symbolic and hard
    links), otherwise the same resolved absolute path."""
    if os.path.exists(a) and os.path.exists(b):
        try:
            return os.path.samefile(a, b)
        except OSError:
            pass
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def check_outputs(outputs: Mapping[str, Optional[str]], inputs: Mapping[str, Optional[str]]) -> None:
    """Refuse outputs that would overwrite an input or each other.

    ``outputs`` and ``inputs`` map a description (the flag or key that named the file, e.g.
    ``"--output"``, ``"MODEL.WEIGHTS"``) to a path; empty values and URLs (``scheme://``) are
    ignored. Raises :class:`OutputIsInputError` naming both files."""
    outs = [(label, path) for label, path in outputs.items() if _is_local(path)]
    ins = [(label, path) for label, path in inputs.items() if _is_local(path)]
    for i, (out_label, out_path) in enumerate(outs):
        for in_label, in_path in ins:
            if same_file(out_path, in_path):
                raise OutputIsInputError(
                    f"{out_label} = {out_path!r} is the same file as the input {in_label} = {in_path!r}; "
                    "refusing to overwrite an input: choose another output path"
                )
        for other_label, other_path in outs[i + 1:]:
            if same_file(out_path, other_path):
                raise OutputIsInputError(
                    f"{out_label} = {out_path!r} and {other_label} = {other_path!r} are the same file; "
                    "choose different output paths"
                )



def _folder_problem(full: str) -> Optional[str]:
    """Why the folder ``full`` (absolute) cannot be created and written, or None."""
    if os.path.exists(full) and not os.path.isdir(full):
        return "is a file, not a folder"
    existing = full
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        return f"cannot be created: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return "is not writable by this user" if existing == full else f"cannot be created: {existing} is not writable"
    return None


def check_output_folder(path: str, label: str = "output folder") -> None:
    """Refuse, without creating anything, an output folder ``path`` (named ``label`` in the message,
    e.g. ``"OUTPUT_DIR"``) that is an existing file, lies under a file, or whose nearest existing
    folder is not writable (``path`` itself if it exists). URLs (``scheme://``) and "" pass.
    Raises :class:`OutputFolderError`."""
    if not _is_local(path):
        return
    problem = _folder_problem(os.path.abspath(os.fspath(path)))
    if problem:
        raise OutputFolderError(f"{label} = {path!r} {problem}" + ("; choose a folder for the outputs" if "is a file" in problem else ""))


def check_output_file(path: str, label: str = "output") -> None:
    """Refuse, without creating anything, an output file ``path`` that is an existing folder or whose
    folder cannot be created or written (:func:`check_output_folder`). Raises :class:`OutputFolderError`."""
    if not _is_local(path):
        return
    full = os.path.abspath(os.fspath(path))
    if os.path.isdir(full):
        raise OutputFolderError(f"{label} = {path!r} is a folder: name the file to write")
    problem = _folder_problem(os.path.dirname(full))
    if problem:
        raise OutputFolderError(f"{label} = {path!r} cannot be written: its folder {os.path.dirname(full)} {problem}")
