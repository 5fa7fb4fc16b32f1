"""StructMAR: MAR's masked autoregressive backbone with 2D RoPE, layout tokens + layout-guided attention
bias, and gated text cross-attention; plus reading and loading MAR's official weights.

Reads top-down: masking helpers, the layout embedder, attention / MLP parts, the block, the model,
then weights I/O and parameter counts.

Buffer (MAR's 64 slots before the image tokens): slot 0 holds the projected pooled caption, slots
1..K one layout token per box, every other slot the null condition. MAR fills all 64 slots with the
class embedding and uses `fake_latent` as the unconditional one; structmar keeps that parameter (same
name, same role) as its null condition: it fills unused slots, and replaces the text slot and every
layout slot when the condition is dropped (CFG's unconditional branch). So MAR's weights give a
structmar whose unconditional branch is exactly MAR's unconditional model, and with rope/layout/text
all off structmar's forward is numerically MAR's with the class label dropped. `class_emb` has no
counterpart and is reported as unexpected on load.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from structmar import atomic
from structmar.attention import (
    BOX,
    IMAGE,
    NULL,
    TEXT,
    LayoutBias,
    TokenTable,
    apply_rope,
    cell_ranges,
    rope_table,
    select_attention,
)
from structmar.config import PRESETS, ModelConfig, model_config
from structmar.diffusion import DiffLoss

# ---------------------------------------------------------------------------------------------
# Masking (torch RNG only)
# ---------------------------------------------------------------------------------------------


def _forward_attention_kernels():
    """torch.utils.checkpoint's context_fn: the recomputation in backward runs with the SDPA kernels the forward
    ran with. GRPO selects the math kernel around its forward only (--math_attention); a block recomputed with
    other kernels saves other tensors, which checkpoint refuses (and would give other values)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = torch.backends.cuda  # SDPA's backend switches, which CPU kernels follow too
    switches = ((SDPBackend.FLASH_ATTENTION, b.flash_sdp_enabled()), (SDPBackend.MATH, b.math_sdp_enabled()),
                (SDPBackend.EFFICIENT_ATTENTION, b.mem_efficient_sdp_enabled()),
                (SDPBackend.CUDNN_ATTENTION, b.cudnn_sdp_enabled()))
    enabled = [k for k, on in switches if on]
    return contextlib.nullcontext(), sdpa_kernel(enabled)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, g, g) -> (B, g*g, C), row-major tokens."""
    return latents.flatten(2).transpose(1, 2)


def unpatchify(tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
    """(B, g*g, C) -> (B, C, g, g)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid_size, grid_size)


def sample_mask_ratio(min_ratio: float, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One mask ratio from the normal centred at 1.0 (std 0.25) truncated to [min_ratio, 1], by inverse CDF."""
    lo = torch.special.ndtr(torch.tensor((min_ratio - 1.0) / 0.25, dtype=torch.float64))
    u = torch.rand(1, generator=generator, device=device, dtype=torch.float64).cpu()
    return 1.0 + 0.25 * torch.special.ndtri(lo + u * (0.5 - lo))  # ndtr(0) = 0.5 is the upper bound's CDF


def sample_orders(batch_size: int, seq_len: int, device=None, generator: torch.Generator | None = None):
    """A uniformly random generation order per image: (B, L) long."""
    return torch.argsort(torch.rand(batch_size, seq_len, generator=generator, device=device), dim=1)


def mask_by_order(num_masked: int, orders: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: True at the first `num_masked` positions of each order."""
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter(1, orders[:, :num_masked], True)


def _validate_boxes(boxes: torch.Tensor, box_mask: torch.Tensor, max_objects: int, truncate: bool) -> None:
    bad = box_mask & (((boxes < 0) | (boxes > 1)).any(-1) | (boxes[..., 2] < boxes[..., 0])
                      | (boxes[..., 3] < boxes[..., 1]))
    if bad.any():
        b, k = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"box {k} of sample {b} is {boxes[b, k].tolist()}: boxes must be xyxy in [0, 1] "
                         "with x0 <= x1 and y0 <= y1")
    counts = box_mask.sum(1)
    if counts.numel() and int(counts.max()) > max_objects and not truncate:
        b = int(counts.argmax())
        raise ValueError(f"sample {b} has {int(counts[b])} boxes, more than max_objects={max_objects} "
                         "(set truncate_boxes to keep the largest)")


def check_boxes(boxes: torch.Tensor, box_mask: torch.Tensor, max_objects: int, truncate: bool):
    """Validate real boxes (inside [0, 1], x0 <= x1, y0 <= y1) and fit them into `max_objects` slots.

    Returns an index (B, K') into the box dim, real boxes first (largest first when truncating).
    Meta tensors (a FLOP count, tools/cost.py) hold no values: the checks, host syncs, are skipped for them."""
    if not boxes.is_meta:
        _validate_boxes(boxes, box_mask, max_objects, truncate)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    key = box_mask.float() * (2.0 + area) if truncate else box_mask.float()
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    return order[:, :max_objects]


# ---------------------------------------------------------------------------------------------
# Layout tokens
# ---------------------------------------------------------------------------------------------


class LayoutEmbedder(nn.Module):
    """One token per box: MLP(Fourier features of xyxy) + MLP(tag text embedding)."""

    def __init__(self, width: int, text_dim: int, num_bands: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_bands, dtype=torch.float32), persistent=False)
        fourier_dim = 4 * (2 * num_bands + 1)
        self.box_mlp = nn.Sequential(nn.Linear(fourier_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.tag_mlp = nn.Sequential(nn.Linear(text_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, boxes: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        angles = boxes.float().unsqueeze(-1) * self.freqs  # (B, K, 4, bands)
        fourier = torch.cat([boxes.float().unsqueeze(-1), angles.sin(), angles.cos()], -1).flatten(2)
        fourier = fourier.to(self.box_mlp[0].weight.dtype)  # (B, K, 4 * (2 bands + 1))
        return self.box_mlp(fourier) + self.tag_mlp(tags.to(fourier.dtype))  # (B, K, W)


# ---------------------------------------------------------------------------------------------
# Attention, MLP, block
# ---------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What every block of one pass shares: per-token RoPE, the layout bias rule, the text keys."""

    sin: torch.Tensor | None = None  # (B, N, head_dim)
    cos: torch.Tensor | None = None
    bias: LayoutBias | None = None
    text: torch.Tensor | None = None  # (B, 1 + L_text, text_dim), slot 0 the always-valid null text token
    text_mask: torch.Tensor | None = None  # (B, 1 + L_text) bool


class SelfAttention(nn.Module):
    """MAR's attention (qkv, proj) + RoPE on image tokens + the layout bias (per-head lambda if soft)."""

    def __init__(self, cfg: ModelConfig, attend):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.attend = attend
        self.attn_dropout = cfg.attn_dropout
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.proj_drop = nn.Dropout(cfg.proj_dropout)
        if cfg.layout and cfg.layout_bias == "soft":
            self.bias_lambda = nn.Parameter(torch.zeros(cfg.num_heads))  # lambda = softplus(.) >= 0

    def forward(self, x, ctx: Context):
        B, N, W = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D)
        if ctx.sin is not None:
            q, k = apply_rope(q, ctx.sin, ctx.cos), apply_rope(k, ctx.sin, ctx.cos)
        lam = F.softplus(self.bias_lambda) if hasattr(self, "bias_lambda") else None
        out = self.attend(q, k, v, bias=ctx.bias, lam=lam, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, W)))


class CrossAttention(nn.Module):
    """Image and buffer tokens attend to the CLIP token embeddings (padding masked)."""

    def __init__(self, cfg: ModelConfig, attend):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.attend = attend
        self.attn_dropout = cfg.attn_dropout
        self.q = nn.Linear(cfg.width, cfg.width)
        self.kv = nn.Linear(cfg.text_dim, 2 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.proj_drop = nn.Dropout(cfg.proj_dropout)

    def forward(self, x, ctx: Context):
        B, N, W = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)  # (B, H, N, D)
        k, v = self.kv(ctx.text.to(x.dtype)).reshape(B, ctx.text.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = self.attend(q, k, v, key_mask=ctx.text_mask, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, W)))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, width)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """MAR's pre-norm transformer block, with a tanh-gated text cross-attention between attention and MLP."""

    def __init__(self, cfg: ModelConfig, attend, cross_attend):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = SelfAttention(cfg, attend)
        if cfg.text:
            self.norm_cross = nn.LayerNorm(cfg.width, eps=1e-6)
            self.cross_attn = CrossAttention(cfg, cross_attend)
            self.cross_gate = nn.Parameter(torch.zeros(1))
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.proj_dropout)

    def forward(self, x, ctx: Context):
        x = x + self.attn(self.norm1(x), ctx)
        if hasattr(self, "cross_attn"):
            x = x + torch.tanh(self.cross_gate) * self.cross_attn(self.norm_cross(x), ctx)
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

# Name fragments of the parameters structmar adds to MAR (stage 1 trains exactly these).
ADDITION_NAMES = ("text_proj.", "null_text", "layout_embed.", "cross_attn.", "norm_cross.", "cross_gate",
                  "attn.bias_lambda")


def is_addition(name: str) -> bool:
    """True for a parameter structmar adds to MAR (absent from MAR's checkpoints)."""
    return any(part in name for part in ADDITION_NAMES)


@dataclass
class Condition:
    """A batch's conditioning: buffer contents, the full-sequence token table and the text keys."""

    buffer: torch.Tensor  # (B, S, W)
    table: TokenTable  # over buffer + image positions (B, S + L)
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None


class StructMAR(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        W, S, L, C = cfg.width, cfg.buffer_size, cfg.seq_len, cfg.token_channels
        attend = select_attention(cfg.attention)
        cross_attend = select_attention(cfg.cross_attention, cross=True)

        # conditioning: MAR's unconditional embedding is structmar's null slot / null condition
        self.fake_latent = nn.Parameter(torch.zeros(1, W))
        if cfg.text:
            self.text_proj = nn.Linear(cfg.text_dim, W)
            self.null_text = nn.Parameter(torch.zeros(1, 1, cfg.text_dim))
        if cfg.layout:
            self.layout_embed = LayoutEmbedder(W, cfg.text_dim)

        # encoder over the buffer and the unmasked image tokens
        self.z_proj = nn.Linear(C, W)
        self.z_proj_ln = nn.LayerNorm(W, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, S + L, W))
        self.encoder_blocks = nn.ModuleList([Block(cfg, attend, cross_attend) for _ in range(cfg.encoder_depth)])
        self.encoder_norm = nn.LayerNorm(W, eps=1e-6)

        # decoder over every position, masked ones as the mask token
        self.decoder_embed = nn.Linear(W, W)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, W))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, S + L, W))
        self.decoder_blocks = nn.ModuleList([Block(cfg, attend, cross_attend) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(W, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, W))

        if cfg.rope:
            sin, cos = rope_table(cfg.grid_size, W // cfg.num_heads)
            self.register_buffer("rope_sin", sin, persistent=False)
            self.register_buffer("rope_cos", cos, persistent=False)
        self.initialize_weights()

        self.diffloss = DiffLoss(C, W, cfg.diffusion_depth, cfg.diffusion_width, cfg.num_sampling_steps,
                                 cfg.grad_checkpointing,  # initialises itself (AdaLN-Zero)
                                 clip_denoised=cfg.data_range if cfg.clip_denoised else None,
                                 noise_shift=cfg.noise_shift)

    def initialize_weights(self):
        for p in (self.fake_latent, self.mask_token, self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
                  self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        if self.cfg.text:
            nn.init.normal_(self.null_text, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for block in [*self.encoder_blocks, *self.decoder_blocks]:
            if self.cfg.text:
                # zero gate: tanh(0) = 0, so a fresh structmar computes exactly its MAR initialisation
                nn.init.zeros_(block.cross_gate)
            if hasattr(block.attn, "bias_lambda"):
                nn.init.constant_(block.attn.bias_lambda, math.log(math.expm1(self.cfg.layout_bias_init)))

    # ---- conditioning ----------------------------------------------------------------------

    def condition(self, batch: dict, drop: torch.Tensor | None = None) -> Condition:
        """Buffer, token table and text keys for `batch`; `drop` (B,) bool swaps text and layout for null."""
        cfg = self.cfg
        B = batch["latents"].shape[0] if "latents" in batch else batch["text_pooled"].shape[0]
        S, L, g = cfg.buffer_size, cfg.seq_len, cfg.grid_size
        dev = self.fake_latent.device
        null = self.fake_latent.expand(B, 1, -1)
        keep = torch.ones(B, dtype=torch.bool, device=dev) if drop is None else ~drop.to(dev)
        longs = dict(dtype=torch.long, device=dev)

        text_slot = null
        text_kind = torch.full((B, 1), NULL, **longs)
        text = text_mask = None
        if cfg.text:
            pooled = self.text_proj(batch["text_pooled"].to(null.dtype)).unsqueeze(1)
            text_slot = torch.where(keep[:, None, None], pooled, null)
            text_kind = torch.where(keep[:, None], TEXT, NULL)
            tokens = batch["text_tokens"]
            text = torch.cat([self.null_text.expand(B, 1, -1).to(tokens.dtype), tokens], 1)
            text_mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev),
                                   batch["text_mask"].bool() & keep[:, None]], 1)

        slots = [text_slot]
        kinds = [text_kind]
        ranges = [torch.zeros(B, 1, 4, **longs)]
        if cfg.layout and "boxes" in batch and batch["boxes"].shape[1] > 0:
            boxes, box_mask = batch["boxes"].float(), batch["box_mask"].bool()
            index = check_boxes(boxes, box_mask, cfg.max_objects, cfg.truncate_boxes)  # (B, K)
            boxes = torch.gather(boxes, 1, index.unsqueeze(-1).expand(-1, -1, 4))
            real = torch.gather(box_mask, 1, index) & keep[:, None]
            tags = batch["tag_embeds"]
            tags = torch.gather(tags, 1, index.unsqueeze(-1).expand(-1, -1, tags.shape[-1]))
            tokens = self.layout_embed(boxes, tags)
            slots.append(torch.where(real.unsqueeze(-1), tokens, null))
            kinds.append(torch.where(real, BOX, NULL))
            ranges.append(cell_ranges(boxes, g) * real.unsqueeze(-1))
        used = sum(s.shape[1] for s in slots)
        slots.append(null.expand(B, S - used, -1))
        buffer = torch.cat(slots, 1)  # (B, S, W)

        kind = torch.cat([*kinds, torch.full((B, S - used), NULL, **longs), torch.full((B, L), IMAGE, **longs)], 1)
        cells = torch.arange(L, device=dev).expand(B, L)
        cell = torch.cat([torch.full((B, S), L, **longs), cells], 1)  # L = the identity RoPE row
        row = torch.cat([torch.zeros(B, S, **longs), cells // g], 1)
        col = torch.cat([torch.zeros(B, S, **longs), cells % g], 1)
        box = torch.cat([*ranges, torch.zeros(B, S - used + L, 4, **longs)], 1)  # (B, S + L, 4)
        table = TokenTable(kind, cell, row, col, *box.unbind(-1))
        return Condition(buffer, table, text, text_mask)

    def attention_context(self, table: TokenTable, cond: Condition) -> Context:
        """What every block's attention needs for the tokens of `table`: text, RoPE rows and the layout bias."""
        cfg = self.cfg
        ctx = Context(text=cond.text, text_mask=cond.text_mask)
        if cfg.rope:
            ctx.sin, ctx.cos = self.rope_sin[table.cell], self.rope_cos[table.cell]  # (B, N, head_dim)
        if cfg.layout and cfg.layout_bias != "none":
            ctx.bias = LayoutBias(table, cfg.layout_bias, cfg.layout_to_image, cfg.bias_text_slot, cfg.bias_null_slots,
                                  cfg.layout_bias_bonus)
        return ctx

    def _run(self, blocks, x, ctx):
        for block in blocks:
            if self.cfg.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, ctx, use_reentrant=False, context_fn=_forward_attention_kernels)
            else:
                x = block(x, ctx)
        return x

    # ---- backbone --------------------------------------------------------------------------

    def forward_encoder(self, tokens: torch.Tensor, mask: torch.Tensor, cond: Condition):
        """tokens (B, L, C), mask (B, L) bool (True = masked) -> (B, S + kept, W) and the kept index (B, S + kept)."""
        B, S = tokens.shape[0], self.cfg.buffer_size
        x = self.z_proj(tokens.to(self.z_proj.weight.dtype))
        x = torch.cat([cond.buffer.to(x.dtype), x], 1)  # (B, S + L, W)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        masked = torch.cat([torch.zeros(B, S, dtype=torch.bool, device=mask.device), mask.bool()], 1)
        kept = (~masked).nonzero()[:, 1].reshape(B, -1)  # ascending positions; every row keeps as many
        x = torch.gather(x, 1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, S + kept, W)
        x = self._run(self.encoder_blocks, x, self.attention_context(cond.table.gather(kept), cond))
        return self.encoder_norm(x), kept

    def forward_decoder(self, x: torch.Tensor, kept: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Encoder output -> per-image-token conditions z (B, L, W) for the diffusion head."""
        x = self.decoder_embed(x)
        B, W = x.shape[0], x.shape[-1]
        full = self.mask_token.to(x.dtype).expand(B, self.cfg.buffer_size + self.cfg.seq_len, W)
        x = full.scatter(1, kept.unsqueeze(-1).expand(-1, -1, W), x) + self.decoder_pos_embed_learned  # (B, S + L, W)
        x = self.decoder_norm(self._run(self.decoder_blocks, x, self.attention_context(cond.table, cond)))
        return x[:, self.cfg.buffer_size:] + self.diffusion_pos_embed_learned

    def predict(self, tokens: torch.Tensor, mask: torch.Tensor, cond: Condition) -> torch.Tensor:
        """z (B, L, W) for current tokens (B, L, C) with `mask` (B, L) True where a token is still unknown."""
        x, kept = self.forward_encoder(tokens, mask, cond)
        return self.forward_decoder(x, kept, cond)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Masked-token diffusion loss of a training batch (latents, text_*, boxes, box_mask, tag_embeds)."""
        cfg = self.cfg
        target = patchify(batch["latents"])  # (B, L, C)
        B, L, C = target.shape
        dev = target.device
        orders = sample_orders(B, L, device=dev)
        ratio = sample_mask_ratio(cfg.mask_ratio_min, device=dev)
        mask = mask_by_order(int(torch.ceil(L * ratio)), orders)  # (B, L) True = masked
        drop = torch.rand(B, device=dev) < cfg.label_drop_prob if self.training else None
        z = self.predict(target, mask, self.condition(batch, drop))  # (B, L, W)
        mul = cfg.diffusion_batch_mul
        loss = self.diffloss(target=target.reshape(B * L, C).repeat(mul, 1), z=z.reshape(B * L, -1).repeat(mul, 1),
                             mask=mask.reshape(B * L).repeat(mul).to(z.dtype))
        return loss, {"loss": loss.detach(), "mask_ratio": ratio.detach().float().squeeze()}


# ---------------------------------------------------------------------------------------------
# Weights: MAR's checkpoints, hub safetensors, structmar exports
# ---------------------------------------------------------------------------------------------


EXPORT = "checkpoint-last.safetensors"  # a stage's consolidated model + EMA, the next stage's --resume


def weights_file(path: str, flag: str = "--resume") -> str:
    """The weights file `path` names: a file as it is, or a run directory's stage export (EXPORT).

    The one rule for every command that takes weights (`train`/`rl --resume`, `sample`/`eval --checkpoint`);
    `flag` names the option in the error.
    """
    if os.path.isdir(path):
        export = os.path.join(path, EXPORT)
        if not os.path.isfile(export):
            raise FileNotFoundError(f"{flag} {path} is a directory without {EXPORT} (not a structmar run?)")
        return export
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path} does not exist")
    return path


def _described(encoder: dict) -> str:
    digest = encoder.get("sha256")
    return f"{encoder.get('path') or encoder['id']}" + (f" (sha256 {digest[:12]})" if digest else "")


@dataclass
class TrainedWith:
    """What a stage's model was trained with, recorded in its export: the text encoder the shards were built with
    ({"id", "path", "sha256"}: the encoder's id, its directory, the digest of its weights), the tokenizer
    ({"name", "path", "sha256"}: path and digest None for the weight-free pixel tokenizer) and the dataset's
    category names. A path or digest is None where the shards' build did not record it or the file is gone."""

    text_encoder: dict
    tokenizer: dict
    categories: dict[int, str]

    KEYS = ("text_encoder", "tokenizer", "categories")  # the export metadata entries, JSON each

    @classmethod
    def of_shards(cls, manifest: dict, split: str) -> TrainedWith:
        """The encoders `split`'s shards were built with (the paths its build recorded, made absolute)."""
        from structmar.files import weights_sha256

        built = manifest["splits"][split].get("build_args") or {}

        def source(path: str | None) -> dict:
            if not path or not os.path.exists(path):
                return dict(path=None, sha256=None)
            return dict(path=os.path.abspath(path), sha256=weights_sha256(path))

        tok = manifest["tokenizer"]
        return cls(dict(id=manifest["text_encoder"]["id"], **source(built.get("clip_path"))),
                   dict(name=tok["name"], **source(built.get("vae_path") if tok["name"] == "kl16" else None)),
                   {int(k): v for k, v in manifest["categories"].items()})

    def metadata(self) -> dict[str, str]:
        return {"text_encoder": json.dumps(self.text_encoder), "tokenizer": json.dumps(self.tokenizer),
                "categories": json.dumps({str(k): v for k, v in self.categories.items()})}

    @classmethod
    def from_metadata(cls, meta: dict) -> TrainedWith | None:
        if not all(k in meta for k in cls.KEYS):
            return None  # an export of an older structmar, or an initialisation file
        text, tok, names = (json.loads(meta[k]) for k in cls.KEYS)
        return cls(text, tok, {int(k): v for k, v in names.items()})

    def check_text_encoder(self, other: dict, ours: str, theirs: str) -> None:
        """Refuse `other` (what `theirs` names) unless it is the text encoder this model was trained with
        (`ours` names the model): the weights' digests where both are known, else the encoders' shapes."""
        mine = self.text_encoder
        if mine.get("sha256") and other.get("sha256"):
            same = mine["sha256"] == other["sha256"]
        else:  # an id is "<directory name>:<shape>"; a copy may live under another name
            same = mine["id"].rsplit(":", 1)[-1] == other["id"].rsplit(":", 1)[-1]
        if not same:
            raise ValueError(f"{ours} was trained with the text encoder {_described(mine)} but {theirs} "
                             f"{_described(other)}; use the text encoder the model was trained with")


@dataclass
class Weights:
    model: dict
    ema: dict | None = None
    config: ModelConfig | None = None
    trained_with: TrainedWith | None = None  # a stage export's record of its inputs

    def select(self, ema: bool) -> dict:
        if ema and self.ema is None:
            raise ValueError("these weights hold no EMA state dict (model_ema)")
        return self.ema if ema else self.model


@dataclass
class LoadReport:
    missing: list[str]
    unexpected: list[str]


def _config_from_mar_args(args) -> ModelConfig | None:
    """MAR's argparse namespace -> the equivalent structmar config (structure off), if it names a preset."""
    if args is None:
        return None
    a = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    if a.get("model") not in PRESETS:
        return None
    if a.get("patch_size", 1) != 1 or a.get("vae_embed_dim", 16) != 16:
        raise ValueError(f"MAR patch_size {a.get('patch_size')} / vae_embed_dim {a.get('vae_embed_dim')} "
                         "is not supported (structmar uses patch 1 over 16-channel kl16 latents)")
    names = {"diffloss_d": "diffusion_depth", "diffloss_w": "diffusion_width", "img_size": "image_size",
             "buffer_size": "buffer_size", "mask_ratio_min": "mask_ratio_min", "attn_dropout": "attn_dropout",
             "proj_dropout": "proj_dropout", "label_drop_prob": "label_drop_prob",
             "diffusion_batch_mul": "diffusion_batch_mul", "grad_checkpointing": "grad_checkpointing"}
    overrides = {ours: a[theirs] for theirs, ours in names.items() if theirs in a}
    if "num_sampling_steps" in a:
        overrides["num_sampling_steps"] = int(a["num_sampling_steps"])
    return model_config(a["model"], rope=False, layout=False, text=False, **overrides)


def read_weights(path: str) -> Weights:
    """Read MAR's `checkpoint-*.pth`, a flat `.safetensors` (hub copy) or structmar's `.safetensors` export."""
    from structmar.files import load_safetensors, load_torch_pickle

    if path.endswith(".safetensors"):
        tensors, meta = load_safetensors(path, "weights file")
        if "config" in meta and any(k.startswith("model.") for k in tensors):
            model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
            ema = {k[len("model_ema."):]: v for k, v in tensors.items() if k.startswith("model_ema.")} or None
            return Weights(model, ema, ModelConfig.from_dict(json.loads(meta["config"])),
                           TrainedWith.from_metadata(meta))
        return Weights(tensors)
    obj = load_torch_pickle(path, "weights file", allowed=(argparse.Namespace,))  # MAR pickles its args beside them
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    if "model" not in obj:
        if obj and all(torch.is_tensor(v) for v in obj.values()):
            return Weights(obj)
        raise ValueError(f"{path} has no 'model' entry (keys: {sorted(obj)[:8]})")
    return Weights(obj["model"], obj.get("model_ema"), _config_from_mar_args(obj.get("args")))


def write_export(path: str, model_sd: dict, ema_sd: dict, model_cfg: ModelConfig, meta: dict | None = None,
                 trained_with: TrainedWith | None = None) -> None:
    """A stage export: keys "model.<name>" and "model_ema.<name>", the ModelConfig json in metadata["config"],
    and what the model was trained with (`TrainedWith.metadata`)."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_sd.items()}
    # safetensors refuses shared storage; an EMA entry may alias its model entry (frozen tensors, buffers)
    tensors.update({f"model_ema.{k}": v.detach().cpu().clone() for k, v in ema_sd.items()})
    metadata = {"config": json.dumps(model_cfg.to_dict()), **{k: str(v) for k, v in (meta or {}).items()},
                **(trained_with.metadata() if trained_with else {})}
    atomic.write_path(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_weights(model: nn.Module, state_dict: dict) -> LoadReport:
    """Load by name; a shape mismatch is an error naming the tensor, missing/unexpected names are reported."""
    own = model.state_dict()
    for name, value in state_dict.items():
        if name in own and own[name].shape != value.shape:
            raise ValueError(f"weight {name} has shape {tuple(value.shape)} in the file but {tuple(own[name].shape)} "
                             "in the model (wrong preset or diffusion head size?)")
    result = model.load_state_dict(state_dict, strict=False)
    return LoadReport(sorted(result.missing_keys), sorted(result.unexpected_keys))


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(MAR backbone + head parameters, structmar additions), counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = StructMAR(dataclasses.replace(cfg))
    backbone = sum(p.numel() for n, p in model.named_parameters() if not is_addition(n))
    additions = sum(p.numel() for n, p in model.named_parameters() if is_addition(n))
    return backbone, additions
