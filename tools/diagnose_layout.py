"""How much layout a checkpoint's backbone passes to its diffusion head; prints a markdown table.

For a stage export (`checkpoint-last.safetensors`) and the pixel-token shards it trained on, with every
image token masked (the first generation step, where only text and layout are known):
  - attention mass of image queries on each key kind (box, null slot, text slot, image) in the first
    decoder block: how much of the layout tokens reaches the masked positions;
  - a ridge probe from z to each in-box token's mean colour, fit on `--fit_batches` batches and scored
    on another: error / variance of in-box colours (1.0: z knows nothing about the box's colour);
  - the same ratio for the head's deterministic sample (temperature 0) and the saturation of the sampled
    in-box colours against the data's (a head that only knows the mean returns grey).

    python tools/diagnose_layout.py output/demo/stage2_full/checkpoint-last.safetensors output/demo/shards
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from structmar.attention import BOX, IMAGE, NULL, TEXT, apply_rope, box_cells
from structmar.model import StructMAR, load_weights, patchify, read_weights
from structmar.shards import ShardLoader


def in_box(batch: dict, grid: int) -> torch.Tensor:
    """(B, L) bool: the token's cell lies in one of the sample's boxes, by the cell rule the layout bias uses."""
    return box_cells(batch["boxes"], batch["box_mask"], grid).any(1)


@torch.no_grad()
def attention_mass(model: StructMAR, batch: dict) -> dict[str, float]:
    """Mean attention of the masked image queries on each key kind, first decoder block, all tokens masked."""
    cfg = model.cfg
    tokens = patchify(batch["latents"])
    cond = model.condition(batch)
    block = model.decoder_blocks[0]
    seen = []  # the block's normalised input, as its attention sees it, from the model's own forward
    handle = block.norm1.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        model.predict(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool), cond)
    finally:
        handle.remove()
    h = seen[0]
    B, N, _ = h.shape
    q, k, _ = block.attn.qkv(h).reshape(B, N, 3, cfg.num_heads, -1).permute(2, 0, 3, 1, 4)
    ctx = model.attention_context(cond.table, cond)
    if ctx.sin is not None:
        q, k = apply_rope(q, ctx.sin, ctx.cos), apply_rope(k, ctx.sin, ctx.cos)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if ctx.bias is not None:
        lam = F.softplus(block.attn.bias_lambda) if hasattr(block.attn, "bias_lambda") else None
        logits = logits + ctx.bias.dense(lam, logits.dtype)
    weights = logits.softmax(-1)[:, :, cfg.buffer_size:]  # image queries (B, H, L, N)
    kind = cond.table.kind[:, None, None, :]
    return {name: (weights * (kind == kind_id)).sum(-1).mean().item()
            for name, kind_id in (("box", BOX), ("null", NULL), ("text", TEXT), ("image", IMAGE))}


@torch.no_grad()
def colour_features(model: StructMAR, loader, batches: int):
    zs, colours, inside = [], [], []
    for _, batch in zip(range(batches), loader):
        tokens = patchify(batch["latents"])
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
        z = model.predict(tokens, mask, model.condition(batch))
        zs.append(z.flatten(0, 1))
        colours.append(tokens.reshape(*tokens.shape[:2], -1, 3).mean(2).flatten(0, 1))  # pixel tokens: rgb last
        inside.append(in_box(batch, model.cfg.grid_size).flatten())
    return torch.cat(zs), torch.cat(colours), torch.cat(inside)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("shards")
    ap.add_argument("--split", default="train2014")
    ap.add_argument("--ema", action="store_true", help="the EMA weights (default: the raw weights)")
    ap.add_argument("--fit_batches", type=int, default=6)
    args = ap.parse_args()

    weights = read_weights(args.checkpoint)
    cfg = weights.config
    if cfg.tokenizer != "pixel" or not cfg.layout:
        raise SystemExit(f"{args.checkpoint}: needs a pixel-tokenizer model with layout tokens")
    model = StructMAR(cfg)
    load_weights(model, weights.select(args.ema))
    model.eval()
    fit = ShardLoader(args.shards, args.split, cfg, 64, seed=3)
    held = ShardLoader(args.shards, args.split, cfg, 64, seed=7)
    mass = attention_mass(model, next(iter(held)))
    z, colour, inside = colour_features(model, fit, args.fit_batches)
    zt, colour_t, inside_t = colour_features(model, held, 2)
    x = torch.cat([z, torch.ones(len(z), 1)], 1)
    w = torch.linalg.solve(x.T @ x + 1e-2 * torch.eye(x.shape[1]), x.T @ colour)
    spread = ((colour_t[inside_t] - colour[inside].mean(0)) ** 2).sum(-1).mean()
    probe = ((torch.cat([zt, torch.ones(len(zt), 1)], 1) @ w - colour_t) ** 2).sum(-1)[inside_t].mean() / spread
    with torch.no_grad():
        sample, _ = model.diffloss.sample(zt[inside_t], temperature=0.0, generator=torch.Generator().manual_seed(0))
    sampled = sample.reshape(len(sample), -1, 3).mean(1)
    head = ((sampled - colour_t[inside_t]) ** 2).sum(-1).mean() / spread
    print("| measure | value |\n| --- | --- |")
    for name, value in mass.items():
        print(f"| attention of masked image queries on {name} keys (decoder block 0) | {value:.3f} |")
    print(f"| in-box colour: ridge probe of z, error / variance | {probe:.3f} |")
    print(f"| in-box colour: head sample at temperature 0, error / variance | {head:.3f} |")
    print(f"| saturation (rgb std) of sampled / real in-box colours | {sampled.std(-1).mean():.3f} / "
          f"{colour_t[inside_t].std(-1).mean():.3f} |")


if __name__ == "__main__":
    main()
