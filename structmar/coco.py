"""COCO instances + captions -> layouts at the training resolution (resize, centre crop, filter, flip).

A layout is up to `max_objects` boxes (largest first) in normalised xyxy coordinates of the square
training crop, with a category id and a tag string per box, plus every caption of the image. A box's
tag is its annotation's optional `"tag"` (free text, as grounding data gives it) or else its category
name. Crowd boxes, boxes smaller than `min_box_area` (a fraction of the crop's area) and boxes mostly
cropped away are dropped. Everything is computed from the annotation files alone (image sizes come
from them too), so the list of usable images is known before any pixel is read: that is what lets
shard builders agree on shard contents. For the same reason the annotation files are checked whole
first (unknown categories, boxes outside their image, duplicate ids, bad tags): every fault is listed
in one error before any image is read. A fault of one image file (missing, unreadable, another size
than annotated) is an `ImageFault`, which the shard builder skips and lists.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

MAX_LISTED = 5  # faults quoted in an error; the rest are counted
BOX_SLACK = 1.0  # pixels a box may pass its image's edge (rounding in annotation tools)


class ImageFault(ValueError):
    """One image cannot be used; `.reason` is "missing", "unreadable" or "wrong_size"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def listed(faults: list[str]) -> str:
    """The first MAX_LISTED of `faults` and the count of the others, on one line."""
    more = len(faults) - MAX_LISTED
    return "; ".join(faults[:MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")


def annotation_faults(instances: dict, captions: dict, categories: dict[int, str]) -> list[str]:
    """Every fault of the instances and captions files (COCO dicts), in file order: duplicate ids, annotations of
    an unknown image or category, boxes outside their image, tags that are not non-empty strings."""
    faults = []
    for what, items in (("image", instances["images"]), ("category", instances["categories"]),
                        ("annotation", instances["annotations"]), ("caption", captions["annotations"])):
        seen = set()
        for item in items:
            if item["id"] in seen:
                faults.append(f"duplicate {what} id {item['id']}")
            seen.add(item["id"])
    images = {info["id"]: info for info in instances["images"]}
    for ann in instances["annotations"]:
        where = f"annotation {ann['id']}"
        info = images.get(ann["image_id"])
        if info is None:
            faults.append(f"{where}: image id {ann['image_id']} is not among the images")
        if ann["category_id"] not in categories:
            faults.append(f"{where} (image {ann['image_id']}): unknown category id {ann['category_id']}")
        if "tag" in ann and not (isinstance(ann["tag"], str) and ann["tag"].strip()):
            faults.append(f"{where}: tag must be a non-empty string, got {ann['tag']!r}")
        if info is not None:
            x, y, w, h = (float(v) for v in ann["bbox"])
            width, height = info["width"], info["height"]
            inside = (min(x, y) >= -BOX_SLACK and w >= 0 and h >= 0 and x + w <= width + BOX_SLACK
                      and y + h <= height + BOX_SLACK)  # False for NaN too
            if not inside:
                faults.append(f"{where} (image {ann['image_id']}): box {ann['bbox']} is outside the "
                              f"{width}x{height} image")
    return faults


@dataclass
class Layout:
    image_id: int
    file_name: str
    orig_size: tuple[int, int]  # (width, height) of the original image
    boxes: np.ndarray  # (K, 4) float32 normalised xyxy in the training crop
    category_ids: np.ndarray  # (K,) int64
    tags: list[str]
    captions: list[str] = field(default_factory=list)


def crop_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop x, crop y) of the ADM centre crop MAR trains on."""
    w, h = width, height
    # Repeated 2x box downsampling first, as ADM does (only changes rounding, not the mapping).
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
    scale = size / min(w, h)
    rw, rh = round(w * scale), round(h * scale)
    return rw, rh, (rw - size) // 2, (rh - size) // 2


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """PIL image -> (size, size, 3) uint8: ADM-style resize of the short side to `size`, centre crop."""
    image = image.convert("RGB")
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    rw, rh, cx, cy = crop_geometry(*image.size, size)
    image = image.resize((rw, rh), resample=Image.BICUBIC)
    return np.array(image)[cy:cy + size, cx:cx + size]


def transform_boxes(boxes_xywh: np.ndarray, width: int, height: int, size: int,
                    min_visible: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """COCO pixel boxes (N, 4) xywh of a width x height image -> (normalised xyxy in the crop (N, 4), keep (N,)).

    keep is False for boxes that keep less than `min_visible` of their area after the crop, or none.
    """
    boxes_xywh = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    rw, rh, cx, cy = crop_geometry(width, height, size)
    sx, sy = rw / width, rh / height
    x0 = boxes_xywh[:, 0] * sx - cx
    y0 = boxes_xywh[:, 1] * sy - cy
    x1 = (boxes_xywh[:, 0] + boxes_xywh[:, 2]) * sx - cx
    y1 = (boxes_xywh[:, 1] + boxes_xywh[:, 3]) * sy - cy
    full = np.maximum(x1 - x0, 0) * np.maximum(y1 - y0, 0)
    xyxy = np.stack([x0, y0, x1, y1], axis=1).clip(0, size)
    visible = np.maximum(xyxy[:, 2] - xyxy[:, 0], 0) * np.maximum(xyxy[:, 3] - xyxy[:, 1], 0)
    keep = (visible > 0) & (visible >= min_visible * np.maximum(full, 1e-12))
    return (xyxy / size).astype(np.float32), keep


def flip_boxes(boxes: np.ndarray):
    """Mirror normalised xyxy boxes (..., 4) left-right: the layout of the horizontally flipped image.

    Works on numpy arrays and torch tensors alike.
    """
    x0, y0, x1, y1 = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
    stack = np.stack if isinstance(boxes, np.ndarray) else torch.stack
    return stack([1 - x1, y0, 1 - x0, y1], -1)


def box_areas(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)


class CocoLayouts:
    """The usable images of one COCO split as `Layout`s, sorted by image id.

    `root` holds `{split}/` images and `annotations/instances_{split}.json` + `captions_{split}.json`.
    Images left with no box or no caption are dropped and counted in `.dropped`.
    """

    def __init__(self, root: str, split: str, image_size: int = 256, max_objects: int = 16,
                 min_box_area: float = 0.002, min_visible: float = 0.5):
        from pycocotools.coco import COCO

        self.root, self.split, self.image_size = root, split, image_size
        self.max_objects, self.min_box_area, self.min_visible = max_objects, min_box_area, min_visible
        self.image_dir = os.path.join(root, split)
        inst_path = os.path.join(root, "annotations", f"instances_{split}.json")
        cap_path = os.path.join(root, "annotations", f"captions_{split}.json")
        for p in (self.image_dir, inst_path, cap_path):
            if not os.path.exists(p):
                raise FileNotFoundError(f"COCO split {split!r}: {p} not found (expected {root}/{split}/ and "
                                        f"{root}/annotations/{{instances,captions}}_{split}.json)")
        if max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {max_objects}")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            instances, captions = COCO(inst_path), COCO(cap_path)
        self.categories: dict[int, str] = {c["id"]: c["name"] for c in instances.loadCats(instances.getCatIds())}
        faults = annotation_faults(instances.dataset, captions.dataset, self.categories)
        if faults:
            raise ValueError(f"{inst_path}, {cap_path}: {len(faults)} annotation faults, no image read: "
                             f"{listed(faults)}")
        self.dropped = {"no_boxes": 0, "no_captions": 0}
        self.layouts: list[Layout] = []
        for image_id in sorted(instances.getImgIds()):
            info = instances.imgs[image_id]
            anns = [a for a in instances.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
            caps = [a["caption"].strip() for a in sorted(captions.imgToAnns.get(image_id, []), key=lambda a: a["id"])]
            layout = self._layout(info, anns, caps, max_objects, min_box_area, min_visible)
            if layout is not None:
                self.layouts.append(layout)

    def _layout(self, info, anns, captions, max_objects, min_box_area, min_visible) -> Layout | None:
        width, height = int(info["width"]), int(info["height"])
        anns = sorted(anns, key=lambda a: a["id"])
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        xyxy, keep = transform_boxes(boxes, width, height, self.image_size, min_visible)
        area = box_areas(xyxy)
        keep &= area >= min_box_area
        tags = [self._tag(a) for a in anns]
        # Largest first; the stable sort keeps annotation order among equal areas.
        order = [i for i in np.argsort(-area, kind="stable") if keep[i]][:max_objects]
        if not order:
            self.dropped["no_boxes"] += 1
            return None
        if not captions:
            self.dropped["no_captions"] += 1
            return None
        cats = np.array([anns[i]["category_id"] for i in order], dtype=np.int64)
        return Layout(image_id=int(info["id"]), file_name=info["file_name"], orig_size=(width, height),
                      boxes=xyxy[order], category_ids=cats, tags=[tags[i] for i in order],
                      captions=captions)

    def _tag(self, ann: dict) -> str:
        """The box's tag: the annotation's own `tag` text if it has one (checked by annotation_faults), else its
        category name."""
        return ann["tag"].strip() if "tag" in ann else self.categories[ann["category_id"]]

    def __len__(self) -> int:
        return len(self.layouts)

    def __getitem__(self, index: int) -> Layout:
        return self.layouts[index]

    def image(self, layout: Layout) -> np.ndarray:
        """The (S, S, 3) uint8 training crop of `layout`'s image; ImageFault when the file cannot give it."""
        path = os.path.join(self.image_dir, layout.file_name)
        try:
            with Image.open(path) as im:
                if im.size != layout.orig_size:
                    raise ImageFault("wrong_size", f"{path} (image id {layout.image_id}): size {im.size} differs "
                                     f"from the annotation's {layout.orig_size}")
                return center_crop(im, self.image_size)
        except FileNotFoundError:
            raise ImageFault("missing", f"{path} (image id {layout.image_id}): no such file") from None
        except (OSError, SyntaxError, Image.DecompressionBombError) as e:
            raise ImageFault("unreadable", f"{path} (image id {layout.image_id}): {e}") from None
