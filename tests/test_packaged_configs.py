"""The configs ship inside the plug-in (d2_bnstats.model_zoo): one copy, found by name or by the
``bnstats://`` prefix wherever a config path is taken, with ``_BASE_`` resolved inside the package."""
import os

import pytest

from d2_bnstats import model_zoo
from d2_bnstats.d2.lazy.train import LazyConfigError
from d2_bnstats.d2.lazy.train import load_config as load_lazy_config
from d2_bnstats.d2.train import load_config

from .conftest import REPO

# the generated matrix and the hand-written configs the README names
NAMED = ("frcnn_r50_evalnorm_2img.yaml", "cpu/frcnn_r18_evalnorm_2img.yaml", "cpu/demo_evalnorm_diverse.yaml",
         "lazy/mask_rcnn_R_50_FPN_evalnorm.py", "lazy/cpu/faster_rcnn_R_18_FPN_fashion_evalnorm.py")


def _clone_files():
    root = os.path.join(REPO, "configs")
    out = []
    for dirpath, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files if f.endswith((".yaml", ".py"))]
    return sorted(out)


def test_the_clones_configs_folder_and_the_packaged_configs_are_one_copy():
    names = model_zoo.available_configs()
    assert names == _clone_files() and len(names) > 300
    for name in NAMED:
        assert name in names
        assert os.path.samefile(model_zoo.get_config_file(name), os.path.join(REPO, "configs", name))
    assert model_zoo.get_config_file("bnstats://" + NAMED[0]) == model_zoo.get_config_file(NAMED[0])
    assert model_zoo.get_config_file(NAMED[0]).startswith(os.path.join(REPO, "d2_bnstats", "model_zoo", "configs"))


def test_a_packaged_name_loads_as_its_clone_path_with_its_bases():
    """_BASE_ chains (leaf -> Base-R18-FPN-fashion-scratch -> Base-R18-FPN-fashion) resolve in the package."""
    opts = ["MODEL.DEVICE", "cpu"]
    by_name = load_config("bnstats://cpu/frcnn_r18_evalnorm_2img_scratch.yaml", opts)
    by_path = load_config(os.path.join(REPO, "configs", "cpu", "frcnn_r18_evalnorm_2img_scratch.yaml"), opts)
    assert by_name.dump() == by_path.dump()
    assert by_name.MODEL.RESNETS.NORM == "EvalNorm" and by_name.MODEL.RESNETS.DEPTH == 18  # from the leaf, the base
    cfg = model_zoo.get_config("frcnn_r50_evalnorm_2img.yaml")
    assert cfg.MODEL.RESNETS.NORM == "EvalNorm" and cfg.MODEL.RESNETS.DEPTH == 50 and "BNSTATS" in cfg


def test_the_lazy_loader_takes_the_prefix():
    cfg = load_lazy_config("bnstats://lazy/cpu/faster_rcnn_R_18_FPN_fashion_evalnorm.py", ["train.max_iter=3"],
                           world_size=1)
    assert cfg.train.max_iter == 3 and cfg.model.backbone.norm == "EvalNorm"
    with pytest.raises(LazyConfigError, match="bnstats://lazy/nope.py is not a packaged d2_bnstats config"):
        load_lazy_config("bnstats://lazy/nope.py", [], world_size=1)


@pytest.mark.parametrize("name, close", [("frcnn_r50_evalnorm_2imgs.yaml", "frcnn_r50_evalnorm_2img.yaml"),
                                         ("../__init__.py", None), ("", None), ("cpu", None)])
def test_a_name_that_is_not_packaged_is_one_line_naming_the_closest(name, close):
    with pytest.raises(FileNotFoundError) as error:
        model_zoo.get_config_file(name)
    message = str(error.value)
    assert "\n" not in message and "is not a packaged d2_bnstats config" in message, message
    if close:
        assert f"did you mean '{close}'" in message, message
    with pytest.raises(FileNotFoundError, match="is not a packaged d2_bnstats config"):
        load_config("bnstats://" + name)
