"""Evaluation: layout overlays and figure grids, FID and CLIP score, and the two pipelines behind
`structmar sample` (one layout spec -> PNGs and overlays) and `structmar eval` (a COCO-format val set
-> layout fidelity against its real-image ceiling and mismatched-layout chance level, FID, CLIP score).

FID uses the field's standard FID Inception (the TF-ported network of pytorch-fid, whose blocks this
module assembles) with weights read from a local file, never downloaded; CLIP score uses a local CLIP
directory holding both towers. Layout fidelity (AP against the input layouts) lives in
structmar.reward next to the matching it shares with the GRPO reward.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from structmar import atomic

FID_WEIGHTS_HOWTO = (
    "download pt_inception-2015-12-05-6726825d.pth (the FID Inception weights released with pytorch-fid) "
    "once on a machine with internet access and pass its path"
)

DEFAULT_CLIP_PATH = "pretrained_models/clip-vit-base-patch32"  # where the README puts the CLIP text encoder

# ---- overlays and grids ------------------------------------------------------------------------------


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


# ---- FID ---------------------------------------------------------------------------------------------


class FIDInception(nn.Module):
    """The FID Inception network: images (B, 3, H, W) in [0, 1] -> pool3 features (B, 2048)."""

    def __init__(self):
        super().__init__()
        from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
        net.Mixed_5b = FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = FIDInceptionE_1(1280)
        net.Mixed_7c = FIDInceptionE_2(2048)
        self.net = net

    @classmethod
    def from_file(cls, path: str, device: str | torch.device = "cpu") -> FIDInception:
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(f"FID Inception weights {path} not found: {FID_WEIGHTS_HOWTO}")
        model = cls()
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.net.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise ValueError(f"{path} is not an FID Inception state dict ({first})") from None
        return model.eval().requires_grad_(False).to(device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                      n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets (N, D) and (M, D): Gaussian fits compared in closed form.

    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2). With A, B the centred features scaled by
    1/sqrt(N-1), 1/sqrt(M-1), the non-zero eigenvalues of S_a S_b = A'A B'B are the squared singular
    values of A B', so the trace term is the nuclear norm of the N x M matrix A B': exact, and far
    cheaper than a D x D matrix square root when the sets are smaller than D = 2048. Larger sets
    take the square roots of the eigenvalues of S_a S_b.
    """
    for name, f in (("first", features_a), ("second", features_b)):
        if len(f) < 2:
            raise ValueError(f"FID needs at least 2 images per set; the {name} set has {len(f)}")
    a = torch.as_tensor(np.asarray(features_a), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(features_b), dtype=torch.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    a_c, b_c = (a - mu_a) / (len(a) - 1) ** 0.5, (b - mu_b) / (len(b) - 1) ** 0.5
    trace_a, trace_b = a_c.square().sum(), b_c.square().sum()
    if max(len(a), len(b)) <= a.shape[1]:
        trace_sqrt = torch.linalg.matrix_norm(a_c @ b_c.T, ord="nuc")
    else:
        trace_sqrt = torch.linalg.eigvals((a_c.T @ a_c) @ (b_c.T @ b_c)).sqrt().real.sum()
    fid = (mu_a - mu_b).square().sum() + trace_a + trace_b - 2 * trace_sqrt
    return float(fid.clamp(min=0))


def inception_features(model: FIDInception, images, batch_size: int = 32) -> np.ndarray:
    """Features (N, 2048) of an iterable of (3, H, W) [0, 1] tensors, batched."""
    device = next(model.parameters()).device
    feats, batch = [], []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            feats.append(model(torch.stack(batch).to(device)).cpu())
            batch = []
    if batch:
        feats.append(model(torch.stack(batch).to(device)).cpu())
    return torch.cat(feats).double().numpy()


# ---- CLIP score --------------------------------------------------------------------------------------


class ClipScorer:
    """CLIP score (100 x max(cos(image, caption), 0), averaged) with a local two-tower CLIP directory."""

    def __init__(self, path: str, device: str | torch.device = "cpu"):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"CLIP directory {path} not found")
        needs = f"CLIP score needs a full CLIP model (text and vision towers, image processor) in {path}"
        try:
            model, info = CLIPModel.from_pretrained(path, local_files_only=True, output_loading_info=True)
            self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
            self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{needs}: {e}") from None
        if info["missing_keys"]:  # transformers would score with randomly initialised towers
            raise ValueError(f"{needs}: {len(info['missing_keys'])} weights are missing, e.g. "
                             f"{sorted(info['missing_keys'])[0]}")
        self.model = model.eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Per-image CLIP scores (B,) for images (B, 3, H, W) in [0, 1] and their captions."""
        pixels = self.processor(images=list(images.float().clamp(0, 1).cpu()), return_tensors="pt",
                                do_rescale=False)["pixel_values"].to(self.device)
        text = self.tokenizer(captions, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_emb = F.normalize(_projected(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        text_emb = F.normalize(_projected(self.model.get_text_features(**text.to(self.device))), dim=-1)
        return (100 * (image_emb * text_emb).sum(-1)).clamp(min=0).cpu()


def _projected(output) -> torch.Tensor:
    """CLIP's projected embedding: a tensor in older transformers, the pooled output of a model output in newer."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ---- a trained model ready to sample: weights, tokenizer, text encoder -------------------------------


def resolve_device(device: str) -> torch.device:
    """auto: cuda:LOCAL_RANK where CUDA is available, else cpu; anything else as torch names it."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}")
        return torch.device("cpu")
    return torch.device(device)


@dataclass
class Sampler:
    """A StructMAR with the tokenizer and text encoder its config names, ready to sample."""

    model: nn.Module
    tokenizer: nn.Module
    text_encoder: nn.Module
    checkpoint: str
    ema: bool

    @property
    def device(self) -> torch.device:
        return self.model.fake_latent.device

    def condition(self, captions, boxes, tags, category_ids=None, image_ids=None) -> dict:
        from structmar.sample import condition_batch

        return condition_batch(self.text_encoder, captions, boxes, tags, category_ids, image_ids)

    @torch.no_grad()
    def generate(self, batch: dict, generator: torch.Generator, **sampling) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1] on the CPU, quantised to 8 bits: exactly what a PNG of them holds."""
        from structmar.sample import generate_images

        images, _ = generate_images(self.model, self.tokenizer, batch, generator=generator, **sampling)
        return (((images.float() + 1) / 2).clamp(0, 1) * 255).round().cpu() / 255


def load_sampler(checkpoint: str, clip_path: str = DEFAULT_CLIP_PATH, vae_path: str | None = None,
                 ema: bool | None = None, device: str | torch.device = "cpu") -> Sampler:
    """The model in `checkpoint` (a weights file with a model config, or a run directory holding its export).

    ema: None takes the EMA weights when the file has them, True requires them, False takes the raw weights.
    """
    from structmar.model import StructMAR, load_weights, read_weights
    from structmar.text import TextEncoder
    from structmar.tokenizer import build_tokenizer

    if os.path.isdir(checkpoint):
        from structmar.model import EXPORT

        path = os.path.join(checkpoint, EXPORT)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--checkpoint {checkpoint} is a directory without {EXPORT}")
        checkpoint = path
    weights = read_weights(checkpoint)
    if weights.config is None:
        raise ValueError(f"{checkpoint} carries no model config: pass a structmar stage export "
                         "(checkpoint-last.safetensors) or a MAR checkpoint with its args")
    use_ema = weights.ema is not None if ema is None else ema
    if use_ema and weights.ema is None:
        raise ValueError(f"{checkpoint} holds no EMA weights (model_ema); pass --no-ema")
    cfg = weights.config
    device = torch.device(device)
    model = StructMAR(cfg)
    report = load_weights(model, weights.select(use_ema))
    if report.missing:  # sampling with randomly initialised parts would look like a bad model
        raise ValueError(f"{checkpoint} lacks {len(report.missing)} of the model's weights, e.g. {report.missing[0]}")
    model = model.eval().requires_grad_(False).to(device)
    tokenizer = build_tokenizer(cfg.tokenizer, vae_path, cfg.pixel_patch).eval().to(device)
    text_encoder = TextEncoder.from_pretrained(clip_path, device=device)
    if text_encoder.dim != cfg.text_dim:
        raise ValueError(f"the CLIP text encoder in {clip_path} is {text_encoder.dim} wide but the model was trained "
                         f"on {cfg.text_dim}-wide text embeddings (pass the CLIP directory its shards were built with)")
    return Sampler(model, tokenizer, text_encoder, checkpoint, use_ema)


def _sampling(num_iter: int, cfg: float, cfg_schedule: str, temperature: float) -> dict:
    if num_iter < 1:
        raise ValueError(f"--num_iter must be >= 1, got {num_iter}")
    if temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    return dict(num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature)


def _check_box_count(gen: Sampler, count: int, where: str) -> None:
    cfg = gen.model.cfg
    if cfg.layout and count > cfg.max_objects and not cfg.truncate_boxes:
        raise ValueError(f"{where}: {count} boxes, more than the model's max_objects={cfg.max_objects}")


# ---- `structmar sample` ------------------------------------------------------------------------------


def sample_layout(gen: Sampler, spec, out: str, num_images: int = 4, batch_size: int = 16, seed: int = 0,
                  source: str = "layout", num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear",
                  temperature: float = 1.0) -> list[str]:
    """Generate `num_images` images of one LayoutSpec into `out`; returns the paths written.

    Writes {i:03d}.png (the model's resolution), {i:03d}_layout.png (boxes and tags drawn), grid_layout.png
    (all overlays) and sample.json (the spec and every setting). The same seed gives the same files.
    """
    sampling = _sampling(num_iter, cfg, cfg_schedule, temperature)
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"--num_images and --batch_size must be >= 1, got {num_images} and {batch_size}")
    _check_box_count(gen, len(spec.boxes), f"{source}: boxes")
    os.makedirs(out, exist_ok=True)
    generator = torch.Generator(device=gen.device).manual_seed(seed)
    paths, overlays = [], []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        batch = gen.condition([spec.caption] * n, [spec.boxes] * n, [spec.tags] * n)
        for i, image in enumerate(gen.generate(batch, generator, **sampling), start):
            path, layout_path = os.path.join(out, f"{i:03d}.png"), os.path.join(out, f"{i:03d}_layout.png")
            overlays.append(draw_layout(image, spec.boxes, spec.tags))
            atomic.save_image(to_pil(image), path)
            atomic.save_image(overlays[-1], layout_path)
            paths += [path, layout_path]
    grid = os.path.join(out, "grid_layout.png")
    atomic.save_image(image_grid(overlays, ncol=min(4, len(overlays))), grid)
    record = dict(caption=spec.caption, boxes=spec.boxes.tolist(), tags=spec.tags, checkpoint=gen.checkpoint,
                  weights="ema" if gen.ema else "model", seed=seed, num_images=num_images, batch_size=batch_size,
                  **sampling)
    atomic.write_text(os.path.join(out, "sample.json"), json.dumps(record, indent=2))
    return [*paths, grid, os.path.join(out, "sample.json")]


# ---- `structmar eval` --------------------------------------------------------------------------------


@dataclass
class EvalOptions:
    """What `structmar eval` runs; field names are its flags."""

    checkpoint: str
    coco_root: str
    out: str
    coco_split: str = "val2014"
    num_layouts: int = 0  # 0: every usable image of the split
    eval_detector: str = "torchvision_frcnn"
    eval_detector_path: str | None = None
    reward_detector: str | None = None
    reward_detector_path: str | None = None
    score_threshold: float = 0.05
    inception_path: str | None = None
    clip_score_path: str | None = None
    clip_path: str = DEFAULT_CLIP_PATH
    vae_path: str | None = None
    ema: bool | None = None
    num_iter: int = 64
    cfg: float = 1.0
    cfg_schedule: str = "linear"
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 16
    num_grids: int = 1  # 4x4 figure grids written
    device: str = "auto"
    gather_timeout: float = 3600.0  # seconds rank 0 waits for the other ranks' results


def _mean_se(values) -> tuple[float, float | None]:
    """Mean and its standard error (None with fewer than two values)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return 0.0, None
    return float(x.mean()), (float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None)


def _ratio_se(numerators, denominators) -> float | None:
    """Standard error of sum(y) / sum(x) over images (linearised; objects within an image are not independent)."""
    y, x = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    n, total = len(x), x.sum()
    if n < 2 or total <= 0:
        return None
    residual = y - y.sum() / total * x
    return float(math.sqrt(n / (n - 1) * np.square(residual).sum()) / total)


def bootstrap_resamples(n: int, count: int) -> list[np.ndarray]:
    """`count` seeded bootstrap draws of n image indices (a rerun reports the same standard errors)."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, n, n) for _ in range(count)]


def layout_scores(detections, layouts, image_size: tuple[int, int], categories: dict[int, str],
                  bootstrap: int = 0) -> dict:
    """reward.layout_metrics plus standard errors over images and the mean GRPO-style reward.

    AP is not a mean over images, so its standard errors (`ap_se`, `ap50_se`) come from `bootstrap`
    resamples of the images (seeded, so a rerun reports the same figures); 0 leaves them out.
    """
    from structmar.reward import RewardWeights, coco_ap, layout_rewards, per_image_matches, pooled_metrics

    resamples = bootstrap_resamples(len(layouts), bootstrap)
    ap = coco_ap(detections, layouts, image_size, categories, resamples)  # one pycocotools matching for all rows
    per = per_image_matches(detections, layouts, image_size)
    result = pooled_metrics(per, ap[0])
    if bootstrap:
        result["ap_se"], result["ap50_se"] = (float(v) for v in np.std(ap[1:, :2], axis=0, ddof=1))
    result["success_rate_se"] = _ratio_se(per["successes"], per["objects"])
    result["mean_iou_se"] = _ratio_se(per["iou_sum"], per["matched"])
    result["centroid_distance_se"] = _ratio_se(per["centroid_sum"], per["matched"])
    reward, _ = layout_rewards(detections, layouts, image_size, RewardWeights())
    result["reward"], result["reward_se"] = _mean_se(reward.numpy())
    return result


def _fingerprint(opts: EvalOptions, checkpoint: str) -> str:
    """Identifies one evaluation run, so rank 0 never merges another run's leftover results."""
    keep = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("out", "device", "gather_timeout")}
    stat = os.stat(checkpoint)
    keep["checkpoint_file"] = [stat.st_size, stat.st_mtime_ns]
    return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def _batches(num: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, list[int]]]:
    """(batch number, indices) of this rank's batches: batch j goes to rank j % world_size.

    Each batch draws from a generator seeded by its number, so results do not depend on the world size.
    """
    return [(j, list(range(s, min(s + batch_size, num))))
            for j, s in enumerate(range(0, num, batch_size)) if j % world_size == rank]


def _wait_for_parts(parts_dir: str, world_size: int, fingerprint: str, timeout: float) -> list[dict]:
    parts, deadline = [], time.monotonic() + timeout
    for r in range(world_size):
        path = os.path.join(parts_dir, f"rank{r:04d}-of-{world_size:04d}.pt")
        while True:
            if os.path.exists(path):
                part = torch.load(path, map_location="cpu", weights_only=True)
                if part["fingerprint"] == fingerprint:
                    parts.append(part)
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {r}'s results {path} did not appear within {timeout:g} s "
                                   "(did that rank fail? its log says why)")
            time.sleep(1.0)
    return parts


def _detect(detector, images: torch.Tensor) -> list[dict]:
    return [{k: v.detach().cpu() for k, v in d.items()} for d in detector(images)]


def run_eval(opts: EvalOptions, rank: int | None = None, world_size: int | None = None) -> dict | None:
    """Generate for the layouts of a COCO-format split, score, and write results.json, results.md, figures.

    Ranks (RANK / WORLD_SIZE from the environment unless given) split the batches; each writes its
    detections, Inception features and CLIP scores to <out>/parts/, and rank 0 waits for all of them,
    merges and reports. Returns the results dict on rank 0, None elsewhere.
    """
    from structmar.coco import CocoLayouts
    from structmar.reward import load_detector

    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if opts.batch_size < 1 or opts.num_layouts < 0 or opts.num_grids < 0:
        raise ValueError("--batch_size must be >= 1 and --num_layouts, --num_grids >= 0")
    sampling = _sampling(opts.num_iter, opts.cfg, opts.cfg_schedule, opts.temperature)
    started = time.monotonic()
    device = resolve_device(opts.device)
    # Everything that can fail on a bad flag or a missing file loads before any image is generated.
    gen = load_sampler(opts.checkpoint, opts.clip_path, opts.vae_path, opts.ema, device)
    mcfg = gen.model.cfg
    coco = CocoLayouts(opts.coco_root, opts.coco_split, image_size=mcfg.image_size,
                       max_objects=mcfg.max_objects if mcfg.layout and mcfg.max_objects else 16)
    layouts = coco.layouts[:opts.num_layouts or None]
    if len(layouts) < 2:
        raise ValueError(f"{opts.coco_root}/{opts.coco_split} has {len(layouts)} usable layouts; evaluation needs "
                         "at least 2 (the chance level pairs each image with another image's layout)")
    detectors = {"eval": load_detector(opts.eval_detector, opts.eval_detector_path, coco.categories, str(device),
                                       opts.score_threshold)}
    if opts.reward_detector:
        detectors["reward"] = load_detector(opts.reward_detector, opts.reward_detector_path, coco.categories,
                                            str(device), opts.score_threshold)
    inception = FIDInception.from_file(opts.inception_path, device) if opts.inception_path else None
    clip_scorer = ClipScorer(opts.clip_score_path, device) if opts.clip_score_path else None
    fingerprint = _fingerprint(opts, gen.checkpoint)

    samples_dir, parts_dir = os.path.join(opts.out, "samples"), os.path.join(opts.out, "parts")
    os.makedirs(samples_dir, exist_ok=True)
    os.makedirs(parts_dir, exist_ok=True)
    part = dict(fingerprint=fingerprint, index=[], generate_seconds=0.0,
                **{f"{kind}_{which}": [] for kind in detectors for which in ("generated", "real")},
                **{f"{name}_{which}": [] for name in ("features", "clip") for which in ("generated", "real")})
    for j, indices in _batches(len(layouts), opts.batch_size, rank, world_size):
        chosen = [layouts[i] for i in indices]
        captions = [lay.captions[0] for lay in chosen]  # the first caption (lowest annotation id)
        batch = gen.condition(captions, [lay.boxes for lay in chosen], [lay.tags for lay in chosen],
                              [lay.category_ids for lay in chosen], [lay.image_id for lay in chosen])
        t0 = time.monotonic()
        generator = torch.Generator(device=device).manual_seed(opts.seed * 1_000_003 + j)
        images = gen.generate(batch, generator, **sampling)  # (B, 3, S, S) in [0, 1]
        part["generate_seconds"] += time.monotonic() - t0
        real = torch.stack([torch.from_numpy(coco.image(lay)).permute(2, 0, 1) for lay in chosen]).float() / 255
        for i, lay, image in zip(indices, chosen, images):
            atomic.save_image(to_pil(image), os.path.join(samples_dir, f"{i:06d}_{lay.image_id}.png"))
        part["index"] += indices
        for kind, detector in detectors.items():
            part[f"{kind}_generated"] += _detect(detector, images)
            part[f"{kind}_real"] += _detect(detector, real)
        for which, pixels in (("generated", images), ("real", real)):
            if inception is not None:
                part[f"features_{which}"].append(torch.from_numpy(inception_features(inception, pixels)).float())
            if clip_scorer is not None:
                part[f"clip_{which}"].append(clip_scorer(pixels, captions))
    for key in ("features_generated", "features_real", "clip_generated", "clip_real"):
        part[key] = torch.cat(part[key]) if part[key] else None
    atomic.torch_save(part, os.path.join(parts_dir, f"rank{rank:04d}-of-{world_size:04d}.pt"))
    if rank != 0:
        return None

    parts = _wait_for_parts(parts_dir, world_size, fingerprint, opts.gather_timeout)
    merged = merge_parts(parts)
    results = _report(opts, gen, coco, layouts, detectors, merged, world_size,
                      sum(p["generate_seconds"] for p in parts))
    results["seconds_total"] = time.monotonic() - started
    atomic.write_text(os.path.join(opts.out, "results.json"), json.dumps(results, indent=2))
    atomic.write_text(os.path.join(opts.out, "results.md"), results_markdown(results))
    return results


def merge_parts(parts: list[dict]) -> dict:
    """The ranks' per-layout results (detections, features, CLIP scores) in layout order."""
    order = np.argsort(np.concatenate([p["index"] for p in parts]), kind="stable")
    merged = {}
    for key in parts[0]:
        if key in ("fingerprint", "index", "generate_seconds"):
            continue
        if key.startswith(("features", "clip")):  # None where the metric is off (or the rank had no batch)
            pieces = [p[key] for p in parts if p[key] is not None]
            merged[key] = torch.cat(pieces)[order] if pieces else None
        else:
            flat = [d for p in parts for d in p[key]]
            merged[key] = [flat[i] for i in order]
    return merged


def load_evaluation(out: str, coco_root: str | None = None) -> dict:
    """A finished evaluation in `out` (results.json and parts/): {"results", "targets", "detections",
    "categories"}, with each layout's (normalised xyxy boxes, category ids) and the evaluation detector's
    detections on its generated image, in layout order. `coco_root` overrides the recorded one."""
    from structmar.coco import CocoLayouts

    path = os.path.join(out, "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {out} is not a finished structmar eval output directory")
    with open(path) as f:
        results = json.load(f)
    world = results["world_size"]
    parts = []
    for r in range(world):
        part_path = os.path.join(out, "parts", f"rank{r:04d}-of-{world:04d}.pt")
        if not os.path.isfile(part_path):
            raise FileNotFoundError(f"{part_path} is missing: the evaluation in {out} did not finish")
        parts.append(torch.load(part_path, map_location="cpu", weights_only=True))
    if len({p["fingerprint"] for p in parts}) != 1:
        raise ValueError(f"{out}/parts holds the results of more than one evaluation; rerun structmar eval")
    root = coco_root or results["coco_root"]
    coco = CocoLayouts(root, results["coco_split"], image_size=results["image_size"],
                       max_objects=results.get("max_objects", 16))
    targets = [(lay.boxes, lay.category_ids) for lay in coco.layouts[:results["num_layouts"]]]
    if sum(len(t[0]) for t in targets) != results["num_objects"]:
        raise ValueError(f"{root}/{results['coco_split']} gives other layouts than those {out} scored "
                         f"({sum(len(t[0]) for t in targets)} objects, not {results['num_objects']})")
    return dict(results=results, targets=targets, detections=merge_parts(parts)["eval_generated"],
                categories=coco.categories)


def paired_difference(a: dict, b: dict, bootstrap: int = 100) -> dict:
    """b minus a, two evaluations (`load_evaluation`) of the same layouts, with standard errors of the paired
    difference: AP50 from `bootstrap` resamples of the layouts shared by both (seeded), the success rate and
    the reward over images. Each layout's own difficulty cancels, so a difference far smaller than either
    figure's own standard error can show: what comparing two GRPO arms, or an arm and its control, needs."""
    return paired_differences(a, [b], bootstrap)[0]


def paired_differences(a: dict, others: list[dict], bootstrap: int = 100, mean: bool = False) -> list[dict]:
    """`paired_difference(a, b)` for each b of `others`, with a's side (its AP50 on every resample, the same
    seeded resamples for each b) computed once: one baseline against many arms costs half as much.

    `mean` returns one row instead: the mean over `others` of b minus a (several seeds of one arm against
    their common start), with standard errors over the layouts, which count each layout once."""
    from structmar.reward import RewardWeights, coco_ap, layout_rewards, per_image_matches

    targets, size = a["targets"], (a["results"]["image_size"],) * 2
    for b in others:
        same = len(targets) == len(b["targets"]) and all(
            np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(targets, b["targets"]))
        if not same:
            raise ValueError("the two evaluations scored different layouts: compare evaluations of one split and "
                             "count")
        if a["results"]["image_size"] != b["results"]["image_size"]:
            raise ValueError("the two evaluations generated images of different sizes")
    n = len(targets)
    resamples = bootstrap_resamples(n, bootstrap)

    def ap50s(detections) -> np.ndarray:  # on every layout, then on each resample
        return coco_ap(detections, targets, size, a["categories"], resamples)[:, 1]

    def rewards(detections) -> np.ndarray:  # per image
        return layout_rewards(detections, targets, size, RewardWeights())[0].double().numpy()

    base_ap50, base_matches = ap50s(a["detections"]), per_image_matches(a["detections"], targets, size)
    base_rewards = rewards(a["detections"])
    counts = base_matches["objects"]
    rows = [(ap50s(b["detections"]) - base_ap50,
             per_image_matches(b["detections"], targets, size)["successes"] - base_matches["successes"],
             rewards(b["detections"]) - base_rewards) for b in others]
    if mean:
        rows = [tuple(np.mean(column, axis=0) for column in zip(*rows))]
    diffs = []
    for ap50, hits, reward_diff in rows:
        reward, reward_se = _mean_se(reward_diff)
        diffs.append(dict(num_layouts=n, ap50=float(ap50[0]),
                          ap50_se=float(np.std(ap50[1:], ddof=1)) if bootstrap > 1 else None,
                          success_rate=float(hits.sum() / counts.sum()), success_rate_se=_ratio_se(hits, counts),
                          reward=reward, reward_se=reward_se))
    return diffs


def headroom(generate, layouts, detector, categories: dict[int, str], image_size: int, samples: int,
             batch_size: int = 16) -> dict:
    """What a layout reward has left to sharpen: `samples` (K) images of each layout from `generate`, a
    callable from a list of layouts to their images (B, 3, H, W) in [0, 1].

    Per category and over all objects: the share of objects in their box with their category (IoU >= 0.5)
    averaged over the K samples (pass@1) and the share found in at least one of them (pass@K); and the layout
    reward's mean, its best of K per layout (what best-of-group fits) and its standard deviation within a
    layout's K samples (what group-normalised advantages divide by). GRPO and best-of-group can at most move
    pass@1 toward pass@K: where the two are equal, every sample of a layout agrees and a reward ranks nothing.
    """
    from structmar.reward import RewardWeights, layout_rewards, match_layout

    size = (image_size, image_size)
    hits: dict[str, list[np.ndarray]] = {}  # category -> per object: success in each of the K samples
    rewards = []  # per layout: (K,)
    for start in range(0, len(layouts), batch_size):
        chosen = layouts[start:start + batch_size]
        repeated = [lay for lay in chosen for _ in range(samples)]  # each layout's K samples side by side
        detections = _detect(detector, generate(repeated))
        targets = [(lay.boxes, np.asarray(lay.category_ids)) for lay in repeated]
        reward, _ = layout_rewards(detections, targets, size, RewardWeights())
        rewards += list(reward.double().numpy().reshape(len(chosen), samples))
        for i, lay in enumerate(chosen):
            target = targets[i * samples]
            success = np.stack([match_layout(detections[i * samples + j], *target, size).iou >= 0.5
                                for j in range(samples)])  # (K, objects)
            for obj, category in enumerate(lay.category_ids):
                hits.setdefault(categories[int(category)], []).append(success[:, obj])

    def shares(rows: list[np.ndarray]) -> dict:
        table = np.stack(rows)  # (objects, K)
        return dict(objects=len(table), pass1=float(table.mean()), passk=float(table.any(1).mean()))

    per_layout = np.stack(rewards)  # (layouts, K)
    return dict(layouts=len(layouts), samples=samples, all=shares([r for v in hits.values() for r in v]),
                reward_mean=float(per_layout.mean()), reward_best_of_k=float(per_layout.max(1).mean()),
                reward_std_within=float(per_layout.std(1).mean()),
                by_category={name: shares(v) for name, v in sorted(hits.items())})


def _report(opts, gen, coco, layouts, detectors, merged, world_size, generate_seconds) -> dict:
    size = (gen.model.cfg.image_size, gen.model.cfg.image_size)
    targets = [(lay.boxes, lay.category_ids) for lay in layouts]
    mismatched = targets[1:] + targets[:1]  # each real image against the next image's layout
    notes = []
    layout = {}
    for kind in detectors:
        layout[kind] = dict(
            generated=layout_scores(merged[f"{kind}_generated"], targets, size, coco.categories,
                                    bootstrap=AP_BOOTSTRAP),
            real=layout_scores(merged[f"{kind}_real"], targets, size, coco.categories),
            mismatched=layout_scores(merged[f"{kind}_real"], mismatched, size, coco.categories),
        )
        layout[kind]["position"] = _position(layout[kind])
    detector_info = {"eval": dict(kind=opts.eval_detector, path=opts.eval_detector_path)}
    if opts.reward_detector:
        detector_info["reward"] = dict(kind=opts.reward_detector, path=opts.reward_detector_path)
        if (opts.reward_detector, opts.reward_detector_path) == (opts.eval_detector, opts.eval_detector_path):
            notes.append("the evaluation detector is the reward detector: scores of an RL-tuned model may be "
                         "inflated by reward hacking")
    else:
        notes.append("no --reward_detector: only the evaluation detector's scores are reported")

    fid = None
    if merged["features_generated"] is not None:
        fid = dict(value=frechet_distance(merged["features_generated"].double().numpy(),
                                          merged["features_real"].double().numpy()),
                   num_generated=len(layouts), num_real=len(layouts), inception_path=opts.inception_path)
        if len(layouts) < 2048:
            notes.append(f"FID over {len(layouts)} images is biased upwards; compare only at equal counts "
                         "(papers use 10k-30k)")
    else:
        notes.append("FID skipped: no --inception_path")
    clip = None
    if merged["clip_generated"] is not None:
        clip = {which: dict(zip(("mean", "se"), _mean_se(merged[f"clip_{which}"].numpy())))
                for which in ("generated", "real")}
        clip["path"] = opts.clip_score_path
    else:
        notes.append("CLIP score skipped: no --clip_score_path")

    figures = _write_figures(opts, coco, layouts)
    return dict(
        checkpoint=gen.checkpoint, weights="ema" if gen.ema else "model", coco_root=opts.coco_root,
        coco_split=opts.coco_split, num_layouts=len(layouts), max_objects=coco.max_objects,
        num_objects=int(sum(len(t[0]) for t in targets)),
        image_size=size[0], caption="first caption of each image",
        sampling=dict(num_iter=opts.num_iter, cfg=opts.cfg, cfg_schedule=opts.cfg_schedule,
                      temperature=opts.temperature, seed=opts.seed, batch_size=opts.batch_size),
        world_size=world_size, detectors=detector_info, layout=layout, fid=fid, clip_score=clip,
        figures=figures, notes=notes, seconds_generating=generate_seconds,
        seconds_per_image=generate_seconds / len(layouts),
    )


POSITION_METRICS = ("ap50", "success_rate", "reward")
AP_BOOTSTRAP = 100  # resamples behind the generated images' AP standard errors (one matching, 100 poolings)


def _position(block: dict) -> dict:
    """Where the generated images sit between chance (0: real images, mismatched layouts) and the ceiling (1)."""
    out = {}
    for key in POSITION_METRICS:
        g, r, c = block["generated"][key], block["real"][key], block["mismatched"][key]
        out[key] = (g - c) / (r - c) if r - c > 1e-9 else None
    return out


def _write_figures(opts: EvalOptions, coco, layouts) -> list[str]:
    """4x4 grids of generated and real images with the layouts drawn over them."""
    written = []
    os.makedirs(os.path.join(opts.out, "figures"), exist_ok=True)
    for k in range(opts.num_grids):
        chosen = list(enumerate(layouts))[16 * k:16 * (k + 1)]
        if not chosen:
            break
        generated, real = [], []
        for i, lay in chosen:
            with Image.open(os.path.join(opts.out, "samples", f"{i:06d}_{lay.image_id}.png")) as im:
                generated.append(draw_layout(np.asarray(im.convert("RGB")), lay.boxes, lay.tags))
            real.append(draw_layout(coco.image(lay), lay.boxes, lay.tags))
        for name, tiles in (("generated", generated), ("real", real)):
            path = os.path.join(opts.out, "figures", f"{name}_{k:02d}.png")
            atomic.save_image(image_grid(tiles, ncol=4), path)
            written.append(path)
    return written


def _fmt(value, se=None, digits: int = 3) -> str:
    text = f"{value:.{digits}f}"
    return f"{text} ± {se:.{digits}f}" if se is not None else text


def results_markdown(results: dict) -> str:
    """results.json as a markdown report: one layout-fidelity table per detector, then FID and CLIP score."""
    s = results["sampling"]
    lines = [
        f"# structmar eval: {results['coco_split']}",
        "",
        f"{results['num_layouts']} layouts ({results['num_objects']} objects) at {results['image_size']} px; "
        f"checkpoint `{results['checkpoint']}` ({results['weights']} weights); num_iter {s['num_iter']}, "
        f"cfg {s['cfg']} ({s['cfg_schedule']}), temperature {s['temperature']}, seed {s['seed']}; "
        f"{results['seconds_per_image']:.3f} s per generated image.",
        "",
    ]
    rows = (("AP", "ap", "ap_se"), ("AP50", "ap50", "ap50_se"), ("AP75", "ap75", None),
            ("success rate (IoU >= 0.5)", "success_rate", "success_rate_se"),
            ("mean IoU (matched)", "mean_iou", "mean_iou_se"),
            ("centroid distance (matched)", "centroid_distance", "centroid_distance_se"),
            ("reward (default weights)", "reward", "reward_se"))
    for kind, block in results["layout"].items():
        det = results["detectors"][kind]
        lines += [f"## Layout fidelity, {kind} detector ({det['kind']}{', ' + det['path'] if det['path'] else ''})",
                  "", "| metric | generated | real images (ceiling) | real, mismatched layouts (chance) |",
                  "|---|---|---|---|"]
        for label, key, se in rows:
            cells = [_fmt(block[w][key], block[w].get(se) if se else None) for w in ("generated", "real",
                                                                                      "mismatched")]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        placed = [f"{key} {v:.2f}" for key, v in block["position"].items() if v is not None]
        lines += ["", "Generated images between chance (0) and the real-image ceiling (1): " + ", ".join(placed)
                  if placed else "The real-image ceiling does not beat chance: no position to report.", ""]
    lines.append("## Image quality")
    lines.append("")
    fid = results["fid"]
    lines.append(f"- FID (generated vs real, {fid['num_generated']} images): {fid['value']:.2f}" if fid
                 else "- FID: skipped")
    clip = results["clip_score"]
    if clip:
        lines.append(f"- CLIP score: generated {_fmt(clip['generated']['mean'], clip['generated']['se'], 2)}, "
                     f"real {_fmt(clip['real']['mean'], clip['real']['se'], 2)}")
    else:
        lines.append("- CLIP score: skipped")
    lines += ["", f"± is one standard error over images; for AP and AP50, which COCOeval pools over all images, "
                  f"from {AP_BOOTSTRAP} bootstrap resamples of the layouts.", ""]
    if results["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    if results["figures"]:
        lines += ["## Figures", ""] + [f"- `{os.path.basename(p)}`" for p in results["figures"]] + [""]
    return "\n".join(lines)
