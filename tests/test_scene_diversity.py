"""fashion-scenes appearance diversity: level 0 is the data set as it always was, every level shows
the same scenes, the photometric transform is the documented formula, and image-to-image variation
grows with the level."""
import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from bnstats_lab.data import SceneSpec, SceneSplitSpec, build_fashion_scenes
from bnstats_lab.data.fashion_scenes import PRESETS, is_built, pixel_statistics, vary_image

SMALL = SceneSpec(
    splits={"train": SceneSplitSpec(24, "train", 5), "val": SceneSplitSpec(3, "test", 6)}, image_size=64,
    min_item_size=16, max_item_size=32,
)

# SHA-256 of fashion_scenes_tiny's annotation files and decoded pixels, as built before the
# diversity option existed: the default presets must stay exactly these scenes.
TINY_DIGEST = "442cfdef5742d81efabb615558bb5d94665651c2f88d64c7c9248e7c2f77aedb"


def content_digest(folder):
    h = hashlib.sha256()
    for split in ("train", "val"):
        with open(os.path.join(folder, f"{split}.json"), "rb") as f:
            h.update(f.read())
        for name in sorted(os.listdir(os.path.join(folder, split))):
            h.update(np.asarray(Image.open(os.path.join(folder, split, name))).tobytes())
    return h.hexdigest()


def load_images(folder, split):
    names = sorted(os.listdir(os.path.join(folder, split)))
    return [np.asarray(Image.open(os.path.join(folder, split, n)), dtype=np.float64) for n in names]


def test_level_zero_is_the_data_set_built_before_the_option(tmp_path):
    folder = build_fashion_scenes(str(tmp_path), "fashion_scenes_tiny")
    assert content_digest(folder) == TINY_DIGEST
    with open(os.path.join(folder, "spec.json")) as f:
        assert "diversity" not in json.load(f)  # spec.json unchanged too; an old build stays "built"
    assert is_built(str(tmp_path), "fashion_scenes_tiny", PRESETS["fashion_scenes_tiny"])


def test_every_level_shows_the_same_scenes_with_more_varied_appearance(tmp_path):
    folders = {d: build_fashion_scenes(str(tmp_path), f"d{d}", dataclasses.replace(SMALL, diversity=d))
               for d in (0.0, 0.5, 2.0)}
    annotations = {}
    for d, folder in folders.items():
        with open(os.path.join(folder, "train.json")) as f:
            annotations[d] = json.load(f)["annotations"]
    assert annotations[0.0] == annotations[0.5] == annotations[2.0]  # boxes, masks, labels
    # the spread over images of each image's mean brightness: what a 2-image batch's statistics see
    spread = {d: np.std([im.mean() for im in load_images(folder, "train")]) for d, folder in folders.items()}
    assert spread[0.0] < spread[0.5] < spread[2.0]
    assert spread[2.0] > 3 * spread[0.0]


def test_vary_image_is_the_documented_transform():
    image = np.random.default_rng(0).uniform(0, 100, size=(8, 8, 3)).astype(np.float32)
    level = 0.7
    out = vary_image(np.random.default_rng(3), image, level)
    draws = np.random.default_rng(3)  # the same draws, in the documented order
    contrast = np.exp(level * draws.uniform(-np.log(2.5), np.log(2.5)))
    brightness = level * draws.uniform(-40.0, 120.0)
    gain = 1.0 + level * draws.uniform(-0.4, 0.4, size=3)
    mean = image.astype(np.float64).mean()
    expected = ((image - mean) * contrast + mean + brightness) * gain
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(vary_image(np.random.default_rng(3), image, 0.0), image, atol=1e-4)


def test_pixel_statistics_match_numpy(tmp_path):
    folder = build_fashion_scenes(str(tmp_path), "d1", dataclasses.replace(SMALL, diversity=1.0))
    pixels = np.concatenate([im.reshape(-1, 3) for im in load_images(folder, "train")])
    mean, std = pixel_statistics(folder, "train")
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-6)


@pytest.mark.parametrize("level", [-0.1, float("nan"), float("inf")])
def test_bad_level_is_refused(level):
    with pytest.raises(ValueError, match="diversity must be a finite number >= 0"):
        dataclasses.replace(SMALL, diversity=level)
