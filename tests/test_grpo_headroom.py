"""tools/grpo_headroom.py's `headroom`, loaded from the tool's file."""

import importlib.util
from pathlib import Path

import pytest
import torch

from structmar.coco import CocoLayouts
from structmar.reward import load_detector
from structmar.shapes import generate_shapes

_TOOL = Path(__file__).parents[1] / "tools" / "grpo_headroom.py"
_spec = importlib.util.spec_from_file_location("grpo_headroom", _TOOL)
grpo_headroom = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grpo_headroom)
headroom = grpo_headroom.headroom


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return str(generate_shapes(tmp_path_factory.mktemp("headroom") / "shapes", 0, 16, 32, seed=11))


def test_headroom_pass_at_one_and_at_k(shapes_root):
    """pass@1 averages an object's success over its K samples, pass@K asks for one of them: the real image as
    every sample gives the two equal and no spread; the real image as one sample of K (blank images for the
    others) keeps pass@K, divides pass@1 by K and makes the real image each layout's best."""
    coco = CocoLayouts(shapes_root, "val2014", image_size=32, max_objects=8)
    detector = load_detector("shapes", None, coco.categories)
    k = 3

    def real(layouts):
        return torch.stack([torch.from_numpy(coco.image(lay)).permute(2, 0, 1).float() / 255 for lay in layouts])

    def first_real(layouts):  # each layout's K samples arrive side by side
        images = real(layouts)
        images[torch.arange(len(layouts)) % k != 0] = 0
        return images

    every = headroom(real, coco.layouts, detector, coco.categories, 32, k, batch_size=5)
    once = headroom(first_real, coco.layouts, detector, coco.categories, 32, k, batch_size=5)
    objects = sum(len(lay.category_ids) for lay in coco.layouts)
    assert every["layouts"] == once["layouts"] == 16 and every["all"]["objects"] == once["all"]["objects"] == objects
    assert every["all"]["pass1"] == every["all"]["passk"] >= 0.9
    assert every["reward_std_within"] == 0 and every["reward_best_of_k"] == pytest.approx(every["reward_mean"])
    assert once["all"]["passk"] == every["all"]["passk"]
    assert once["all"]["pass1"] == pytest.approx(every["all"]["pass1"] / k)
    assert once["reward_best_of_k"] == pytest.approx(every["reward_mean"]) and once["reward_std_within"] > 0
    assert once["reward_mean"] < every["reward_mean"]
    assert sum(v["objects"] for v in once["by_category"].values()) == objects
    assert set(once["by_category"]) <= set(coco.categories.values())
