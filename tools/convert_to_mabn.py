#!/usr/bin/env python
"""Convert ordinary BN/FrozenBN weights into weights for an MABN config (see docs/mabn.md).

    python tools/convert_to_mabn.py --config-file configs/frcnn_r50_mabn_2img_finetune.yaml \\
        --weights detectron2://ImageNetPretrained/MSRA/R-50.pkl --output models/R-50-MSRA-MABN.pth

The MABN config defines the target model; the source is the same model with every MABN/SyncMABN
norm key replaced by --source-norm (default FrozenBN, which loads BN and FrozenBN checkpoints of any
detectron2 format). Conv weights feeding MABN are centralised and BN statistics mapped to MABN's
state, calibrated on --calibration-images training images (0: from the statistics alone). Only
what the source weights hold is written (an ImageNet backbone gives a backbone-only file).
--compare-images reports the relative distance of the backbone features (source vs converted, in
eval mode and with the converted model in training mode); --eval also COCO-evaluates both models
on cfg.DATASETS.TEST. Trailing KEY VALUE pairs override the config.
"""
import itertools
import json
import logging
import os
import sys

import torch

from d2_bnstats.d2.train import argument_parser, load_config

logger = logging.getLogger("d2_bnstats.convert_to_mabn")


def parse_args(argv=None):
    p = argument_parser(epilog=__doc__)
    p.add_argument("--weights", required=True, help="source BN/FrozenBN weights (a path or detectron2:// URL)")
    p.add_argument("--output", required=True, help="converted checkpoint (.pth) to write")
    p.add_argument("--source-norm", default="FrozenBN", help="norm of the source model in place of MABN (default FrozenBN)")
    p.add_argument("--calibration-images", type=int, default=64, help="training images to calibrate on (0: none)")
    p.add_argument("--compare-images", type=int, default=8, help="images to measure feature distances on (0: none)")
    p.add_argument("--dataset", help="data set for calibration/comparison (default: the first of DATASETS.TRAIN)")
    p.add_argument("--eval", action="store_true", help="also COCO-evaluate source and converted model")
    p.add_argument("--report", help="write the numbers as JSON here")
    return p.parse_args(argv)


def main(argv=None):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import build_detection_test_loader
    from detectron2.utils.logger import setup_logger

    import d2_bnstats  # noqa: F401
    from d2_bnstats.d2.build import build_model
    from d2_bnstats.d2.config import NORM_KEYS, get_config_value
    from d2_bnstats.d2.mabn_convert import backbone_distance, convert_to_mabn
    from d2_bnstats.d2.norms_mabn import MABN_NORMS

    args = parse_args(argv)
    setup_logger(name="d2_bnstats")
    setup_logger(name="detectron2", abbrev_name="d2")
    opts = list(args.opts or [])
    cfg = load_config(args.config_file, opts + ["MODEL.WEIGHTS", ""])  # the target need not exist yet
    weights = args.weights
    keys = [k for k in NORM_KEYS if get_config_value(cfg, k) in MABN_NORMS]
    if not keys:
        raise SystemExit(f"{args.config_file} uses no MABN norm (keys {', '.join(NORM_KEYS)}); nothing to convert to")
    source_cfg = cfg.clone()
    source_cfg.merge_from_list([x for k in keys for x in (k, args.source_norm)])

    source = build_model(source_cfg)
    checkpointer = DetectionCheckpointer(source)
    path = checkpointer.path_manager.get_local_path(weights)
    incompatible = checkpointer._load_model(checkpointer._load_file(path))
    missing = set(getattr(incompatible, "missing_keys", []) or [])
    loaded = set(source.state_dict()) - missing
    logger.info("source: %s (%d of %d tensors loaded)", weights, len(loaded), len(source.state_dict()))

    target = build_model(cfg)
    dataset = args.dataset or cfg.DATASETS.TRAIN[0]
    need = args.calibration_images + args.compare_images
    images = []
    if need:
        loader = build_detection_test_loader(cfg, dataset)
        images = list(itertools.islice(iter(loader), need))
        if len(images) < need:
            logger.warning("%s has only %d images", dataset, len(images))
    calibration = images[: args.calibration_images] or None
    compare = images[args.calibration_images :]

    report = convert_to_mabn(target, source, calibration=calibration, loaded_keys=loaded)
    state = target.state_dict()
    out = {k: state[k] for k in report["state_keys"]}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)) or ".", exist_ok=True)
    torch.save({"model": out, "__author__": "d2_bnstats tools/convert_to_mabn.py", "matching_heuristics": False}, args.output)
    numbers = {
        "source": weights,
        "output": args.output,
        "converted_layers": len(report["converted"]),
        "calibrated_layers": len(report["calibrated"]),
        "skipped_layers": len(report["skipped"]),
        "centralized_convs": len(report["centralized"]),
        "tensors_written": len(out),
    }
    if compare:
        numbers["feature_distance_eval"] = backbone_distance(source, target, compare)
        numbers["feature_distance_train_mode"] = backbone_distance(source, target, compare, model_training=True)
    if args.eval:
        from d2_bnstats.d2.trainer import Trainer

        numbers["source_eval"] = _as_floats(Trainer.test(source_cfg, source))
        numbers["converted_eval"] = _as_floats(Trainer.test(cfg, target))
    print(json.dumps(numbers, indent=1))
    if args.report:
        with open(args.report, "w") as f:
            json.dump(numbers, f, indent=1)
    return numbers


def _as_floats(results):
    return json.loads(json.dumps(results, default=float))


if __name__ == "__main__":
    main()
    sys.exit(0)
