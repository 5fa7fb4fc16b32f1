"""The `structmar` command: thin wiring from flags to library calls.

Each subcommand is one `_add_<name>` function that declares its flags and a handler. Errors a user
can fix (bad flags, missing files, bad data) print as one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from structmar.atomic import SaveError


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a one-line UserError instead of usage text on stderr."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def _add_shapes(sub) -> None:
    p = sub.add_parser("shapes", help="write the synthetic Shapes dataset as a COCO-2014-style tree")
    p.add_argument("--out", required=True, help="output directory (created; must be empty unless --overwrite)")
    p.add_argument("--num_train", type=_positive_int, default=2000)
    p.add_argument("--num_val", type=_positive_int, default=256)
    p.add_argument("--image_size", type=int, default=64, help="square image side in pixels (32 to 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")

    def run(args):
        from structmar.shapes import generate_shapes

        generate_shapes(args.out, args.num_train, args.num_val, args.image_size, args.seed, overwrite=args.overwrite)

    p.set_defaults(func=run)


def _add_build_shards(sub) -> None:
    p = sub.add_parser("build-shards", help="encode a COCO split into shards of VAE moments and CLIP embeddings")
    p.add_argument("--coco_root", required=True, help="COCO tree: {root}/{split}/ images and {root}/annotations/")
    p.add_argument("--coco_split", required=True, help="split name, e.g. train2014 (also the shard name prefix)")
    p.add_argument("--out", required=True, help="shard directory (several splits may share it)")
    p.add_argument("--tokenizer", required=True, choices=("kl16", "pixel"))
    p.add_argument("--vae_path", default=None, help="MAR's kl16.ckpt (kl16 only)")
    p.add_argument("--pixel_patch", type=int, default=4, help="patch side in pixels (pixel tokenizer only)")
    p.add_argument("--clip_path", required=True, help="local CLIP directory (clip-vit-base-patch32 layout)")
    p.add_argument("--image_size", type=int, default=256, help="training resolution (resize + centre crop)")
    p.add_argument("--max_objects", type=int, default=16, help="boxes kept per image, largest first")
    p.add_argument("--min_box_area", type=float, default=0.002, help="drop boxes under this fraction of the crop")
    p.add_argument("--samples_per_shard", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=64, help="images per encoder call")
    p.add_argument("--num_workers", type=int, default=1,
                   help="builder processes: local processes to spawn, or with --worker_rank the total count")
    p.add_argument("--worker_rank", type=int, default=None,
                   help="build only this slot of --num_workers (default: RANK/WORLD_SIZE from the environment)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:N")
    p.add_argument("--verify", action="store_true", help="re-read every shard against the manifest at the end")

    def run(args):
        from structmar.shards import run_build

        opts = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
        run_build(opts)

    p.set_defaults(func=run)


def _add_knobs(p, group, defaults) -> None:
    """One flag per field of `group` declared with `config.knob`: its name, type, allowed values and help, the
    default from `defaults` (a stage config's other fields have flags of their own)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(group)
    for f in dataclasses.fields(group):
        if "help" not in f.metadata:
            continue
        kind = hints[f.name]
        spec = dict(default=getattr(defaults, f.name), help=f.metadata["help"])
        if f.metadata["choices"]:
            spec["choices"] = f.metadata["choices"]
        if kind is bool:
            spec["action"] = argparse.BooleanOptionalAction  # it appends the default to the help itself
        elif typing.get_origin(kind) is tuple:
            spec.update(nargs=len(typing.get_args(kind)), type=typing.get_args(kind)[0])
        else:  # X or X | None
            spec["type"] = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        if kind is not bool and "default" not in spec["help"]:
            spec["help"] += " (default: %(default)s)"
        p.add_argument(f"--{f.name}", **spec)


def _add_stage_flags(p, d) -> None:
    """The flags stages 1-3 share: data, model, run directory, optimizer, and the engine's and checkpoints'
    knobs."""
    from structmar.config import PRECISIONS, PRESETS, BadDataConfig, OptimizerConfig

    p.add_argument("--output_dir", default=d.output_dir, help="checkpoints, export and logs; rerunning continues it")
    p.add_argument("--data", default=d.data, help="shard directory (default: <coco_root>/shards/<coco_split>)")
    p.add_argument("--coco_root", default=d.coco_root)
    p.add_argument("--coco_split", default=d.coco_split, help="split name inside the shard directory")
    p.add_argument("--model", default=d.model, choices=sorted(PRESETS),
                   help="model preset (default: the --resume file's config)")
    p.add_argument("--diffloss_d", type=int, default=d.diffloss_d, help="diffusion head depth (default: preset's)")
    p.add_argument("--diffloss_w", type=int, default=d.diffloss_w, help="diffusion head width (default: preset's)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max_steps", type=int, default=d.max_steps, help="stop after this many steps (0: all epochs)")
    _add_knobs(p, OptimizerConfig, d.optimizer)
    p.add_argument("--ema_rate", type=float, default=d.ema_rate)
    p.add_argument("--init_ema", action="store_true",
                   help="a fresh run starts from the --resume file's EMA weights (model_ema), the weights a stage's "
                        "evaluation scores, instead of its raw ones")
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--deepspeed_config", default=d.deepspeed_config,
                   help="ZeRO json: a packaged one (zero2, zero3, zero3_offload) or a path; ZeRO and communication "
                        "knobs only")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS)
    p.add_argument("--device", default=d.device, choices=("cuda", "cpu"))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num_workers", type=int, default=d.num_workers, help="data loader workers per rank")
    _add_knobs(p, BadDataConfig, d.bad_data)
    p.add_argument("--save_last_freq", type=int, default=d.save_last_freq, help="epochs between checkpoints")
    p.add_argument("--save_steps", type=int, default=d.save_steps, help="also checkpoint every N steps (0: off)")
    p.add_argument("--keep_checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--log_dir", default=d.log_dir, help="TensorBoard directory (default: <output_dir>/tensorboard)")
    p.add_argument("--log_every", type=int, default=d.log_every, help="steps between progress lines")
    p.add_argument("--sample_every", type=int, default=d.sample_every,
                   help="steps between TensorBoard grids of EMA samples (0: off)")
    p.add_argument("--max_nonfinite", type=int, default=d.max_nonfinite,
                   help="consecutive non-finite losses that abort the run")


def _stage_runner(config_cls, entry: str):
    """A handler building `config_cls` from the parsed flags (each flag is one of its fields) and calling
    structmar.<entry>."""

    def run(args):
        import importlib

        module, name = entry.rsplit(".", 1)
        flags = {k: v for k, v in vars(args).items() if k not in ("func", "command", "local_rank")}
        cfg = config_cls.from_flags(flags)
        try:
            getattr(importlib.import_module(module), name)(cfg)
        except FloatingPointError as e:
            raise UserError(str(e)) from None

    return run


def _add_train(sub) -> None:
    from structmar.config import LR_SCHEDULES, TRAIN_MODES, TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="supervised stages 1-2 (text_layout / full) under DeepSpeed",
                       description="Runs as one process, or under deepspeed / torchrun / srun (one process per GPU).")
    _add_stage_flags(p, d)
    p.add_argument("--resume", default=d.resume,
                   help="MAR weights (.pth/.safetensors), a stage export, or a run directory")
    p.add_argument("--train_mode", default=d.train_mode, choices=TRAIN_MODES,
                   help="text_layout: train only structmar's new modules; full: everything")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="per GPU (rank)")
    p.add_argument("--grad_accum", type=int, default=d.grad_accum, help="gradient accumulation steps")
    p.add_argument("--warmup_epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--blr", type=float, default=d.blr, help="base lr: lr = blr x global batch / 256")
    p.add_argument("--lr", type=float, default=d.lr, help="absolute lr (overrides --blr)")
    p.add_argument("--min_lr", type=float, default=d.min_lr, help="floor of the cosine schedule")
    p.add_argument("--lr_schedule", default=d.lr_schedule, choices=LR_SCHEDULES)
    p.add_argument("--label_drop_prob", type=float, default=d.label_drop_prob, help="condition dropout for CFG")
    p.add_argument("--vae_path", default=d.vae_path,
                   help="kl16 checkpoint to decode the --sample_every samples (default: the one the shards were "
                        "built with, else pretrained_models/vae/kl16.ckpt)")
    _add_knobs(p, TrainConfig, d)
    p.set_defaults(func=_stage_runner(TrainConfig, "structmar.train.run_train"))


def _add_sampling_flags(p) -> None:
    """How `sample` and `eval` load a model and sample. A flag left out is not passed (None), so each default
    lives in one place: the sampling knobs' in config.SamplingConfig (quoted in the help), the rest in
    structmar.sampler and structmar.evaluate."""
    from structmar.config import CFG_SCHEDULES, SamplingConfig

    d = SamplingConfig()
    p.add_argument("--num_iter", type=int, help=f"autoregressive steps (default {d.num_iter})")
    p.add_argument("--cfg", type=float, help=f"classifier-free guidance scale, 1: off (default {d.cfg:g})")
    p.add_argument("--cfg_schedule", choices=CFG_SCHEDULES, help=f"default {d.cfg_schedule}")
    p.add_argument("--temperature", type=float, help=f"diffusion sampling temperature (default {d.temperature})")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--clip_path", help="the CLIP directory the model's shards were built with (default: the one "
                                       "its export records, else pretrained_models/clip-vit-base-patch32)")
    p.add_argument("--vae_path", help="MAR's kl16.ckpt (kl16 models only; default: the one its export records, "
                                      "else pretrained_models/vae/kl16.ckpt)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction,
                   help="sample with the EMA weights (default: when the file has them)")


def _add_sample(sub) -> None:
    # Defaults live in structmar.sampler.sample_layout and config.SamplingConfig (a flag left out is not passed).
    p = sub.add_parser("sample", help="generate images of one layout spec (PNGs and box/tag overlays)",
                       description='A layout spec is JSON: {"caption": "...", "units": "normalized" (default) or '
                                   '"pixels", "image_size": S or [W, H] (needed for pixels), "boxes": [{"box": '
                                   '[x0, y0, x1, y1], "tag": "red circle"}, ...]}.')
    p.add_argument("--checkpoint", required=True, help="a stage export (checkpoint-last.safetensors) or its run dir")
    p.add_argument("--layout", help="layout spec JSON file (or --planner)")
    p.add_argument("--prompt", help="caption (overrides the spec's)")
    p.add_argument("--planner", help="without --layout: a planner export (or its run dir) plans the --prompt's "
                                     "layout, written to OUT/layout.json")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num_images", type=int, help="default 4")
    p.add_argument("--batch_size", type=int, help="images per sampler call (default 16)")
    _add_sampling_flags(p)
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda:N")

    def run(args):
        import dataclasses

        from structmar.config import SamplingConfig
        from structmar.sample import read_layout_spec
        from structmar.sampler import load_sampler, resolve_device, sample_layout

        if (args.layout is None) == (args.planner is None):
            raise UserError("structmar sample: pass --layout, or --planner with --prompt (a planned layout)")
        if args.planner is not None and not args.prompt:
            raise UserError("structmar sample: --planner plans a layout from --prompt; pass a caption")
        if args.layout is not None:
            spec = read_layout_spec(args.layout)
            if args.prompt is not None:
                spec.caption = args.prompt
            elif not spec.caption:
                raise UserError(f"{args.layout}: caption: missing; give one in the spec or pass --prompt")
        given = lambda names: {k: getattr(args, k) for k in names if getattr(args, k) is not None}
        gen = load_sampler(args.checkpoint, device=resolve_device(args.device),
                           **given(("clip_path", "vae_path", "ema")))
        if args.planner is not None:
            from structmar.planner import plan_spec

            args.layout = plan_spec(args.planner, gen, args.prompt, args.out)
            print(f"structmar sample: planned {args.layout}")
            spec = read_layout_spec(args.layout)
        sampling = SamplingConfig(**given(f.name for f in dataclasses.fields(SamplingConfig)))
        paths = sample_layout(gen, spec, args.out, sampling, source=args.layout,
                              **given(("num_images", "batch_size", "seed")))
        print(f"structmar sample: wrote {len(paths)} files to {args.out}")

    p.set_defaults(func=run)

def _add_eval(sub) -> None:
    # Defaults live in structmar.evaluate.EvalOptions, whose sampling knobs take config.SamplingConfig's (a flag
    # left out is not passed), so building the parser imports no torch.
    p = sub.add_parser("eval", help="layout fidelity (AP, IoU, success), FID and CLIP score on a COCO-format val set",
                       description="Runs as one process or one per GPU (RANK/WORLD_SIZE from torchrun/srun); "
                                   "rank 0 merges the ranks' results through files under --out.")
    p.add_argument("--checkpoint", required=True, help="a stage export (checkpoint-last.safetensors) or its run dir")
    p.add_argument("--coco_root", required=True, help="COCO tree: {root}/{split}/ images and {root}/annotations/")
    p.add_argument("--coco_split", help="split name (default val2014)")
    p.add_argument("--out", required=True, help="output directory: results.json, results.md, figures/, samples/")
    p.add_argument("--num_layouts", type=_positive_int, help="evaluate the first N usable layouts (default 0: all)")
    p.add_argument("--batch_size", type=int, help="layouts per sampler call (default 16)")
    p.add_argument("--eval_detector", help="detector scored against, not the RL reward detector: torchvision_frcnn "
                                           "(default), hf or shapes")
    p.add_argument("--eval_detector_path", help="its weights file (torchvision_frcnn) or directory (hf)")
    p.add_argument("--reward_detector", help="also report the RL reward detector (same kinds)")
    p.add_argument("--reward_detector_path")
    p.add_argument("--score_threshold", type=float, help="drop detections scoring below it (default 0.05)")
    p.add_argument("--inception_path",
                   help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth); FID is skipped without it")
    p.add_argument("--clip_score_path", help="a two-tower CLIP directory for the CLIP score; skipped without it")
    _add_sampling_flags(p)
    p.add_argument("--num_grids", type=_positive_int, help="4x4 figure grids to write (default 1)")
    p.add_argument("--device", help="auto (default: cuda:LOCAL_RANK if available, else cpu), cpu, cuda:N")
    p.add_argument("--gather_timeout", type=float, help="seconds rank 0 waits for the other ranks (default 3600)")
    p.add_argument("--planner", help="text to image end to end: a planner export (or its run dir) plans each "
                                     "caption's layout; also scores the plans and the objects of the images")

    def run(args):
        import dataclasses

        from structmar.evaluate import EvalOptions, run_eval

        fields = {f.name for f in dataclasses.fields(EvalOptions)}
        opts = EvalOptions(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
        if run_eval(opts) is not None:
            print(f"structmar eval: wrote {opts.out}/results.json and results.md")

    p.set_defaults(func=run)

def _add_rl(sub) -> None:
    from structmar.config import DETECTOR_KINDS, GRPOConfig, RLConfig

    d = RLConfig(resume="-")
    p = sub.add_parser("rl", help="stage 3: GRPO with detector rewards (the training loop of stages 1-2)",
                       description="Runs as one process, or under deepspeed / torchrun / srun (one process per GPU). "
                                   "Each step: group_size rollouts per layout, detector reward, group-normalised "
                                   "advantages, PPO-clipped loss on recomputed transitions + KL to a frozen reference.")
    _add_stage_flags(p, d)
    p.add_argument("--resume", required=True,
                   help="the stage-2 weights (export or run directory): the policy's start and the KL reference")
    p.add_argument("--vae_path", default=d.vae_path,
                   help="MAR's kl16.ckpt, to decode rollouts (kl16 models; default: the one the --resume export "
                        "records, else pretrained_models/vae/kl16.ckpt)")
    p.add_argument("--detector", default=d.detector, choices=DETECTOR_KINDS,
                   help="reward detector: torchvision Faster R-CNN state dict, transformers directory, or Shapes'")
    p.add_argument("--detector_path", default=d.detector_path, help="the detector's weights (file or directory)")
    p.add_argument("--detector_threshold", type=float, default=d.detector_threshold,
                   help="detections under this score are ignored")
    p.add_argument("--reward_iou", type=float, default=d.reward_iou, help="weight of the matched boxes' mean IoU")
    p.add_argument("--reward_confidence", type=float, default=d.reward_confidence,
                   help="weight of the matched detections' mean score")
    p.add_argument("--reward_centroid", type=float, default=d.reward_centroid,
                   help="penalty weight of the mean centroid distance (share of the diagonal)")
    p.add_argument("--reward_missing", type=float, default=d.reward_missing, help="penalty weight of unmatched boxes")
    p.add_argument("--batch_size", type=int, default=d.batch_size,
                   help=f"layouts per GPU (rank) and step ({d.batch_size}: the paper's stage-3 command)")
    _add_knobs(p, GRPOConfig, d.grpo)
    p.add_argument("--grad_accum", type=int, default=d.grad_accum,
                   help="backward passes per optimizer step: GRPO splits each update's selected AR steps into this "
                        "many chunks, one per pass, so only one chunk's graph is in memory at once")
    p.add_argument("--train_head", action="store_true", help="also train the diffusion head (frozen by default)")
    p.add_argument("--ref_offload", action=argparse.BooleanOptionalAction, default=d.ref_offload,
                   help="the frozen KL reference's parameters, partitioned across the ranks (ZeRO-3) in the policy's "
                        "precision, live in pinned CPU memory and are gathered onto the device layer by layer while "
                        "its means are computed (default); --no-ref_offload keeps the partitions on the device "
                        "(1/ranks of the model per GPU, no host-to-device copies). It computes on the policy's "
                        "device either way")
    p.add_argument("--lr", type=float, default=d.lr,
                   help=f"absolute learning rate, constant ({d.lr:g}: the paper's stage-3 command)")

    p.set_defaults(func=_stage_runner(RLConfig, "structmar.grpo.run_rl"))


def _add_train_planner(sub) -> None:
    from structmar.config import PLANNER_PRESETS, PlannerOptions, PlannerTrainConfig

    d = PlannerTrainConfig()
    # the stage flags, --model redeclared as the planner's preset
    p = sub.add_parser("train-planner", conflict_handler="resolve",
                       help="the layout planner (caption -> boxes and categories) on the shards' captions and layouts",
                       description="Runs as one process, or under deepspeed / torchrun / srun (one process per GPU).")
    _add_stage_flags(p, d)
    p.add_argument("--model", default=d.model, choices=sorted(PLANNER_PRESETS), help="planner preset")
    p.add_argument("--resume", default=d.resume, help="its own --output_dir only (a planner trains from scratch)")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="captions per GPU (rank)")
    p.add_argument("--grad_accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=d.lr, help="absolute learning rate, constant")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--sample_every", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--vae_path", default=d.vae_path, help=argparse.SUPPRESS)
    _add_knobs(p, PlannerOptions, d.planner)
    p.set_defaults(func=_stage_runner(PlannerTrainConfig, "structmar.planner.run_train_planner"))


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the embedded default: Shapes -> shards -> MAR -> stages 1, 2, GRPO -> eval")
    p.add_argument("--out", default="output/demo", help="demo directory (a rerun continues what is there)")
    p.add_argument("--clip_path", default=None,
                   help="a real CLIP directory; default: a seeded random-init ViT-B/32 text model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_train", type=_positive_int, default=None, help="Shapes training images")
    p.add_argument("--eval_layouts", type=_positive_int, default=None, help="val layouts per evaluation")

    def run(args):
        import dataclasses

        from structmar.demo import DemoConfig, DemoStopped, run_demo

        demo = DemoConfig(out=args.out, clip_path=args.clip_path, seed=args.seed)
        overrides = {k: getattr(args, k) for k in ("num_train", "eval_layouts") if getattr(args, k) is not None}
        try:
            report = run_demo(dataclasses.replace(demo, **overrides))
        except DemoStopped as stopped:
            print(f"structmar demo: {stopped}", file=sys.stderr)
            return 1
        print(f"structmar demo: report written to {report}")

    p.set_defaults(func=run)


def _add_app(sub) -> None:
    from structmar.config import AppConfig

    p = sub.add_parser("app", help="a page in the browser: draw boxes, tag them, type a caption, get images",
                       description="Serves a Gradio page (pip install 'structmar[app]') sampling the model as "
                                   "`structmar sample` does; its layouts export as `structmar sample` specs.")
    _add_knobs(p, AppConfig, AppConfig())

    def run(args):
        import dataclasses

        from structmar.app import serve

        serve(AppConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AppConfig)}))

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="structmar", description="StructMAR layout-to-image training system")
    # the deepspeed launcher passes --local_rank=N before the subcommand (LOCAL_RANK is set from it)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_shapes(sub)
    _add_demo(sub)
    _add_build_shards(sub)
    _add_train(sub)
    _add_sample(sub)
    _add_eval(sub)
    _add_rl(sub)
    _add_app(sub)
    _add_train_planner(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.local_rank is not None:
            os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
        rc = args.func(args)
    except (UserError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
            SaveError) as e:
        print(f"structmar: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("structmar: interrupted", file=sys.stderr)
        return 130
    return rc or 0  # a command returns a non-zero status for an unfinished but resumable run
