"""Iterative masked generation (MAR's sampler) with CFG, temperature and optional trajectory recording.

Each of `num_iter` steps runs the backbone on the current tokens, then the diffusion head samples the
tokens that leave the mask at this step: after step k, floor(L * cos(pi/2 * (k+1) / num_iter)) tokens
stay masked (at least one token is generated per step; the last step generates all that remain), in a
random order per image. The CFG scale is constant or linear in the share of tokens already generated;
the unconditional branch is the null text + null layout condition. With `record=True` every generated
token's reverse diffusion chain is kept (x_t, x_{t-1}, mean, std, AR step, token index, timestep): what
GRPO needs to recompute log N(x_{t-1}; mu_theta(x_t, t, z), sigma^2) with `diffusion.step_log_prob`.

The conditions come in as the training batch's text/layout keys; `condition_batch` builds them from
captions, boxes and tags with the CLIP text encoder, and `parse_layout_spec` reads a user's layout
spec (the JSON file of `structmar sample`) with one-line errors naming the field at fault.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from structmar.config import CFG_SCHEDULES, SamplingConfig
from structmar.diffusion import DenoisingTrace
from structmar.model import StructMAR, mask_by_order, sample_orders, unpatchify


@dataclass
class ARStep:
    """One autoregressive step of a recorded rollout.

    mask: (B, L) bool, the tokens still unknown when the step ran (the backbone's input mask);
    batch_index, token_index: (N,) which tokens this step generated; cfg_scale: the guidance used;
    trace: their reverse diffusion chains (x_t etc. of shape (S, N, C)).
    """

    ar_step: int
    mask: torch.Tensor
    batch_index: torch.Tensor
    token_index: torch.Tensor
    cfg_scale: float
    trace: DenoisingTrace


@dataclass
class SampleOutput:
    latents: torch.Tensor  # (B, C, g, g) scaled tokenizer latents
    orders: torch.Tensor  # (B, L) the generation order
    steps: list[ARStep] = field(default_factory=list)  # filled when recording


def _repeat_batch(batch: dict, times: int) -> dict:
    return {k: torch.cat([v] * times) if torch.is_tensor(v) else v for k, v in batch.items()}


def cfg_scale_at(guidance: float, schedule: str, num_masked_after: int, seq_len: int) -> float:
    """Guidance of a step: constant, or linear from 1 to `guidance` in the share of tokens generated after it."""
    if schedule == "constant":
        return guidance
    if schedule == "linear":
        return 1.0 + (guidance - 1.0) * (seq_len - num_masked_after) / seq_len
    raise ValueError(f"unknown cfg schedule {schedule!r}; known: {', '.join(CFG_SCHEDULES)}")


@torch.no_grad()
def sample_latents(model: StructMAR, batch: dict, num_iter: int = SamplingConfig.num_iter,
                   guidance: float = SamplingConfig.cfg, cfg_schedule: str = SamplingConfig.cfg_schedule,
                   temperature: float = SamplingConfig.temperature, generator: torch.Generator | None = None,
                   record: bool = False, orders: torch.Tensor | None = None) -> SampleOutput:
    """Generate token latents for the conditions in `batch` (text/layout keys of the training batch contract).

    `guidance` is the classifier-free guidance scale (the `--cfg` flag; 1: off). The batch size comes from
    `text_pooled` (or `boxes`); every random draw uses `generator`. `orders` (B, L), a permutation of the
    tokens per row, fixes the generation orders (default: uniformly random).
    """
    cfg = model.cfg
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1, got {num_iter}")
    cfg_scale_at(guidance, cfg_schedule, 0, 1)  # validate the schedule name before any work
    ref = batch.get("text_pooled", batch.get("boxes"))
    if ref is None:
        raise ValueError("the sampling batch needs 'text_pooled' or 'boxes' to know its size")
    B, L, C = ref.shape[0], cfg.seq_len, cfg.token_channels
    dev = model.fake_latent.device
    dtype = model.fake_latent.dtype
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items() if k != "latents"}
    guided = guidance != 1.0
    if guided:  # one pass over [conditional; unconditional]
        drop = torch.cat([torch.zeros(B, dtype=torch.bool, device=dev), torch.ones(B, dtype=torch.bool, device=dev)])
        cond = model.condition(_repeat_batch(batch, 2), drop)
    else:
        cond = model.condition(batch, None)

    mask = torch.ones(B, L, dtype=torch.bool, device=dev)
    tokens = torch.zeros(B, L, C, device=dev, dtype=dtype)
    if orders is None:
        orders = sample_orders(B, L, device=dev, generator=generator)
    elif orders.shape != (B, L):
        raise ValueError(f"orders of shape {tuple(orders.shape)} do not match the batch's ({B}, {L})")
    orders = orders.to(dev)
    out = SampleOutput(latents=tokens, orders=orders)
    for step in range(num_iter):
        z = model.predict(torch.cat([tokens] * 2) if guided else tokens, torch.cat([mask] * 2) if guided else mask,
                          cond)  # (B or 2B, L, W)
        remaining = int(mask[0].sum())
        num_masked = math.floor(L * math.cos(math.pi / 2 * (step + 1) / num_iter))
        num_masked = max(1, min(remaining - 1, num_masked))
        mask_next = mask_by_order(num_masked, orders)
        to_pred = mask if step == num_iter - 1 else mask & ~mask_next
        scale = cfg_scale_at(guidance, cfg_schedule, num_masked, L)
        b_idx, t_idx = to_pred.nonzero(as_tuple=True)
        z_cond = z[:B][b_idx, t_idx]
        z_uncond = z[B:][b_idx, t_idx] if guided else None
        x, trace = model.diffloss.sample(z_cond, temperature, scale, z_uncond, generator=generator, record=record)
        if record:
            out.steps.append(ARStep(step, mask.clone(), b_idx, t_idx, scale, trace))
        tokens = tokens.clone()
        tokens[b_idx, t_idx] = x.to(tokens.dtype)
        mask = mask_next if step < num_iter - 1 else torch.zeros_like(mask)
    out.latents = unpatchify(tokens, cfg.grid_size)
    return out


@torch.no_grad()
def generate_images(model: StructMAR, tokenizer, batch: dict, **kwargs) -> tuple[torch.Tensor, SampleOutput]:
    """Sample latents and decode them: images in [-1, 1] (B, 3, S, S) and the SampleOutput."""
    out = sample_latents(model, batch, **kwargs)
    return tokenizer.decode(out.latents), out


# ---- conditions: layout specs and the batch they become ----------------------------------------------

SPEC_UNITS = ("normalized", "pixels")
_SPEC_FIELDS = ("caption", "units", "image_size", "boxes")
_BOX_FIELDS = ("box", "tag")


@dataclass
class LayoutSpec:
    """A caption and boxes (K, 4) normalised xyxy, each with a tag (a category name or free text)."""

    caption: str
    boxes: np.ndarray
    tags: list[str]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_layout_spec(spec, source: str = "layout") -> LayoutSpec:
    """A layout spec (parsed JSON) -> LayoutSpec; errors read "<source>: <field>: <what is wrong>".

    The spec is an object:
      caption     string (may be left out when the caller supplies a prompt: it is then "")
      units       "normalized" (default: coordinates in [0, 1]) or "pixels" (needs image_size)
      image_size  side in pixels, or [width, height]: the canvas pixel boxes are measured on
      boxes       list of {"box": [x0, y0, x1, y1], "tag": "red circle"} (xyxy, x1 > x0, y1 > y0)
    """
    def fail(where: str, what: str):
        raise ValueError(f"{source}: {where}: {what}")

    if not isinstance(spec, dict):
        raise ValueError(f"{source}: a layout spec is a JSON object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_SPEC_FIELDS))
    if unknown:
        fail(unknown[0], f"unknown field (known: {', '.join(_SPEC_FIELDS)})")
    caption = spec.get("caption", "")
    if not isinstance(caption, str):
        fail("caption", f"expected a string, got {json.dumps(caption)}")

    units = spec.get("units", "normalized")
    if units == "normalised":
        units = "normalized"
    if units not in SPEC_UNITS:
        fail("units", f"{json.dumps(units)} is not one of {', '.join(SPEC_UNITS)}")
    size = spec.get("image_size")
    if size is not None:
        sides = size if isinstance(size, list) else [size]
        if len(sides) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                for v in sides):
            fail("image_size", f"expected a positive integer or [width, height], got {json.dumps(size)}")
        width, height = sides[0], sides[-1]
    elif units == "pixels":
        fail("image_size", 'missing: "units": "pixels" needs the canvas size the boxes are measured on')
    else:
        width = height = 1
    extent = (1, 1) if units == "normalized" else (width, height)

    raw = spec.get("boxes", [])
    if not isinstance(raw, list):
        fail("boxes", f"expected a list of {{\"box\": [x0, y0, x1, y1], \"tag\": ...}}, got {type(raw).__name__}")
    boxes, tags = [], []
    for i, item in enumerate(raw):
        where = f"boxes[{i}]"
        if not isinstance(item, dict):
            fail(where, f'expected an object {{"box": [x0, y0, x1, y1], "tag": ...}}, got {json.dumps(item)}')
        unknown = sorted(set(item) - set(_BOX_FIELDS))
        if unknown:
            fail(f"{where}.{unknown[0]}", f"unknown field (known: {', '.join(_BOX_FIELDS)})")
        if "box" not in item:
            fail(f"{where}.box", "missing")
        box = item["box"]
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            fail(f"{where}.box", f"expected four numbers [x0, y0, x1, y1], got {json.dumps(box)}")
        x0, y0, x1, y1 = box
        for lo, hi, a, b in (("x0", "x1", x0, x1), ("y0", "y1", y0, y1)):
            if b <= a:
                fail(f"{where}.box", f"{hi} {b:g} {'<' if b < a else '='} {lo} {a:g}")
        for name, v, top in (("x0", x0, extent[0]), ("y0", y0, extent[1]), ("x1", x1, extent[0]),
                             ("y1", y1, extent[1])):
            if not 0 <= v <= top:
                hint = (' (pixel boxes need "units": "pixels" and "image_size")' if units == "normalized"
                        else f" (image_size {width}x{height})")
                fail(f"{where}.box", f"{name} {v:g} is outside [0, {top:g}]{hint}")
        if "tag" not in item:
            fail(f"{where}.tag", "missing (a category name or free text)")
        tag = item["tag"]
        if not isinstance(tag, str) or not tag.strip():
            fail(f"{where}.tag", f"expected a non-empty string, got {json.dumps(tag)}")
        boxes.append([x0 / extent[0], y0 / extent[1], x1 / extent[0], y1 / extent[1]])
        tags.append(tag.strip())
    return LayoutSpec(caption.strip(), np.asarray(boxes, dtype=np.float32).reshape(-1, 4), tags)


def read_layout_spec(path: str) -> LayoutSpec:
    """parse_layout_spec of a JSON file; errors name the file."""
    from structmar.files import read_json

    return parse_layout_spec(read_json(path, "layout spec"), source=path)


@torch.no_grad()
def condition_batch(text_encoder, captions: list[str], boxes: list[np.ndarray], tags: list[list[str]],
                    category_ids: list[np.ndarray] | None = None, image_ids: list[int] | None = None) -> dict:
    """The text/layout keys of the training batch contract for B captions and layouts (boxes normalised xyxy).

    Padding as the shard loader pads: boxes 0, box_mask False, tag_embeds 0, category_ids -1.
    """
    if not len(captions) == len(boxes) == len(tags):
        raise ValueError(f"{len(captions)} captions, {len(boxes)} box sets and {len(tags)} tag lists")
    B = len(captions)
    k = max((len(b) for b in boxes), default=0)
    tokens, mask, pooled = text_encoder.encode(captions)  # (B, Lt, D), (B, Lt), (B, D)
    dev, D = pooled.device, pooled.shape[-1]
    batch = dict(
        text_tokens=tokens, text_mask=mask, text_pooled=pooled,
        boxes=torch.zeros(B, k, 4, device=dev), box_mask=torch.zeros(B, k, dtype=torch.bool, device=dev),
        tag_embeds=torch.zeros(B, k, D, device=dev, dtype=pooled.dtype),
        category_ids=torch.full((B, k), -1, dtype=torch.long, device=dev),
        image_ids=torch.tensor(image_ids if image_ids is not None else range(B), dtype=torch.long, device=dev),
    )
    flat = [t for row in tags for t in row]
    embeds = text_encoder.encode_tags(flat) if flat else None  # (sum K_i, D)
    start = 0
    for i, (b, t) in enumerate(zip(boxes, tags)):
        n = len(b)
        if len(t) != n:
            raise ValueError(f"layout {i}: {n} boxes but {len(t)} tags")
        if n:
            batch["boxes"][i, :n] = torch.as_tensor(np.asarray(b, dtype=np.float32), device=dev)
            batch["box_mask"][i, :n] = True
            batch["tag_embeds"][i, :n] = embeds[start:start + n]
            if category_ids is not None:
                batch["category_ids"][i, :n] = torch.as_tensor(np.asarray(category_ids[i]), device=dev)
        start += n
    return batch
