"""The training loop of the supervised stages: a stage is an objective, the loop is one.

Stage 1 (`text_layout`) trains only the parameters structmar adds to MAR (`model.is_addition`);
stage 2 (`full`) trains everything. Both minimise the model's own loss; everything parallel
(DeepSpeed, EMA, checkpoints, the process group) lives in `structmar.engine`, everything about
data order in `structmar.shards`.

Resume rules (`--resume`):
  - the run's own output_dir has a checkpoint: continue it exactly (weights, optimizer, EMA, step,
    data position, RNG, an objective's own state), also when --resume is not given (a preempted job
    reruns the same command);
  - a weights file (MAR `.pth`/`.safetensors`, or a stage export `checkpoint-last.safetensors`), or
    another run's directory (its export is used): initialise the weights from it (its EMA weights with
    --init_ema), start at step 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from structmar import atomic
from structmar import engine as eng
from structmar.config import ModelConfig, StageConfig
from structmar.model import EXPORT, write_export

LOG = "log.jsonl"  # every logged scalar row, appended (a continued run adds to it)
SAMPLE_IMAGES, SAMPLE_NUM_ITER = 8, 16  # the TensorBoard grid of EMA samples
# Fields a weights file's config must share with the model a stage builds.
SHAPE_FIELDS = ("tokenizer", "image_size", "pixel_patch", "width", "encoder_depth", "decoder_depth", "num_heads",
                "buffer_size", "diffusion_depth", "diffusion_width")


# ---- what to start from -----------------------------------------------------------------------


@dataclass
class Start:
    """Where a run starts: continue a checkpoint of its own output_dir, or initialise from a weights file."""

    continue_tag: str | None = None
    saved: dict | None = None  # trainer_state.json of the continued checkpoint
    weights_path: str | None = None


def plan_start(cfg: StageConfig) -> Start:
    own = eng.latest_checkpoint(cfg.output_dir)
    resume = cfg.resume
    if resume and os.path.isdir(resume):
        if os.path.realpath(resume) in (os.path.realpath(cfg.output_dir),
                                        os.path.realpath(os.path.join(cfg.output_dir, eng.CHECKPOINTS))):
            if own is None:
                raise FileNotFoundError(f"--resume {resume} is this run's output_dir but holds no checkpoint")
            return Start(own[0], own[1])
        export = os.path.join(resume, EXPORT)
        if not os.path.isfile(export):
            raise FileNotFoundError(f"--resume {resume} is a directory without {EXPORT} (not a structmar run?)")
        resume = export
    elif resume and not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume {resume} does not exist")
    if own is not None:
        # a preempted run restarts with its original command line: its own checkpoint wins
        return Start(own[0], own[1])
    return Start(weights_path=resume)


def resolve_model_config(cfg: StageConfig, start: Start, file_config: ModelConfig | None) -> ModelConfig:
    """The ModelConfig of this stage: the continued run's, else --model (+ --diffloss_d/w), else the file's."""
    runtime = cfg.model_overrides()
    if start.saved is not None:
        return dataclasses.replace(ModelConfig.from_dict(start.saved["model_config"]), **runtime).validate()
    if cfg.model is None:
        if file_config is None:
            raise ValueError("--model is required (the --resume weights carry no model config)")
        return dataclasses.replace(file_config, **runtime).validate()
    model_cfg = cfg.model_config()
    if file_config is not None:
        for name in SHAPE_FIELDS:
            have, want = getattr(file_config, name), getattr(model_cfg, name)
            if have != want:
                raise ValueError(f"--resume {start.weights_path} has {name}={have!r} but --model {cfg.model} "
                                 f"(with --diffloss_d/--diffloss_w) gives {want!r}")
    return model_cfg


# ---- EMA samples for TensorBoard ------------------------------------------------------------------


class EmaSampler:
    """Rank 0's grid of EMA samples for fixed layouts, boxes and tags drawn on (see `structmar.sample`)."""

    def __init__(self, cfg: StageConfig, model_cfg: ModelConfig, device: torch.device):
        from structmar.model import StructMAR
        from structmar.shards import ShardLoader
        from structmar.tokenizer import build_tokenizer

        self.tokenizer = build_tokenizer(model_cfg.tokenizer, cfg.vae_path, model_cfg.pixel_patch).to(device).eval()
        self.model = StructMAR(model_cfg).to(device).eval()
        fixed = ShardLoader(cfg.shard_dir, cfg.coco_split, model_cfg, SAMPLE_IMAGES, seed=cfg.seed, shuffle=False)
        self.batch = next(iter(fixed))
        self.names = {int(k): v if isinstance(v, str) else v.get("name", str(k))
                      for k, v in fixed.manifest["categories"].items()}
        self.device = device

    @torch.no_grad()
    def grid(self, ema: dict) -> torch.Tensor:
        """(3, H, W) in [0, 1]: the EMA model's samples with the layouts drawn in black."""
        from structmar.evaluate import draw_layout, image_grid
        from structmar.sample import generate_images

        self.model.load_state_dict(ema)
        generator = torch.Generator(self.device).manual_seed(0)
        images, _ = generate_images(self.model, self.tokenizer, self.batch, num_iter=SAMPLE_NUM_ITER,
                                    generator=generator)
        tiles = []
        for i, image in enumerate(images):
            keep = self.batch["box_mask"][i]
            tags = [self.names.get(int(c), str(int(c))) for c in self.batch["category_ids"][i][keep]]
            tiles.append(draw_layout((image.float().cpu() + 1) / 2, self.batch["boxes"][i][keep].numpy(), tags))
        grid = np.asarray(image_grid(tiles, ncol=4))  # (H, W, 3) uint8
        return torch.from_numpy(grid.copy()).permute(2, 0, 1).float() / 255


# ---- the loop -----------------------------------------------------------------------------------


class _StopFlag:
    """Set by SIGTERM/SIGUSR1 (preemption); the loop saves and exits at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self.previous = {}

    def install(self):
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self):
        """Put back the handlers train() found (a process may go on after training, e.g. the demo)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name


@dataclass
class Summary:
    step: int
    epoch: int
    losses: list[float]  # mean loss of each optimizer step this process ran (skipped micro-batches excluded)
    nonfinite: int
    preempted: bool
    export: str | None


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(cfg: StageConfig, objective=None, build_model: Callable[[ModelConfig], torch.nn.Module] | None = None,
          on_step: Callable[[eng.Engine, int, eng.StepResult], None] | None = None) -> Summary:
    """Run one stage. Stages 1-2 minimise the model's own loss (`cfg.train_mode`); another stage passes an
    `objective` with `.name`, `.trainable(param_name) -> bool`, `.prepare(model_cfg, seed)` (once the model
    exists), `.loss(model, batch) -> (loss, metrics)` and `.state_dict()` / `.load_state_dict(state,
    same_ranks)` (its per-rank state in each checkpoint) (stage 3: `structmar.grpo`; ZeRO stage 0-2).
    `build_model` (default StructMAR) and `on_step` are hooks for tests and tools. SIGTERM/SIGUSR1 during
    the run save a checkpoint at the next step boundary and return (Summary.preempted)."""
    stop = _StopFlag()
    stop.install()
    try:
        return _train(cfg, objective, build_model, on_step, stop)
    finally:
        stop.restore()


def _train(cfg: StageConfig, objective, build_model, on_step, stop: _StopFlag) -> Summary:
    from structmar.model import StructMAR, is_addition, load_weights, read_weights
    from structmar.shards import ShardLoader, check_manifest, read_manifest

    cfg.validate()
    start = plan_start(cfg)
    stage = objective.name if objective is not None else cfg.train_mode
    if start.saved is not None and start.saved.get("stage") != stage:
        raise ValueError(f"{cfg.output_dir} holds a {start.saved.get('stage')} run; start the {stage} stage "
                         f"in a new --output_dir with --resume {cfg.output_dir}")
    weights = read_weights(start.weights_path) if start.weights_path else None
    model_cfg = resolve_model_config(cfg, start, weights.config if weights else None)
    # fail before any process group exists when the shards are missing or do not fit the model
    hint = dict(tokenizer=model_cfg.tokenizer, image_size=model_cfg.image_size, max_objects=model_cfg.max_objects,
                pixel_patch=model_cfg.pixel_patch)
    check_manifest(read_manifest(cfg.shard_dir, cfg.coco_split, hint), model_cfg)
    if cfg.sample_every and model_cfg.tokenizer == "kl16" and not os.path.isfile(cfg.vae_path):
        raise FileNotFoundError(f"--vae_path {cfg.vae_path} not found (it decodes the --sample_every samples; "
                                "pass --sample_every 0 to train without them)")
    env = eng.init_distributed(cfg.device)

    loader = ShardLoader(cfg.shard_dir, cfg.coco_split, model_cfg, cfg.batch_size, rank=env.rank,
                         world_size=env.world_size, num_workers=cfg.num_workers, seed=cfg.seed)
    steps_per_epoch = len(loader) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(loader)} batches per epoch cannot fill one step of --grad_accum {cfg.grad_accum}")

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = (build_model or StructMAR)(model_cfg)
    log_lines = []
    if weights is not None:
        if cfg.init_ema and weights.ema is None:
            raise ValueError(f"--init_ema: --resume {start.weights_path} holds no EMA weights (model_ema)")
        report = load_weights(model, weights.select(ema=cfg.init_ema))
        backbone_missing = [n for n in report.missing if not is_addition(n)]
        if stage == "text_layout" and backbone_missing:
            raise ValueError(f"--resume {start.weights_path} lacks {len(backbone_missing)} backbone weights "
                             f"(e.g. {backbone_missing[:3]}); text_layout would train on a random frozen backbone")
        log_lines.append(f"initialised from {start.weights_path}{' (EMA)' if cfg.init_ema else ''}: "
                         f"{len(report.missing)} missing "
                         f"({len(report.missing) - len(backbone_missing)} structmar additions), "
                         f"{len(report.unexpected)} unexpected {report.unexpected[:4]}")
    for name, p in model.named_parameters():
        if objective is not None:
            p.requires_grad_(objective.trainable(name))
        else:
            p.requires_grad_(cfg.train_mode == "full" or is_addition(name))
    if objective is not None:
        objective.prepare(model_cfg, cfg.seed)

    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before ZeRO-3 partitions them
    global_batch = cfg.batch_size * cfg.grad_accum * env.world_size
    base_lr = cfg.base_lr(global_batch)
    universal = start.saved is not None and start.saved["world_size"] != env.world_size
    if universal:
        eng.prepare_universal(cfg.output_dir, start.continue_tag, env)
    ds_config = eng.build_ds_config(cfg.deepspeed_config, micro_batch=cfg.batch_size, grad_accum=cfg.grad_accum,
                                    world_size=env.world_size, lr=base_lr, optimizer=cfg.optimizer,
                                    precision=cfg.precision, load_universal=universal)
    engine = eng.Engine(model, ds_config, env, cfg.ema_rate, loss_fn=objective.loss if objective else None)

    step, nonfinite_total = 0, 0
    torch.manual_seed(cfg.seed * 1000 + env.rank)  # masks, noise and dropout differ per rank
    if start.saved is not None:
        own = engine.load(cfg.output_dir, start.continue_tag, start.saved["world_size"])
        step, nonfinite_total = start.saved["step"], start.saved["nonfinite_total"]
        data = own["data"]
        if universal or start.saved["batch_size"] != cfg.batch_size:
            # per-rank positions do not map across world or batch sizes: resume at the same share of the epoch
            seen = data["batches"] * start.saved["world_size"] * start.saved["batch_size"]
            data = dict(data, batches=min(seen // (env.world_size * cfg.batch_size), len(loader)))
        if objective is not None and "objective" in own:
            objective.load_state_dict(own["objective"], same_ranks=not universal)
        if not universal:
            torch.set_rng_state(own["rng_cpu"])
            if env.device.type == "cuda" and "rng_cuda" in own:
                torch.cuda.set_rng_state(own["rng_cuda"], env.device)
        loader.load_state_dict(data)
        log_lines.append(f"continuing {cfg.output_dir} from {start.continue_tag} (step {step}, "
                         f"saved with {start.saved['world_size']} ranks, now {env.world_size})"
                         + (f"; --resume {cfg.resume} applies to fresh runs only" if cfg.resume else ""))

    log_dir = cfg.log_dir or os.path.join(cfg.output_dir, "tensorboard")
    logger = eng.make_logger(env, log_dir, os.path.join(cfg.output_dir, LOG))
    if env.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        atomic.write_text(os.path.join(cfg.output_dir, "train_config.json"),
                          json.dumps({"train": cfg.to_dict(), "model": model_cfg.to_dict(),
                                      "world_size": env.world_size}, indent=1))
    for line in log_lines + [
        f"{stage}: {n_train / 1e6:.2f}M trainable parameters, {env.world_size} ranks x batch "
        f"{cfg.batch_size} x accum {cfg.grad_accum} = {global_batch}, lr {base_lr:.3g}, ZeRO-{engine.zero_stage}, "
        f"{cfg.precision}, {steps_per_epoch} steps/epoch"
    ]:
        logger.text(line)

    sampler = None
    if cfg.sample_every and env.is_main:
        with torch.random.fork_rng(devices=[]):  # its init must not move the training RNG (exact resume)
            sampler = EmaSampler(cfg, model_cfg, env.device)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    def save(epoch_done: int) -> str:
        tag = f"step_{step:08d}"
        trainer_state = dict(step=step, epoch=epoch_done, stage=stage, nonfinite_total=nonfinite_total,
                             batch_size=cfg.batch_size, train_config=cfg.to_dict(), model_config=model_cfg.to_dict())
        rank_state = {"rng_cpu": torch.get_rng_state(), "data": loader.state_dict()}
        if objective is not None:
            rank_state["objective"] = objective.state_dict()
        if env.device.type == "cuda":
            rank_state["rng_cuda"] = torch.cuda.get_rng_state(env.device)
        engine.save(cfg.output_dir, tag, trainer_state, rank_state, keep=cfg.keep_checkpoints)
        export = os.path.join(cfg.output_dir, EXPORT)
        export_weights(engine, model_cfg, export, dict(step=step, epoch=epoch_done, stage=stage))
        logger.text(f"saved {tag} and {export}")
        return export

    losses: list[float] = []
    consecutive_bad, preempted = 0, False
    # a continued run does not rewrite the checkpoint it started from
    last_saved = step if start.saved is not None else None
    export = os.path.join(cfg.output_dir, EXPORT) if start.saved is not None else None
    window: dict[str, float] = defaultdict(float)
    window_steps, window_images, window_time, window_wait = 0, 0, 0.0, 0.0
    run_start, run_start_step = eng.now(), step
    epoch = loader.epoch
    if loader.batches >= len(loader):  # saved exactly at an epoch's end
        epoch += 1
        loader.set_epoch(epoch)
    while step < total_steps and epoch < cfg.epochs and not preempted:
        batches = iter(loader)
        t0 = eng.now()
        while step < total_steps:
            # data loading may draw from torch's global RNG (DataLoader seeds); keep the model's stream intact
            with torch.random.fork_rng(devices=[]):
                batch = next(batches, None)
            if batch is None:
                break
            t_data = eng.now()
            lr = cfg.lr_at(base_lr, epoch + (loader.batches - 1) / len(loader))
            result = engine.train_step(batch, lr)
            if result.skipped:
                consecutive_bad += 1
                nonfinite_total += 1
                logger.scalars(step, {"train/nonfinite_total": nonfinite_total})
                logger.text(f"step {step}: non-finite loss on some rank, micro-batch skipped "
                            f"({consecutive_bad} in a row, {nonfinite_total} in total)")
                if consecutive_bad >= cfg.max_nonfinite:
                    raise FloatingPointError(
                        f"{consecutive_bad} consecutive non-finite losses at step {step}; stopping. The last "
                        f"checkpoint is in {cfg.output_dir}/{eng.CHECKPOINTS}; lower --blr or check the data")
                continue
            consecutive_bad = 0
            window["loss"] += result.loss
            window_images += cfg.batch_size * env.world_size
            if not result.applied:
                continue
            step += 1
            losses.append(result.loss)
            if on_step is not None:
                on_step(engine, step, result)
            eng.synchronize(env.device)
            t1 = eng.now()
            window_steps += 1
            window_time += t1 - t0
            window_wait += t_data - t0
            if result.grad_norm is not None:
                window["grad_norm"] += result.grad_norm
            for k, v in result.metrics.items():
                window[f"m/{k}"] += v
            if step % cfg.log_every == 0 or step == total_steps:
                images_s = window_images / window_time
                scalars = {
                    # the objective's own metrics first: the loop's scalars win a name clash ("loss")
                    **{f"train/{k[2:]}": v / window_steps for k, v in window.items() if k.startswith("m/")},
                    "train/loss": window["loss"] / (window_steps * cfg.grad_accum),
                    "train/lr": lr,
                    "train/grad_norm": window["grad_norm"] / window_steps if "grad_norm" in window else None,
                    "perf/images_per_s": images_s,
                    "perf/tokens_per_s": images_s * model_cfg.seq_len,
                    "perf/step_time_s": window_time / window_steps,
                    "perf/data_wait_share": window_wait / window_time,
                    "perf/memory_mb": eng.memory_mb(env.device),
                    "train/epoch": epoch + loader.batches / len(loader),
                    "train/nonfinite_total": nonfinite_total,
                }
                scalars.update({f"data/skipped_{reason}": n for reason, n in loader.skipped.items()})
                logger.scalars(step, scalars)
                rate = (step - run_start_step) / (t1 - run_start)
                gnorm = scalars["train/grad_norm"]
                logger.text(
                    f"epoch {epoch + 1}/{cfg.epochs} step {step}/{total_steps} loss {scalars['train/loss']:.4f} "
                    f"lr {lr:.3g} gnorm {float('nan') if gnorm is None else gnorm:.3g} {images_s:.1f} img/s "
                    f"data {100 * scalars['perf/data_wait_share']:.0f}% ETA {_fmt_time((total_steps - step) / rate)}")
                window.clear()
                window_steps, window_images, window_time, window_wait = 0, 0, 0.0, 0.0
            if cfg.sample_every and step % cfg.sample_every == 0:
                _, ema = engine.consolidated()  # collective: every rank takes part
                if sampler is not None:
                    # sampling must not move the training RNG streams (exact resume)
                    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
                        logger.image(step, "samples/ema", sampler.grid(ema))
            if eng.any_rank(stop.requested, env.device):
                logger.text(f"step {step}: stop requested ({stop.signal_name or 'on another rank'}); saving")
                preempted = True
                break
            if cfg.save_steps and step % cfg.save_steps == 0:
                export, last_saved = save(epoch), step
            t0 = eng.now()
        if not preempted and loader.batches >= len(loader):
            epoch += 1
            if (epoch % cfg.save_last_freq == 0 or epoch == cfg.epochs) and last_saved != step:
                export, last_saved = save(epoch), step
            loader.set_epoch(epoch)
    if last_saved != step:
        export = save(epoch)
    logger.close()
    eng.barrier()
    return Summary(step, epoch, losses, nonfinite_total, preempted, export)


def export_weights(engine: eng.Engine, model_cfg: ModelConfig, path: str, meta: dict) -> None:
    """Write the consolidated model + EMA as one safetensors file (rank 0; every rank must call it)."""
    model_sd, ema_sd = engine.consolidated()
    if engine.env.is_main:
        write_export(path, model_sd, ema_sd, model_cfg, meta)

