#!/usr/bin/env python
"""Build the fashion-scenes detection data sets (COCO format) from Fashion-MNIST.

    python datasets/prepare_fashion_scenes.py                      # the default preset
    python datasets/prepare_fashion_scenes.py --name fashion_scenes_tiny
    python datasets/prepare_fashion_scenes.py --name my_scenes --num-train 500 --num-val 100 \
        --image-size 192 --seed 3                                  # a custom data set
    python datasets/prepare_fashion_scenes.py --name scenes_d1 --diversity 1   # the same scenes, varied appearance

Output: $DETECTRON2_DATASETS/fashion_scenes/<name>/{train,val}.json and images (default root:
./datasets). After `import bnstats_lab` they are registered as <name>_train and <name>_val.
The logic is in bnstats_lab.data.fashion_scenes.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a clone's script: the lab (bnstats_lab) and the plug-in of this clone
    sys.path.insert(0, ROOT)

import argparse
import dataclasses
import time

from bnstats_lab.data.fashion_mnist import FashionMNISTError
from bnstats_lab.data.fashion_scenes import (
    PRESETS,
    SceneSpec,
    SceneSplitSpec,
    build_fashion_scenes,
    is_built,
    pixel_statistics,
)
from bnstats_lab.data.register import fashion_scenes_root


def _int_at_least(minimum):
    """An argparse type: an integer >= ``minimum`` (a count of 0 would otherwise mean "the default")."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


_non_negative_float.__name__ = "number"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="fashion_scenes", help=f"data set name; presets: {', '.join(PRESETS)}")
    p.add_argument("--root", default=None, help="data sets root (default: $DETECTRON2_DATASETS or ./datasets)")
    p.add_argument("--fashion-mnist-dir", default=None, help="folder of the Fashion-MNIST IDX files")
    positive = _int_at_least(1)
    p.add_argument("--num-train", type=positive, help="training images (custom data sets, or to resize a preset)")
    p.add_argument("--num-val", type=positive, help="validation images")
    p.add_argument("--image-size", type=positive, help="square canvas side in pixels")
    p.add_argument("--max-objects", type=positive, help="items per scene at most")
    p.add_argument("--seed", type=_int_at_least(0), help="seed of the training split (validation uses seed + 1)")
    p.add_argument("--diversity", type=_non_negative_float, help="appearance variation level (0: none; 1: strong; "
                   "see bnstats_lab/data/fashion_scenes.py)")
    p.add_argument("--force", action="store_true", help="rebuild even if the data set is up to date")
    return p.parse_args(argv)


def spec_from_args(args) -> SceneSpec:
    base = PRESETS.get(args.name, PRESETS["fashion_scenes"])
    custom = [args.num_train, args.num_val, args.image_size, args.max_objects, args.seed, args.diversity]
    if args.name not in PRESETS and all(v is None for v in custom):
        raise SystemExit(
            f"{args.name!r} is not a preset ({', '.join(PRESETS)}); give at least one of --num-train, "
            "--num-val, --image-size, --max-objects, --seed, --diversity to define a custom data set"
        )
    train, val = base.splits["train"], base.splits["val"]
    seed = train.seed if args.seed is None else args.seed
    splits = {
        "train": SceneSplitSpec(train.num_images if args.num_train is None else args.num_train, "train", seed),
        "val": SceneSplitSpec(val.num_images if args.num_val is None else args.num_val, "test", seed + 1),
    }
    changes = {"splits": splits}
    if args.image_size is not None:
        scale = args.image_size / base.image_size
        changes.update(
            image_size=args.image_size,
            min_item_size=max(8, round(base.min_item_size * scale)),
            max_item_size=min(args.image_size, round(base.max_item_size * scale)),
        )
    if args.diversity is not None:
        changes["diversity"] = args.diversity
    if args.max_objects is not None:
        changes.update(max_objects=args.max_objects, min_objects=min(base.min_objects, args.max_objects))
    return dataclasses.replace(base, **changes)


def main(argv=None):
    args = parse_args(argv)
    try:
        spec = spec_from_args(args)
    except ValueError as e:
        raise SystemExit(f"invalid data set parameters: {e}")
    root = fashion_scenes_root(args.root)
    if not args.force and is_built(root, args.name, spec):
        print(f"{args.name}: up to date in {root}/{args.name}")
        return 0
    start = time.time()
    last = [0.0]

    def progress(split, done, total):
        now = time.time()
        if done == total or now - last[0] > 2:
            last[0] = now
            print(f"  {args.name}/{split}: {done}/{total} images", flush=True)

    try:
        folder = build_fashion_scenes(root, args.name, spec, args.fashion_mnist_dir, force=args.force, progress=progress)
    except FashionMNISTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.name}: built in {time.time() - start:.1f}s -> {folder}")
    mean, std = pixel_statistics(folder, "train")
    print(f"  pixel mean / std (RGB, training split) for MODEL.PIXEL_MEAN / PIXEL_STD: "
          f"[{', '.join(f'{v:.1f}' for v in mean)}] / [{', '.join(f'{v:.1f}' for v in std)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
