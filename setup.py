#!/usr/bin/env python
"""d2_bnstats: batch-statistics methods for detectron2 at small batch sizes.

The distribution is the plug-in (the package ``d2_bnstats``); the experiment lab ``bnstats_lab``
stays in the repository. detectron2 is a prerequisite, installed
separately (as for every detectron2 plug-in): `make env` installs it, or see README.md.
"""
import ast
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def version() -> str:
    """``d2_bnstats.__version__``, read without importing the package (which needs detectron2)."""
    with open(os.path.join(HERE, "d2_bnstats", "__init__.py")) as f:
        for node in ast.parse(f.read()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
                return ast.literal_eval(node.value)
    raise RuntimeError("d2_bnstats/__init__.py defines no __version__")


def long_description() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


setup(
    name="d2_bnstats",
    version=version(),
    description="BatchNorm statistics that work at 1-2 images per GPU, as a detectron2 plug-in",
    long_description=long_description(),
    long_description_content_type="text/markdown",
    author="the d2_bnstats developers",
    license="Apache-2.0",
    license_files=["LICENSE", "NOTICE"],
    keywords="detectron2 batchnorm object-detection evalnorm mabn precisebn syncbn",
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Science/Research",
        "Intended Audience :: Developers",
        "License :: OSI Approved :: Apache Software License",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.8",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
    # the plug-in alone: the experiment lab (bnstats_lab: fashion-scenes, pre-training, config matrix,
    # benchmarks, experiments) is for the project's own experiments and stays in the repository, where
    # the scripts of tools/ and datasets/ put the clone on sys.path
    packages=find_packages(include=["d2_bnstats", "d2_bnstats.*"]),
    python_requires=">=3.8",
    # detectron2 (and the torchvision it was built with) is a prerequisite (see README.md): it is not on
    # PyPI under its own name, and listing it would make pip replace a user's CUDA or source build.
    # torch is a lower bound only: pip keeps an installed torch that satisfies it.
    install_requires=["torch>=2.0", "numpy", "pycocotools", "matplotlib", "tabulate", "fvcore"],
    # the tools of a clone's tools/ as commands (tools/*.py wrap the same modules)
    entry_points={"console_scripts": [
        "d2-bnstats-train = d2_bnstats.cli.train:command",
        "d2-bnstats-lazy-train = d2_bnstats.cli.lazy_train:command",
        "d2-bnstats-compare = d2_bnstats.cli.compare:command",
        "d2-bnstats-estimate-evalnorm = d2_bnstats.cli.estimate_evalnorm:command",
        "d2-bnstats-convert-mabn = d2_bnstats.cli.convert_mabn:command",
        "d2-bnstats-deploy = d2_bnstats.cli.deploy:command",
    ]},
    # the configs (one copy: a clone's configs/ is a link to d2_bnstats/model_zoo/configs)
    package_data={"d2_bnstats": ["compat/*.py"],
                  "d2_bnstats.model_zoo": ["configs/*.yaml", "configs/*.md", "configs/cpu/*.yaml",
                                           "configs/lazy/*.py", "configs/lazy/cpu/*.py"]},
)
