"""What happens to MODEL.WEIGHTS around loading: re-initialised statistics, missing-file messages.

The "re-initialised BN statistics" training setting (EvalNorm paper, section 5) starts from
pre-trained weights whose norm layers' running statistics are reset before training. A model
transform cannot do it (weights are loaded after the model is built), and a reset on every load
would also wipe the statistics of a resumed run, so it happens once, right after
``MODEL.WEIGHTS`` is loaded for a *new* run: d2_bnstats' ``Trainer.resume_or_load`` calls
:func:`after_loading_weights`; other training loops call it themselves.

A ``MODEL.WEIGHTS`` file that does not exist stops the config checks with
:func:`missing_weights_message`. Code that knows how some weights files are made (a project that
pre-trains its own backbones) registers a hint with :func:`add_missing_weights_hint`, and the
message then says how to build the missing file.

A file that exists but is not a checkpoint (empty, truncated, a text file, a Git LFS pointer) is
named by :func:`check_weights_file` at the same point, instead of failing at load with torch's bare
``EOFError`` or its ``weights_only`` advice. The check reads the file's first and last bytes (and a
zip archive's directory), never the whole file: detectron2 reads ``torch.save`` files (a zip
archive, or a pickle stream in torch's legacy format) and model-zoo ``.pkl`` pickles.
"""
import logging
import os
import zipfile
from typing import Callable, List, Optional

from torch import nn

logger = logging.getLogger(__name__)


def reset_norm_statistics(model: nn.Module) -> int:
    """Reset the running statistics of every norm layer that has them; returns how many.

    A layer qualifies when it defines ``reset_running_stats()`` and does not say it keeps no
    statistics (``track_running_stats`` False): torch's BatchNorm family (BN, SyncBN, EvalNorm, ...:
    mean 0, variance 1, ``num_batches_tracked`` 0) and any other layer that resets its statistics its
    own way. FrozenBN (no such method) and GN (no statistics) are left alone; parameters are never touched.
    """
    count = 0
    for module in model.modules():
        reset = getattr(module, "reset_running_stats", None)
        if callable(reset) and getattr(module, "track_running_stats", True):
            reset()
            count += 1
    return count


def after_loading_weights(cfg, model: nn.Module, resumed: bool) -> None:
    """Apply ``BNSTATS.INIT`` once ``MODEL.WEIGHTS`` is loaded; ``resumed``: the weights came from
    the run's own last checkpoint (then nothing is reset)."""
    if resumed or not cfg.BNSTATS.INIT.RESET_NORM_STATS:
        return
    count = reset_norm_statistics(model)
    logger.info(
        "BNSTATS.INIT.RESET_NORM_STATS: reset the running statistics of %d norm layers after loading %s",
        count,
        cfg.MODEL.WEIGHTS or "(no weights)",
    )


WeightsHint = Callable[[str], Optional[str]]
_HINTS: List[WeightsHint] = []


def add_missing_weights_hint(hint: WeightsHint) -> WeightsHint:
    """Register ``hint(weights_path) -> sentence or None``, consulted by :func:`missing_weights_message`
    (e.g. a project that builds its own pre-trained backbones names the command that builds one).
    Registering the same function twice has no effect."""
    if hint not in _HINTS:
        _HINTS.append(hint)
    return hint


def remove_missing_weights_hint(hint: WeightsHint) -> None:
    if hint in _HINTS:
        _HINTS.remove(hint)


def missing_weights_message(weights: str, hint: Optional[WeightsHint] = None, label: str = "MODEL.WEIGHTS") -> str:
    """The error for a MODEL.WEIGHTS file (or the file of option ``label``) that does not exist. The
    first sentence that ``hint`` or, after it, a registered hint (:func:`add_missing_weights_hint`)
    gives for the path is appended."""
    message = f"{label} = {weights!r}: no such file"
    if not os.path.isabs(weights):
        message += f" (relative paths are read from the current directory, {os.getcwd()})"
    for candidate in ([hint] if hint is not None else []) + list(_HINTS):
        sentence = candidate(weights)
        if sentence:
            return f"{message}. {sentence}"
    return message


_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a"  # pickled LONG1 magic number that opens torch's legacy format
_PICKLE_0_1_STARTS = (b"(", b"}", b"]", b"c")  # MARK, EMPTY_DICT, EMPTY_LIST, GLOBAL: protocol 0/1 openings
_LFS_POINTER = b"version https://git-lfs"


def _is_pickle_start(head: bytes) -> bool:
    if head[:1] == b"\x80":  # PROTO opcode, then the protocol number
        return len(head) > 1 and 2 <= head[1] <= 5
    return head[:1] in _PICKLE_0_1_STARTS


def _pickle_problem(f, size: int) -> Optional[str]:
    f.seek(size - 1)
    if f.read(1) != b".":  # a pickle stream ends with the STOP opcode
        return "it is a pickle that ends early (a truncated or partly written file)"
    return None


def _zip_problem(path: str) -> Optional[str]:
    try:
        with zipfile.ZipFile(path) as archive:  # reads the directory at the end, not the data
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        return f"it is a damaged or truncated zip archive ({e})"
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "it is a zip archive without data.pkl, so not written by torch.save"
    return None


def checkpoint_file_problem(path: str) -> Optional[str]:
    """Why the existing file ``path`` cannot be a checkpoint detectron2 loads, or None if its first
    and last bytes look like one (module docstring)."""
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(64)
        if head.startswith(_ZIP_MAGIC):
            return _zip_problem(path)
        if head.startswith(_LEGACY_TORCH_MAGIC):
            return None  # storages follow the pickles: no end marker to check
        if _is_pickle_start(head):
            return _pickle_problem(f, size)
    if head.startswith(_LFS_POINTER):
        return "it is a Git LFS pointer, not the file it stands for (run git lfs pull)"
    return (f"it starts with {head[:16]!r}: neither a torch.save file (zip archive or pickle) nor a "
            "pickle (.pkl) of detectron2's model zoo")


def check_weights_file(weights: str, label: str = "MODEL.WEIGHTS") -> None:
    """FileNotFoundError (:func:`missing_weights_message`) if the local weights file ``weights`` does
    not exist, ValueError naming it if it is not a checkpoint. URLs (``scheme://``) and "" pass."""
    if not weights or "://" in weights:
        return
    if not os.path.isfile(weights):
        raise FileNotFoundError(missing_weights_message(weights, label=label))
    problem = checkpoint_file_problem(weights)
    if problem:
        raise ValueError(f"{label} = {weights!r} is not a checkpoint: {problem}")
