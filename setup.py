#!/usr/bin/env python
"""d2_bnstats: batch-statistics methods for detectron2 at small batch sizes.

detectron2 is a prerequisite, installed separately (as for every detectron2 plug-in):
`make env` installs it, or see README.md.
"""
from setuptools import find_packages, setup

setup(
    name="d2_bnstats",
    version="0.1.0",
    description="BatchNorm statistics that work at 1-2 images per GPU, as a detectron2 plug-in",
    # the plug-in, and the experiment lab (fashion-scenes, pre-training, config matrix, benchmarks)
    packages=find_packages(include=["d2_bnstats", "d2_bnstats.*", "bnstats_lab", "bnstats_lab.*"]),
    python_requires=">=3.8",
    # torch, torchvision and detectron2 are prerequisites (see README.md); listing them here would
    # make pip replace a user's own CUDA/source builds.
    install_requires=["numpy", "pycocotools", "matplotlib", "tabulate", "fvcore"],
    package_data={"d2_bnstats": ["compat/*.py"]},
)
