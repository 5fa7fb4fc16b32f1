"""The embedded default: the paper's three-stage recipe on Shapes, end to end on a CPU in minutes.

Shapes (COCO 2014 layout) -> pixel-tokenizer shards -> stage 0: a plain MAR (no text, no layout, no
RoPE) trained on Shapes and written in MAR's official checkpoint format, the analog of the ImageNet
MAR weights the paper starts from -> stage 1 (`text_layout`) from that file -> stage 2 (`full`) ->
stage 3 (GRPO with the analytic detector) -> an evaluation after each stage -> report.md.

Every stage runs through the same library calls as the commands (`structmar shapes`, `build-shards`,
`train`, `rl`, `eval`) in one process, and each step is skipped when its output is already complete,
so a killed demo reruns to completion. Without a real CLIP directory the text features come from a
seeded random-init CLIP text model of ViT-B/32's architecture, used as a fixed feature extractor, its final
layer norm fit so the category names' pooled features are centred (text.centre_pooled).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass

import torch

from structmar import atomic
from structmar.config import GRPOConfig, PlannerTrainConfig, RLConfig, TrainConfig, model_config
from structmar.engine import latest_checkpoint
from structmar.model import EXPORT, StructMAR, read_weights, write_export


@dataclass
class DemoConfig:
    """Sizes and lengths of the demo; the defaults fit ~10 minutes on a 2-core CPU."""

    out: str = "output/demo"
    clip_path: str | None = None  # a real CLIP directory; None: a seeded random ViT-B/32 text model
    seed: int = 0
    image_size: int = 32
    num_train: int = 2000
    num_val: int = 256
    preset: str = "small"
    batch_size: int = 64
    # most of the budget goes to stage 2, the only stage that trains everything with the layout: stage 2's
    # colour-correct share was 0.40 after 250 + 120 + 200 steps (lr 2e-3), 0.95 after 100 + 50 + 400 (docs/demo.md)
    stage0_steps: int = 100
    stage1_steps: int = 50
    stage2_steps: int = 400
    rl_steps: int = 4
    lr: float = 1e-3  # stages 0-2 (a small model trained briefly; MAR-H uses blr 1e-4 / 2e-5)
    ema_rate: float = 0.95  # a few hundred steps per stage: 0.99 still lagged the weights after stage 2's 200
    rl_lr: float = 1e-5
    rl_batch_size: int = 4
    rl_group_size: int = 4
    rl_num_iter: int = 8
    rl_anchor_coef: float = 1.0
    eval_layouts: int = 128
    # sampling, not SamplingConfig's 64 iterations at temperature 1, as measured on the demo: 8 iterations sample
    # at ~0.1 s per image on 2 cores, and temperature 0.25 beat 0.1 and 0.5 on stage 2
    num_iter: int = 8
    temperature: float = 0.25
    threads: int = 0  # torch threads (0: torch's default)
    # the caption-only row: a layout planner on the same shards (about a minute on 2 cores), whose plans for the
    # val captions the last stage's model draws
    planner_preset: str = "small"
    planner_steps: int = 100
    planner_lr: float = 1e-3


STAGES = ("stage0_mar", "stage1_text_layout", "stage2_full", "stage3_grpo")
CAPTION_ONLY = "caption_only"  # the last stage's model drawing layouts the planner made from the captions


class DemoStopped(Exception):
    """A stage was stopped by a signal (SIGTERM/SIGUSR1) and saved its checkpoint: the demo ends there, and
    rerunning it continues from that checkpoint."""


def _finished(name: str, summary) -> None:
    if summary.preempted:
        raise DemoStopped(f"stopped during {name} at step {summary.step} (checkpoint saved); rerun the same "
                          "command to continue")


def _stage_done(run_dir: str, steps: int) -> bool:
    """A stage is complete when its export exists and its last checkpoint reached `steps`."""
    last = latest_checkpoint(run_dir)
    return os.path.isfile(os.path.join(run_dir, EXPORT)) and last is not None and last[1]["step"] >= steps


def write_mar_checkpoint(export: str, path: str, epoch: int) -> None:
    """Rewrite a structure-off stage export as MAR's `checkpoint-last.pth` ({model, model_ema, epoch, args}).

    The file also carries a one-class `class_emb.weight` as MAR's state dicts do (stage 0 trains one
    class, always dropped to the unconditional `fake_latent`), so loading it into StructMAR reports
    exactly what loading the official weights reports: the class embedding as unexpected.
    """
    weights = read_weights(export)
    cfg = weights.config
    extra = {"class_emb.weight": torch.zeros(1, cfg.width)}
    args = argparse.Namespace(model=cfg.preset, img_size=cfg.image_size, diffloss_d=cfg.diffusion_depth,
                              diffloss_w=cfg.diffusion_width, buffer_size=cfg.buffer_size,
                              mask_ratio_min=cfg.mask_ratio_min, attn_dropout=cfg.attn_dropout,
                              proj_dropout=cfg.proj_dropout, diffusion_batch_mul=cfg.diffusion_batch_mul,
                              num_sampling_steps=str(cfg.num_sampling_steps), class_num=1)
    state = dict(model={**weights.model, **extra}, model_ema={**weights.select(ema=True), **extra}, epoch=epoch,
                 args=args)
    atomic.torch_save(state, path)


def _vocabulary(shapes_root: str) -> tuple[set[str], list[str]]:
    """The words of the training captions and category names (the random CLIP's tokenizer vocabulary), and
    the category names (the tags its pooled features are centred on)."""
    with open(os.path.join(shapes_root, "annotations", "captions_train2014.json")) as f:
        captions = [a["caption"] for a in json.load(f)["annotations"]]
    with open(os.path.join(shapes_root, "annotations", "instances_train2014.json")) as f:
        names = [c["name"] for c in json.load(f)["categories"]]
    return {w for c in captions + names for w in re.findall(r"[a-z]+", c.lower())}, names


def _evaluate(demo: DemoConfig, paths: dict, checkpoint: str, name: str, planner: str | None = None) -> dict:
    from structmar.evaluate import EvalOptions, run_eval

    out = os.path.join(demo.out, "eval", name)
    done = os.path.join(out, "results.json")
    if os.path.isfile(done):
        return json.load(open(done))
    opts = EvalOptions(checkpoint=checkpoint, coco_root=paths["shapes"], out=out, coco_split="val2014",
                       num_layouts=demo.eval_layouts, eval_detector="shapes", clip_path=paths["clip"],
                       num_iter=demo.num_iter, temperature=demo.temperature, cfg=1.0, seed=demo.seed,
                       batch_size=64, device="cpu", planner=planner)
    return run_eval(opts, rank=0, world_size=1)


def train_args(demo: DemoConfig, paths: dict, run_dir: str, steps: int, **kw) -> dict:
    """The StageConfig fields of a demo stage that runs `steps` steps into `run_dir`, `kw` added."""
    return dict(output_dir=run_dir, data=paths["shards"], coco_split="train2014", batch_size=demo.batch_size,
                epochs=10_000, max_steps=steps, lr=demo.lr, device="cpu", precision="fp32",
                deepspeed_config=paths["ds_config"], num_workers=0, log_every=25, save_steps=0, sample_every=0,
                seed=demo.seed, ema_rate=demo.ema_rate, save_last_freq=10_000, **kw)


def _supervised(demo: DemoConfig, paths: dict, run_dir: str, steps: int, **kw) -> TrainConfig:
    """A supervised demo stage: no warmup (a few hundred steps; the lr is constant)."""
    return TrainConfig(**train_args(demo, paths, run_dir, steps, warmup_epochs=0.0, **kw))


def run_demo(demo: DemoConfig) -> str:
    """Run the whole demo into `demo.out`; returns the path of report.md."""
    from structmar.shapes import generate_shapes
    from structmar.shards import run_build
    from structmar.text import write_random_clip
    from structmar.train import run_train

    if demo.threads:
        torch.set_num_threads(demo.threads)
    os.makedirs(demo.out, exist_ok=True)
    paths = dict(shapes=os.path.join(demo.out, "shapes"), shards=os.path.join(demo.out, "shards"),
                 clip=demo.clip_path or os.path.join(demo.out, "clip-random-vit-b32"),
                 ds_config="zero2")
    started, timings = time.time(), {}

    t = time.time()
    if not os.path.isfile(os.path.join(paths["shapes"], "annotations", "instances_val2014.json")):
        generate_shapes(paths["shapes"], demo.num_train, demo.num_val, demo.image_size, demo.seed, overwrite=True)
    if demo.clip_path is None and not os.path.isfile(os.path.join(paths["clip"], "config.json")):
        words, tags = _vocabulary(paths["shapes"])
        write_random_clip(paths["clip"], seed=demo.seed, size="base", words=words, centre_on=tags)
    run_build(dict(coco_root=paths["shapes"], coco_split="train2014", out=paths["shards"], tokenizer="pixel",
                   vae_path=None, pixel_patch=4, clip_path=paths["clip"], image_size=demo.image_size,
                   max_objects=16, min_box_area=0.002, samples_per_shard=250, batch_size=128, num_workers=1,
                   worker_rank=None, device="cpu", verify=False, progress=False))
    timings["data"] = time.time() - t

    results, runs = {}, {name: os.path.join(demo.out, name) for name in STAGES}
    # stage 0: plain MAR (structure off), initialised by an export of a fresh model so the run's config says so
    t = time.time()
    plain = model_config(demo.preset, image_size=demo.image_size, rope=False, layout=False, text=False,
                         layout_bias="none")
    init = os.path.join(demo.out, "stage0_init.safetensors")
    if not os.path.isfile(init):
        torch.manual_seed(demo.seed)
        sd = StructMAR(plain).state_dict()
        write_export(init, sd, sd, plain, {"note": "fresh plain MAR"})
    if not _stage_done(runs["stage0_mar"], demo.stage0_steps):
        _finished("stage0_mar", run_train(_supervised(demo, paths, runs["stage0_mar"], demo.stage0_steps, model=None,
                                                      resume=init, train_mode="full")))
    mar_file = os.path.join(runs["stage0_mar"], "checkpoint-last.pth")
    write_mar_checkpoint(os.path.join(runs["stage0_mar"], EXPORT), mar_file, epoch=demo.stage0_steps)
    timings["stage0_mar"] = time.time() - t
    results["stage0_mar"] = _evaluate(demo, paths, os.path.join(runs["stage0_mar"], EXPORT), "stage0_mar")

    # stages 1-2: the paper's recipe from MAR-format weights; every stage starts from the previous one's EMA
    # weights, the ones its evaluation scored (its raw weights at lr 1e-3 sample worse: stage 2's AP50 0.087 EMA,
    # 0.038 raw)
    previous = mar_file
    for name, mode, steps in (("stage1_text_layout", "text_layout", demo.stage1_steps),
                              ("stage2_full", "full", demo.stage2_steps)):
        t = time.time()
        if not _stage_done(runs[name], steps):
            _finished(name, run_train(_supervised(demo, paths, runs[name], steps, model=demo.preset, resume=previous,
                                                  train_mode=mode, init_ema=True)))
        timings[name] = time.time() - t
        previous = os.path.join(runs[name], EXPORT)
        results[name] = _evaluate(demo, paths, previous, name)

    # stage 3: GRPO with the analytic detector as reward, the supervised loss kept as an anchor
    from structmar.grpo import run_rl

    t = time.time()
    name = "stage3_grpo"
    if not _stage_done(runs[name], demo.rl_steps):
        rl = RLConfig(**{**train_args(demo, paths, runs[name], demo.rl_steps, model=demo.preset, resume=previous,
                                      init_ema=True),
                         "batch_size": demo.rl_batch_size, "lr": demo.rl_lr, "log_every": 5},
                      detector="shapes",
                      grpo=GRPOConfig(group_size=demo.rl_group_size, num_iter=demo.rl_num_iter,
                                      temperature=demo.temperature, anchor_coef=demo.rl_anchor_coef))
        _finished(name, run_rl(rl))
    timings[name] = time.time() - t
    results[name] = _evaluate(demo, paths, os.path.join(runs[name], EXPORT), name)

    # caption only: a planner trained on the same shards plans each val caption's layout for the last stage
    from structmar.planner import run_train_planner

    t = time.time()
    planner = os.path.join(demo.out, "planner")
    if not _stage_done(planner, demo.planner_steps):
        cfg = PlannerTrainConfig(**{**train_args(demo, paths, planner, demo.planner_steps, model=demo.planner_preset),
                                    "lr": demo.planner_lr})
        threads = torch.get_num_threads()
        # a 1M-parameter model's steps are overhead-bound: more threads on 2 shared cores only contend (the tiny
        # planner measured 7 captions/s with torch's default threads, 70 with one, on a loaded 2-core CPU)
        torch.set_num_threads(1)
        try:
            _finished("planner", run_train_planner(cfg))
        finally:
            torch.set_num_threads(threads)
    timings[CAPTION_ONLY] = time.time() - t
    results[CAPTION_ONLY] = _evaluate(demo, paths, os.path.join(runs[name], EXPORT), CAPTION_ONLY, planner=planner)

    timings["total"] = time.time() - started
    return write_report(demo, results, timings, random_clip=demo.clip_path is None)


def _cell(block: dict, key: str) -> str:
    value, se = block.get(key), block.get(f"{key}_se")
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" ± {se:.3f}" if se else "")


def write_report(demo: DemoConfig, results: dict, timings: dict, random_clip: bool) -> str:
    """report.md: per-stage layout fidelity with standard errors, the real-image ceiling and chance, grids."""
    first = next(iter(results.values()))["layout"]["eval"]
    ceiling, chance = first["real"], first["mismatched"]
    lines = [
        "# structmar demo report",
        "",
        f"Shapes at {demo.image_size} px ({demo.num_train} train / {demo.num_val} val images), preset "
        f"`{demo.preset}`, pixel tokenizer; evaluation on {demo.eval_layouts} val layouts with the analytic Shapes "
        f"detector, sampling {demo.num_iter} iterations at temperature {demo.temperature}. Wall time "
        f"{timings['total'] / 60:.1f} min on this machine.",
        "",
    ]
    if random_clip:
        lines += ["Text features come from a seeded random-init CLIP text model of ViT-B/32's architecture (no "
                  "pretrained CLIP was given): captions and tags are embedded by a fixed random network whose final "
                  "layer norm centres the category names' pooled features, so text conditioning carries only what "
                  "such features preserve.", ""]
    lines += [
        "| stage | AP50 | AP | success @ IoU 0.5 | mean IoU | minutes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, res in results.items():
        gen = res["layout"]["eval"]["generated"]
        label = f"caption only: planned layouts -> {STAGES[-1]}" if name == CAPTION_ONLY else name
        lines.append(f"| {label} | {_cell(gen, 'ap50')} | {_cell(gen, 'ap')} | {_cell(gen, 'success_rate')} | "
                     f"{_cell(gen, 'mean_iou')} | {timings.get(name, 0) / 60:.1f} |")
    lines += [
        f"| real images (ceiling) | {_cell(ceiling, 'ap50')} | {_cell(ceiling, 'ap')} | "
        f"{_cell(ceiling, 'success_rate')} | {_cell(ceiling, 'mean_iou')} | |",
        f"| real images, mismatched layouts (chance) | {_cell(chance, 'ap50')} | {_cell(chance, 'ap')} | "
        f"{_cell(chance, 'success_rate')} | {_cell(chance, 'mean_iou')} | |",
        "",
    ]
    if CAPTION_ONLY in results:
        plan = results[CAPTION_ONLY]["planner"]
        planned, rel = plan["layouts"]["planned"], plan["relations"]
        lines += [f"The caption-only row scores images drawn from layouts a planner made from the captions alone "
                  f"(`planner/`, {demo.planner_steps} steps) against the captions' own layouts. Its plans: category "
                  f"precision {planned['precision']:.3f}, recall {planned['recall']:.3f}, mean best IoU "
                  f"{planned['mean_best_iou']:.3f}"
                  + (f"; stated relations satisfied {rel['planned']:.3f} (ground-truth layouts "
                     f"{rel['ground_truth']:.3f}, shuffled {rel['shuffled']:.3f})" if rel else "") + ".", ""]
    lines += [
        "Figures (generated samples with their input boxes and tags):",
        "",
    ]
    for name in results:
        lines.append(f"- {name}: ![{name}](eval/{name}/figures/generated_00.png)")
    path = os.path.join(demo.out, "report.md")
    atomic.write_text(path, "\n".join(lines) + "\n")
    atomic.write_text(os.path.join(demo.out, "results.json"),
                      json.dumps(dict(config=dataclasses.asdict(demo), results=results, timings=timings), indent=1))
    return path
