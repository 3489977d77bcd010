"""The declared experiments (their protocol and results: docs/results.md).

- ``levels``: the train–test discrepancy of BN statistics at 2 images per batch as a function of the
  scenes' appearance diversity; chooses the diversity level of the benchmark by a rule fixed before
  any AP run (docs/results.md, "Protocol").
- ``e1``: EvalNorm's Table 2 in miniature (Singh & Shrivastava, ICCV 2019): Faster R-CNN R-18-FPN with
  EvalNorm layers trained at 2 and 8 images per batch, from random init and fine-tuned from a
  Fashion-MNIST backbone, each checkpoint evaluated under every inference-statistics strategy.
- ``e2``: which norm at 2 images per batch on the benchmark scenes: MABN, GN, FrozenBN (detectron2's
  frozen recipe), SyncBN over 2 processes × 1 image, GhostBN in the box head, FrozenBN for the last
  quarter of training; Mask R-CNN for EvalNorm/BN, MABN and GN. E1's cells are its BN/EvalNorm rows
  (its 8-image cell the large-batch reference MABN claims to reach).
- ``e3``: PreciseBN over 20, 100, 500 and 2000 training images against EMA, evaluations of E1's
  2-image checkpoints on the benchmark scenes (no training).
- ``e4``: EvalNorm with learned α̂, β̂ and PreciseBN's population statistics against each alone,
  evaluations of every E1 checkpoint on the benchmark scenes (no training).
- ``e5``: converged detectors: E1's 2-image cells on the benchmark scenes trained 3200 iterations
  (4x), evaluated after 800, 1600 and 3200; the 8-image cells at the same epochs (800 iterations).

Schedules are cut from the config matrix's (``configs/cpu``: 4500 iterations at 2 images) to fit the
CPU budget: 800 iterations at 2 images (the demo's schedule), 400 at 8 images (the linear scaling
rule's LR, twice the 2-image run's epochs, so that the large batch is not left unconverged).
Every cell is trained with ``SEED`` = the seed; the runner adds ``OUTPUT_DIR`` and the checkpoint period.
"""
import importlib
import importlib.util
import os
import sys
from typing import Dict, Optional, Tuple

from ..config_matrix import NORM_BY_KEY
from .spec import Cell, Experiment, evaluation_of

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
BENCHMARK_SCENES = "d200"


def scene_overrides(scenes: str) -> Tuple[str, ...]:
    dataset, pixels = SCENES[scenes]
    overrides = ("DATASETS.TRAIN", f"('{dataset}_train',)", "DATASETS.TEST", f"('{dataset}_val',)")
    if pixels:
        overrides += ("MODEL.PIXEL_MEAN", pixels[0], "MODEL.PIXEL_STD", pixels[1])
    return overrides


SCHEDULE_2IMG = ("SOLVER.MAX_ITER", "800", "SOLVER.STEPS", "(560, 720)", "SOLVER.WARMUP_ITERS", "100")
SCHEDULE_8IMG = ("SOLVER.MAX_ITER", "400", "SOLVER.STEPS", "(280, 360)", "SOLVER.WARMUP_ITERS", "100")
SCHEDULE_LEVELS = ("SOLVER.MAX_ITER", "400", "SOLVER.STEPS", "(280, 360)", "SOLVER.WARMUP_ITERS", "100")

def _short_pretraining(path: str, *flags: str) -> Tuple[str, Tuple[str, ...]]:
    """A backbone pre-trained for 400 iterations of 64 images (a cut of the default recipe)."""
    return path, (sys.executable, "-W", "ignore", "tools/pretrain_backbone.py", "--max-iter", "400", *flags,
                  "--output", path, "--json", path[:-4] + ".json")


SHORT_PRETRAINED = "output/pretrain/r18_fashion_mnist_400it.pkl"
SHORT_PRETRAINED_GN = "output/pretrain/r18_gn_fashion_mnist_400it.pkl"
SHORT_PRETRAINED_WC = "output/pretrain/r18_fashion_mnist_wc_400it.pkl"
PRETRAIN_SHORT = _short_pretraining(SHORT_PRETRAINED)[1]
PRETRAINED_FOR = {  # the pre-trained backbone each norm's fine-tuned/frozen setting starts from
    "EvalNorm": SHORT_PRETRAINED, "BN": SHORT_PRETRAINED, "SyncBN": SHORT_PRETRAINED,
    "FrozenBN": SHORT_PRETRAINED, "GN": SHORT_PRETRAINED_GN, "MABN": SHORT_PRETRAINED_WC,
    "BatchRenorm": SHORT_PRETRAINED, "CrossIterBN": SHORT_PRETRAINED,  # their state is BN's
}
PRETRAININGS = (
    _short_pretraining(SHORT_PRETRAINED),
    _short_pretraining(SHORT_PRETRAINED_GN, "--norm", "GN"),
    _short_pretraining(SHORT_PRETRAINED_WC, "--weight-centralization"),
)

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


# The dose-response cells (random init, 2 images, at the two intermediate diversity levels): the
# strategies of the figure of EvalNorm's, batch statistics' and PreciseBN's gains against d.
DOSE_RESPONSE_STRATEGIES = ("ema", "precise_bn:500", "evalnorm_learned", "batch_stats:2")


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
    for scenes in ("d050", "d100"):
        cells.append(Cell(
            name=f"scratch_2img_{scenes}",
            config="configs/cpu/frcnn_r18_evalnorm_2img_scratch.yaml",
            overrides=scene_overrides(scenes) + SCHEDULE_2IMG,
            strategies=DOSE_RESPONSE_STRATEGIES,
            factors=(("setting", "scratch"), ("images_per_batch", 2), ("scenes", scenes),
                     ("diversity", DIVERSITY[scenes]), ("norm", "EvalNorm")),
            compare_options=("--discrepancy-images", "16", "--batch-sizes", "2"),
        ))
    return Experiment("e1", "EvalNorm Table 2 in miniature, and its 2-image random-init cell at every diversity level",
                      tuple(cells), requires=((SHORT_PRETRAINED, PRETRAIN_SHORT),))


E2_STRATEGIES = ("ema", "precise_bn:500", "batch_stats:2")
FROZEN_LATE_START = "600"  # FrozenBN for the last quarter of the 800-iteration schedule


def _e2_cell(name: str, config: str, norm: str, setting: str, arch: str = "frcnn", extra=(), processes: int = 1,
             strategies=E2_STRATEGIES, backbone_norm: str = "") -> Cell:
    overrides = scene_overrides(BENCHMARK_SCENES) + SCHEDULE_2IMG + tuple(extra)
    if setting in ("finetune", "frozen"):
        overrides += ("MODEL.WEIGHTS", PRETRAINED_FOR[backbone_norm or norm])
    return Cell(
        name=name, config=config, overrides=overrides, strategies=strategies, num_processes=processes,
        factors=(("setting", setting), ("images_per_batch", 2), ("scenes", BENCHMARK_SCENES),
                 ("diversity", DIVERSITY[BENCHMARK_SCENES]), ("norm", norm), ("arch", arch)),
        compare_options=("--discrepancy-images", "16", "--batch-sizes", "2"),
    )


def _schedule_steps(norm_key: str, schedule) -> Tuple[str, ...]:
    """The norm's keys counted in training steps (its config-matrix fractions) for a run of ``schedule``'s
    MAX_ITER instead of the config's."""
    max_iter = int(dict(zip(schedule[::2], schedule[1::2]))["SOLVER.MAX_ITER"])
    out: Tuple[str, ...] = ()
    for key, fraction in NORM_BY_KEY[norm_key].iteration_fractions:
        out += (key, str(int(round(fraction * max_iter))))
    return out


def _e2() -> Experiment:
    cells = []
    for setting in ("scratch", "finetune"):
        cells += [
            _e2_cell(f"mabn_{setting}", f"configs/cpu/frcnn_r18_mabn_2img_{setting}.yaml", "MABN", setting),
            _e2_cell(f"gn_{setting}", f"configs/cpu/frcnn_r18_gn_2img_{setting}.yaml", "GN", setting),
            _e2_cell(f"cbn_{setting}", f"configs/cpu/frcnn_r18_cbn_2img_{setting}.yaml", "CrossIterBN", setting),
            _e2_cell(f"brn_{setting}", f"configs/cpu/frcnn_r18_brn_2img_{setting}.yaml", "BatchRenorm", setting,
                     extra=_schedule_steps("brn", SCHEDULE_2IMG)),
            _e2_cell(f"syncbn_2x1_{setting}", f"configs/cpu/frcnn_r18_syncbn_2img_{setting}.yaml", "SyncBN", setting,
                     processes=2),
            _e2_cell(f"ghostbn_head_{setting}", f"configs/cpu/frcnn_r18_bn_2img_{setting}.yaml", "GhostBN (box head)",
                     setting, extra=("MODEL.ROI_BOX_HEAD.NORM", "GhostBN"), backbone_norm="BN"),
            _e2_cell(f"frozen_late_{setting}", f"configs/cpu/frcnn_r18_bn_2img_{setting}.yaml", "BN, FrozenBN late",
                     setting, extra=("BNSTATS.FROZEN_BN.START_ITER", FROZEN_LATE_START), backbone_norm="BN"),
        ]
    # Weight Standardization: random init only (no backbone is pre-trained with standardized convs)
    cells.append(_e2_cell("gnws_scratch", "configs/cpu/frcnn_r18_gnws_2img_scratch.yaml", "GN+WS", "scratch"))
    cells.append(_e2_cell("bnws_scratch", "configs/cpu/frcnn_r18_bnws_2img_scratch.yaml", "BN+WS", "scratch"))
    # Batch-Channel Normalization: random init (no backbone is pre-trained with it)
    cells.append(_e2_cell("bcn_scratch", "configs/cpu/frcnn_r18_bcn_2img_scratch.yaml", "BCN", "scratch"))
    cells.append(_e2_cell("frozenbn_frozen", "configs/cpu/frcnn_r18_frozenbn_2img_frozen.yaml", "FrozenBN", "frozen"))
    for norm, key in (("EvalNorm", "evalnorm"), ("MABN", "mabn"), ("GN", "gn")):
        cells.append(_e2_cell(
            f"mask_{key}_scratch", f"configs/cpu/mrcnn_r18_{key}_2img_scratch.yaml", norm, "scratch", arch="mrcnn",
            strategies=E1_STRATEGIES if norm == "EvalNorm" else E2_STRATEGIES))
    return Experiment("e2", "which norm at 2 images per batch", tuple(cells), requires=PRETRAININGS)


E3_STRATEGIES = ("ema", "precise_bn:20", "precise_bn:100", "precise_bn:500", "precise_bn:2000")
E4_STRATEGIES = ("ema", "precise_bn:500", "evalnorm_learned", "evalnorm_precise_bn:500")


def _benchmark_cells(images: Tuple[int, ...]):
    return [c for c in _e1().cells
            if c.factor_dict["scenes"] == BENCHMARK_SCENES and c.factor_dict["images_per_batch"] in images]


def _e3() -> Experiment:
    """PreciseBN over 20 to 2000 images against EMA, on E1's 2-image checkpoints of the benchmark level."""
    cells = tuple(evaluation_of("e1", c, E3_STRATEGIES, ("--discrepancy-images", "0", "--batch-sizes", "2"))
                  for c in _benchmark_cells((2,)))
    return Experiment("e3", "PreciseBN against EMA as the number of images grows (evaluations of E1)", cells)


def _e4() -> Experiment:
    """EvalNorm with PreciseBN's population statistics, on every E1 checkpoint of the benchmark level."""
    cells = tuple(evaluation_of("e1", c, E4_STRATEGIES, ("--discrepancy-images", "16", "--batch-sizes", "2"))
                  for c in _benchmark_cells((2, 8)))
    return Experiment("e4", "EvalNorm with PreciseBN's population statistics (evaluations of E1)", cells,
                      comparisons=(("evalnorm_precise_bn:500", "evalnorm_learned"),
                                   ("evalnorm_precise_bn:500", "precise_bn:500")))


# Converged detectors: E1's 2-image cells at the benchmark level trained 4x longer (the same LR-step
# fractions), evaluated after 800, 1600 and 3200 iterations; the 8-image cell at the same epochs.
LONG_ITERATIONS = 3200
SCHEDULE_2IMG_LONG = ("SOLVER.MAX_ITER", "3200", "SOLVER.STEPS", "(2240, 2880)", "SOLVER.WARMUP_ITERS", "100")
SCHEDULE_8IMG_LONG = ("SOLVER.MAX_ITER", "800", "SOLVER.STEPS", "(560, 720)", "SOLVER.WARMUP_ITERS", "100")
CONVERGED_STRATEGIES = DOSE_RESPONSE_STRATEGIES


def _e5() -> Experiment:
    """Converged detectors (docs/results.md, "Revision"): does EvalNorm's gain persist as the detector
    converges?"""
    training, evaluations = [], []
    for setting in ("scratch", "finetune"):
        for images, schedule, iterations, keep in ((2, SCHEDULE_2IMG_LONG, LONG_ITERATIONS, (800, 1600)),
                                                   (8, SCHEDULE_8IMG_LONG, 800, ())):
            overrides = scene_overrides(BENCHMARK_SCENES) + schedule
            if setting == "finetune":
                overrides += ("MODEL.WEIGHTS", SHORT_PRETRAINED)
            cell = Cell(
                name=f"{setting}_{images}img_{iterations}it",
                config=f"configs/cpu/frcnn_r18_evalnorm_{images}img_{setting}.yaml",
                overrides=overrides, strategies=CONVERGED_STRATEGIES,
                # the same epochs at 2 and 8 images: "final" pairs them for the convergence check
                factors=(("setting", setting), ("images_per_batch", images), ("checkpoint", "final"),
                         ("scenes", BENCHMARK_SCENES), ("diversity", DIVERSITY[BENCHMARK_SCENES]),
                         ("norm", "EvalNorm")),
                compare_options=("--discrepancy-images", "16", "--batch-sizes", "2"),
                keep_iterations=keep,
            )
            training.append(cell)
            evaluations += [evaluation_of("e5", cell, CONVERGED_STRATEGIES, iteration=i,
                                          name=f"{setting}_{images}img_{LONG_ITERATIONS}it_at{i}",
                                          factors=(("checkpoint", f"after {i} iterations"),)) for i in keep]
    return Experiment("e5", "converged detectors: 4x longer training at 2 images, evaluated along the way",
                      tuple(training + evaluations), requires=((SHORT_PRETRAINED, PRETRAIN_SHORT),))


def default_experiments() -> Dict[str, Experiment]:
    experiments = [_levels(), _e1(), _e2(), _e3(), _e4(), _e5()]
    return {e.name: e for e in experiments}


def load_catalog(catalog: str):
    """The module of ``catalog``: a module name or a ``.py`` file (which defines ``EXPERIMENTS``, a dict
    or list of :class:`Experiment`, and may define ``CLAIMS``, the claims its report judges)."""
    if catalog.endswith(".py"):
        if not os.path.isfile(catalog):
            raise FileNotFoundError(f"experiment catalog {catalog} does not exist")
        spec = importlib.util.spec_from_file_location("bnstats_experiment_catalog", catalog)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(catalog)


def load_experiments(catalog: Optional[str] = None) -> Dict[str, Experiment]:
    """The experiments of ``catalog`` (:func:`load_catalog`), or the lab's own."""
    if catalog is None:
        return default_experiments()
    module = load_catalog(catalog)
    declared = getattr(module, "EXPERIMENTS", None)
    if declared is None:
        raise ValueError(f"experiment catalog {catalog} defines no EXPERIMENTS")
    if not isinstance(declared, dict):
        declared = {e.name: e for e in declared}
    return dict(declared)
