"""``d2-bnstats-lazy-train`` (in a clone also ``tools/lazyconfig_train_net.py``): train or evaluate a
detectron2 LazyConfig (Python config) with d2_bnstats' checks, transforms and hooks, as detectron2's
``tools/lazyconfig_train_net.py`` does.

    d2-bnstats-lazy-train --config-file bnstats://lazy/cpu/faster_rcnn_R_18_FPN_fashion_evalnorm.py
    d2-bnstats-lazy-train --config-file C train.max_iter=100 --num-gpus 2       # 2 processes (gloo on CPU)
    d2-bnstats-lazy-train --config-file C --eval-only train.init_checkpoint=output/model_final.pth

The logic is in :mod:`d2_bnstats.d2.lazy.train`.
"""
import sys

from ..d2.library_noise import silence_library_noise
from ..d2.lazy.train import LazyConfigError, argument_parser, run


def main(argv=None):
    silence_library_noise()
    args = argument_parser(epilog=__doc__).parse_args(argv)
    try:
        return run(args)
    except LazyConfigError as e:  # a run that cannot start: one line naming the file, override or field
        raise SystemExit(f"lazyconfig_train_net: {e}")


def command() -> int:
    main()
    return 0


if __name__ == "__main__":
    sys.exit(command())
