"""Typed configuration: one default per knob, named presets, and the mapping from the paper's flags.

A `ModelConfig` is saved in every checkpoint and shard manifest and is the only thing needed to
rebuild a model. Presets name the published MAR shapes plus small CPU sizes; the paper's
`--diffloss_d/--diffloss_w` override the diffusion head of a preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Tokenizers: name -> (latent channels per token, pixels per token side).
# kl16 is MAR's KL-16 VAE (16 channels, stride 16); pixel is a weight-free RGB patch tokenizer
# whose token is one patch (3 * patch * patch channels).
TOKENIZERS = ("kl16", "pixel")

ATTENTION_BACKENDS = ("auto", "sdpa", "flex")
LAYOUT_BIAS_MODES = ("none", "soft", "hard")


@dataclass
class ModelConfig:
    """Everything that fixes a StructMAR's parameters and forward semantics."""

    preset: str = "tiny"

    # Tokens: the model sees a (token_channels, image_size/token_stride, ...) latent grid.
    tokenizer: str = "pixel"
    image_size: int = 32
    pixel_patch: int = 4  # pixel tokenizer only: patch side in pixels

    # MAR backbone
    width: int = 64
    encoder_depth: int = 2
    decoder_depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    buffer_size: int = 64
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    mask_ratio_min: float = 0.7
    grad_checkpointing: bool = False

    # Per-token diffusion head
    diffusion_depth: int = 2
    diffusion_width: int = 128
    diffusion_batch_mul: int = 4
    num_sampling_steps: int = 100

    # StructMAR additions (all off = numerically MAR)
    rope: bool = True
    layout: bool = True
    layout_bias: str = "soft"  # none | soft (learnable per-head -lambda) | hard (-inf)
    layout_bias_init: float = 2.0  # initial lambda of the soft bias
    text: bool = True
    text_dim: int = 512  # CLIP ViT-B/32 text hidden size
    max_objects: int = 16  # layout tokens; buffer slot 0 holds the pooled caption
    label_drop_prob: float = 0.1

    attention: str = "auto"  # auto: flex on CUDA, sdpa elsewhere

    # ---- derived -------------------------------------------------------------------------
    @property
    def token_stride(self) -> int:
        return 16 if self.tokenizer == "kl16" else self.pixel_patch

    @property
    def token_channels(self) -> int:
        return 16 if self.tokenizer == "kl16" else 3 * self.pixel_patch**2

    @property
    def grid_size(self) -> int:
        return self.image_size // self.token_stride

    @property
    def seq_len(self) -> int:
        return self.grid_size**2

    def validate(self) -> ModelConfig:
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer {self.tokenizer!r} is not one of {TOKENIZERS}")
        if self.image_size % self.token_stride:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the {self.tokenizer} stride {self.token_stride}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.rope and (self.width // self.num_heads) % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {self.width // self.num_heads}")
        if not 0 <= self.max_objects < self.buffer_size:
            raise ValueError(f"max_objects {self.max_objects} must lie in [0, {self.buffer_size - 1}]")
        if self.layout_bias not in LAYOUT_BIAS_MODES:
            raise ValueError(f"layout_bias {self.layout_bias!r} is not one of {LAYOUT_BIAS_MODES}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention {self.attention!r} is not one of {ATTENTION_BACKENDS}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}")
        return cls(**d).validate()


# Published MAR shapes (LTH14/mar) and small CPU sizes. kl16 at 256 px gives a 16x16 grid.
_MAR = dict(tokenizer="kl16", image_size=256)
PRESETS: dict[str, dict] = {
    "tiny": dict(width=64, encoder_depth=2, decoder_depth=2, num_heads=4, diffusion_depth=2, diffusion_width=128),
    "small": dict(width=128, encoder_depth=2, decoder_depth=2, num_heads=4, diffusion_depth=3, diffusion_width=256),
    "mar_base": dict(_MAR, width=768, encoder_depth=12, decoder_depth=12, num_heads=12,
                     diffusion_depth=6, diffusion_width=1024),
    "mar_large": dict(_MAR, width=1024, encoder_depth=16, decoder_depth=16, num_heads=16,
                      diffusion_depth=8, diffusion_width=1280),
    "mar_huge": dict(_MAR, width=1280, encoder_depth=20, decoder_depth=20, num_heads=16,
                     diffusion_depth=12, diffusion_width=1536),
}


def model_config(preset: str, **overrides) -> ModelConfig:
    """The preset's config with `overrides` applied (None values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known presets: {', '.join(PRESETS)}")
    values = dict(PRESETS[preset], preset=preset)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**values).validate()

