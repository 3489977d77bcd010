"""Shared fixtures: a tiny fashion-scenes data set built once per session, small configs."""
import os

import pytest
import torch

import bnstats_lab  # noqa: F401  (imports d2_bnstats: patches get_norm; registers the data sets)
from bnstats_lab.data import build_fashion_scenes, fashion_scenes_root, register_fashion_scenes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_BASE = os.path.join(REPO, "configs", "cpu", "Base-R18-FPN-fashion.yaml")


def _test_threads():
    """Torch threads per test process: the cores shared among pytest-xdist's workers (one process:
    up to 2), so parallel workers do not oversubscribe the machine. Subprocesses started by the tests
    inherit it through OMP_NUM_THREADS."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, (os.cpu_count() or 1) // workers))


TEST_THREADS = _test_threads()
torch.set_num_threads(TEST_THREADS)
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))


@pytest.fixture(scope="session")
def datasets_root(tmp_path_factory):
    """DETECTRON2_DATASETS for the tests, holding fashion_scenes_tiny; registered under that root."""
    root = str(tmp_path_factory.mktemp("datasets"))
    build_fashion_scenes(fashion_scenes_root(root), "fashion_scenes_tiny")
    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = root
    register_fashion_scenes(root, overwrite=True)
    yield root
    if old is None:
        os.environ.pop("DETECTRON2_DATASETS", None)
    else:
        os.environ["DETECTRON2_DATASETS"] = old
    register_fashion_scenes(overwrite=True)


def tiny_opts(output_dir, max_iter=2, **extra):
    """Overrides that make the CPU base config train a couple of iterations on the tiny split."""
    opts = {
        "DATASETS.TRAIN": "('fashion_scenes_tiny_train',)",
        "DATASETS.TEST": "('fashion_scenes_tiny_val',)",
        "SOLVER.MAX_ITER": str(max_iter),
        "SOLVER.STEPS": "()",
        "SOLVER.WARMUP_ITERS": "0",
        "SOLVER.BASE_LR": "0.001",
        "DATALOADER.NUM_WORKERS": "0",
        "OUTPUT_DIR": str(output_dir),
    }
    opts.update({k: str(v) for k, v in extra.items()})
    return [x for kv in opts.items() for x in kv]


def assert_detection_loss_logged(rows):
    """Every training row of a ``metrics.json`` has ``detection_loss``, below the total by about the
    auxiliary loss (the writers log medians over a window, so the relation is not exact row by row)."""
    steps = [m for m in rows if "total_loss" in m]
    assert steps and all("detection_loss" in m for m in steps)
    for m in steps:
        assert 0 < m["detection_loss"] < m["total_loss"]


def synthetic_detection_batch(size=96, seed=0, images=2):
    """A detectron2 training batch of ``images`` random images of ``size`` px with 3 random boxes each
    (10 classes), from a seeded generator: for tests that train a step without a data set."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(images):
        inst = Instances((size, size))
        xy = torch.rand(3, 2, generator=g) * (size - 40)
        inst.gt_boxes = Boxes(torch.cat([xy, xy + torch.rand(3, 2, generator=g) * 30 + 8], dim=1))
        inst.gt_classes = torch.randint(0, 10, (3,), generator=g)
        batch.append({"image": torch.rand(3, size, size, generator=g) * 255, "instances": inst})
    return batch
