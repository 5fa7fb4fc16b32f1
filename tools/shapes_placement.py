"""Where a Shapes evaluation's samples put object colour: inside their boxes, outside, and whether it is the tag's.

Reads the samples `structmar eval` wrote (`<eval dir>/samples/<index>_<image id>.png`) and the val layouts
they were generated for, and prints, for the generated and the real images:
  - the share of saturated pixels (max - min over RGB > 0.25: Shapes objects; its backgrounds are grey)
    inside the boxes and outside every box;
  - among saturated pixels covered by exactly one box, the share whose nearest Shapes colour is the tag's
    (chance: 1 / 4 colours).
A model that has learned where objects go but not which raises the first share and not the third; AP50
needs both (and the shape).

    python tools/shapes_placement.py output/demo/eval/stage2_full output/demo/shapes
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np
from PIL import Image

from structmar.coco import CocoLayouts
from structmar.shapes import CATEGORY_BY_ID, COLOURS

SATURATED = 0.25


def placement(pairs) -> dict[str, float]:
    """pairs: (layout, image (S, S, 3) floats in [0, 1]) -> the three shares."""
    names = list(COLOURS)
    ref = np.array([COLOURS[n][0] for n in names], dtype=np.float64) / 255
    inside = inside_obj = outside = outside_obj = single = correct = 0
    for layout, image in pairs:
        size = image.shape[0]
        obj = image.max(-1) - image.min(-1) > SATURATED
        cover = np.zeros((size, size), dtype=np.int64)
        colour = np.full((size, size), -1)
        for box, category in zip(layout.boxes, layout.category_ids):
            x0, y0, x1, y1 = (np.asarray(box) * size).round().astype(int)
            cover[y0:y1, x0:x1] += 1
            colour[y0:y1, x0:x1] = names.index(CATEGORY_BY_ID[int(category)].colour)
        boxed = cover > 0
        inside, inside_obj = inside + boxed.sum(), inside_obj + (obj & boxed).sum()
        outside, outside_obj = outside + (~boxed).sum(), outside_obj + (obj & ~boxed).sum()
        one = obj & (cover == 1)
        nearest = ((image[one][:, None, :] - ref[None]) ** 2).sum(-1).argmin(-1)
        single, correct = single + one.sum(), correct + (nearest == colour[one]).sum()
    return dict(in_boxes=inside_obj / max(inside, 1), outside=outside_obj / max(outside, 1),
                colour_correct=correct / max(single, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("eval_dir", help="an output directory of `structmar eval` on Shapes")
    ap.add_argument("shapes_root", help="the Shapes COCO tree it evaluated")
    ap.add_argument("--split", default="val2014")
    args = ap.parse_args()
    files = sorted(glob.glob(os.path.join(args.eval_dir, "samples", "*.png")))
    if not files:
        raise SystemExit(f"{args.eval_dir}/samples holds no generated images")
    first = np.asarray(Image.open(files[0]))
    coco = CocoLayouts(args.shapes_root, args.split, image_size=first.shape[0], max_objects=64)
    by_id = {layout.image_id: layout for layout in coco.layouts}
    generated, real = [], []
    for path in files:
        layout = by_id[int(os.path.basename(path).rsplit(".", 1)[0].split("_")[1])]
        generated.append((layout, np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255))
        real.append((layout, coco.image(layout).astype(np.float64) / 255))
    print(f"{len(files)} samples of {args.eval_dir}\n\n| | saturated share in boxes | outside boxes | "
          "colour-correct in boxes |\n| --- | --- | --- | --- |")
    for label, pairs in (("generated", generated), ("real", real)):
        s = placement(pairs)
        print(f"| {label} | {s['in_boxes']:.3f} | {s['outside']:.3f} | {s['colour_correct']:.3f} |")


if __name__ == "__main__":
    main()
