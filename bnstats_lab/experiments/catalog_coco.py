"""E1 on COCO with Faster R-CNN R-50-FPN, for GPU machines: the same cells, strategies and tables as
the CPU experiment ``e1`` (:mod:`.catalog`), on the config matrix's R-50 configs at their published
schedules (``configs/frcnn_r50_evalnorm_{2,8}img_*.yaml``: 8 GPUs, the total batch in
``SOLVER.IMS_PER_BATCH``, the linear scaling rule). Run it with::

    python tools/run_experiments.py --catalog bnstats_lab.experiments.catalog_coco --experiment coco_e1 \\
        --results results_coco --work output/coco
    python tools/run_experiments.py --catalog bnstats_lab.experiments.catalog_coco --report \\
        --results results_coco --report-output docs/results_coco.md --figures docs/results_coco

(``--threads`` unset; COCO under ``$DETECTRON2_DATASETS``; the fine-tuned setting loads detectron2's
ImageNet R-50). Each training runs on ``GPUS`` processes; the comparison of a checkpoint runs in one.
The report judges E1's claims on these cells (``CLAIMS``) and leaves the README's table alone.
"""
from .catalog import E1_STRATEGIES
from .claims import e1_claims, e1_paper_tables
from .spec import Cell, Experiment

GPUS = 8
CONFIGS = {  # (setting, images per GPU) -> config
    ("scratch", 2): "configs/frcnn_r50_evalnorm_2img_scratch.yaml",
    ("finetune", 2): "configs/frcnn_r50_evalnorm_2img.yaml",
    ("scratch", 8): "configs/frcnn_r50_evalnorm_8img_scratch.yaml",
    ("finetune", 8): "configs/frcnn_r50_evalnorm_8img_finetune.yaml",
}


def _coco_e1() -> Experiment:
    cells = tuple(
        Cell(
            name=f"{setting}_{images}img",
            config=config,
            strategies=E1_STRATEGIES,
            factors=(("setting", setting), ("images_per_batch", images), ("scenes", "coco"), ("norm", "EvalNorm"),
                     ("arch", "frcnn_r50")),
            compare_options=("--discrepancy-images", "16", "--batch-sizes", "2"),
            num_processes=GPUS,
        )
        for (setting, images), config in CONFIGS.items()
    )
    return Experiment("coco_e1", "EvalNorm Table 2 on COCO, Faster R-CNN R-50-FPN, 8 GPUs", cells)


EXPERIMENTS = [_coco_e1()]
CLAIMS = e1_claims("coco_e1", "coco")  # the report judges the same claims on COCO
PAPER_TABLES = e1_paper_tables("coco_e1", "coco")
