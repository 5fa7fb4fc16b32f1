"""Figures: images as PIL, a layout's boxes and tags drawn over its image, and grids of such images.

What `structmar sample` writes next to its PNGs, the figure grids of `structmar eval`, and the EMA sample
grids `structmar train` logs to TensorBoard.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from structmar import atomic


def to_pil(image: torch.Tensor | np.ndarray) -> Image.Image:
    """A (3, H, W) float tensor in [0, 1] or an (H, W, 3) uint8 array as a PIL image."""
    if isinstance(image, torch.Tensor):
        image = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.asarray(image, dtype=np.uint8))


def draw_layout(image, boxes, tags: list[str], min_side: int = 256) -> Image.Image:
    """The image (upscaled to >= min_side for legibility) with its boxes and tags drawn in black.

    boxes: (K, 4) normalised xyxy. Tags sit in a black label at each box's top-left corner.
    """
    pil = to_pil(image)
    scale = max(1, -(-min_side // max(pil.size)))
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).convert("RGB")
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    w, h = pil.size
    for box, tag in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), tags):
        x0, y0, x1, y1 = box * np.array([w, h, w, h])
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(0, 0, 0), width=2)
        if tag:
            left, top, right, bottom = draw.textbbox((x0 + 3, y0 + 2), tag, font=font)
            draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=(0, 0, 0))
            draw.text((x0 + 3, y0 + 2), tag, fill=(255, 255, 255), font=font)
    return pil


def image_grid(images: list[Image.Image], ncol: int = 4, pad: int = 4) -> Image.Image:
    """Images of one size tiled row by row on a white canvas."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    nrow = -(-len(images) // ncol)
    grid = Image.new("RGB", (ncol * w + (ncol + 1) * pad, nrow * h + (nrow + 1) * pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def write_layout_grids(out: str, num_grids: int, coco, layouts) -> list[str]:
    """`num_grids` 4x4 grids of generated (<out>/samples/) and real images with their layouts drawn over them,
    written to <out>/figures/; returns the paths written."""
    written = []
    os.makedirs(os.path.join(out, "figures"), exist_ok=True)
    for k in range(num_grids):
        chosen = list(enumerate(layouts))[16 * k:16 * (k + 1)]
        if not chosen:
            break
        generated, real = [], []
        for i, lay in chosen:
            with Image.open(os.path.join(out, "samples", f"{i:06d}_{lay.image_id}.png")) as im:
                generated.append(draw_layout(np.asarray(im.convert("RGB")), lay.boxes, lay.tags))
            real.append(draw_layout(coco.image(lay), lay.boxes, lay.tags))
        for name, tiles in (("generated", generated), ("real", real)):
            path = os.path.join(out, "figures", f"{name}_{k:02d}.png")
            atomic.save_image(image_grid(tiles, ncol=4), path)
            written.append(path)
    return written
