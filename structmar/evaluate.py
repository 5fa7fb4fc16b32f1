"""`structmar eval`: generate for the layouts of a COCO-format val set and report layout fidelity against its
real-image ceiling and mismatched-layout chance level, FID and CLIP score (results.json, results.md, figures).

The protocol: ranks split the batches and write their results under <out>/parts/; rank 0 gathers and
merges them, scores (`structmar.metrics`), draws the figure grids (`structmar.figures`) and writes the
report. `load_evaluation` reads a finished evaluation back for paired comparisons.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from structmar import atomic
from structmar.config import SamplingConfig
from structmar.figures import to_pil, write_layout_grids
from structmar.metrics import ClipScorer, FIDInception, frechet_distance, inception_features, layout_scores, mean_se
from structmar.sampler import checked_sampling, load_sampler, resolve_device


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
    clip_path: str | None = None  # None: the one the checkpoint records (see sampler.load_sampler)
    vae_path: str | None = None
    ema: bool | None = None
    num_iter: int = SamplingConfig.num_iter
    cfg: float = SamplingConfig.cfg
    cfg_schedule: str = SamplingConfig.cfg_schedule
    temperature: float = SamplingConfig.temperature
    seed: int = 0
    batch_size: int = 16
    num_grids: int = 1  # 4x4 figure grids written
    device: str = "auto"
    gather_timeout: float = 3600.0  # seconds rank 0 waits for the other ranks' results
    planner: str | None = None  # plan each caption's layout (structmar.planner) instead of taking the data's

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.num_iter, self.cfg, self.cfg_schedule, self.temperature)


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
    sampling = checked_sampling(opts.sampling)
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
    planner = _load_planner(opts.planner, gen, coco.categories) if opts.planner else None
    fingerprint = _fingerprint(opts, gen.checkpoint)

    samples_dir, parts_dir = os.path.join(opts.out, "samples"), os.path.join(opts.out, "parts")
    os.makedirs(samples_dir, exist_ok=True)
    os.makedirs(parts_dir, exist_ok=True)
    part = dict(fingerprint=fingerprint, index=[], generate_seconds=0.0,
                **{f"{kind}_{which}": [] for kind in detectors for which in ("generated", "real")},
                **{f"{name}_{which}": [] for name in ("features", "clip") for which in ("generated", "real")},
                **({"planned": []} if planner is not None else {}))
    for j, indices in _batches(len(layouts), opts.batch_size, rank, world_size):
        chosen = [layouts[i] for i in indices]
        captions = [lay.captions[0] for lay in chosen]  # the first caption (lowest annotation id)
        if planner is None:
            batch = gen.condition(captions, [lay.boxes for lay in chosen], [lay.tags for lay in chosen],
                                  [lay.category_ids for lay in chosen], [lay.image_id for lay in chosen])
        else:
            batch = _planned_batch(planner, gen, captions, chosen, part["planned"])
        t0 = time.monotonic()
        generator = torch.Generator(device=device).manual_seed(opts.seed * 1_000_003 + j)
        images = gen.generate(batch, generator, sampling)  # (B, 3, S, S) in [0, 1]
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
    if planner is not None:
        from structmar.planner import planner_results

        size = (mcfg.image_size, mcfg.image_size)
        results["planner"] = planner_results(planner, gen.text_encoder, layouts, merged, size, coco.categories)
        planned = [dataclasses.replace(lay, boxes=p["boxes"].numpy(), category_ids=p["category_ids"].numpy(),
                                       tags=[coco.categories[int(c)] for c in p["category_ids"]])
                   for lay, p in zip(layouts, merged["planned"])]
        results["figures"] = write_layout_grids(opts.out, opts.num_grids, coco, planned)
        results["notes"].append("the figures draw the planned layouts (over the generated and the real images)")
    results["seconds_total"] = time.monotonic() - started
    atomic.write_text(os.path.join(opts.out, "results.json"), json.dumps(results, indent=2))
    atomic.write_text(os.path.join(opts.out, "results.md"), results_markdown(results))
    return results


def _load_planner(path: str, gen, categories: dict[int, str]):
    """The --planner model, its categories checked against the image model's and the data's."""
    from structmar.planner import check_categories, load_planner

    planner = load_planner(path, gen.device)
    check_categories(planner, gen.categories or None, "the image model")
    check_categories(planner, categories, "the evaluation data")
    return planner


def _planned_batch(planner, gen, captions: list[str], chosen: list, planned: list) -> dict:
    """The sampler's batch for layouts planned from `captions` (appended to `planned`)."""
    from structmar.planner import plan_captions

    plans = plan_captions(planner, gen.text_encoder, captions, max_boxes=gen.model.cfg.max_objects)
    planned += [dict(boxes=torch.from_numpy(p.boxes), category_ids=torch.from_numpy(p.category_ids)) for p in plans]
    return gen.condition(captions, [p.boxes for p in plans], [p.tags for p in plans],
                         [p.category_ids for p in plans], [lay.image_id for lay in chosen])


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
        clip = {which: dict(zip(("mean", "se"), mean_se(merged[f"clip_{which}"].numpy())))
                for which in ("generated", "real")}
        clip["path"] = opts.clip_score_path
    else:
        notes.append("CLIP score skipped: no --clip_score_path")

    figures = write_layout_grids(opts.out, opts.num_grids, coco, layouts)
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
    if results.get("planner"):
        from structmar.planner import planner_markdown

        lines += planner_markdown(results["planner"])
    if results["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    if results["figures"]:
        lines += ["## Figures", ""] + [f"- `{os.path.basename(p)}`" for p in results["figures"]] + [""]
    return "\n".join(lines)
