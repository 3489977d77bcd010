"""fashion-scenes: a detection data set composed from Fashion-MNIST, and its registration with detectron2."""
from .fashion_scenes import PRESETS, SceneSpec, SceneSplitSpec, build_fashion_scenes, class_names
from .register import fashion_scenes_root, register_fashion_scenes

__all__ = [
    "PRESETS",
    "SceneSpec",
    "SceneSplitSpec",
    "build_fashion_scenes",
    "class_names",
    "fashion_scenes_root",
    "register_fashion_scenes",
]
