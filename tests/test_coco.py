import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from structmar.coco import CocoLayouts, center_crop, crop_geometry, flip_boxes, transform_boxes
from structmar.shapes import generate_shapes


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return str(generate_shapes(tmp_path_factory.mktemp("coco") / "shapes", 12, 4, 48, seed=0, workers=1))


def _write_coco(root, split, images, anns, captions, categories):
    os.makedirs(os.path.join(root, split), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    infos = []
    for image_id, array in images.items():
        name = f"{image_id:06d}.png"
        Image.fromarray(array).save(os.path.join(root, split, name))
        infos.append(dict(id=image_id, file_name=name, width=array.shape[1], height=array.shape[0]))
    anns = [dict(a, id=i + 1, area=a["bbox"][2] * a["bbox"][3]) for i, a in enumerate(anns)]
    caps = [dict(image_id=i, caption=c, id=n + 1) for n, (i, c) in enumerate(captions)]
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(dict(images=infos, annotations=anns, categories=categories), f)
    with open(os.path.join(root, "annotations", f"captions_{split}.json"), "w") as f:
        json.dump(dict(images=infos, annotations=caps), f)


def test_crop_geometry_follows_adm_center_crop():
    assert crop_geometry(640, 480, 256) == (341, 256, 42, 0)
    assert crop_geometry(480, 640, 256) == (256, 341, 0, 42)
    # 1100 px: halved once (>= 2 x 256) before the bicubic resize.
    assert crop_geometry(1100, 600, 256) == (469, 256, 106, 0)
    im = Image.fromarray(np.zeros((480, 640, 3), np.uint8))
    assert center_crop(im, 256).shape == (256, 256, 3)


def test_transform_boxes_clip_and_drop():
    # 200x100 image -> 64: resized to 128x64 (scale 0.64), crop from x 32 (original x 50 .. 150).
    boxes = np.array([[60, 10, 80, 40],  # fully inside the crop
                      [0, 0, 30, 20],  # entirely in the cropped-away left margin
                      [45, 0, 50, 50],  # 1/10 cut away on the left: kept, clipped
                      [140, 0, 50, 50]])  # 4/5 cut away on the right: dropped
    xyxy, keep = transform_boxes(boxes, 200, 100, 64)
    assert keep.tolist() == [True, False, True, False]
    np.testing.assert_allclose(xyxy[0] * 64, [6.4, 6.4, 57.6, 32], atol=1e-4)
    np.testing.assert_allclose(xyxy[2] * 64, [0, 0, 95 * 0.64 - 32, 32], atol=1e-4)
    assert (xyxy >= 0).all() and (xyxy <= 1).all()


def test_box_follows_pixels_through_the_crop(tmp_path):
    # A non-square image with a red rectangle: after resize + centre crop, the red pixels sit in the transformed box.
    image = np.full((120, 200, 3), 255, np.uint8)
    image[30:90, 70:150] = (255, 0, 0)
    cats = [dict(id=5, name="red block"), dict(id=7, name="ghost")]
    anns = [dict(image_id=1, category_id=5, bbox=[70, 30, 80, 60], iscrowd=0),
            dict(image_id=1, category_id=7, bbox=[60, 20, 100, 80], iscrowd=1),  # crowd: dropped
            dict(image_id=1, category_id=7, bbox=[100, 100, 3, 3], iscrowd=0)]  # tiny: dropped
    _write_coco(str(tmp_path), "val", {1: image}, anns, [(1, " a red block. "), (1, "red")], cats)
    coco = CocoLayouts(str(tmp_path), "val", image_size=48, max_objects=4, min_box_area=0.01)
    (layout,) = coco.layouts
    assert layout.tags == ["red block"] and layout.category_ids.tolist() == [5]
    assert layout.captions == ["a red block.", "red"] and layout.orig_size == (200, 120)
    crop = coco.image(layout)
    assert crop.shape == (48, 48, 3)
    ys, xs = np.nonzero((crop[..., 0] > 200) & (crop[..., 1] < 60))
    x0, y0, x1, y1 = layout.boxes[0] * 48
    assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
    assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1


def test_images_without_boxes_or_captions_are_dropped_and_unknown_categories_raise(tmp_path):
    image = np.zeros((32, 32, 3), np.uint8)
    cats = [dict(id=1, name="thing")]
    anns = [dict(image_id=1, category_id=1, bbox=[0, 0, 16, 16], iscrowd=0),
            dict(image_id=3, category_id=1, bbox=[0, 0, 16, 16], iscrowd=0)]
    _write_coco(str(tmp_path), "s", {1: image, 2: image, 3: image}, anns, [(1, "x"), (2, "y")], cats)
    coco = CocoLayouts(str(tmp_path), "s", image_size=32)
    assert [lay.image_id for lay in coco.layouts] == [1]
    assert coco.dropped == {"no_boxes": 1, "no_captions": 1}
    anns.append(dict(image_id=1, category_id=99, bbox=[0, 0, 16, 16], iscrowd=0))
    _write_coco(str(tmp_path), "s", {1: image}, anns, [(1, "x")], cats)
    with pytest.raises(ValueError, match=r"2 annotation faults, no image read: annotation 2: image id 3 is not "
                                         r"among the images; annotation 3 \(image 1\): unknown category id 99$"):
        CocoLayouts(str(tmp_path), "s", image_size=32)


def test_shapes_layouts_largest_first_and_truncated(shapes_root):
    full = CocoLayouts(shapes_root, "train2014", image_size=48, max_objects=16, min_box_area=0.0)
    assert [lay.image_id for lay in full] == sorted(lay.image_id for lay in full) and len(full) == 12
    with open(os.path.join(shapes_root, "annotations", "instances_train2014.json")) as f:
        inst = json.load(f)
    for lay in full:
        areas = (lay.boxes[:, 2] - lay.boxes[:, 0]) * (lay.boxes[:, 3] - lay.boxes[:, 1])
        assert (np.diff(areas) <= 1e-7).all()
        truth = sorted([a["bbox"] for a in inst["annotations"] if a["image_id"] == lay.image_id],
                       key=lambda b: -b[2] * b[3])
        expect = np.array([[x / 48, y / 48, (x + w) / 48, (y + h) / 48] for x, y, w, h in truth])
        np.testing.assert_allclose(np.sort(lay.boxes, 0), np.sort(expect, 0), atol=1e-6)
        assert len(lay.captions) == 3 and lay.tags[0].split()[0] in ("red", "yellow", "green", "blue")
    two = CocoLayouts(shapes_root, "train2014", image_size=48, max_objects=2, min_box_area=0.0)
    for a, b in zip(full, two, strict=True):
        np.testing.assert_array_equal(b.boxes, a.boxes[:2])
    assert max(len(lay.boxes) for lay in full) > 2


def test_flip_boxes_numpy_and_torch():
    boxes = np.array([[0.1, 0.2, 0.4, 0.9]], np.float32)
    np.testing.assert_allclose(flip_boxes(boxes), [[0.6, 0.2, 0.9, 0.9]], atol=1e-7)
    np.testing.assert_allclose(flip_boxes(flip_boxes(boxes)), boxes, atol=1e-7)
    t = torch.tensor(boxes)
    assert torch.allclose(flip_boxes(t), torch.tensor([[0.6, 0.2, 0.9, 0.9]]))


def test_missing_split_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_train2014.json|train2014 not found"):
        CocoLayouts(str(tmp_path), "train2014")


def _tagged_tree(root, tags: dict):
    """Two 32 px images, three boxes each (annotation ids 1-6); `tags` maps an annotation id to its "tag" value."""
    images = {1: np.zeros((32, 32, 3), np.uint8), 2: np.full((32, 32, 3), 200, np.uint8)}
    cats = [dict(id=1, name="umbrella"), dict(id=2, name="dog")]
    boxes = [[0, 0, 20, 20], [16, 16, 12, 12], [2, 20, 8, 8]]  # areas 400, 144, 64: stays largest first
    anns = [dict(image_id=image_id, category_id=1 + k % 2, bbox=box, iscrowd=0)
            for image_id in images for k, box in enumerate(boxes)]
    for ann_id, tag in tags.items():
        anns[ann_id - 1]["tag"] = tag
    _write_coco(root, "train", images, anns, [(1, "an umbrella and a dog"), (2, "two umbrellas")], cats)


def test_an_annotation_tag_replaces_its_category_name_in_layouts_and_shards(tmp_path):
    from structmar.shards import build_shards, iter_shard
    from structmar.text import TextEncoder, write_random_clip
    from structmar.tokenizer import PixelTokenizer

    _tagged_tree(str(tmp_path / "coco"), {1: "a red umbrella", 3: " a small brown dog ", 6: "dog"})
    coco = CocoLayouts(str(tmp_path / "coco"), "train", image_size=32, min_box_area=0.0)
    assert [lay.tags for lay in coco] == [["a red umbrella", "dog", "a small brown dog"], ["umbrella", "dog", "dog"]]
    assert [lay.category_ids.tolist() for lay in coco] == [[1, 2, 1], [1, 2, 1]]  # the category stays
    clip = TextEncoder.from_pretrained(write_random_clip(str(tmp_path / "clip"), seed=0, size="tiny"))
    build_shards(coco, str(tmp_path / "shards"), PixelTokenizer(4), clip, samples_per_shard=8, batch_size=2,
                 progress=False, build_args=dict(max_objects=16))
    (shard,) = [f for f in os.listdir(tmp_path / "shards") if f.endswith(".tar")]
    samples = list(iter_shard(str(tmp_path / "shards" / shard)))
    assert [json.loads(s["layout.json"])["tags"] for s in samples] == [lay.tags for lay in coco]
    stored = np.load(io.BytesIO(samples[0]["tags.npy"])).astype(np.float32)
    np.testing.assert_allclose(stored, clip.encode_tags(coco[0].tags).float().numpy(), atol=1e-2)  # fp16 payload
    assert not np.allclose(stored[0], clip.encode_tags(["umbrella"]).float().numpy()[0], atol=1e-2)


@pytest.mark.parametrize("bad", [7, "", "   ", None, ["a red umbrella"]])
@pytest.mark.parametrize("ann_id, min_box_area", [(5, 0.0), (3, 0.1)])  # 3: a box too small to keep
def test_a_tag_that_is_not_a_non_empty_string_names_its_annotation(tmp_path, bad, ann_id, min_box_area):
    _tagged_tree(str(tmp_path), {ann_id: bad})
    with pytest.raises(ValueError, match=rf"no image read: annotation {ann_id}: tag must be a non-empty string, got "):
        CocoLayouts(str(tmp_path), "train", image_size=32, min_box_area=min_box_area)


def test_every_annotation_fault_is_listed_before_any_image_is_read(tmp_path):
    """Unknown categories, boxes outside their image and duplicate ids in one error (the first five and a count),
    raised with no image file present: the annotation files are checked whole before any pixel is read."""
    root = str(tmp_path)
    _tagged_tree(root, {})
    path = os.path.join(root, "annotations", "instances_train.json")
    with open(path) as f:
        inst = json.load(f)
    inst["annotations"][1]["category_id"] = 7
    inst["annotations"][2]["bbox"] = [20, 20, 14, 8]  # ends 2 px past the 32 px edge
    inst["annotations"][4]["bbox"] = [-4, 0, 8, 8]
    inst["annotations"][5]["category_id"] = 9
    inst["annotations"][5]["id"] = 1
    inst["images"].append(dict(inst["images"][0]))
    with open(path, "w") as f:
        json.dump(inst, f)
    for name in os.listdir(os.path.join(root, "train")):
        os.remove(os.path.join(root, "train", name))
    with pytest.raises(ValueError) as e:
        CocoLayouts(root, "train", image_size=32)
    message = str(e.value)
    assert "\n" not in message and "6 annotation faults, no image read: " in message
    faults = message.split("no image read: ")[1].split("; ")
    assert faults == ["duplicate image id 1", "duplicate annotation id 1",
                      "annotation 2 (image 1): unknown category id 7",
                      "annotation 3 (image 1): box [20, 20, 14, 8] is outside the 32x32 image",
                      "annotation 5 (image 2): box [-4, 0, 8, 8] is outside the 32x32 image", "and 1 more"]
