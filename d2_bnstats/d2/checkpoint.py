"""Training checkpoints that a kill cannot destroy, and a ``--resume`` that survives a damaged one.

detectron2's checkpointer writes ``model_*.pth`` in place (open, ``torch.save``, close) and then
points ``last_checkpoint`` at it: a process killed while it writes leaves a partial file, and when
the file being rewritten is the good one (``model_final.pth`` of a finished run that is extended
with ``--resume SOLVER.MAX_ITER``), that file is lost while ``last_checkpoint`` still names it.

:class:`AtomicCheckpointer` is detectron2's ``DetectionCheckpointer`` with two changes:

* :meth:`~AtomicCheckpointer.save` writes the same dictionary through
  :func:`d2_bnstats.outputs.save_torch` (temporary file in the same folder, fsync, rename), and only
  then rewrites ``last_checkpoint`` (atomically too). A kill at any point leaves the previous file
  and a ``last_checkpoint`` that names a complete file; the temporary file such a kill leaves is
  removed by the next save of the same checkpoint.
* :meth:`~AtomicCheckpointer.get_checkpoint_file` (what ``resume_or_load(resume=True)`` loads) checks
  the file ``last_checkpoint`` names (its header and end, :func:`~d2_bnstats.d2.weights.checkpoint_file_problem`;
  the file is not read). A missing, truncated or damaged file is reported in one warning line and the
  newest readable ``*.pth`` of the folder is used instead; if there is none, :class:`CheckpointError`
  says so in one line.

:func:`resume_checkpoint` is that decision on its own, for the launching process of a tool (so that
the line comes before any process starts). Folders given as URLs (``scheme://``) keep detectron2's
behaviour.
"""
import logging
import os
from typing import Optional, Tuple

from detectron2.checkpoint import DetectionCheckpointer

from ..outputs import remove_stale_temporaries, save_torch, write_text
from .weights import checkpoint_file_problem

__all__ = ["AtomicCheckpointer", "CheckpointError", "atomic_checkpointer", "resume_checkpoint"]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"  # the pointer file detectron2's checkpointer reads and writes


class CheckpointError(RuntimeError):
    """A run cannot resume: ``last_checkpoint`` names an unusable file and no other checkpoint of
    the folder is readable. The message is one line."""


def _is_local(folder: str) -> bool:
    return bool(folder) and "://" not in folder


def _file_problem(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return "does not exist"
    try:
        problem = checkpoint_file_problem(path)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return f"is not a usable checkpoint: {problem}" if problem else None


def _newest_readable(folder: str, exclude: str) -> Optional[str]:
    candidates = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        # hidden names are temporary files of writes that were interrupted
        if name.startswith(".") or not name.endswith(".pth") or os.path.abspath(path) == os.path.abspath(exclude):
            continue
        if _file_problem(path) is None:
            candidates.append((os.path.getmtime(path), name, path))
    return max(candidates)[2] if candidates else None


def resume_checkpoint(folder: str) -> Tuple[Optional[str], Optional[str]]:
    """What ``--resume`` loads from ``folder``: ``(path, warning)``.

    ``(None, None)``: nothing to resume (no ``last_checkpoint``; the run starts from its weights).
    ``(file, None)``: the file ``last_checkpoint`` names, which looks complete.
    ``(other, warning)``: that file is missing or damaged; ``other`` is the newest readable ``*.pth``
    of the folder and ``warning`` one line saying so. :class:`CheckpointError` when there is none.
    """
    if not _is_local(folder):
        return None, None
    pointer = os.path.join(folder, LAST_CHECKPOINT)
    if not os.path.isfile(pointer):
        return None, None
    try:
        with open(pointer, encoding="utf-8", errors="replace") as f:
            name = f.read().strip()
    except OSError as e:
        raise CheckpointError(f"cannot resume from {folder}: {pointer} cannot be read ({e.strerror or e})") from e
    target = os.path.join(folder, name)
    problem = _file_problem(target) if name else "is empty"
    if problem is None:
        return target, None
    what = f"{pointer} names {name}, which {problem}" if name else f"{pointer} is empty"
    fallback = _newest_readable(folder, target)
    if fallback is None:
        raise CheckpointError(
            f"cannot resume from {folder}: {what}, and no other checkpoint (*.pth) there is readable; "
            f"remove {pointer} to start the run from its weights instead"
        )
    return fallback, f"{what}; resuming from {os.path.basename(fallback)}, the newest readable checkpoint there"


class AtomicCheckpointer(DetectionCheckpointer):
    """detectron2's ``DetectionCheckpointer`` whose saves cannot leave a partial file and whose
    resume skips a damaged last checkpoint (module docstring). Same constructor."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if not _is_local(self.save_dir):
            return super().save(name, **kwargs)
        # the dictionary fvcore's Checkpointer.save writes
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must be a file name, not a path")
        logger.info("Saving checkpoint to %s", save_file)
        remove_stale_temporaries(save_file)  # what earlier saves that were killed left (checkpoint-sized)
        save_torch(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not _is_local(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        write_text(os.path.join(self.save_dir, LAST_CHECKPOINT), last_filename_basename)

    def get_checkpoint_file(self) -> str:
        if not _is_local(self.save_dir):
            return super().get_checkpoint_file()
        path, warning = resume_checkpoint(self.save_dir)
        if warning:
            logger.warning("%s", warning)
        return path or ""


def atomic_checkpointer(checkpointer: DetectionCheckpointer) -> AtomicCheckpointer:
    """An :class:`AtomicCheckpointer` with ``checkpointer``'s model, folder, ``save_to_disk`` and
    checkpointables (``checkpointer`` itself if it is one already)."""
    if isinstance(checkpointer, AtomicCheckpointer):
        return checkpointer
    return AtomicCheckpointer(
        checkpointer.model,
        checkpointer.save_dir,
        save_to_disk=checkpointer.save_to_disk,
        **checkpointer.checkpointables,
    )
