"""A trained model ready to sample, and `structmar sample`: one layout spec -> PNGs and layout overlays.

`load_sampler` reads a stage export (or the run directory holding one) and builds the StructMAR, the
tokenizer and the CLIP text encoder it was trained with (the files its export records, unless the caller
names others), with the dataset's category names; `Sampler` turns captions and layouts into images with
`structmar.sample`'s generation. `structmar eval` loads its model the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from structmar import atomic
from structmar.config import SamplingConfig
from structmar.figures import draw_layout, image_grid, to_pil
from structmar.sample import condition_batch, generate_images

DEFAULT_CLIP_PATH = "pretrained_models/clip-vit-base-patch32"  # where the README puts the CLIP text encoder


def resolve_device(device: str) -> torch.device:
    """auto: cuda:LOCAL_RANK where CUDA is available, else cpu; anything else as torch names it."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}")
        return torch.device("cpu")
    return torch.device(device)


@dataclass
class Sampler:
    """A StructMAR with the tokenizer and text encoder it was trained with, ready to sample; `categories` are the
    category names of its training set (id -> name; empty when the weights file does not record them)."""

    model: nn.Module
    tokenizer: nn.Module
    text_encoder: nn.Module
    checkpoint: str
    ema: bool
    categories: dict[int, str] = dataclasses.field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.model.fake_latent.device

    def condition(self, captions, boxes, tags, category_ids=None, image_ids=None) -> dict:
        return condition_batch(self.text_encoder, captions, boxes, tags, category_ids, image_ids)

    @torch.no_grad()
    def generate(self, batch: dict, generator: torch.Generator, sampling: SamplingConfig) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1] on the CPU, quantised to 8 bits: exactly what a PNG of them holds."""
        images, _ = generate_images(self.model, self.tokenizer, batch, generator=generator, num_iter=sampling.num_iter,
                                    guidance=sampling.cfg, cfg_schedule=sampling.cfg_schedule,
                                    temperature=sampling.temperature)
        return (((images.float() + 1) / 2).clamp(0, 1) * 255).round().cpu() / 255


def _text_encoder_path(checkpoint: str, trained_with, clip_path: str | None) -> str:
    """The CLIP directory to load: `clip_path` when given, else the one the export records, else
    DEFAULT_CLIP_PATH; refused when its weights are not the ones the model was trained with."""
    from structmar.files import weights_sha256

    if trained_with is None:
        return clip_path or DEFAULT_CLIP_PATH
    recorded = trained_with.text_encoder
    path = clip_path or recorded["path"] or DEFAULT_CLIP_PATH  # the shards' build may not have recorded it
    if not os.path.isdir(path):
        where = f"--clip_path {path}" if clip_path else f"its text encoder {path}"
        raise FileNotFoundError(f"{checkpoint} was trained with the text encoder {recorded['id']}, but {where} is "
                                "not there; pass --clip_path with a copy of it")
    if recorded["sha256"]:
        trained_with.check_text_encoder(dict(id=recorded["id"], path=path, sha256=weights_sha256(path)), checkpoint,
                                        "--clip_path gives" if clip_path else "its directory now holds")
    return path


def load_sampler(checkpoint: str, clip_path: str | None = None, vae_path: str | None = None,
                 ema: bool | None = None, device: str | torch.device = "cpu") -> Sampler:
    """Everything needed to sample the model in `checkpoint` (a weights file with a model config, or a run
    directory holding its export): the model, its tokenizer and text encoder, its category names.

    clip_path / vae_path: None takes the ones a stage export records (else DEFAULT_CLIP_PATH /
    tokenizer.DEFAULT_VAE_PATH); a CLIP directory other than the one the model was trained with is refused.
    ema: None takes the EMA weights when the file has them, True requires them, False takes the raw weights.
    """
    from structmar.model import StructMAR, load_weights, read_weights, weights_file
    from structmar.text import TextEncoder
    from structmar.tokenizer import build_tokenizer, vae_path_for

    checkpoint = weights_file(checkpoint, "--checkpoint")
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
    clip_path = _text_encoder_path(checkpoint, weights.trained_with, clip_path)
    model = model.eval().requires_grad_(False).to(device)
    vae_path = vae_path_for(vae_path, weights.trained_with) if cfg.tokenizer == "kl16" else None
    tokenizer = build_tokenizer(cfg.tokenizer, vae_path, cfg.pixel_patch).eval().to(device)
    text_encoder = TextEncoder.from_pretrained(clip_path, device=device)
    if text_encoder.dim != cfg.text_dim:
        raise ValueError(f"the CLIP text encoder in {clip_path} is {text_encoder.dim} wide but the model was trained "
                         f"on {cfg.text_dim}-wide text embeddings (pass the CLIP directory its shards were built with)")
    categories = weights.trained_with.categories if weights.trained_with else {}
    return Sampler(model, tokenizer, text_encoder, checkpoint, use_ema, categories)


def checked_sampling(sampling: SamplingConfig) -> SamplingConfig:
    """`sampling.validate()`, its errors naming the flag: each knob's field name is its flag's."""
    try:
        return sampling.validate()
    except ValueError as e:
        raise ValueError(f"--{e}") from None


def _check_box_count(gen: Sampler, count: int, where: str) -> None:
    cfg = gen.model.cfg
    if cfg.layout and count > cfg.max_objects and not cfg.truncate_boxes:
        raise ValueError(f"{where}: {count} boxes, more than the model's max_objects={cfg.max_objects}")


# ---- `structmar sample` ------------------------------------------------------------------------------


def sample_layout(gen: Sampler, spec, out: str, sampling: SamplingConfig | None = None, num_images: int = 4,
                  batch_size: int = 16, seed: int = 0, source: str = "layout") -> list[str]:
    """Generate `num_images` images of one LayoutSpec into `out`; returns the paths written.

    Writes {i:03d}.png (the model's resolution), {i:03d}_layout.png (boxes and tags drawn), grid_layout.png
    (all overlays) and sample.json (the spec and every setting). The same seed gives the same files.
    """
    sampling = checked_sampling(sampling or SamplingConfig())
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"--num_images and --batch_size must be >= 1, got {num_images} and {batch_size}")
    _check_box_count(gen, len(spec.boxes), f"{source}: boxes")
    os.makedirs(out, exist_ok=True)
    generator = torch.Generator(device=gen.device).manual_seed(seed)
    paths, overlays = [], []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        batch = gen.condition([spec.caption] * n, [spec.boxes] * n, [spec.tags] * n)
        for i, image in enumerate(gen.generate(batch, generator, sampling), start):
            path, layout_path = os.path.join(out, f"{i:03d}.png"), os.path.join(out, f"{i:03d}_layout.png")
            overlays.append(draw_layout(image, spec.boxes, spec.tags))
            atomic.save_image(to_pil(image), path)
            atomic.save_image(overlays[-1], layout_path)
            paths += [path, layout_path]
    grid = os.path.join(out, "grid_layout.png")
    atomic.save_image(image_grid(overlays, ncol=min(4, len(overlays))), grid)
    record = dict(caption=spec.caption, boxes=spec.boxes.tolist(), tags=spec.tags, checkpoint=gen.checkpoint,
                  weights="ema" if gen.ema else "model", seed=seed, num_images=num_images, batch_size=batch_size,
                  **dataclasses.asdict(sampling))
    atomic.write_text(os.path.join(out, "sample.json"), json.dumps(record, indent=2))
    return [*paths, grid, os.path.join(out, "sample.json")]
