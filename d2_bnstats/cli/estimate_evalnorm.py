"""``d2-bnstats-estimate-evalnorm`` (in a clone also ``tools/estimate_evalnorm.py``): offline EvalNorm,
alpha_hat and beta_hat estimated for a model trained with BatchNorm.

    d2-bnstats-estimate-evalnorm --config-file configs/cpu/frcnn_r18_bn_2img.yaml \\
        MODEL.WEIGHTS output/cpu/frcnn_r18_bn_2img/model_final.pth
    d2-bnstats-estimate-evalnorm --config-file C MODEL.WEIGHTS W --images 1000 --ims-per-batch 2 --output out/en.pth

Converts the model's BN layers to EvalNorm, estimates alpha_hat, beta_hat on training images with
everything else frozen, writes the checkpoint (default OUTPUT_DIR/model_evalnorm.pth) and a config
next to it that evaluates it, and prints the per-layer table. Models whose norms keep other
statistics (MABN, GhostBN, RoIShuffleBN, ...) are refused; so is an --output that would overwrite
MODEL.WEIGHTS or the config file. Both files are written atomically. Then:

    d2-bnstats-train --eval-only --config-file OUTPUT_DIR/model_evalnorm.yaml

The logic is in :mod:`d2_bnstats.d2.evalnorm_offline`.
"""
import sys

from detectron2.utils.logger import setup_logger

from ..d2.library_noise import silence_library_noise
from ..d2.evalnorm_offline import check_estimation_inputs, format_evalnorm_table, run_offline_estimation
from ..d2.datasets import check_datasets, register_coco_from_args
from ..d2.train import input_errors, load_config
from ..outputs import OutputIsInputError, OutputWriteError
from .args import ToolArgumentParser


def argument_parser() -> ToolArgumentParser:
    p = ToolArgumentParser(description=__doc__, config_required=True)
    p.add_argument("--images", type=int, default=500, help="training images to estimate on (default 500)")
    p.add_argument("--ims-per-batch", type=int, default=None,
                   help="images per batch = the images per process in training (default SOLVER.IMS_PER_BATCH)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate, decayed linearly to 0 (default 0.01)")
    p.add_argument("--include-frozen", action="store_true",
                   help="also convert FrozenBatchNorm2d layers (only for BN folded into FrozenBN after training)")
    p.add_argument("--output", default=None, help="checkpoint to write (default OUTPUT_DIR/model_evalnorm.pth)")
    return p


def parse_args(argv=None):
    return argument_parser().parse_args(argv)


def main(argv=None):
    silence_library_noise()
    args = parse_args(argv)
    with input_errors("estimate_evalnorm"):  # everything read and written, before any work
        register_coco_from_args(args.register_coco)
        cfg = load_config(args.config_file, args.opts)
        check_datasets(cfg)
        check_estimation_inputs(cfg, args.images, args.ims_per_batch, args.output, args.config_file)
    setup_logger(name="d2_bnstats")
    setup_logger(name="detectron2", abbrev_name="d2")
    try:
        result = run_offline_estimation(
            cfg,
            num_images=args.images,
            lr=args.lr,
            ims_per_batch=args.ims_per_batch,
            include_frozen=args.include_frozen,
            output=args.output,
            config_file=args.config_file,
        )
    except (OutputIsInputError, OutputWriteError) as e:
        raise SystemExit(f"estimate_evalnorm: {e}")
    print(f"# EvalNorm offline estimation: {len(result['layers'])} layers, {result['iterations']} iterations")
    print(format_evalnorm_table(result["rows"]))
    first, last = result["history"][0], result["history"][-1]
    print(f"# mean L_aux per layer: first iteration {first:.4f}, last iteration {last:.4f}")
    print(f"# checkpoint: {result['checkpoint']}")
    print(f"# evaluate:   d2-bnstats-train --eval-only --config-file {result['config']}")
    return 0


def command() -> int:
    return main()


if __name__ == "__main__":
    sys.exit(command())
