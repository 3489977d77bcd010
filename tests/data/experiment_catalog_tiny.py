"""A tiny declared experiment for the runner's tests: fashion_scenes_tiny, a few iterations."""
from bnstats_lab.experiments.spec import Cell, Experiment, evaluation_of

TINY = ("DATASETS.TRAIN", "('fashion_scenes_tiny_train',)", "DATASETS.TEST", "('fashion_scenes_tiny_val',)",
        "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(2,)", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32")

EVALNORM = Cell("evalnorm", "configs/cpu/frcnn_r18_evalnorm_2img.yaml", TINY,
                strategies=("ema", "evalnorm_learned", "batch_stats:2"),
                factors=(("images_per_batch", 2), ("norm", "EvalNorm")),
                compare_options=("--discrepancy-images", "4", "--no-plots"))

EXPERIMENTS = [
    Experiment(
        "tiny",
        "runner test",
        (
            EVALNORM,
            # the test set does not exist: this cell fails at set-up
            Cell("broken", "configs/cpu/frcnn_r18_bn_2img.yaml",
                 TINY[:2] + ("DATASETS.TEST", "('no_such_dataset',)") + TINY[4:],
                 factors=(("images_per_batch", 2), ("norm", "BN"))),
        ),
        seeds=(0, 1),
    ),
    # evaluations of the tiny experiment's checkpoints, without training
    Experiment(
        "tiny_eval",
        "runner test: other strategies on tiny's checkpoints",
        (evaluation_of("tiny", EVALNORM, ("ema", "evalnorm_precise_bn:4"),
                       ("--discrepancy-images", "0", "--no-plots")),),
        seeds=(0, 1),
        comparisons=(("evalnorm_precise_bn:4", "ema"),),
    ),
]
