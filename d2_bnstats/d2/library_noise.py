"""Messages of the libraries under the plug-in that say nothing to a user of its commands, silenced
where they arise, each by its exact text (a user's own warnings and log records stay as they are):

- ``torch.meshgrid: in an upcoming release, it will be required to pass the indexing argument``:
  detectron2's anchor generator calls ``torch.meshgrid`` without ``indexing`` (the result is the same);
- ``No CUDA runtime is found, using CUDA_HOME=...``: torch's ``cpp_extension`` logs it when detectron2's
  ``collect_env`` (``default_setup``) runs on a machine with a CUDA toolkit but no GPU.

(``torch.jit.script is deprecated``, which fvcore's loss functions raise while detectron2 is imported,
is silenced around that import in ``d2_bnstats/__init__.py``.) :func:`silence_library_noise` is called
by every command and in every worker process that :mod:`d2_bnstats.d2.launch` starts.
"""
import logging
import warnings

MESHGRID = r"torch\.meshgrid: in an upcoming release, it will be required to pass the indexing argument"
NO_CUDA_RUNTIME = "No CUDA runtime is found"


class _WithoutNoCudaRuntime(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NO_CUDA_RUNTIME)


_FILTER = _WithoutNoCudaRuntime()


def silence_library_noise() -> None:
    """Install the two filters of the module docstring (idempotent)."""
    warnings.filterwarnings("ignore", message=MESHGRID, category=UserWarning)
    logger = logging.getLogger("torch.utils.cpp_extension")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
