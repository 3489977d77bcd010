"""Data: fashion-scenes (composed from Fashion-MNIST) and checked COCO registration."""
from .fashion_scenes import PRESETS, SceneSpec, SceneSplitSpec, build_fashion_scenes, class_names
from .register import DatasetError, register_checked_coco_instances, register_fashion_scenes

__all__ = [
    "PRESETS",
    "SceneSpec",
    "SceneSplitSpec",
    "build_fashion_scenes",
    "class_names",
    "DatasetError",
    "register_checked_coco_instances",
    "register_fashion_scenes",
]
