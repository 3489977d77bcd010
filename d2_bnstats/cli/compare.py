"""``d2-bnstats-compare`` (in a clone also ``tools/compare_bn_stats.py``): COCO-evaluate one checkpoint
under every inference-statistics strategy, side by side.

    d2-bnstats-compare --config-file C MODEL.WEIGHTS output/run/model_final.pth --output output/run/compare
    d2-bnstats-compare --config-file C MODEL.WEIGHTS W --strategies ema precise_bn:2000 batch_stats:1 --max-images 100
    d2-bnstats-compare --list-strategies

Strategies: EMA, PreciseBN over N training images, batch statistics at test with k images per test
batch, and EvalNorm learned / 1/B² / 1/B / offline when the model has EvalNorm layers. Writes a table
(stdout and compare.md), compare.json, ap.png, and a per-layer train–test discrepancy report with
histograms (discrepancy_*.png). The logic is in the package :mod:`d2_bnstats.compare`.
"""
import sys

from ..d2.library_noise import silence_library_noise
from ..compare import parse_args, run


def main(argv=None) -> int:
    silence_library_noise()
    return run(parse_args(argv))


def command() -> int:
    return main()


if __name__ == "__main__":
    sys.exit(command())
