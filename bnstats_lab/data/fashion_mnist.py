"""Read the original Fashion-MNIST IDX files (Xiao, Rasul & Vollgraf 2017; MIT licence).

Found in ``$FASHION_MNIST_DIR`` if set, else where Debian's ``dataset-fashion-mnist`` installs them
(``/usr/share/datasets/fashion-mnist``). Plain or gzip-compressed files are accepted.
"""
import gzip
import os
import struct
from typing import Optional, Tuple

import numpy as np

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8}


class FashionMNISTError(RuntimeError):
    """Missing or malformed Fashion-MNIST files."""


def fashion_mnist_dir(directory: Optional[str] = None) -> str:
    return directory or os.environ.get("FASHION_MNIST_DIR") or DEBIAN_DIR


def _find(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FashionMNISTError(
        f"Fashion-MNIST file {os.path.join(directory, stem)}[.gz] not found. Install the Debian package "
        "(`apt-get install dataset-fashion-mnist`, done by `make env`) or set FASHION_MNIST_DIR to a folder "
        "holding the four original IDX files."
    )


def read_idx(path: str) -> np.ndarray:
    """Parse one IDX file (magic: two zero bytes, a dtype byte, a rank byte; big-endian sizes)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise FashionMNISTError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise FashionMNISTError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    rank = data[3]
    header = 4 + 4 * rank
    if len(data) < header:
        raise FashionMNISTError(f"{path} is truncated (header)")
    shape = struct.unpack(">" + "I" * rank, data[4:header])
    expected = int(np.prod(shape)) if shape else 0
    if len(data) - header != expected:
        raise FashionMNISTError(
            f"{path} is truncated or padded: header says {shape} = {expected} bytes, found {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(split: str, directory: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 [N, 28, 28], labels int64 [N])`` of the "train" or "test" split."""
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(_FILES)}, got {split!r}")
    directory = fashion_mnist_dir(directory)
    image_stem, label_stem = _FILES[split]
    images = read_idx(_find(directory, image_stem))
    labels = read_idx(_find(directory, label_stem))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise FashionMNISTError(
            f"Fashion-MNIST {split} files in {directory} disagree: images {images.shape}, labels {labels.shape}"
        )
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise FashionMNISTError(f"Fashion-MNIST {split} labels in {directory} exceed the 10 classes")
    return images, labels.astype(np.int64)
