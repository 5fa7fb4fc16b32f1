"""Image tokenizers: MAR's KL-16 VAE (`kl16.ckpt`) and a weight-free RGB patch tokenizer.

Both map images in [-1, 1] of shape (B, 3, S, S) to posterior moments (B, 2C, g, g) (mean then
logvar) and scaled latents (B, C, g, g) back to images. Shards cache moments, not samples: the
loader draws a fresh posterior sample every step with `sample_posterior`, as MAR does.

This module is the one place that knows each tokenizer's latent scale (`LATENT_SCALES`).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from structmar import atomic

# Multiplying a posterior sample by the scale gives latents of roughly unit std (MAR's value for kl16).
LATENT_SCALES = {"kl16": 0.2325, "pixel": 1.0}

# The pixel tokenizer is deterministic: a logvar this low gives std exp(-15) ~ 3e-7.
PIXEL_LOGVAR = -30.0

# MAR's kl16.ckpt architecture (LDM KL autoencoder); `ch` is read from the checkpoint so a tiny
# random-init file in the same format loads too.
KL16_ARCH = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16, resolution=256,
                 encoder_attn_resolutions=(16,))

# Training-only entries LDM checkpoints may carry (discriminator, LPIPS): skipped on load.
KL16_SKIP_PREFIXES = ("loss.",)


def latent_scale(name: str) -> float:
    """The factor that turns tokenizer `name`'s posterior samples into model latents."""
    if name not in LATENT_SCALES:
        raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(LATENT_SCALES)}")
    return LATENT_SCALES[name]


def sample_posterior(moments: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A posterior sample times `scale`: (B, 2C, g, g) moments -> (B, C, g, g) float32 latents."""
    moments = moments.float()
    mean, logvar = moments.chunk(2, dim=1)
    # Same clamp as the LDM posterior, so cached moments behave exactly like a live encoder's.
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * scale


# ---- KL-16 VAE (the module and key layout of MAR's kl16.ckpt) ------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the spatial positions, with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (conv(hn).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # (B, HW, C)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        out = out.transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric (right/bottom) padding, as the checkpoint was trained with.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: `block` ResnetBlocks, optional `attn` after each, optional resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple, num_res_blocks: int, z_channels: int, resolution: int,
                 attn_resolutions: tuple):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_mult = (1,) + tuple(ch_mult)
        res, block_in = resolution, ch
        for level, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_mult[level], ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            down = _Level(blocks, attns)
            if level != len(ch_mult) - 1:
                down.downsample = Downsample(block_in)
                res //= 2
            self.down.append(down)
        self.mid = _Mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple, num_res_blocks: int, z_channels: int):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in)
        ups: list[_Level] = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            up = _Level(blocks, [])  # the decoder attends only in its middle block
            if level != 0:
                up.upsample = Upsample(block_in)
            ups.insert(0, up)  # stored lowest level first, as in the checkpoint
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class KLTokenizer(nn.Module):
    """MAR's KL-16 VAE: stride 16, 16 latent channels, latents scaled by 0.2325."""

    name = "kl16"

    def __init__(self, ch: int = KL16_ARCH["ch"]):
        super().__init__()
        a = KL16_ARCH
        self.ch = ch
        self.channels = a["z_channels"]
        self.stride = 2 ** (len(a["ch_mult"]) - 1)
        self.scale = latent_scale(self.name)
        self.encoder = Encoder(ch, a["ch_mult"], a["num_res_blocks"], a["z_channels"], a["resolution"],
                               a["encoder_attn_resolutions"])
        self.decoder = Decoder(ch, a["ch_mult"], a["num_res_blocks"], a["z_channels"])
        self.quant_conv = nn.Conv2d(2 * a["z_channels"], 2 * a["z_channels"], 1)
        self.post_quant_conv = nn.Conv2d(a["z_channels"], a["z_channels"], 1)

    @property
    def id(self) -> str:
        return "kl16" if self.ch == KL16_ARCH["ch"] else f"kl16-ch{self.ch}"

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> moments (B, 32, S/16, S/16): mean then logvar."""
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 16, g, g) -> images (B, 3, 16g, 16g) in [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents / self.scale)).clamp(-1.0, 1.0)

    @classmethod
    def from_checkpoint(cls, path: str) -> KLTokenizer:
        """Load a `{"model": state_dict}` file (MAR's kl16.ckpt format) with strict key checking."""
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"KL-16 VAE checkpoint {path} not found; download MAR's kl16.ckpt "
                "(https://huggingface.co/jadechoghari/mar, file kl16.ckpt) and pass --vae_path"
            )
        from structmar.files import load_torch_pickle

        ckpt = load_torch_pickle(path, "KL-16 VAE checkpoint")
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise ValueError(f"{path}: expected a dict with a 'model' entry (MAR's kl16.ckpt format)")
        state = ckpt["model"]
        if "encoder.conv_in.weight" not in state:
            raise ValueError(f"{path}: no 'encoder.conv_in.weight'; not a KL-16 VAE state dict")
        model = cls(ch=int(state["encoder.conv_in.weight"].shape[0]))
        report = model.load_checkpoint_state(state, source=path)
        model.load_report = report
        return model.eval()

    def load_checkpoint_state(self, state: dict, source: str = "state dict") -> dict:
        """Copy `state` into this module; raise on any missing, unexpected or mis-shaped key.

        Returns {"skipped": [...]} naming the training-only keys (prefixes `KL16_SKIP_PREFIXES`) that were ignored.
        """
        skipped = sorted(k for k in state if k.startswith(KL16_SKIP_PREFIXES))
        state = {k: v for k, v in state.items() if not k.startswith(KL16_SKIP_PREFIXES)}
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:5])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:5])})")
        if shapes:
            problems.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
        if problems:
            raise ValueError(f"{source}: not a KL-16 VAE checkpoint: " + "; ".join(problems))
        self.load_state_dict(state, strict=True)
        if skipped:
            print(f"structmar: {source}: skipped {len(skipped)} training-only keys with prefix "
                  f"{'/'.join(KL16_SKIP_PREFIXES)} (e.g. {skipped[0]})")
        return {"skipped": skipped}


def write_random_kl16(path: str, seed: int = 0, ch: int = 32, extra_loss_keys: bool = True) -> None:
    """Write a random-init KL-16 VAE in kl16.ckpt's format ({"model": state_dict}) for tests and demos.

    Only tests call it, but it stays beside the loader: it writes the key layout `build_tokenizer` reads.

    `ch` 32 (the smallest GroupNorm-compatible width) runs in seconds on a CPU; `extra_loss_keys` adds
    `loss.*` entries like a real LDM checkpoint's.
    """
    torch.manual_seed(seed)
    state = KLTokenizer(ch=ch).state_dict()
    if extra_loss_keys:
        state["loss.logvar"] = torch.zeros(())
        state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic.torch_save({"model": state}, path)


# ---- pixel tokenizer ------------------------------------------------------------------------------


class PixelTokenizer(nn.Module):
    """RGB patches as tokens: channel order (rgb, row in patch, column in patch); deterministic, no weights."""

    name = "pixel"

    def __init__(self, patch: int = 4):
        super().__init__()
        if patch < 1:
            raise ValueError(f"pixel patch must be >= 1, got {patch}")
        self.patch = patch
        self.channels = 3 * patch * patch
        self.stride = patch
        self.scale = latent_scale(self.name)

    @property
    def id(self) -> str:
        return f"pixel-p{self.patch}"

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> moments (B, 2 * 3p^2, S/p, S/p): the patch values, then a constant logvar."""
        b, c, h, w = images.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the pixel patch {p}")
        x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)  # (B, 3, p, p, g, g)
        mean = x.reshape(b, c * p * p, h // p, w // p)
        return torch.cat([mean, torch.full_like(mean, PIXEL_LOGVAR)], dim=1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 3p^2, g, g) -> images (B, 3, gp, gp) in [-1, 1]."""
        b, _, gh, gw = latents.shape
        p = self.patch
        x = (latents / self.scale).reshape(b, 3, p, p, gh, gw).permute(0, 1, 4, 2, 5, 3)  # (B, 3, g, p, g, p)
        return x.reshape(b, 3, gh * p, gw * p).clamp(-1.0, 1.0)


DEFAULT_VAE_PATH = "pretrained_models/vae/kl16.ckpt"  # where MAR's download script puts kl16.ckpt


def vae_path_for(flag: str | None, trained_with=None) -> str:
    """The kl16.ckpt to use: --vae_path when given, else the one a model was trained with (`trained_with`, a
    stage export's `model.TrainedWith`), else DEFAULT_VAE_PATH."""
    recorded = trained_with.tokenizer.get("path") if trained_with is not None else None
    return flag or recorded or DEFAULT_VAE_PATH


def build_tokenizer(name: str, vae_path: str | None = None, pixel_patch: int = 4) -> nn.Module:
    """`kl16` (needs `vae_path`, MAR's kl16.ckpt) or `pixel` (weight-free patches of `pixel_patch` px)."""
    if name == "kl16":
        if not vae_path:
            raise ValueError("the kl16 tokenizer needs --vae_path (MAR's kl16.ckpt)")
        return KLTokenizer.from_checkpoint(vae_path)
    if name == "pixel":
        return PixelTokenizer(pixel_patch)
    raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(LATENT_SCALES)}")


def latent_shape(name: str, image_size: int, pixel_patch: int = 4) -> tuple[int, int, int]:
    """(C, g, g) of tokenizer `name` at `image_size` without building it."""
    stride = 2 ** (len(KL16_ARCH["ch_mult"]) - 1) if name == "kl16" else pixel_patch
    channels = KL16_ARCH["z_channels"] if name == "kl16" else 3 * pixel_patch**2
    latent_scale(name)
    if image_size % stride:
        raise ValueError(f"image_size {image_size} is not a multiple of the {name} stride {stride}")
    return channels, image_size // stride, image_size // stride

