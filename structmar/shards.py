"""WebDataset shards of precomputed tokenizer moments and CLIP embeddings: the writer and the training loader.

One schema, both directions. A sample (key = 12-digit image id, no dots) holds only .npy and .json
payloads (nothing is unpickled):

    moments.npy   float16 (2, 2C, g, g)  posterior moments of the image [0] and of its horizontal flip [1]
    text.npy      float16 (N, L, D)      CLIP last hidden states of the N captions, L = longest of them
    pooled.npy    float16 (N, D)         CLIP pooled embedding of each caption
    tags.npy      float16 (K, D)         pooled CLIP embedding of each box's tag text
    layout.json   {"image_id", "orig_size", "boxes" (K x normalised xyxy, unflipped), "category_ids",
                   "tags", "captions", "caption_lengths" (real tokens per caption: the mask is a prefix)}

Shard i of a split (`{split}-{i:06d}.tar`) holds the usable images with sorted-id ranks
[i * n, (i + 1) * n); builder slot w of W builds the shards with i % W == w, so any number of
processes, GPUs or nodes (and reruns) agree on the contents. Each shard is written to a temp file,
fsynced and renamed, then described by a sidecar `{split}-{i:06d}.json` (count, sha256, image ids);
`manifest.json` is rebuilt from the sidecars under a file lock. The tar and .npy bytes are
structmar.shard_tar's (plain ustar written by WebDataset's TarWriter, read by a small header parser).

The loader (`ShardLoader`) splits shards by rank then by DataLoader worker after a seeded,
epoch-aware shuffle, gives every rank the same number of batches, picks image or flip (the box flip
sits next to the latent flip) and a caption with a generator seeded from (seed, epoch, rank,
worker, batch), draws a fresh posterior sample per step, and resumes mid-epoch from its state dict.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from structmar import atomic
from structmar.coco import CocoLayouts, ImageFault, Layout, flip_boxes, listed
from structmar.config import BadDataConfig
from structmar.files import read_json
from structmar.shard_tar import ShardError, iter_shard, load_npy, npy_bytes, sha256, write_shard
from structmar.tokenizer import latent_scale, sample_posterior

FORMAT = "structmar-shards-v1"
MANIFEST = "manifest.json"
PAYLOADS = ("moments.npy", "text.npy", "pooled.npy", "tags.npy", "layout.json")
SKIP_REASONS = ("corrupt", "missing_payload", "bad_shape", "nonfinite", "empty_layout", "bad_box",
                "unknown_category")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


# ---- payload encoding ---------------------------------------------------------------------------


def _all_finite(a: np.ndarray) -> bool:
    if a.dtype == np.float16:  # numpy's float16 isfinite is slow: test the exponent bits instead
        return a.size == 0 or int((a.view(np.uint16) & 0x7FFF).max()) < 0x7C00
    return bool(np.isfinite(a).all())


def encode_sample(layout: Layout, moments: np.ndarray, text: np.ndarray, lengths: list[int], pooled: np.ndarray,
                  tags: np.ndarray) -> dict:
    """One sample's payloads (a WebDataset dict). moments (2, 2C, g, g); text (N, L, D); pooled (N, D); tags (K, D)."""
    key = f"{layout.image_id:012d}"
    arrays = {"moments.npy": moments, "text.npy": text, "pooled.npy": pooled, "tags.npy": tags}
    out = {"__key__": key}
    for name, a in arrays.items():
        a16 = np.asarray(a, dtype=np.float16)
        if not np.isfinite(a16).all():
            raise ValueError(f"image {layout.image_id}: non-finite values in {name} (after fp16 conversion)")
        out[name] = npy_bytes(a16)
    meta = dict(image_id=int(layout.image_id), orig_size=list(layout.orig_size),
                boxes=[[round(float(v), 6) for v in b] for b in layout.boxes],
                category_ids=[int(c) for c in layout.category_ids], tags=list(layout.tags),
                captions=list(layout.captions), caption_lengths=[int(n) for n in lengths])
    out["layout.json"] = json.dumps(meta).encode("utf-8")
    return out


@dataclass
class Schema:
    """What every sample of a split must look like (from the manifest)."""

    moments_shape: tuple[int, int, int, int]  # (2, 2C, g, g)
    text_dim: int
    categories: frozenset


def decode_sample(raw: dict, schema: Schema) -> dict:
    """Raw payload bytes -> validated numpy arrays; raises ShardError naming what is wrong."""
    missing = [p for p in PAYLOADS if p not in raw]
    if missing:
        raise ShardError("missing_payload", f"missing payload {', '.join(missing)}")
    try:
        moments = load_npy(raw["moments.npy"])
        text = load_npy(raw["text.npy"])
        pooled = load_npy(raw["pooled.npy"])
        tags = load_npy(raw["tags.npy"])
        meta = json.loads(raw["layout.json"])
        boxes = np.asarray(meta["boxes"], dtype=np.float32).reshape(-1, 4)
        cats = np.asarray(meta["category_ids"], dtype=np.int64)
        lengths = np.asarray(meta["caption_lengths"], dtype=np.int64)
        image_id = int(meta["image_id"])
    except (ValueError, KeyError, TypeError, SyntaxError) as e:
        raise ShardError("corrupt", f"unreadable payload: {e}") from None
    d = schema.text_dim
    n_cap, n_box = len(lengths), len(boxes)
    if moments.shape != schema.moments_shape:
        raise ShardError("bad_shape", f"moments shape {moments.shape} != {schema.moments_shape}")
    if text.ndim != 3 or text.shape[0] != n_cap or text.shape[2] != d or pooled.shape != (n_cap, d):
        raise ShardError("bad_shape", f"text {text.shape} / pooled {pooled.shape} do not match {n_cap} captions "
                         f"of width {d}")
    if n_cap == 0 or lengths.min() < 1 or lengths.max() > text.shape[1]:
        raise ShardError("bad_shape", f"caption lengths {lengths.tolist()} do not fit text of length {text.shape[1]}")
    if n_box == 0:
        raise ShardError("empty_layout", "empty layout (no boxes)")
    if tags.shape != (n_box, d) or cats.shape != (n_box,):
        raise ShardError("bad_shape", f"tags {tags.shape} / category ids {cats.shape} do not match {n_box} boxes")
    for name, a in (("moments", moments), ("text", text), ("pooled", pooled), ("tags", tags)):
        if not _all_finite(a):
            raise ShardError("nonfinite", f"NaN or inf in {name}")
    # Three comparisons fail on NaN or inf as well as on a bad box: the exact checks run only then.
    lo, hi = boxes[:, :2], boxes[:, 2:]
    if not ((lo >= 0).all() and (hi <= 1).all() and (lo < hi).all()):
        if not _all_finite(boxes):
            raise ShardError("nonfinite", "NaN or inf in boxes")
        bad = ~((lo >= 0) & (hi <= 1) & (lo < hi)).all(1)
        raise ShardError("bad_box", f"box {boxes[bad][0].tolist()} is out of [0, 1] or inverted")
    unknown = sorted(set(cats.tolist()) - schema.categories)
    if unknown:
        raise ShardError("unknown_category", f"unknown category ids {unknown}")
    return dict(moments=moments, text=text, pooled=pooled, tags=tags, boxes=boxes, category_ids=cats,
                lengths=lengths, image_id=image_id)


# ---- manifest -----------------------------------------------------------------------------------


def build_command(shard_dir: str, split: str, tokenizer: str = "pixel", image_size: int = 256,
                  max_objects: int = 16, pixel_patch: int = 4) -> str:
    """The `structmar build-shards` command line that writes `split` into `shard_dir`."""
    tok = "--tokenizer kl16 --vae_path pretrained_models/vae/kl16.ckpt" if tokenizer == "kl16" else (
        f"--tokenizer pixel --pixel_patch {pixel_patch}")
    return (f"structmar build-shards --coco_root data/coco --coco_split {split} --out {shard_dir} {tok} "
            f"--clip_path pretrained_models/clip-vit-base-patch32 --image_size {image_size} "
            f"--max_objects {max_objects}")


def read_manifest(shard_dir: str, split: str | None = None, hint: dict | None = None) -> dict:
    """The manifest of `shard_dir` (and check `split` is in it and complete); errors print the build command."""
    path = os.path.join(shard_dir, MANIFEST)
    cmd = build_command(shard_dir, split or "train2014", **(hint or {}))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no shard manifest {path}; build the shards first: {cmd}")
    try:
        manifest = read_json(path, "shard manifest")
    except ValueError as e:
        raise ValueError(f"{e}; rebuild it by rerunning: {cmd}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"shard manifest {path}: format {found!r} is not {FORMAT!r}")
    if split is not None:
        entry = manifest["splits"].get(split)
        if entry is None:
            raise FileNotFoundError(f"{path} has no split {split!r} (has {sorted(manifest['splits'])}); "
                                    f"build it first: {cmd}")
        if not entry["complete"]:
            raise ValueError(f"{path}: split {split!r} is incomplete ({len(entry['shards'])} of "
                             f"{entry['num_shards_expected']} shards); rerun the builder to finish it: {cmd}")
    return manifest


def check_manifest(manifest: dict, cfg) -> None:
    """Refuse shards that do not match ModelConfig `cfg` (tokenizer, resolution, text encoder), naming the field."""
    tok, text = manifest["tokenizer"], manifest["text_encoder"]
    checks = [
        ("tokenizer", tok["name"], cfg.tokenizer),
        ("image_size", manifest["image_size"], cfg.image_size),
        ("text_dim", text["dim"], cfg.text_dim),
    ]
    if cfg.tokenizer == tok["name"]:
        checks.append(("latent shape (C, g, g)", tuple(tok["latent_shape"]),
                       (cfg.token_channels, cfg.grid_size, cfg.grid_size)))
        checks.append(("tokenizer scale", tok["scale"], latent_scale(cfg.tokenizer)))
    for name, have, want in checks:
        if have != want:
            raise ValueError(f"shards were built with {name} {have!r} but the model config has {want!r}; "
                             "rebuild the shards with matching settings or change the model config")


def _plan(layouts: list[Layout], samples_per_shard: int) -> list[list[Layout]]:
    return [layouts[i:i + samples_per_shard] for i in range(0, len(layouts), samples_per_shard)]


def update_manifest(out: str, split: str, num_shards: int, common: dict, split_info: dict) -> dict:
    """Rebuild `split`'s manifest entry from the sidecars present, under a lock; atomic write. Returns the manifest."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, ".manifest.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = os.path.join(out, MANIFEST)
        manifest = {"format": FORMAT, **common, "splits": {}}
        if os.path.isfile(path):
            with open(path) as f:
                old = json.load(f)
            for key, value in common.items():
                if old.get(key) != value:
                    raise ValueError(f"{path} was written with a different {key} ({old.get(key)!r} vs {value!r}); "
                                     "use a new --out directory")
            manifest["splits"] = old.get("splits", {})
        shards, skipped_images = [], []
        for i in range(num_shards):
            side = os.path.join(out, shard_name(split, i) + ".json")
            if os.path.isfile(side):
                with open(side) as f:
                    s = json.load(f)
                shards.append({k: s[k] for k in ("name", "num_samples", "sha256", "bytes")})
                skipped_images += s.get("skipped_images", [])
        manifest["splits"][split] = dict(split_info, shards=shards, num_shards_expected=num_shards,
                                         num_samples=sum(s["num_samples"] for s in shards),
                                         skipped_images=skipped_images, complete=len(shards) == num_shards)
        atomic.write_text(path, json.dumps(manifest, indent=1))
        return manifest


# ---- builder ------------------------------------------------------------------------------------


def _shard_done(out: str, name: str, fingerprint: dict, image_ids: list[int]) -> bool:
    """True if shard `name` was completed earlier with the same settings (sidecar present, sha256 matches)."""
    tar, side = os.path.join(out, name + ".tar"), os.path.join(out, name + ".json")
    if not (os.path.isfile(tar) and os.path.isfile(side)):
        return False
    with open(side) as f:
        s = json.load(f)
    for key, value in fingerprint.items():
        if s["fingerprint"].get(key) != value:
            raise ValueError(f"{side} was built with {key} {s['fingerprint'].get(key)!r}, this run has {value!r}; "
                             "use a new --out directory")
    return s["image_ids"] == image_ids and s["sha256"] == sha256(tar)


def _read_image(coco: CocoLayouts, layout: Layout) -> np.ndarray | ImageFault:
    try:
        return coco.image(layout)
    except ImageFault as e:
        return e


def _encode_batch(coco: CocoLayouts, layouts: list[Layout], tokenizer, text_encoder, pool, device,
                  tag_cache: dict, schema: Schema) -> tuple[list[dict], list[dict]]:
    """The samples of `layouts` whose image reads, and {"image_id", "file_name", "reason", "error"} of the others."""
    read = list(pool.map(lambda lay: _read_image(coco, lay), layouts))
    faults = [dict(image_id=lay.image_id, file_name=lay.file_name, reason=r.reason, error=str(r))
              for lay, r in zip(layouts, read, strict=True) if isinstance(r, ImageFault)]
    if faults:
        layouts = [lay for lay, r in zip(layouts, read, strict=True) if not isinstance(r, ImageFault)]
        read = [r for r in read if not isinstance(r, ImageFault)]
        if not layouts:
            return [], faults
    images = read
    x = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, S, S)
    moments = tokenizer.encode(torch.cat([x, x.flip(3)]))  # (2B, 2C, g, g): images, then their flips
    moments = moments.float().unflatten(0, (2, len(layouts))).transpose(0, 1).cpu().numpy()  # (B, 2, 2C, g, g)
    captions = [c for lay in layouts for c in lay.captions]
    tokens, mask, pooled = text_encoder.encode(captions)  # (N, L, D), (N, L), (N, D)
    tokens, pooled = tokens.float().cpu().numpy(), pooled.float().cpu().numpy()
    lengths = mask.sum(1).cpu().numpy()
    new_tags = sorted({t for lay in layouts for t in lay.tags} - set(tag_cache))
    if new_tags:
        for t, e in zip(new_tags, text_encoder.encode_tags(new_tags).float().cpu().numpy(), strict=True):
            tag_cache[t] = e
    samples, start = [], 0
    for i, lay in enumerate(layouts):
        n = len(lay.captions)
        lens = lengths[start:start + n]
        text = tokens[start:start + n, : int(lens.max())]  # (n, L_i, D): cut to this image's longest caption
        tags = np.stack([tag_cache[t] for t in lay.tags])
        sample = encode_sample(lay, moments[i], text, lens.tolist(), pooled[start:start + n], tags)
        try:  # what the loader would refuse must not be written
            decode_sample(sample, schema)
        except ShardError as e:
            raise ValueError(f"image {lay.image_id} ({lay.file_name}): {e}") from None
        samples.append(sample)
        start += n
    return samples, faults


def build_shards(coco: CocoLayouts, out: str, tokenizer, text_encoder, *, samples_per_shard: int = 1000,
                 batch_size: int = 64, worker_rank: int = 0, num_workers: int = 1, device="cpu",
                 build_args: dict | None = None, progress: bool = True, image_threads: int | None = None,
                 stop_after: int | None = None) -> dict:
    """Write the shards of builder slot `worker_rank` of `num_workers`, skipping shards already complete.

    Returns {"built": [...], "skipped": [...], "manifest": ...}. An image that cannot be read (`ImageFault`)
    is left out of its shard and listed with its reason in the shard's sidecar and the manifest's
    "skipped_images". `stop_after` ends the run after that many shards were built (tests use it to
    simulate a killed worker).
    """
    from tqdm import tqdm

    if not 0 <= worker_rank < num_workers:
        raise ValueError(f"worker rank {worker_rank} is outside [0, {num_workers})")
    if samples_per_shard < 1 or batch_size < 1:
        raise ValueError("--samples_per_shard and --batch_size must be >= 1")
    split = coco.split
    os.makedirs(out, exist_ok=True)
    plan = _plan(coco.layouts, samples_per_shard)
    # Everything that changes a shard's bytes: a rerun with other values must not mix into this set.
    fingerprint = dict(tokenizer=tokenizer.id, text_encoder=text_encoder.id, image_size=coco.image_size,
                       max_objects=coco.max_objects, min_box_area=coco.min_box_area, min_visible=coco.min_visible,
                       samples_per_shard=samples_per_shard, num_usable_images=len(coco.layouts))
    mine = [i for i in range(len(plan)) if i % num_workers == worker_rank]
    todo = [i for i in mine if not _shard_done(out, shard_name(split, i), fingerprint,
                                                [lay.image_id for lay in plan[i]])]
    for i in todo:  # temp files of a killed run: never renamed, so never part of the set
        atomic.remove_stale_temps(os.path.join(out, shard_name(split, i) + ".tar"))
    grid = coco.image_size // tokenizer.stride
    schema = Schema(moments_shape=(2, 2 * tokenizer.channels, grid, grid), text_dim=text_encoder.dim,
                    categories=frozenset(coco.categories))
    built = []
    tag_cache: dict[str, np.ndarray] = {}
    bar = tqdm(total=sum(len(plan[i]) for i in todo), desc=f"{split} shards (worker {worker_rank}/{num_workers})",
               unit="img", disable=not progress, position=worker_rank if num_workers > 1 else None)
    # Image decode + resize runs in threads (PIL releases the GIL) while the encoders run.
    with ThreadPoolExecutor(image_threads or min(8, os.cpu_count() or 1)) as pool:
        for i in todo:
            if stop_after is not None and len(built) >= stop_after:
                break
            name, layouts = shard_name(split, i), plan[i]
            samples, faults = [], []
            for b in range(0, len(layouts), batch_size):
                encoded, bad = _encode_batch(coco, layouts[b:b + batch_size], tokenizer, text_encoder, pool, device,
                                             tag_cache, schema)
                samples += encoded
                faults += bad
                bar.update(len(layouts[b:b + batch_size]))
            sha, size = write_shard(os.path.join(out, name + ".tar"), samples)
            side = dict(name=name + ".tar", num_samples=len(samples), sha256=sha, bytes=size,
                        image_ids=[lay.image_id for lay in layouts], fingerprint=fingerprint)
            if faults:
                side["skipped_images"] = faults
            atomic.write_text(os.path.join(out, name + ".json"), json.dumps(side))
            built.append(name)
    bar.close()
    channels = tokenizer.channels
    common = dict(
        tokenizer=dict(name=tokenizer.name, id=tokenizer.id, scale=tokenizer.scale, channels=channels,
                       stride=tokenizer.stride, latent_shape=[channels, grid, grid]),
        text_encoder=dict(id=text_encoder.id, dim=text_encoder.dim, max_length=text_encoder.max_length),
        image_size=coco.image_size,
        categories={str(k): v for k, v in sorted(coco.categories.items())},
    )
    split_info = dict(max_objects=coco.max_objects, min_box_area=coco.min_box_area, samples_per_shard=samples_per_shard,
                      dropped_images=coco.dropped, build_args=build_args or {})
    manifest = update_manifest(out, split, len(plan), common, split_info)
    return dict(built=built, skipped=[shard_name(split, i) for i in mine if i not in todo], manifest=manifest)


def verify_shards(shard_dir: str, split: str) -> dict:
    """Re-read every shard of `split` against the manifest (sha256, sample count, every payload); raise on mismatch.
    Returns the counts and the images the build skipped (the manifest's "skipped_images")."""
    manifest = read_manifest(shard_dir, split)
    schema = _schema(manifest)
    seen: set[str] = set()
    total = 0
    for s in manifest["splits"][split]["shards"]:
        path = os.path.join(shard_dir, s["name"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard {s['name']} listed in the manifest is missing from {shard_dir}")
        if sha256(path) != s["sha256"]:
            raise ValueError(f"shard {s['name']}: sha256 differs from the manifest (corrupted or rewritten)")
        count = 0
        for raw in iter_shard(path, s["num_samples"]):
            try:
                decode_sample(raw, schema)
            except ShardError as e:
                raise ShardError(e.reason, f"shard {s['name']}, sample {raw['__key__']}: {e}") from None
            if raw["__key__"] in seen:
                raise ValueError(f"shard {s['name']}: sample {raw['__key__']} appears twice in split {split}")
            seen.add(raw["__key__"])
            count += 1
        if count != s["num_samples"]:
            raise ValueError(f"shard {s['name']}: {count} samples, manifest says {s['num_samples']}")
        total += count
    entry = manifest["splits"][split]
    return dict(shards=len(entry["shards"]), samples=total, skipped_images=entry.get("skipped_images", []))


def _resolve_slots(num_workers: int, worker_rank: int | None) -> tuple[list[int], int]:
    """(builder slots this process runs, total slots) from the flags or the torch.distributed environment."""
    if worker_rank is not None:
        return [worker_rank], num_workers
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return [rank * num_workers + i for i in range(num_workers)], world * num_workers


def _build_slot(opts: dict, slot: int, total: int, stop_after: int | None = None) -> dict:
    from structmar.text import TextEncoder
    from structmar.tokenizer import build_tokenizer

    device = opts["device"]
    if device == "auto":
        device = "cpu"
        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', slot)) % torch.cuda.device_count()}"
    tokenizer = build_tokenizer(opts["tokenizer"], opts.get("vae_path"), opts["pixel_patch"]).to(device).eval()
    text_encoder = TextEncoder.from_pretrained(opts["clip_path"], device=device)
    coco = CocoLayouts(opts["coco_root"], opts["coco_split"], opts["image_size"], opts["max_objects"],
                       opts["min_box_area"])
    return build_shards(coco, opts["out"], tokenizer, text_encoder, samples_per_shard=opts["samples_per_shard"],
                        batch_size=opts["batch_size"], worker_rank=slot, num_workers=total, device=device,
                        build_args=opts, progress=opts.get("progress", True), stop_after=stop_after)


def _spawned_slot(opts: dict, slot: int, total: int, threads: int) -> None:
    torch.set_num_threads(threads)
    _build_slot(opts, slot, total)


def _skipped_images(faults: list[dict]) -> str:
    """The summary line's account of the images a build skipped: count by reason, then the first few."""
    if not faults:
        return ""
    reasons = Counter(f["reason"] for f in faults)
    return (f"; {len(faults)} images skipped ({', '.join(f'{n} {r}' for r, n in sorted(reasons.items()))}): "
            + listed([f"{f['file_name']} ({f['reason']})" for f in faults]))


def run_build(opts: dict) -> dict:
    """`structmar build-shards`: build this process's slots (spawning local processes when several), then verify."""
    slots, total = _resolve_slots(opts["num_workers"], opts.get("worker_rank"))
    if opts["tokenizer"] not in ("kl16", "pixel"):
        raise ValueError(f"unknown tokenizer {opts['tokenizer']!r}")
    # Fail here with one clear line rather than in every spawned process.
    if opts["tokenizer"] == "kl16" and not (opts.get("vae_path") and os.path.isfile(opts["vae_path"])):
        raise FileNotFoundError(f"--vae_path {opts.get('vae_path')} is not a file; the kl16 tokenizer needs MAR's "
                                "kl16.ckpt")
    if not os.path.isdir(opts["clip_path"]):
        from structmar.text import CLIP_HOWTO

        raise FileNotFoundError(f"CLIP directory {opts['clip_path']} not found; {CLIP_HOWTO}")
    if len(slots) == 1:
        result = _build_slot(opts, slots[0], total)
    else:
        ctx = torch.multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // len(slots))
        procs = [ctx.Process(target=_spawned_slot, args=(opts, s, total, threads)) for s in slots]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [s for s, p in zip(slots, procs, strict=True) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"shard builder slots {failed} failed; rerun the same command to finish")
        result = {"manifest": read_manifest(opts["out"])}
    entry = result["manifest"]["splits"][opts["coco_split"]]
    print(f"structmar: {opts['out']}: split {opts['coco_split']}: {len(entry['shards'])}/"
          f"{entry['num_shards_expected']} shards, {entry['num_samples']} samples"
          + _skipped_images(entry.get("skipped_images", []))
          + ("" if entry["complete"] else " (other workers still running)"))
    if opts.get("verify"):
        if entry["complete"]:
            info = verify_shards(opts["out"], opts["coco_split"])
            print(f"structmar: verified {info['shards']} shards, {info['samples']} samples"
                  + _skipped_images(info["skipped_images"]))
        else:
            print("structmar: --verify skipped: the split is not complete yet; rerun with --verify when it is")
    return result


# ---- training loader ----------------------------------------------------------------------------


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (independent streams per (seed, epoch, rank, worker, ...))."""
    return int(np.random.SeedSequence([v & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)


def _schema(manifest: dict) -> Schema:
    c, g, _ = manifest["tokenizer"]["latent_shape"]
    return Schema(moments_shape=(2, 2 * c, g, g), text_dim=manifest["text_encoder"]["dim"],
                  categories=frozenset(int(k) for k in manifest["categories"]))


class _ShardStream(torch.utils.data.IterableDataset):
    """Yields whole batches; one logical worker per DataLoader worker (see ShardLoader for the contract)."""

    def __init__(self, shards: dict[str, int], shard_dir: str, schema: Schema, *, batch_size: int, rank: int,
                 world_size: int, num_workers: int, batches_per_worker: int, seed: int, shuffle: bool,
                 shuffle_buffer: int, max_objects: int, text_length: int, scale: float, on_error: str,
                 dtype: torch.dtype, mirror: bool = True):
        super().__init__()
        self.shards, self.shard_sizes = sorted(shards), shards  # name -> sample count from the manifest
        self.shard_dir, self.schema = shard_dir, schema
        self.batch_size, self.rank, self.world_size, self.num_workers = batch_size, rank, world_size, num_workers
        self.batches_per_worker, self.seed, self.shuffle, self.shuffle_buffer = (batches_per_worker, seed, shuffle,
                                                                                  shuffle_buffer)
        self.max_objects, self.text_length, self.scale = max_objects, text_length, scale
        self.on_error, self.dtype, self.mirror = on_error, dtype, mirror
        self.epoch, self.start_batch = 0, 0

    def worker_shards(self, epoch: int, worker: int) -> list[str]:
        order = list(self.shards)
        if self.shuffle:
            order = [order[i] for i in np.random.default_rng(_mix(self.seed, epoch)).permutation(len(order))]
        return order[self.rank::self.world_size][worker::self.num_workers]

    def _pass(self, shards: list[str], counts: Counter):
        """(shard, key, arrays) of each sample of one pass over `shards`; a bad shard raises, or the rest of it is
        skipped and its unread samples counted (`counts` is keyed by (reason, shard)).

        Each sample is decoded and checked as it is read, while its bytes are still in the CPU cache
        (after the shuffle buffer they are not: ~10% of the loader's time); a bad sample carries the
        ShardError saying why in place of its arrays, raised or counted where it is drawn (`_valid`).
        """
        for name in shards:
            read = 0
            try:
                for raw in iter_shard(os.path.join(self.shard_dir, name), self.shard_sizes[name]):
                    try:
                        sample = decode_sample(raw, self.schema)
                    except ShardError as e:
                        sample = e.with_traceback(None)  # a traceback would keep the sample's bytes alive
                    read += 1
                    yield raw["__shard__"], raw["__key__"], sample
            except ShardError as e:
                if self.on_error != "skip":
                    raise
                counts[e.reason, name] += max(1, self.shard_sizes[name] - read)

    def _stream(self, shards: list[str], counts: Counter, rng: random.Random):
        """Endless shuffled samples: pass after pass over `shards`, each pass a full shuffle-buffer cycle.

        A short share is topped up by a further pass, so every worker yields the same batch count.
        """
        while True:
            produced = 0
            buf: list[tuple] = []
            for item in self._pass(shards, counts):
                produced += 1
                if not self.shuffle or self.shuffle_buffer <= 1:
                    yield item
                    continue
                if len(buf) < self.shuffle_buffer:
                    buf.append(item)
                    continue
                i = rng.randrange(len(buf))
                buf[i], item = item, buf[i]
                yield item
            rng.shuffle(buf)  # drain the buffer at the end of the pass, so a pass is a permutation
            yield from buf
            if produced == 0:
                raise ShardError("corrupt", f"shards {shards} yielded no readable sample")

    def _valid(self, stream, counts: Counter, n: int, max_bad_run: int) -> list[dict]:
        """The next `n` samples that decoded and validated (bad ones raise, or are skipped and counted)."""
        out, bad_run = [], 0
        while len(out) < n:
            shard, key, sample = next(stream)
            if not isinstance(sample, ShardError):
                out.append(sample)
                bad_run = 0
                continue
            e = sample
            if self.on_error != "skip":
                raise ShardError(e.reason, f"shard {shard}, sample {key}: {e}") from None
            counts[e.reason, shard] += 1
            bad_run += 1
            if bad_run > max_bad_run:
                raise ShardError(e.reason, f"a whole pass over this worker's shards held no valid sample "
                                 f"(last: shard {shard}, sample {key}: {e})") from None
        return out

    def __iter__(self):
        """This worker's batches; a ShardError ends them with {"__error__": [reason, message]}, which ShardLoader
        raises in the trainer's process (an exception raised in a DataLoader worker reaches it as a traceback)."""
        try:
            yield from self._batches()
        except ShardError as e:
            yield {"__error__": [e.reason, str(e)]}

    def _batches(self):
        info = torch.utils.data.get_worker_info()
        loader_worker = info.id if info is not None else 0
        # Rotate logical workers so a resumed DataLoader's worker 0 serves the next batch in global order.
        worker = (loader_worker + self.start_batch) % self.num_workers
        skip = max(0, -(-(self.start_batch - worker) // self.num_workers))  # this worker's batches already seen
        epoch = self.epoch
        counts: Counter = Counter()
        shards = self.worker_shards(epoch, worker)
        max_bad_run = sum(self.shard_sizes[name] for name in shards)
        stream = self._stream(shards, counts, random.Random(_mix(self.seed, epoch, self.rank, worker, 1)))
        staging: dict = {}
        for j in range(self.batches_per_worker):
            if j < skip:
                if self.on_error == "skip":
                    self._valid(stream, Counter(), self.batch_size, max_bad_run)  # which samples are bad needs decoding
                else:
                    for _ in range(self.batch_size):
                        next(stream)
                counts.clear()
                continue
            samples = self._valid(stream, counts, self.batch_size, max_bad_run)
            gen = torch.Generator().manual_seed(_mix(self.seed, epoch, self.rank, worker, 2, j))
            batch = self._collate(samples, gen, staging)
            by_reason = Counter()
            for (reason, _), n in counts.items():
                by_reason[reason] += n
            batch["__skipped__"].numpy()[:] = [by_reason[r] for r in SKIP_REASONS]
            if counts:
                batch["__bad_shards__"] = sorted({shard for _, shard in counts})
            counts.clear()
            yield batch

    def _collate(self, samples: list[dict], gen: torch.Generator, staging: dict) -> dict:
        """One batch from decoded `samples`; `staging` keeps this iterator's scratch arrays between batches."""
        b, k, length, d = len(samples), self.max_objects, self.text_length, self.schema.text_dim
        flips = torch.randint(0, 2, (b,), generator=gen).tolist()
        if not self.mirror:  # drawn all the same: the caption picks below come from the same stream either way
            flips = [0] * b
        picks = torch.rand(b, generator=gen).tolist()
        latent_shape = (b, self.schema.moments_shape[1] // 2) + self.schema.moments_shape[2:]
        batch = _empty_batch({
            "latents": (latent_shape, self.dtype),
            "text_tokens": ((b, length, d), self.dtype),
            "text_mask": ((b, length), torch.bool),
            "text_pooled": ((b, d), self.dtype),
            "boxes": ((b, k, 4), torch.float32),
            "box_mask": ((b, k), torch.bool),
            "tag_embeds": ((b, k, d), self.dtype),
            "category_ids": ((b, k), torch.long),
            "image_ids": ((b,), torch.long),
            "__skipped__": ((len(SKIP_REASONS),), torch.long),  # filled by __iter__, popped by ShardLoader
        }, shared=torch.utils.data.get_worker_info() is not None)
        # Rows are written through numpy (a numpy store costs ~1 us, a torch one ~5 us). Payloads go
        # straight into a field of their dtype (the stored float16 into a float16 batch); otherwise
        # they are staged in their own dtype and converted by one vectorised torch copy per field.
        view = {key: t.numpy() for key, t in batch.items() if t.dtype != torch.bfloat16}
        rows = {}
        for key, field, shape in (("moments", "moments", (b,) + self.schema.moments_shape[1:]),
                                  ("text_tokens", "text", (b, length, d)), ("text_pooled", "pooled", (b, d)),
                                  ("tag_embeds", "tags", (b, k, d))):
            dtype = np.result_type(*{s[field].dtype for s in samples})
            if key in view and view[key].dtype == dtype:
                rows[key] = view[key]
            else:
                if key not in staging or staging[key].shape != shape or staging[key].dtype != dtype:
                    staging[key] = np.empty(shape, dtype)
                rows[key] = staging[key]
        moments, text, pooled, tags = rows["moments"], rows["text_tokens"], rows["text_pooled"], rows["tag_embeds"]
        boxes, categories = view["boxes"], view["category_ids"]
        boxes.fill(0)
        categories.fill(-1)
        num_boxes, num_tokens = np.empty(b, np.int64), np.empty(b, np.int64)
        for i, s in enumerate(samples):
            # View `flips[i]` (0 image, 1 mirror) and caption `picks[i]` (in [0, 1)) of sample i.
            moments[i] = s["moments"][flips[i]]  # the latent flip; the box flip follows the loop
            n_box = num_boxes[i] = min(len(s["boxes"]), k)  # stored largest first: truncation keeps the largest
            boxes[i, :n_box] = s["boxes"][:n_box]
            categories[i, :n_box] = s["category_ids"][:n_box]
            tags[i, :n_box] = s["tags"][:n_box]
            tags[i, n_box:] = 0
            lengths = s["lengths"]
            c = min(int(picks[i] * len(lengths)), len(lengths) - 1)
            n_tok = num_tokens[i] = min(int(lengths[c]), length)
            text[i, :n_tok] = s["text"][c, :n_tok]
            text[i, n_tok:] = 0
            pooled[i] = s["pooled"][c]
        np.less(np.arange(k), num_boxes[:, None], out=view["box_mask"])
        # The box flip, next to the latent flip: the rows showing view 1 (the mirrored image) get mirrored boxes.
        mirrored = np.flatnonzero(flips)
        boxes[mirrored] = np.where(view["box_mask"][mirrored, :, None], flip_boxes(boxes[mirrored]), 0)
        np.less(np.arange(length), num_tokens[:, None], out=view["text_mask"])
        view["image_ids"][:] = [s["image_id"] for s in samples]
        for key in ("text_tokens", "text_pooled", "tag_embeds"):
            if rows[key] is not view.get(key):
                batch[key].copy_(torch.from_numpy(rows[key]))
        batch["latents"].copy_(sample_posterior(torch.from_numpy(moments), self.scale, gen))  # (B, C, g, g)
        return batch


def _empty_batch(fields: dict, shared: bool) -> dict:
    """Uninitialised tensors {name: (shape, dtype)}.

    In a DataLoader worker (`shared`) they are carved from one block of shared memory: allocating
    in shared memory, as torch's default_collate does, saves a copy per batch on the way to the
    trainer (measured 1.5-2x the transfer rate), and one block passes to the trainer as one file
    descriptor where a block per field costs a handshake each (~1.5 ms of the trainer's CPU time
    per MAR-H batch of 64).
    """
    if not (shared and hasattr(torch.UntypedStorage, "_new_shared")):
        return {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in fields.items()}
    offsets, nbytes = [], 0
    for shape, dtype in fields.values():
        nbytes = -(-nbytes // 64) * 64  # each field starts 64-byte aligned
        offsets.append(nbytes)
        nbytes += math.prod(shape) * dtype.itemsize
    block = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(nbytes, 1)))
    return {name: block[start:start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for (name, (shape, dtype)), start in zip(fields.items(), offsets, strict=True)}


class ShardLoader:
    """Training batches (the contract's dict) from the shards of one split, for one rank.

    Every rank yields `len(self)` batches per epoch (equal across ranks, so DDP never waits on a rank
    that ran dry): each (rank, worker) pair reads its own shards and cycles them if its share is
    short. The order depends only on (seed, epoch, rank, world_size, num_workers); `state_dict()` is
    {"epoch", "batches"} and a loader restored from it continues exactly where the original was.
    `on_error="skip"` drops bad samples (and the rest of a corrupt shard) and counts them in
    `.skipped`, and raises naming the shards once more than `max_bad_fraction` of this rank's epoch
    was bad; the default raises naming the shard and sample (and the member of a corrupt tar).
    `mirror=False` never shows the mirrored view.
    """

    def __init__(self, shard_dir: str, split: str, cfg, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 max_objects: int | None = None, text_length: int | None = None, on_error: str = "raise",
                 dtype: torch.dtype = torch.float32, pin_memory: bool = False, prefetch_factor: int = 4,
                 max_bad_fraction: float = BadDataConfig.max_bad_fraction, mirror: bool = True):
        BadDataConfig(on_error, max_bad_fraction).validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        hint = dict(tokenizer=cfg.tokenizer, image_size=cfg.image_size, max_objects=cfg.max_objects,
                    pixel_patch=cfg.pixel_patch)
        if not os.path.isdir(shard_dir):
            raise FileNotFoundError(f"shard directory {shard_dir} not found; build the shards first: "
                                    + build_command(shard_dir, split, **hint))
        self.manifest = read_manifest(shard_dir, split, hint)
        check_manifest(self.manifest, cfg)
        entry = self.manifest["splits"][split]
        shards = {s["name"]: s["num_samples"] for s in entry["shards"]}
        for name in shards:
            if not os.path.isfile(os.path.join(shard_dir, name)):
                raise FileNotFoundError(f"shard {name} listed in {shard_dir}/{MANIFEST} is missing; rerun: "
                                        + build_command(shard_dir, split, **hint))
        workers = max(1, num_workers)
        if len(shards) < world_size * workers:
            raise ValueError(f"{len(shards)} shards of split {split!r} cannot feed {world_size} ranks x {workers} "
                             "workers; rebuild with a smaller --samples_per_shard or use fewer loader workers")
        self.batches_per_worker = entry["num_samples"] // (world_size * workers * batch_size)
        if self.batches_per_worker == 0:
            raise ValueError(f"split {split!r} has {entry['num_samples']} samples: too few for batch {batch_size} x "
                             f"{world_size} ranks x {workers} workers")
        max_objects = cfg.max_objects if max_objects is None else max_objects
        if not 0 < max_objects <= cfg.max_objects:
            raise ValueError(f"max_objects {max_objects} must lie in [1, {cfg.max_objects}] (the model's)")
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self.dataset = _ShardStream(
            shards, shard_dir, _schema(self.manifest), batch_size=batch_size, rank=rank, world_size=world_size,
            num_workers=workers, batches_per_worker=self.batches_per_worker, seed=seed, shuffle=shuffle,
            shuffle_buffer=shuffle_buffer, max_objects=max_objects,
            text_length=text_length or self.manifest["text_encoder"]["max_length"],
            scale=latent_scale(cfg.tokenizer), on_error=on_error, dtype=dtype, mirror=mirror)
        self.max_bad_fraction = max_bad_fraction
        self.epoch, self.batches = 0, 0
        self.skipped: Counter = Counter()  # bad samples by reason, over the run
        self.epoch_bad, self.bad_shards = 0, set()  # bad samples this epoch and the shards they came from

    def __len__(self) -> int:
        return self.batches_per_worker * self.dataset.num_workers

    def _layout(self) -> dict:
        d = self.dataset
        return dict(seed=d.seed, rank=d.rank, world_size=d.world_size, num_workers=d.num_workers,
                    batch_size=d.batch_size, shuffle=d.shuffle, shuffle_buffer=d.shuffle_buffer, batches=len(self))

    def state_dict(self) -> dict:
        """{"epoch", "batches" consumed in it, "skipped" counts, this epoch's "epoch_bad" count and "bad_shards",
        "layout": what fixes the order}; JSON-safe."""
        return {"epoch": self.epoch, "batches": self.batches, "skipped": dict(self.skipped),
                "epoch_bad": self.epoch_bad, "bad_shards": sorted(self.bad_shards), "layout": self._layout()}

    def load_state_dict(self, state: dict, strict: bool = False) -> None:
        """Continue from `state` (epoch and batches consumed in it).

        With another seed, world size, worker count or batch size the exact order cannot be
        reproduced: strict raises naming the field; otherwise a warning names it and the position is
        taken as given (a caller that changed the world size maps `batches` to the new layout first).
        """
        saved, mine = state.get("layout", {}), self._layout()
        changed = [k for k in mine if k != "batches" and k in saved and saved[k] != mine[k]]
        if changed:
            k = changed[0]
            message = (f"loader state was saved with {k} {saved[k]!r}, this loader has {mine[k]!r}: "
                       "the sample order differs from the interrupted run's")
            if strict:
                raise ValueError(message)
            warnings.warn(message, stacklevel=2)
        batches = int(state["batches"])
        if not 0 <= batches <= len(self):
            raise ValueError(f"loader state position {batches} is outside this epoch's {len(self)} batches")
        self.epoch, self.batches = int(state["epoch"]), batches
        self.skipped = Counter(state.get("skipped", {}))
        self.epoch_bad, self.bad_shards = int(state.get("epoch_bad", 0)), set(state.get("bad_shards", ()))

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches = epoch, 0
        self.epoch_bad, self.bad_shards = 0, set()

    def _count_bad(self, counts: list[int], shards: list[str]) -> None:
        """Add one batch's skipped samples (by reason); raise once this epoch's exceed max_bad_fraction."""
        for reason, n in zip(SKIP_REASONS, counts, strict=True):
            if n:
                self.skipped[reason] += n
                self.epoch_bad += n
        self.bad_shards.update(shards)
        epoch_samples = len(self) * self.dataset.batch_size
        if self.epoch_bad > self.max_bad_fraction * epoch_samples:
            names = sorted(self.bad_shards)
            raise ShardError("corrupt", f"more than {self.max_bad_fraction:g} of rank {self.dataset.rank}'s epoch "
                             f"{self.epoch} is bad data ({self.epoch_bad} bad samples for {epoch_samples}; so far "
                             f"{dict(self.skipped)}) in {len(names)} shards: {', '.join(names[:5])}"
                             f"{' ...' if len(names) > 5 else ''}; rerun build-shards to rebuild them, or raise "
                             "--max_bad_fraction")

    def __iter__(self):
        """One epoch (or its remainder after load_state_dict); the next call starts the next epoch."""
        if self.batches >= len(self):
            self.set_epoch(self.epoch + 1)
        self.dataset.epoch, self.dataset.start_batch = self.epoch, self.batches
        kwargs = dict(num_workers=self.num_workers, batch_size=None, pin_memory=self.pin_memory)
        if self.num_workers > 0:
            kwargs.update(prefetch_factor=self.prefetch_factor, persistent_workers=False)
        loader = torch.utils.data.DataLoader(self.dataset, **kwargs)
        for batch in loader:
            if "__error__" in batch:
                raise ShardError(*batch["__error__"])
            self._count_bad(batch.pop("__skipped__").tolist(), batch.pop("__bad_shards__", []))
            self.batches += 1
            yield batch
        if self.batches < len(self):
            raise RuntimeError(f"loader ended after {self.batches} of {len(self)} batches")

