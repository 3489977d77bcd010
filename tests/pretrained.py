"""Tiny pre-trained backbones for the tests: the real pre-training tool, a couple of iterations on a
few Fashion-MNIST images, built once per test run and shared by the test modules that import
the ``tiny_pretrained`` fixture."""
import os

import pytest

from bnstats_lab import config_matrix as cm
from bnstats_lab.pretrain import PretrainOptions, default_checkpoint_name, pretrain

from .conftest import CPU_BASE, REPO

R50_BASE = os.path.join(REPO, "configs", "Base-RCNN-FPN.yaml")


class TinyPretrained:
    """Builds ``(depth, norm, weight_centralization)`` checkpoints on demand, once each."""

    def __init__(self, root):
        self.root = root
        self.paths = {}

    def get(self, depth: int = 18, norm: str = "BN", weight_centralization: bool = False) -> str:
        key = (depth, norm, weight_centralization)
        if key not in self.paths:
            path = os.path.join(self.root, default_checkpoint_name(depth, norm, weight_centralization))
            options = PretrainOptions(
                config_file=CPU_BASE if depth in (18, 34) else R50_BASE,
                depth=depth,
                norm=norm,
                weight_centralization=weight_centralization,
                max_iter=2,
                batch_size=8,
                warmup_iters=1,
                train_subset=64,
                test_subset=16,
                log_period=1000,
            )
            pretrain(options, path)
            self.paths[key] = path
        return self.paths[key]

    def for_config_weights(self, weights: str) -> str:
        """The tiny stand-in for a config's MODEL.WEIGHTS (a pre-trained CPU backbone or an ImageNet
        R-50 URL); "" stays ""."""
        if not weights:
            return ""
        if weights == cm.R50_GN_WEIGHTS:
            return self.get(50, "GN")
        if "ImageNetPretrained" in weights:
            return self.get(50, "BN")
        if os.path.basename(weights) == "R-50-MSRA-MABN.pth":
            # tools/convert_to_mabn.py's output from the MSRA R-50 (conversion tested in test_mabn.py);
            # the BN stand-in goes through the same mapping when loaded into MABN layers
            return self.get(50, "BN")
        name = os.path.basename(weights)
        for depth in (18, 34, 50):
            for norm in ("BN", "GN"):
                for wc in (False, True):
                    if name == default_checkpoint_name(depth, norm, wc):
                        return self.get(depth, norm, wc)
        raise AssertionError(f"no tiny stand-in for MODEL.WEIGHTS = {weights!r}")


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
    return TinyPretrained(str(tmp_path_factory.mktemp("pretrained")))
