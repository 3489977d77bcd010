"""fashion-scenes: a small, real detection data set composed from Fashion-MNIST images.

Each scene is a canvas with a smooth, noisy background on which 1..K Fashion-MNIST items are
pasted at random sizes, positions and colours, without overlap. The item's pixels give its
instance mask exactly (alpha > ``MASK_THRESHOLD`` after resizing), and its box is the tight box
of that mask, so boxes and masks are exact by construction. Ten classes, the Fashion-MNIST ones.

Scenes are deterministic: image ``i`` of a split is drawn from ``numpy.random.default_rng((seed,
i))`` and written with fixed encoder settings, so the same spec gives the same bytes, and a larger
split starts with the images of a smaller one. Training scenes take items from the Fashion-MNIST
training split and validation scenes from its test split, so no item is in both.

Diversity (``SceneSpec.diversity``, default 0): COCO images differ far more from one another in
brightness, contrast and colour than these scenes do, and that image-to-image variation is what makes
the statistics of a 2-image batch differ from the population's. At level ``d > 0`` every scene is
drawn with the same content (items, sizes, positions, colours: the same random draws) and then varied
in appearance by draws from a separate random stream, each range scaled by ``d``:

- background: its gradient and noise scaled by ``exp(d * U(-log 2, log 2))``;
- items: each item's colour scaled by ``exp(d * U(-log 1.6, log 1.6))``;
- image: contrast ``c = exp(d * U(-log 2.5, log 2.5))`` about the image mean, brightness
  ``+ d * U(-40, 120)``, per-channel gain ``1 + d * U(-0.4, 0.4)``, then clipped to 0..255.

At ``d = 1`` the image part is the photometric transform of a pilot in which EMA statistics fell
behind EvalNorm by several AP at 2 images per batch. Level 0 draws nothing from the appearance
stream, so its bytes are those of a data set built without the option.

The output is COCO format: ``<root>/<name>/<split>.json`` with RLE instance masks and
``<root>/<name>/<split>/<id>.png``; ``spec.json`` beside them records how they were made.
"""
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from .fashion_mnist import CLASS_NAMES, load_fashion_mnist

MASK_THRESHOLD = 0.25  # alpha above which a resized item pixel belongs to the item
MIN_MASK_AREA = 16  # smaller items are dropped: too small to be a fair target
_PLACEMENT_TRIES = 30


@dataclasses.dataclass(frozen=True)
class SceneSplitSpec:
    """How to make one split."""

    num_images: int
    source: str  # Fashion-MNIST split the items come from: "train" or "test"
    seed: int


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """How to make a fashion-scenes data set (all of its splits)."""

    splits: Dict[str, SceneSplitSpec]
    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 4
    min_item_size: int = 28  # side of the resized 28x28 item, pixels
    max_item_size: int = 64
    diversity: float = 0.0  # appearance variation level (module docstring); 0 = none

    def __post_init__(self):
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 8 <= self.min_item_size <= self.max_item_size <= self.image_size:
            raise ValueError(
                "need 8 <= min_item_size <= max_item_size <= image_size, got "
                f"{self.min_item_size}, {self.max_item_size}, {self.image_size}"
            )
        if not (self.diversity >= 0 and np.isfinite(self.diversity)):
            raise ValueError(f"diversity must be a finite number >= 0, got {self.diversity}")
        for name, split in self.splits.items():
            if split.num_images < 1:
                raise ValueError(f"split {name!r} must have at least one image, got {split.num_images}")
            if split.source not in ("train", "test"):
                raise ValueError(f"split {name!r}: source must be 'train' or 'test', got {split.source!r}")

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        if not self.diversity:  # a level-0 spec reads and writes as it did before the option existed
            del data["diversity"]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "SceneSpec":
        data = dict(data)
        data["splits"] = {k: SceneSplitSpec(**v) for k, v in data["splits"].items()}
        return cls(**data)


def _preset(num_train: int, num_val: int, seed: int = 0, **kwargs) -> SceneSpec:
    return SceneSpec(
        splits={
            "train": SceneSplitSpec(num_train, "train", seed),
            "val": SceneSplitSpec(num_val, "test", seed + 1),
        },
        **kwargs,
    )


# Named data sets; each registers "<name>_train" and "<name>_val" with detectron2.
PRESETS: Dict[str, SceneSpec] = {
    # the demo / CPU experiments default: 128 px, as in the CPU-sized configs
    "fashion_scenes": _preset(4000, 300),
    # larger canvases for the 256 px CPU configs
    "fashion_scenes_256": _preset(4000, 300, image_size=256, max_objects=6, min_item_size=32, max_item_size=112),
    # a few images for tests and smoke runs
    "fashion_scenes_tiny": _preset(16, 8),
    # the default scenes with appearance variation (module docstring) at levels 0.5, 1 and 2
    "fashion_scenes_d050": _preset(4000, 300, diversity=0.5),
    "fashion_scenes_d100": _preset(4000, 300, diversity=1.0),
    "fashion_scenes_d200": _preset(4000, 300, diversity=2.0),
}

# Second random stream of a scene (``default_rng((seed, i, APPEARANCE_STREAM))``): its appearance
# draws, kept apart so that every diversity level shows the same content.
APPEARANCE_STREAM = 1


def class_names() -> List[str]:
    return list(CLASS_NAMES)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dim colour gradient plus pixel noise, float32 [H, W, 3] in 0..255."""
    corners = rng.uniform(0, 70, size=(2, 2, 3)).astype(np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    top = corners[0, 0] * (1 - t[:, None]) + corners[0, 1] * t[:, None]
    bottom = corners[1, 0] * (1 - t[:, None]) + corners[1, 1] * t[:, None]
    grad = top[None, :, :] * (1 - t[:, None, None]) + bottom[None, :, :] * t[:, None, None]
    noise = rng.normal(0.0, 8.0, size=(size, size, 3)).astype(np.float32)
    return grad + noise


def _place(rng, size: int, side: int, taken: List[Tuple[int, int, int, int]]) -> Optional[Tuple[int, int]]:
    for _ in range(_PLACEMENT_TRIES):
        x = int(rng.integers(0, size - side + 1))
        y = int(rng.integers(0, size - side + 1))
        if all(x + side <= a or a + w <= x or y + side <= b or b + h <= y for a, b, w, h in taken):
            return x, y
    return None


def _scaled_uniform(rng: np.random.Generator, level: float, low: float, high: float, size=None):
    """``level * U(low, high)``: a variation range scaled by the diversity level."""
    return level * rng.uniform(low, high, size=size)


def vary_image(rng: np.random.Generator, image: np.ndarray, level: float) -> np.ndarray:
    """The image part of the appearance variation (module docstring), float32 [H, W, 3], unclipped."""
    contrast = np.exp(_scaled_uniform(rng, level, -np.log(2.5), np.log(2.5)))
    brightness = _scaled_uniform(rng, level, -40.0, 120.0)
    gain = 1.0 + _scaled_uniform(rng, level, -0.4, 0.4, size=3)
    mean = image.mean()
    return ((image - mean) * contrast + mean + brightness) * gain.astype(np.float32)


def compose_scene(
    rng: np.random.Generator,
    items: np.ndarray,
    labels: np.ndarray,
    spec: SceneSpec,
    appearance_rng: Optional[np.random.Generator] = None,
):
    """Draw one scene.

    Returns ``(image uint8 [H, W, 3] RGB, objects)``; each object is a dict with ``label``,
    ``mask`` (bool [H, W]), and how it was drawn: ``item`` (index into ``items``), ``x``, ``y``,
    ``side`` (the pasted square) and ``colour`` (before any appearance variation). With
    ``spec.diversity > 0`` the appearance draws come from ``appearance_rng``; ``rng`` makes the same
    draws at every level.
    """
    size = spec.image_size
    level = spec.diversity
    if level > 0 and appearance_rng is None:
        raise ValueError("a scene with diversity > 0 needs appearance_rng")
    canvas = _background(rng, size)
    if level > 0:
        canvas *= np.float32(np.exp(_scaled_uniform(appearance_rng, level, -np.log(2.0), np.log(2.0))))
    objects = []
    taken: List[Tuple[int, int, int, int]] = []
    count = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    for _ in range(count):
        index = int(rng.integers(0, len(items)))
        side = int(rng.integers(spec.min_item_size, spec.max_item_size + 1))
        colour = rng.uniform(90, 255, size=3).astype(np.float32)
        position = _place(rng, size, side, taken)
        if position is None:
            continue
        glyph = Image.fromarray(items[index]).resize((side, side), Image.BILINEAR)
        alpha = np.asarray(glyph, dtype=np.float32) / 255.0
        item_mask = alpha > MASK_THRESHOLD
        if item_mask.sum() < MIN_MASK_AREA:
            continue
        x, y = position
        taken.append((x, y, side, side))
        region = canvas[y : y + side, x : x + side]
        a = alpha[:, :, None]
        painted = colour
        if level > 0:
            painted = colour * np.float32(np.exp(_scaled_uniform(appearance_rng, level, -np.log(1.6), np.log(1.6))))
        region[:] = region * (1 - a) + painted * a
        mask = np.zeros((size, size), dtype=bool)
        mask[y : y + side, x : x + side] = item_mask
        objects.append(
            {"label": int(labels[index]), "mask": mask, "item": index, "x": x, "y": y, "side": side, "colour": colour}
        )
    if level > 0:
        canvas = vary_image(appearance_rng, canvas, level)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image, objects


def _annotation(ann_id: int, image_id: int, label: int, mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": label + 1,
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "area": int(mask.sum()),
        "iscrowd": 0,
        "segmentation": rle,
    }


def build_split(
    out_dir: str, split: str, spec: SceneSpec, fashion_mnist_dir: Optional[str] = None, progress=None
) -> dict:
    """Write ``<out_dir>/<split>.json`` and ``<out_dir>/<split>/*.png``; return the COCO dict."""
    split_spec = spec.splits[split]
    items, labels = load_fashion_mnist(split_spec.source, fashion_mnist_dir)
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(split_spec.num_images):
        rng = np.random.default_rng((split_spec.seed, i))
        appearance_rng = np.random.default_rng((split_spec.seed, i, APPEARANCE_STREAM)) if spec.diversity else None
        pixels, objects = compose_scene(rng, items, labels, spec, appearance_rng)
        file_name = f"{i:06d}.png"
        Image.fromarray(pixels).save(os.path.join(image_dir, file_name), format="PNG", compress_level=6)
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "height": spec.image_size, "width": spec.image_size})
        for obj in objects:
            annotations.append(_annotation(len(annotations) + 1, image_id, obj["label"], obj["mask"]))
        if progress is not None:
            progress(i + 1, split_spec.num_images)
    coco = {
        "info": {"description": f"fashion-scenes {split} (composed from Fashion-MNIST)", "version": "1"},
        "licenses": [{"id": 1, "name": "MIT (Fashion-MNIST, Zalando Research)"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": n, "supercategory": "fashion"} for k, n in enumerate(CLASS_NAMES)],
    }
    with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
        json.dump(coco, f, sort_keys=True, separators=(",", ":"))
    return coco


def is_built(root: str, name: str, spec: SceneSpec) -> bool:
    """True when ``<root>/<name>`` holds every split of exactly this spec."""
    folder = os.path.join(root, name)
    try:
        with open(os.path.join(folder, "spec.json")) as f:
            if SceneSpec.from_json(json.load(f)) != spec:
                return False
    except (OSError, ValueError, TypeError, KeyError):
        return False
    return all(os.path.isfile(os.path.join(folder, f"{s}.json")) for s in spec.splits)


def build_fashion_scenes(
    root: str,
    name: str,
    spec: Optional[SceneSpec] = None,
    fashion_mnist_dir: Optional[str] = None,
    force: bool = False,
    progress=None,
) -> str:
    """Build data set ``name`` (a preset, or any name with an explicit ``spec``) under ``root``.

    Nothing is rebuilt when the folder already holds this spec (unless ``force``). The data set is
    written to a temporary folder and moved into place at the end, so an interrupted or failed
    build leaves no half-written data set behind. Returns the data set folder.
    """
    if spec is None:
        if name not in PRESETS:
            raise ValueError(f"unknown fashion-scenes preset {name!r}; presets: {sorted(PRESETS)} (or pass a spec)")
        spec = PRESETS[name]
    folder = os.path.join(root, name)
    if not force and is_built(root, name, spec):
        return folder
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.building-", dir=root)
    try:
        for split in spec.splits:
            build_split(staging, split, spec, fashion_mnist_dir, progress=_split_progress(progress, split))
        with open(os.path.join(staging, "spec.json"), "w") as f:
            json.dump(spec.to_json(), f, sort_keys=True, indent=1)
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _split_progress(progress, split: str):
    if progress is None:
        return None
    return lambda done, total: progress(split, done, total)


def pixel_statistics(folder: str, split: str, max_images: int = 500) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel pixel mean and standard deviation (RGB) over the first ``max_images`` images of a
    built split: the values for ``MODEL.PIXEL_MEAN`` / ``MODEL.PIXEL_STD``."""
    image_dir = os.path.join(folder, split)
    names = sorted(n for n in os.listdir(image_dir) if n.endswith(".png"))[:max_images]
    if not names:
        raise ValueError(f"no images in {image_dir}")
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for name in names:
        pixels = np.asarray(Image.open(os.path.join(image_dir, name)).convert("RGB"), dtype=np.float64).reshape(-1, 3)
        total += pixels.sum(0)
        total_sq += (pixels**2).sum(0)
        count += len(pixels)
    mean = total / count
    return mean, np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))


def iter_built(root: str) -> Iterable[Tuple[str, SceneSpec]]:
    """``(name, spec)`` of every data set built under ``root`` (presets or custom)."""
    if not os.path.isdir(root):
        return
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "spec.json")
        if name.startswith(".") or not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                yield name, SceneSpec.from_json(json.load(f))
        except (ValueError, TypeError, KeyError):
            continue
