"""The declared experiments (their protocol and results: docs/results.md).

- ``levels``: the train–test discrepancy of BN statistics at 2 images per batch as a function of the
  scenes' appearance diversity; chooses the diversity level of the benchmark by a rule fixed before
  any AP run (docs/results.md, "Protocol").
- ``e1``: EvalNorm's Table 2 in miniature (Singh & Shrivastava, ICCV 2019): Faster R-CNN R-18-FPN with
  EvalNorm layers trained at 2 and 8 images per batch, from random init and fine-tuned from a
  Fashion-MNIST backbone, each checkpoint evaluated under every inference-statistics strategy.

Schedules are cut from the config matrix's (``configs/cpu``: 4500 iterations at 2 images) to fit the
CPU budget: 800 iterations at 2 images (the demo's schedule), 400 at 8 images (the linear scaling
rule's LR, twice the 2-image run's epochs, so that the large batch is not left unconverged).
Every cell is trained with ``SEED`` = the seed; the runner adds ``OUTPUT_DIR`` and the checkpoint period.
"""
import importlib
import importlib.util
import os
from typing import Dict, Optional, Tuple

from .spec import Cell, Experiment

# Per-channel pixel mean / std (RGB) of each scene set's training split (pixel_statistics, 500 images)
SCENES = {
    "default": ("fashion_scenes", None),  # the configs' own PIXEL_MEAN / PIXEL_STD
    "d050": ("fashion_scenes_d050", ("[65.2, 65.9, 64.6]", "[43.8, 44.6, 44.3]")),
    "d100": ("fashion_scenes_d100", ("[85.0, 86.1, 84.5]", "[63.1, 64.2, 63.9]")),
    "d200": ("fashion_scenes_d200", ("[112.4, 114.0, 111.7]", "[94.5, 94.9, 94.4]")),
}
DIVERSITY = {"default": 0.0, "d050": 0.5, "d100": 1.0, "d200": 2.0}

# The benchmark's diversity level, chosen from the ``levels`` experiment by the rule in
# docs/results.md ("Protocol"), before any AP run.
BENCHMARK_SCENES = "d100"


def scene_overrides(scenes: str) -> Tuple[str, ...]:
    dataset, pixels = SCENES[scenes]
    overrides = ("DATASETS.TRAIN", f"('{dataset}_train',)", "DATASETS.TEST", f"('{dataset}_val',)")
    if pixels:
        overrides += ("MODEL.PIXEL_MEAN", pixels[0], "MODEL.PIXEL_STD", pixels[1])
    return overrides


SCHEDULE_2IMG = ("SOLVER.MAX_ITER", "800", "SOLVER.STEPS", "(560, 720)", "SOLVER.WARMUP_ITERS", "100")
SCHEDULE_8IMG = ("SOLVER.MAX_ITER", "400", "SOLVER.STEPS", "(280, 360)", "SOLVER.WARMUP_ITERS", "100")
SCHEDULE_LEVELS = ("SOLVER.MAX_ITER", "400", "SOLVER.STEPS", "(280, 360)", "SOLVER.WARMUP_ITERS", "100")

SHORT_PRETRAINED = "output/pretrain/r18_fashion_mnist_400it.pkl"
PRETRAIN_SHORT = ("python", "-W", "ignore", "tools/pretrain_backbone.py", "--max-iter", "400",
                  "--output", SHORT_PRETRAINED, "--json", SHORT_PRETRAINED[:-4] + ".json")

E1_STRATEGIES = ("ema", "precise_bn:500", "evalnorm_learned", "evalnorm_rule", "evalnorm_exact",
                 "evalnorm_offline:500", "batch_stats:2")


def _levels() -> Experiment:
    cells = []
    for scenes in ("default", "d050", "d100", "d200"):
        cells.append(Cell(
            name=f"diversity_{scenes}",
            config="configs/cpu/frcnn_r18_evalnorm_2img_scratch.yaml",
            overrides=scene_overrides(scenes) + SCHEDULE_LEVELS,
            strategies=("ema",),
            factors=(("scenes", scenes), ("diversity", DIVERSITY[scenes]), ("images_per_batch", 2),
                     ("setting", "scratch"), ("norm", "EvalNorm")),
            compare_options=("--discrepancy-images", "32", "--max-images", "1"),
        ))
    return Experiment("levels", "train–test discrepancy vs appearance diversity (level choice)", tuple(cells), seeds=(0,))


def _e1() -> Experiment:
    cells = []
    for scenes in (BENCHMARK_SCENES, "default"):
        for setting in ("scratch", "finetune"):
            for images in (2, 8):
                overrides = scene_overrides(scenes) + (SCHEDULE_2IMG if images == 2 else SCHEDULE_8IMG)
                if setting == "finetune":
                    overrides += ("MODEL.WEIGHTS", SHORT_PRETRAINED)
                cells.append(Cell(
                    name=f"{setting}_{images}img_{scenes}",
                    config=f"configs/cpu/frcnn_r18_evalnorm_{images}img_{setting}.yaml",
                    overrides=overrides,
                    strategies=E1_STRATEGIES,
                    factors=(("setting", setting), ("images_per_batch", images), ("scenes", scenes),
                             ("diversity", DIVERSITY[scenes]), ("norm", "EvalNorm")),
                    compare_options=("--discrepancy-images", "16", "--batch-sizes", "2"),
                ))
    return Experiment("e1", "EvalNorm Table 2 in miniature", tuple(cells),
                      requires=((SHORT_PRETRAINED, PRETRAIN_SHORT),))


def default_experiments() -> Dict[str, Experiment]:
    experiments = [_levels(), _e1()]
    return {e.name: e for e in experiments}


def load_experiments(catalog: Optional[str] = None) -> Dict[str, Experiment]:
    """The experiments of ``catalog`` (a module name or a ``.py`` file defining ``EXPERIMENTS``, a
    dict or list of :class:`Experiment`), or the lab's own."""
    if catalog is None:
        return default_experiments()
    if catalog.endswith(".py"):
        if not os.path.isfile(catalog):
            raise FileNotFoundError(f"experiment catalog {catalog} does not exist")
        spec = importlib.util.spec_from_file_location("bnstats_experiment_catalog", catalog)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(catalog)
    declared = getattr(module, "EXPERIMENTS", None)
    if declared is None:
        raise ValueError(f"experiment catalog {catalog} defines no EXPERIMENTS")
    if not isinstance(declared, dict):
        declared = {e.name: e for e in declared}
    return dict(declared)
