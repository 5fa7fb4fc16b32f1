"""Shapes: the embedded default dataset, in COCO 2014's file layout, and its analytic detector.

Each image shows 1 to 6 coloured shapes (circle, square, triangle x red, yellow, green, blue: 12
categories) on a low-saturation gradient background. Objects may overlap, under two constraints
that keep the ground truth well defined: every object keeps >= 75% of its pixels visible with a
visible box close to its full box, and two objects of the same colour never touch (so a colour's
connected components are its objects). Boxes are the extent of the visible pixels, as in COCO.

The detector recovers objects from pixels alone: saturated pixels are split by hue into the four
colours, each colour's connected components are candidate objects, and the shape is read from how
much of each bbox corner region the component fills (square: all four; triangle: the bottom two;
circle: none), ignoring pixels hidden by another colour. It returns torchvision-style dicts and
is the reward model and evaluation detector of the embedded default.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from scipy import ndimage
from tqdm import tqdm

from structmar import atomic

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # name -> (RGB, hue in degrees)
    "red": ((220, 40, 40), 0.0),
    "yellow": ((225, 205, 35), 54.0),
    "green": ((40, 190, 70), 132.0),
    "blue": ((45, 85, 225), 227.0),
}


@dataclass(frozen=True)
class Category:
    id: int
    colour: str
    shape: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


CATEGORIES = tuple(
    Category(id=1 + i * len(SHAPES) + j, colour=c, shape=s) for i, c in enumerate(COLOURS) for j, s in enumerate(SHAPES)
)
CATEGORY_BY_ID = {c.id: c for c in CATEGORIES}
_CATEGORY_ID = {(c.colour, c.shape): c.id for c in CATEGORIES}

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024
MAX_OBJECTS = 6
_MIN_VISIBLE = 0.75  # share of an object's pixels left visible by the objects drawn over it
_MIN_BOX_IOU = 0.8  # IoU between an object's visible box and its full box
_PLACEMENT_TRIES = 30


# ---- generation -------------------------------------------------------------------------------


def _shape_mask(shape: str, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Boolean (size, size) mask of `shape` filling `box` = (x0, y0, x1, y1), x1/y1 exclusive."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=1)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=1)
    else:  # triangle, apex up
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=1)
    return np.asarray(canvas, dtype=bool)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-saturation linear gradient between two tinted greys, with pixel noise: (size, size, 3) float."""
    grey = rng.uniform(70, 235, size=2)
    tint = rng.uniform(-12, 12, size=(2, 3))
    c0, c1 = grey[0] + tint[0], grey[1] + tint[1]
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    return c0 + t[..., None] * (c1 - c0)


def _place_objects(rng: np.random.Generator, size: int, num_objects: int):
    """Draw order list of (category, full mask); each placement keeps every constraint or is retried."""
    placed: list[tuple[Category, np.ndarray]] = []
    grow = np.ones((3, 3), dtype=bool)
    for _ in range(num_objects):
        for _ in range(_PLACEMENT_TRIES):
            cat = CATEGORIES[rng.integers(len(CATEGORIES))]
            side = rng.uniform(0.15, 0.45) * size
            aspect = rng.uniform(0.75, 1.33)
            w, h = max(5, round(side * np.sqrt(aspect))), max(5, round(side / np.sqrt(aspect)))
            w, h = min(w, size), min(h, size)
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            mask = _shape_mask(cat.shape, (x0, y0, x0 + w, y0 + h), size)
            if _placement_ok(placed, cat, mask, grow):
                placed.append((cat, mask))
                break
    return placed


def _placement_ok(placed, cat: Category, mask: np.ndarray, grow: np.ndarray) -> bool:
    touching = ndimage.binary_dilation(mask, structure=grow, iterations=2)
    for other_cat, other in placed:
        if other_cat.colour == cat.colour and (touching & other).any():
            return False
    candidate = placed + [(cat, mask)]
    covered = np.zeros_like(mask)
    for _, other in reversed(candidate):
        visible = other & ~covered
        full_box, vis_box = _bbox(other), _bbox(visible)
        if vis_box is None or visible.sum() < _MIN_VISIBLE * other.sum() or _iou(full_box, vis_box) < _MIN_BOX_IOU:
            return False
        covered |= other
    return True


def render_image(seed: tuple[int, ...], size: int, num_objects: int | None = None):
    """One Shapes image from its own seed: (uint8 (size, size, 3) array, list of object dicts)."""
    rng = np.random.default_rng(seed)
    if num_objects is None:
        num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    image = _background(rng, size)
    placed = _place_objects(rng, size, num_objects)
    for cat, mask in placed:
        rgb = np.asarray(COLOURS[cat.colour][0], dtype=np.float64) + rng.uniform(-12, 12, size=3)
        image[mask] = rgb
    image += rng.normal(0.0, 4.0, size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    objects, covered = [], np.zeros((size, size), dtype=bool)
    for cat, mask in reversed(placed):
        visible = mask & ~covered
        covered |= mask
        objects.append(dict(category=cat, mask=visible, box=_bbox(visible)))
    objects.reverse()  # back to draw order
    return image, objects


def _describe(obj) -> str:
    return f"a {obj['category'].name}"


def _relation(a, b) -> str:
    ax, ay = (a["box"][0] + a["box"][2]) / 2, (a["box"][1] + a["box"][3]) / 2
    bx, by = (b["box"][0] + b["box"][2]) / 2, (b["box"][1] + b["box"][3]) / 2
    if abs(ax - bx) >= abs(ay - by):
        word = "to the left of" if ax < bx else "to the right of"
    else:
        word = "above" if ay < by else "below"
    return f"{_describe(a)} {word} {_describe(b)}"


def captions_for(objects, rng: np.random.Generator) -> list[str]:
    """Three captions composed from the objects: a list, a spatial relation, a count."""
    names = [_describe(o) for o in objects]
    listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    if len(objects) == 1:
        relation = f"{names[0]} on a plain background"
    else:
        i, j = rng.choice(len(objects), size=2, replace=False)
        relation = _relation(objects[int(i)], objects[int(j)])
    count = f"{len(objects)} shape{'s' if len(objects) > 1 else ''}: {listing}"
    return [listing, relation, count]


def _split_id(split: str) -> int:
    return {"train": 0, "val": 1}[split]


def _render_one(job):
    """Worker: render, save and annotate image `index` of `split`; returns its annotation pieces."""
    root, split, index, size, seed = job
    image_id = index + 1
    image, objects = render_image((seed, _split_id(split), index), size)
    file_name = f"COCO_{split}2014_{image_id:012d}.png"
    Image.fromarray(image).save(os.path.join(root, f"{split}2014", file_name), compress_level=1)
    rng = np.random.default_rng((seed, _split_id(split), index, 1))
    instances = []
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        rle = mask_utils.encode(np.asfortranarray(obj["mask"].astype(np.uint8)))
        instances.append(
            dict(
                image_id=image_id,
                category_id=obj["category"].id,
                bbox=[x0, y0, x1 - x0, y1 - y0],
                area=int(obj["mask"].sum()),
                iscrowd=0,
                segmentation={"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            )
        )
    info = dict(id=image_id, file_name=file_name, width=size, height=size)
    return info, instances, captions_for(objects, rng)


def _write_split(root: str, split: str, count: int, size: int, seed: int, workers: int) -> None:
    os.makedirs(os.path.join(root, f"{split}2014"))
    jobs = [(root, split, i, size, seed) for i in range(count)]
    images, instances, captions = [], [], []
    desc = f"shapes {split}2014"
    if workers > 1 and count >= 64:
        with get_context("fork").Pool(workers) as pool:
            results = list(tqdm(pool.imap(_render_one, jobs, chunksize=32), total=count, desc=desc, unit="img"))
    else:
        results = [_render_one(j) for j in tqdm(jobs, desc=desc, unit="img")]
    for info, objs, caps in results:
        images.append(info)
        instances.extend(objs)
        captions.extend(dict(image_id=info["id"], caption=c) for c in caps)
    for i, ann in enumerate(instances):
        ann["id"] = i + 1
    for i, ann in enumerate(captions):
        ann["id"] = i + 1
    header = dict(
        info=dict(description="structmar Shapes", version="1.0", year=2014),
        licenses=[dict(id=1, name="generated", url="")],
    )
    categories = [dict(id=c.id, name=c.name, supercategory=c.shape) for c in CATEGORIES]
    atomic.write_text(os.path.join(root, "annotations", f"instances_{split}2014.json"),
                      json.dumps(dict(header, images=images, annotations=instances, categories=categories)))
    atomic.write_text(os.path.join(root, "annotations", f"captions_{split}2014.json"),
                      json.dumps(dict(header, images=images, annotations=captions)))


def generate_shapes(
    out: str | os.PathLike,
    num_train: int,
    num_val: int,
    image_size: int,
    seed: int = 0,
    overwrite: bool = False,
    workers: int | None = None,
) -> Path:
    """Write the Shapes dataset as a COCO-2014-style tree at `out`, atomically (temp dir, then rename)."""
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be non-negative, got num_train={num_train} num_val={num_val}")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"--image_size {image_size} is outside [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] for Shapes")
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} is not empty (pass --overwrite to replace it)")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise PermissionError(f"cannot write under {parent}: {e.strerror}") from None
    try:
        os.makedirs(tmp / "annotations")
        workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
        for split, count in (("train", num_train), ("val", num_val)):
            _write_split(str(tmp), split, count, image_size, seed, workers)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            out.rename(trash / "old")
            tmp.rename(out)
            shutil.rmtree(trash)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---- the analytic detector ------------------------------------------------------------------------

# Expected fill of the four bbox corner regions (top-left, top-right, bottom-left, bottom-right).
_CORNER_TEMPLATES = {
    "square": np.array([1.0, 1.0, 1.0, 1.0]),
    "circle": np.array([0.15, 0.15, 0.15, 0.15]),
    "triangle": np.array([0.0, 0.0, 0.75, 0.75]),
}
_OCCLUSION_PENALTY = 0.1


def _hsv(image: np.ndarray):
    """Hue (degrees), saturation and value of an (H, W, 3) float image in [0, 1]."""
    mx, mn = image.max(-1), image.min(-1)
    delta = mx - mn
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-6), 0.0)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    d = np.maximum(delta, 1e-6)
    hue = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60.0
    return hue, sat, mx


class ShapesDetector:
    """Analytic detector for Shapes: images (B, 3, H, W) in [0, 1] -> torchvision-style detections."""

    def __init__(self, min_saturation: float = 0.4, min_value: float = 0.3, hue_tolerance: float = 24.0):
        self.min_saturation = min_saturation
        self.min_value = min_value
        self.hue_tolerance = hue_tolerance

    def colour_masks(self, image: np.ndarray) -> dict[str, np.ndarray]:
        hue, sat, val = _hsv(image)
        vivid = (sat >= self.min_saturation) & (val >= self.min_value)
        masks = {}
        for name, (_, centre) in COLOURS.items():
            dist = np.abs((hue - centre + 180.0) % 360.0 - 180.0)
            masks[name] = vivid & (dist <= self.hue_tolerance)
        return masks

    def detect_one(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        height, width = image.shape[:2]
        min_area = max(4, int(0.005 * height * width))
        masks = self.colour_masks(image)
        any_colour = np.zeros((height, width), dtype=bool)
        for m in masks.values():
            any_colour |= m
        boxes, labels, scores = [], [], []
        for colour, mask in masks.items():
            components, count = ndimage.label(mask, structure=np.ones((3, 3)))
            for index, region in enumerate(ndimage.find_objects(components), start=1):
                own = components[region] == index
                area = int(own.sum())
                if area < min_area:
                    continue
                hidden = any_colour[region] & ~mask[region]  # pixels another colour may be covering
                shape, score = self._classify(own, hidden)
                ys, xs = region
                boxes.append([xs.start, ys.start, xs.stop, ys.stop])
                labels.append(_CATEGORY_ID[(colour, shape)])
                scores.append(score)
        return dict(
            boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            labels=torch.tensor(labels, dtype=torch.int64),
            scores=torch.tensor(scores, dtype=torch.float32),
        )

    @staticmethod
    def _classify(own: np.ndarray, hidden: np.ndarray) -> tuple[str, float]:
        """Shape from corner-region fill, under two readings of pixels of another colour.

        They may lie over this object (occlusion: leave them out) or under it (the object is drawn on top:
        count them as empty). Each shape takes its better reading; occlusion pays a small penalty so an
        object on top of another is not read as a square whose corners are hidden.
        """
        h, w = own.shape
        ch, cw = max(1, round(h / 4)), max(1, round(w / 4))
        corners = [(slice(0, ch), slice(0, cw)), (slice(0, ch), slice(w - cw, w)),
                   (slice(h - ch, h), slice(0, cw)), (slice(h - ch, h), slice(w - cw, w))]
        fill_on_top = np.array([own[ys, xs].mean() for ys, xs in corners])
        fill_occluded, weight = np.zeros(4), np.zeros(4)
        for k, (ys, xs) in enumerate(corners):
            known = ~hidden[ys, xs]
            if known.any():
                fill_occluded[k] = own[ys, xs][known].mean()
                weight[k] = known.mean()
        errors = {}
        for shape, template in _CORNER_TEMPLATES.items():
            error = float(np.sqrt(((fill_on_top - template) ** 2).mean()))
            if weight.sum() > 0:
                occluded = np.sqrt((weight * (fill_occluded - template) ** 2).sum() / weight.sum())
                error = min(error, float(occluded) + _OCCLUSION_PENALTY)
            errors[shape] = error
        best = min(errors, key=errors.get)
        ranked = sorted(errors.values())
        margin = ranked[1] - ranked[0]  # confidence: how much better the best template fits than the runner-up
        return best, float(np.clip(0.5 + margin, 0.05, 1.0))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"ShapesDetector expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        array = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return [self.detect_one(img) for img in array]
