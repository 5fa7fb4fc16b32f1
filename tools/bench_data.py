"""Benchmark the shard loader on MAR-H-sized samples; prints a markdown table.

Writes synthetic shards in the real schema (kl16 moments of a 256 px image and its flip, 16x16x16
x 2; CLIP ViT-B/32 text states, 512 wide; 16 boxes with tag embeddings), then times
`structmar.shards.ShardLoader` with DataLoader workers over full epochs.

    python tools/bench_data.py --samples 4096 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch

from structmar.coco import Layout
from structmar.config import model_config
from structmar.shard_tar import write_shard
from structmar.shards import ShardLoader, encode_sample, shard_name, update_manifest


def write_synthetic_shards(out: str, samples: int, per_shard: int, captions: int, caption_tokens: int,
                           boxes: int, seed: int = 0) -> int:
    """MAR-H-sized shards of random payloads; returns the bytes on disk."""
    rng = np.random.default_rng(seed)
    split, total = "bench", 0
    for i in range(0, samples, per_shard):
        rows = []
        for image_id in range(i + 1, min(i + per_shard, samples) + 1):
            xy = rng.uniform(0, 0.5, (boxes, 2))
            wh = rng.uniform(0.05, 0.5, (boxes, 2))
            lay = Layout(image_id=image_id, file_name="", orig_size=(640, 480),
                         boxes=np.concatenate([xy, xy + wh], 1).astype(np.float32),
                         category_ids=rng.integers(1, 91, boxes), tags=["thing"] * boxes,
                         captions=["a caption"] * captions)
            lengths = rng.integers(max(2, caption_tokens // 2), caption_tokens + 1, captions)
            lengths[0] = caption_tokens  # the stored text length is the longest caption's
            rows.append(encode_sample(
                lay, rng.standard_normal((2, 32, 16, 16)), rng.standard_normal((captions, caption_tokens, 512)),
                lengths.tolist(), rng.standard_normal((captions, 512)), rng.standard_normal((boxes, 512))))
        name = shard_name(split, i // per_shard)
        sha, size = write_shard(os.path.join(out, name + ".tar"), rows)
        total += size
        with open(os.path.join(out, name + ".json"), "w") as f:
            json.dump(dict(name=name + ".tar", num_samples=len(rows), sha256=sha, bytes=size, image_ids=[],
                           fingerprint={}), f)
    common = dict(tokenizer=dict(name="kl16", id="kl16", scale=0.2325, channels=16, stride=16,
                                 latent_shape=[16, 16, 16]),
                  text_encoder=dict(id="synthetic", dim=512, max_length=77), image_size=256,
                  categories={str(c): f"category {c}" for c in range(1, 91)})
    update_manifest(out, split, -(-samples // per_shard), common, dict(max_objects=boxes, build_args={}))
    return total


def time_loader(out: str, batch_size: int, workers: int, epochs: int, dtype: torch.dtype) -> tuple[float, float]:
    """(steady samples/s after each epoch's first batch, samples/s over whole epochs including worker start)."""
    cfg = model_config("mar_huge")
    loader = ShardLoader(out, "bench", cfg, batch_size, num_workers=workers, seed=0, shuffle_buffer=1000, dtype=dtype)
    next(iter(loader))  # warm the page cache and the imports
    loader.set_epoch(0)
    steady_time = total_time = 0.0
    steady = total = 0
    for _ in range(epochs):
        start = time.perf_counter()
        first = None
        for batch in loader:
            n = batch["latents"].shape[0]
            if first is None:
                first = time.perf_counter()
            else:
                steady += n
            total += n
        end = time.perf_counter()
        steady_time += end - first
        total_time += end - start
    return steady / steady_time, total / total_time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--samples_per_shard", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--dtypes", default="float32,float16", help="batch dtypes to time, comma-separated")
    p.add_argument("--dir", default=None, help="where to write the synthetic shards (default: a temp dir)")
    args = p.parse_args()
    # One intra-op thread in this process too (DataLoader workers use one): with 0 workers the row
    # measures the pipeline's cost on one core.
    torch.set_num_threads(1)
    load_at_start = os.getloadavg()[0]  # the box may be shared: report how busy it was
    rows = []
    configs = [("1 caption x 77 tokens (spec)", 1, 77), ("5 captions, longest 20 tokens (COCO-like)", 5, 20),
               ("5 captions x 77 tokens (worst case)", 5, 77)]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for label, captions, tokens in configs:
            out = os.path.join(tmp, f"c{captions}-t{tokens}")
            os.makedirs(out)
            size = write_synthetic_shards(out, args.samples, args.samples_per_shard, captions, tokens, boxes=16)
            for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
                for workers in (args.workers, 0):
                    steady, whole = time_loader(out, args.batch_size, workers, args.epochs, dtype)
                    rows.append((label, str(dtype).replace("torch.", ""), workers, steady, whole, size / args.samples))
    cpu = platform.processor() or platform.machine()
    print(f"\nMachine: {platform.node()} ({cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}); "
          f"{args.workers} loader workers, batch {args.batch_size}, {args.samples} samples in shards of "
          f"{args.samples_per_shard}, shuffle buffer 1000, {args.epochs} epochs timed, shards in the page cache; "
          "steady = after each epoch's first batch (worker start and shuffle-buffer fill excluded); "
          f"1-min load average at start {load_at_start:.1f}, at end {os.getloadavg()[0]:.1f}\n")
    print("| sample | batch dtype | loader workers | samples/s (steady) | samples/s (whole epochs) | bytes/sample |")
    print("|---|---|---:|---:|---:|---:|")
    for label, dtype, workers, steady, whole, size in rows:
        print(f"| {label} | {dtype} | {workers} | {steady:,.0f} | {whole:,.0f} | {size:,.0f} |")


if __name__ == "__main__":
    main()
