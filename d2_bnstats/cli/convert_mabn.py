"""``d2-bnstats-convert-mabn`` (in a clone also ``tools/convert_to_mabn.py``): convert ordinary
BN/FrozenBN weights into weights for an MABN config (see docs/mabn.md).

    d2-bnstats-convert-mabn --config-file bnstats://frcnn_r50_mabn_2img_finetune.yaml \\
        --weights detectron2://ImageNetPretrained/MSRA/R-50.pkl --output models/R-50-MSRA-MABN.pth

The MABN config defines the target model; the source is the same model with every MABN/SyncMABN
norm key replaced by --source-norm (default FrozenBN, which loads BN and FrozenBN checkpoints of any
detectron2 format). Conv weights feeding MABN are centralized and BN statistics mapped to MABN's
state, calibrated on --calibration-images training images (0: from the statistics alone). Only
what the source weights hold is written (an ImageNet backbone gives a backbone-only file).
--compare-images reports the relative distance of the backbone features (source vs converted, in
eval mode and with the converted model in training mode); --eval also COCO-evaluates both models
on cfg.DATASETS.TEST. KEY VALUE pairs override the config. --output and --report are
written atomically and may not be --weights or the config file.
(The work is done by :func:`d2_bnstats.d2.mabn_convert.convert_checkpoint`.)
"""
import argparse
import json
import sys

from ..d2.library_noise import silence_library_noise
from ..d2.datasets import check_datasets, register_coco_from_args
from ..d2.train import input_errors, load_config
from ..d2.weights import check_weights_file
from ..outputs import OutputIsInputError, OutputWriteError, check_output_file, check_outputs, write_json
from .args import ToolArgumentParser


def image_count(text: str) -> int:
    """argparse type: a number of images, >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of images")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: give a number of images >= 0 (0: none)")
    return value


def argument_parser() -> ToolArgumentParser:
    p = ToolArgumentParser(description=__doc__, config_required=True)
    p.add_argument("--weights", required=True, help="source BN/FrozenBN weights (a path or detectron2:// URL)")
    p.add_argument("--output", required=True, help="converted checkpoint (.pth) to write")
    p.add_argument("--source-norm", default="FrozenBN", help="norm of the source model in place of MABN (default FrozenBN)")
    p.add_argument("--calibration-images", type=image_count, default=64, help="training images to calibrate on (0: none)")
    p.add_argument("--compare-images", type=image_count, default=8, help="images to measure feature distances on (0: none)")
    p.add_argument("--dataset", help="data set for calibration/comparison (default: the first of DATASETS.TRAIN)")
    p.add_argument("--eval", action="store_true", help="also COCO-evaluate source and converted model")
    p.add_argument("--report", help="write the numbers as JSON here")
    return p


def parse_args(argv=None):
    return argument_parser().parse_args(argv)


def main(argv=None):
    silence_library_noise()
    from detectron2.utils.logger import setup_logger

    from ..d2.mabn_convert import convert_checkpoint, source_config

    args = parse_args(argv)
    with input_errors("convert_to_mabn"):  # everything read and written, before any work
        check_outputs({"--output": args.output, "--report": args.report},
                      {"--weights": args.weights, "--config-file": args.config_file})
        check_output_file(args.output, "--output")
        if args.report:
            check_output_file(args.report, "--report")
        check_weights_file(args.weights, label="--weights")
        register_coco_from_args(args.register_coco)  # calibration images may come from such a data set
        cfg = load_config(args.config_file, list(args.opts or []) + ["MODEL.WEIGHTS", ""])  # the target need not exist yet
        try:
            source_config(cfg, args.source_norm)
        except ValueError as e:
            raise ValueError(f"{args.config_file}: {e}") from e
        if args.calibration_images or args.compare_images or args.eval:
            check_datasets(cfg)
        if args.dataset and (args.calibration_images or args.compare_images):
            check_datasets(cfg, names={"--dataset": [args.dataset]})
    setup_logger(name="d2_bnstats")
    setup_logger(name="detectron2", abbrev_name="d2")
    try:
        numbers = convert_checkpoint(
            cfg, args.weights, args.output, source_norm=args.source_norm,
            calibration_images=args.calibration_images, compare_images=args.compare_images,
            dataset=args.dataset, evaluate=args.eval, author="d2_bnstats tools/convert_to_mabn.py",
        )
        print(json.dumps(numbers, indent=1))
        if args.report:
            write_json(args.report, numbers)
    except (OutputIsInputError, OutputWriteError) as e:
        raise SystemExit(f"convert_to_mabn: {e}")
    return numbers


def command() -> int:
    main()
    return 0


if __name__ == "__main__":
    sys.exit(command())
