"""``d2-bnstats-train`` (in a clone also ``tools/train_net.py``): train or evaluate a detectron2 model
with d2_bnstats norms, as detectron2's ``tools/train_net.py`` does.

    d2-bnstats-train --config-file bnstats://cpu/frcnn_r18_evalnorm_2img.yaml          # train + COCO eval
    d2-bnstats-train --config-file C --num-gpus 2 SOLVER.MAX_ITER 100                   # 2 processes (gloo on CPU)
    d2-bnstats-train --config-file C MODEL.WEIGHTS out/model_final.pth --eval-only
    d2-bnstats-train --config-file C --register-coco my_train my.json images/ DATASETS.TRAIN "('my_train',)"

The logic is in :mod:`d2_bnstats.d2.train`.
"""
import sys

from ..d2.library_noise import silence_library_noise
from ..d2.train import argument_parser, run


def main(argv=None):
    silence_library_noise()
    args = argument_parser(epilog=__doc__).parse_args(argv)
    return run(args)


def command() -> int:
    main()
    return 0


if __name__ == "__main__":
    sys.exit(command())
