"""The training loop of every stage: a stage is an objective (`Objective`), the loop is one.

Stage 1 (`text_layout`) trains only the parameters structmar adds to MAR (`model.is_addition`);
stage 2 (`full`) trains everything; both minimise the model's own loss (`SupervisedObjective`).
Stage 3 is GRPO (`structmar.grpo.GRPOStage`). Everything parallel
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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from structmar import atomic
from structmar import engine as eng
from structmar.config import TRAIN_MODES, ModelConfig, StageConfig, TrainConfig
from structmar.model import (
    EXPORT,
    StructMAR,
    TrainedWith,
    Weights,
    is_addition,
    load_weights,
    read_weights,
    weights_file,
    write_export,
)

if TYPE_CHECKING:
    from structmar.shards import ShardLoader

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
    this_run = (os.path.realpath(cfg.output_dir), os.path.realpath(os.path.join(cfg.output_dir, eng.CHECKPOINTS)))
    if resume and os.path.isdir(resume) and os.path.realpath(resume) in this_run:
        if own is None:
            raise FileNotFoundError(f"--resume {resume} is this run's output_dir but holds no checkpoint")
        return Start(own[0], own[1])
    if resume:
        resume = weights_file(resume)
    if own is not None:
        # a preempted run restarts with its original command line: its own checkpoint wins
        return Start(own[0], own[1])
    return Start(weights_path=resume)


def resolve_model_config(cfg: StageConfig, start: Start, file_config: ModelConfig | None) -> ModelConfig:
    """The ModelConfig of this stage: the continued run's, else --model (+ --diffloss_d/w), else the file's."""
    runtime = cfg.model_overrides()
    if start.saved is not None:
        return dataclasses.replace(cfg.model_config_from_dict(start.saved["model_config"]), **runtime).validate()
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

    def __init__(self, cfg: StageConfig, model_cfg: ModelConfig, device: torch.device, vae_path: str):
        from structmar.shards import ShardLoader
        from structmar.tokenizer import build_tokenizer

        self.tokenizer = build_tokenizer(model_cfg.tokenizer, vae_path, model_cfg.pixel_patch).to(device).eval()
        self.model = StructMAR(model_cfg).to(device).eval()
        # a preview: bad samples are left out whatever --on_bad_data says (the training loader applies it)
        fixed = ShardLoader(cfg.shard_dir, cfg.coco_split, model_cfg, SAMPLE_IMAGES, seed=cfg.seed, shuffle=False,
                            on_error="skip", max_bad_fraction=1.0)
        self.batch = next(iter(fixed))
        self.names = {int(k): v if isinstance(v, str) else v.get("name", str(k))
                      for k, v in fixed.manifest["categories"].items()}
        self.device = device

    @torch.no_grad()
    def grid(self, ema: dict) -> torch.Tensor:
        """(3, H, W) in [0, 1]: the EMA model's samples with the layouts drawn in black."""
        from structmar.figures import draw_layout, image_grid
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


# ---- a stage is an objective ----------------------------------------------------------------------


@runtime_checkable
class Objective(Protocol):
    """What a stage is to the loop: which parameters train, and the loss it minimises.

    `prepare` runs once, after the model is built from the seeded RNG (before the per-rank seed). `loss` gets
    each micro-batch on this rank's device. `state_dict`/`load_state_dict` carry the objective's per-rank state
    through a checkpoint (`same_ranks` False: the world size changed); an empty state is not written.
    `forward_only`: `loss` calls nothing of the model but `model(batch)`. Such an objective is handed the
    DeepSpeed engine as `model`, whose forward gathers ZeRO-3 partitions and hooks DeepSpeed's backward, so it
    runs under any ZeRO stage (stages 1-2). Any other is handed the bare module, for method calls outside
    forward (stage 3's rollouts), and runs under ZeRO stage 0-2 only: the engine refuses stage 3.
    """

    name: str  # the stage, recorded in its checkpoints
    forward_only: bool

    def trainable(self, param_name: str) -> bool: ...

    def prepare(self, model_cfg: ModelConfig, seed: int) -> None: ...

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict, same_ranks: bool) -> None: ...


class SupervisedObjective:
    """Stages 1-2, the model's own loss: `text_layout` trains only what structmar adds to MAR
    (`model.is_addition`), `full` trains everything."""

    forward_only = True

    def __init__(self, train_mode: str):
        if train_mode not in TRAIN_MODES:
            raise ValueError(f"train_mode {train_mode!r} is not one of {TRAIN_MODES}")
        self.name = train_mode

    def trainable(self, param_name: str) -> bool:
        return self.name == "full" or is_addition(param_name)

    def prepare(self, model_cfg: ModelConfig, seed: int) -> None:
        """Nothing to build: the model is the whole objective."""

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return model(batch)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, same_ranks: bool) -> None:
        """No state: its checkpoints hold none."""


# ---- the run's setup ----------------------------------------------------------------------------


def _check_start(cfg: StageConfig, objective: Objective) -> tuple[Start, Weights | None, ModelConfig, TrainedWith]:
    """What to start from, the model it gives and what it trains with (the shards' encoders); fails before any
    process group exists when the run directory holds another stage, or the shards or the VAE are missing or do
    not fit the model, or the --resume export was trained with another text encoder than the shards'."""
    from structmar.shards import check_manifest, read_manifest
    from structmar.tokenizer import vae_path_for

    cfg.validate()
    start = plan_start(cfg)
    if start.saved is not None and start.saved.get("stage") != objective.name:
        raise ValueError(f"{cfg.output_dir} holds a {start.saved.get('stage')} run; start the {objective.name} "
                         f"stage in a new --output_dir with --resume {cfg.output_dir}")
    weights = read_weights(start.weights_path) if start.weights_path else None
    model_cfg = resolve_model_config(cfg, start, weights.config if weights else None)
    shard_cfg = cfg.shard_model_config(model_cfg)
    hint = dict(tokenizer=shard_cfg.tokenizer, image_size=shard_cfg.image_size, max_objects=shard_cfg.max_objects,
                pixel_patch=shard_cfg.pixel_patch)
    manifest = read_manifest(cfg.shard_dir, cfg.coco_split, hint)
    check_manifest(manifest, shard_cfg)
    trained_with = TrainedWith.of_shards(manifest, cfg.coco_split)
    if weights is not None and weights.trained_with is not None:
        weights.trained_with.check_text_encoder(trained_with.text_encoder, f"--resume {start.weights_path}",
                                                f"the shards {cfg.shard_dir} were built with")
    vae_path = vae_path_for(cfg.vae_path, trained_with)
    if cfg.sample_every and model_cfg.tokenizer == "kl16" and not os.path.isfile(vae_path):
        raise FileNotFoundError(f"--vae_path {vae_path} not found (it decodes the --sample_every samples; "
                                "pass --sample_every 0 to train without them)")
    return start, weights, model_cfg, trained_with


def _open_loader(cfg: StageConfig, model_cfg: ModelConfig, env: eng.DistEnv) -> ShardLoader:
    from structmar.shards import ShardLoader

    loader = ShardLoader(cfg.shard_dir, cfg.coco_split, cfg.shard_model_config(model_cfg), cfg.batch_size,
                         rank=env.rank, world_size=env.world_size, num_workers=cfg.num_workers, seed=cfg.seed,
                         on_error=cfg.bad_data.on_bad_data, max_bad_fraction=cfg.bad_data.max_bad_fraction,
                         mirror=cfg.mirror_samples)
    if len(loader) // cfg.grad_accum == 0:
        raise ValueError(f"{len(loader)} batches per epoch cannot fill one step of --grad_accum {cfg.grad_accum}")
    return loader


def _build_and_freeze(cfg: StageConfig, objective: Objective, build_model: Callable[[ModelConfig], torch.nn.Module],
                      model_cfg: ModelConfig, start: Start,
                      weights: Weights | None) -> tuple[torch.nn.Module, list[str]]:
    """The model (identical on every rank) with the --resume weights, frozen where the objective says, and the
    objective prepared; with what to log about the weights."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(model_cfg)
    notes = []
    if weights is not None:
        if cfg.init_ema and weights.ema is None:
            raise ValueError(f"--init_ema: --resume {start.weights_path} holds no EMA weights (model_ema)")
        report = load_weights(model, weights.select(ema=cfg.init_ema))
        backbone_missing = [n for n in report.missing if not is_addition(n)]
        if objective.name == "text_layout" and backbone_missing:
            raise ValueError(f"--resume {start.weights_path} lacks {len(backbone_missing)} backbone weights "
                             f"(e.g. {backbone_missing[:3]}); text_layout would train on a random frozen backbone")
        notes.append(f"initialised from {start.weights_path}{' (EMA)' if cfg.init_ema else ''}: "
                     f"{len(report.missing)} missing "
                     f"({len(report.missing) - len(backbone_missing)} structmar additions), "
                     f"{len(report.unexpected)} unexpected {report.unexpected[:4]}")
    for name, p in model.named_parameters():
        p.requires_grad_(objective.trainable(name))
    objective.prepare(model_cfg, cfg.seed)
    return model, notes


def _make_engine(cfg: StageConfig, model: torch.nn.Module, objective: Objective, start: Start, env: eng.DistEnv,
                 batches_per_epoch: int) -> tuple[eng.Engine, float, str]:
    """The DeepSpeed engine at the base learning rate (--lr, else --blr scaled by the global batch), that rate,
    and the line describing the run."""
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before ZeRO-3 partitions them
    global_batch = cfg.batch_size * cfg.grad_accum * env.world_size
    base_lr = cfg.base_lr(global_batch)
    universal = start.saved is not None and start.saved["world_size"] != env.world_size
    if universal:
        eng.prepare_universal(cfg.output_dir, start.continue_tag, env)
    ds_config = eng.build_ds_config(cfg.deepspeed_config, micro_batch=cfg.batch_size, grad_accum=cfg.grad_accum,
                                    world_size=env.world_size, lr=base_lr, optimizer=cfg.optimizer,
                                    precision=cfg.precision, load_universal=universal)
    backend = cfg.compile_backend()
    engine = eng.Engine(model, ds_config, env, cfg.ema_rate, objective.loss, forward_only=objective.forward_only,
                        compile=backend)
    plan = (f"{objective.name}: {n_train / 1e6:.2f}M trainable parameters, {env.world_size} ranks x batch "
            f"{cfg.batch_size} x accum {cfg.grad_accum} = {global_batch}, lr {base_lr:.3g}, "
            f"ZeRO-{engine.zero_stage}, {cfg.precision}{f', compiled ({backend})' if backend else ''}, "
            f"{batches_per_epoch // cfg.grad_accum} steps/epoch")
    return engine, base_lr, plan


@dataclass
class Run:
    """A stage in progress: what it trains with, and where it stands (what a checkpoint records)."""

    cfg: StageConfig
    model_cfg: ModelConfig
    objective: Objective
    engine: eng.Engine
    loader: ShardLoader
    base_lr: float
    logger: eng.NullLogger = field(default_factory=eng.NullLogger)
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    nonfinite_total: int = 0  # micro-batches skipped for a non-finite loss
    last_saved: int | None = None  # the step of the newest checkpoint, written or continued from
    export: str | None = None
    trained_with: TrainedWith | None = None  # recorded in the export

    @property
    def env(self) -> eng.DistEnv:
        return self.engine.env

    @property
    def total_steps(self) -> int:
        total = self.cfg.epochs * (len(self.loader) // self.cfg.grad_accum)
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total


def _restore(run: Run, start: Start) -> str:
    """Continue the checkpoint `start` names: weights, optimizer, EMA, step, data position, RNG and the
    objective's state; returns the line to log."""
    cfg, env, loader, saved = run.cfg, run.env, run.loader, start.saved
    universal = saved["world_size"] != env.world_size
    own = run.engine.load(cfg.output_dir, start.continue_tag, saved["world_size"])
    run.step, run.nonfinite_total = saved["step"], saved["nonfinite_total"]
    data = own["data"]
    if universal or saved["batch_size"] != cfg.batch_size:
        # per-rank positions do not map across world or batch sizes: resume at the same share of the epoch
        seen = data["batches"] * saved["world_size"] * saved["batch_size"]
        data = dict(data, batches=min(seen // (env.world_size * cfg.batch_size), len(loader)))
    if "objective" in own:
        run.objective.load_state_dict(own["objective"], same_ranks=not universal)
    if not universal:
        torch.set_rng_state(own["rng_cpu"])
        if env.device.type == "cuda" and "rng_cuda" in own:
            torch.cuda.set_rng_state(own["rng_cuda"], env.device)
    loader.load_state_dict(data)
    run.epoch = loader.epoch
    if loader.batches >= len(loader):  # saved exactly at an epoch's end
        run.epoch += 1
        loader.set_epoch(run.epoch)
    # a continued run does not rewrite the checkpoint it started from
    run.last_saved, run.export = run.step, os.path.join(cfg.output_dir, EXPORT)
    if env.is_main:  # what a kill during a save or a removal left: only the checkpoint `latest` names counts
        eng.prune_checkpoints(os.path.join(cfg.output_dir, eng.CHECKPOINTS), cfg.keep_checkpoints,
                              current=start.continue_tag)
    if _export_step(run.export) != run.step:  # killed between the checkpoint and its export: the export is behind
        _export(run, run.export, run.step, saved["epoch"])
    return (f"continuing {cfg.output_dir} from {start.continue_tag} (step {run.step}, saved with "
            f"{saved['world_size']} ranks, now {env.world_size})"
            + (f"; --resume {cfg.resume} applies to fresh runs only" if cfg.resume else ""))


def _export_step(path: str) -> int | None:
    """The step a stage export was written at (its metadata), or None without one."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        return None
    with safe_open(path, "pt") as f:
        step = (f.metadata() or {}).get("step")
    return None if step is None else int(step)


def _open_logger(run: Run, lines: list[str]) -> eng.NullLogger:
    """Rank 0's TensorBoard and log.jsonl (a real logger there, a silent one elsewhere), the run's
    train_config.json, and the setup's `lines` logged."""
    cfg, env = run.cfg, run.env
    log_dir = cfg.log_dir or os.path.join(cfg.output_dir, "tensorboard")
    logger = eng.make_logger(env, log_dir, os.path.join(cfg.output_dir, LOG))
    if env.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        atomic.write_text(os.path.join(cfg.output_dir, "train_config.json"),
                          json.dumps({"train": cfg.to_dict(), "model": run.model_cfg.to_dict(),
                                      "world_size": env.world_size}, indent=1))
    for line in lines:
        logger.text(line)
    return logger


def _ema_sampler(run: Run) -> EmaSampler | None:
    if not (run.cfg.sample_every and run.env.is_main):
        return None
    with torch.random.fork_rng(devices=[]):  # its init must not move the training RNG (exact resume)
        from structmar.tokenizer import vae_path_for

        return EmaSampler(run.cfg, run.model_cfg, run.env.device, vae_path_for(run.cfg.vae_path, run.trained_with))


# ---- saving ---------------------------------------------------------------------------------------


def save_due(run: Run, moment: Literal["step", "epoch", "stop"]) -> bool:
    """The save schedule, asked after each optimizer step, when epoch `run.epoch` has just ended, and when the
    run stops: every --save_steps steps, after every --save_last_freq-th epoch and the last, and on stopping;
    never twice for one step."""
    cfg = run.cfg
    if run.step == run.last_saved:
        return False
    if moment == "stop":
        return True
    if moment == "epoch":
        return run.epoch % cfg.save_last_freq == 0 or run.epoch == cfg.epochs
    return bool(cfg.save_steps) and run.step % cfg.save_steps == 0


def save(run: Run) -> None:
    """A checkpoint of the run (every rank's state) and its export (every rank must call it)."""
    cfg, env, step = run.cfg, run.env, run.step
    tag = f"step_{step:08d}"
    trainer_state = dict(step=step, epoch=run.epoch, stage=run.objective.name, nonfinite_total=run.nonfinite_total,
                         batch_size=cfg.batch_size, train_config=cfg.to_dict(), model_config=run.model_cfg.to_dict())
    rank_state = {"rng_cpu": torch.get_rng_state(), "data": run.loader.state_dict()}
    objective_state = run.objective.state_dict()
    if objective_state:
        rank_state["objective"] = objective_state
    if env.device.type == "cuda":
        rank_state["rng_cuda"] = torch.cuda.get_rng_state(env.device)
    run.engine.save(cfg.output_dir, tag, trainer_state, rank_state, keep=cfg.keep_checkpoints)
    export = os.path.join(cfg.output_dir, EXPORT)
    _export(run, export, step, run.epoch)
    run.logger.text(f"saved {tag} and {export}")
    run.export, run.last_saved = export, step


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


class Meter:
    """The log window: sums over the optimizer steps since the last log line, and the scalars and the
    progress line they give. A step's time runs from the end of the previous step (or the epoch's start)
    to the end of its last micro-batch; its data wait until its last micro-batch arrived."""

    def __init__(self, run: Run):
        self.images_per_batch = run.cfg.batch_size * run.env.world_size
        self.run_start, self.run_start_step = eng.now(), run.step
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)  # "loss" per micro-batch, "grad_norm" per step
        self.metrics: dict[str, float] = defaultdict(float)  # the objective's, per step
        self.steps, self.images, self.time, self.wait = 0, 0, 0.0, 0.0

    def begin_step(self) -> None:
        self.t0 = eng.now()

    def batch_ready(self) -> None:
        self.t_data = eng.now()

    def micro_batch(self, loss: float) -> None:
        self.sums["loss"] += loss
        self.images += self.images_per_batch

    def step(self, result: eng.StepResult, device: torch.device) -> None:
        eng.synchronize(device)
        self.t1 = eng.now()
        self.steps += 1
        self.time += self.t1 - self.t0
        self.wait += self.t_data - self.t0
        if result.grad_norm is not None:
            self.sums["grad_norm"] += result.grad_norm
        for k, v in result.metrics.items():
            self.metrics[k] += v

    def report(self, run: Run, lr: float) -> None:
        """Log the window's scalars and progress line at `run.step`, then open a new window."""
        cfg, step = run.cfg, run.step
        images_s = self.images / self.time
        scalars = {
            # the objective's own metrics first: the loop's scalars win a name clash ("loss")
            **{f"train/{k}": v / self.steps for k, v in self.metrics.items()},
            "train/loss": self.sums["loss"] / (self.steps * cfg.grad_accum),
            "train/lr": lr,
            "train/grad_norm": self.sums["grad_norm"] / self.steps if "grad_norm" in self.sums else None,
            "perf/images_per_s": images_s,
            # image tokens; a model without an image (the planner) logs none
            "perf/tokens_per_s": images_s * run.model_cfg.seq_len if isinstance(run.model_cfg, ModelConfig) else None,
            "perf/step_time_s": self.time / self.steps,
            "perf/data_wait_share": self.wait / self.time,
            "perf/memory_mb": eng.memory_mb(run.env.device),
            "train/epoch": run.epoch + run.loader.batches / len(run.loader),
            "train/nonfinite_total": run.nonfinite_total,
        }
        skipped = _skipped_on_all_ranks(run)
        scalars.update({f"data/skipped_{reason}": n for reason, n in skipped.items()})
        run.logger.scalars(step, scalars)
        rate = (step - self.run_start_step) / (self.t1 - self.run_start)
        gnorm = scalars["train/grad_norm"]
        run.logger.text(
            f"epoch {run.epoch + 1}/{cfg.epochs} step {step}/{run.total_steps} loss {scalars['train/loss']:.4f} "
            f"lr {lr:.3g} gnorm {float('nan') if gnorm is None else gnorm:.3g} {images_s:.1f} img/s "
            f"data {100 * scalars['perf/data_wait_share']:.0f}% ETA {_fmt_time((run.total_steps - step) / rate)}"
            + (f" bad data skipped {skipped}" if skipped else ""))
        self.reset()


def _skipped_on_all_ranks(run: Run) -> dict[str, int]:
    """Bad samples skipped so far, by reason, summed over the ranks (with --on_bad_data skip: a collective)."""
    from structmar.shards import SKIP_REASONS

    counts = [run.loader.skipped[reason] for reason in SKIP_REASONS]
    if run.cfg.bad_data.on_bad_data == "skip":
        counts = eng.sum_over_ranks(counts, run.env.device)
    return {reason: n for reason, n in zip(SKIP_REASONS, counts, strict=True) if n}


def _count_nonfinite(run: Run, consecutive: int) -> None:
    """Count a micro-batch skipped for a non-finite loss; stop after --max_nonfinite in a row."""
    run.nonfinite_total += 1
    run.logger.scalars(run.step, {"train/nonfinite_total": run.nonfinite_total})
    run.logger.text(f"step {run.step}: non-finite loss on some rank, micro-batch skipped "
                    f"({consecutive} in a row, {run.nonfinite_total} in total)")
    if consecutive >= run.cfg.max_nonfinite:
        raise FloatingPointError(
            f"{consecutive} consecutive non-finite losses at step {run.step}; stopping. The last "
            f"checkpoint is in {run.cfg.output_dir}/{eng.CHECKPOINTS}; lower --blr or check the data")


def _next_batch(batches, env: eng.DistEnv) -> dict | None:
    """The next micro-batch of this rank's loader, None at the epoch's end. A loader error on any rank stops
    every rank here, before the step's collectives (where the others would wait on a rank that left): the rank
    at fault raises its own error (bad data: one line naming the shard and member), the others one pointing to
    it."""
    from structmar.shards import ShardError

    error = None
    try:
        # data loading may draw from torch's global RNG (DataLoader seeds); keep the model's stream intact
        with torch.random.fork_rng(devices=[]):
            batch = next(batches, None)
    except Exception as e:  # noqa: BLE001 - re-raised below, once every rank knows
        batch, error = None, e
    if env.world_size > 1 and eng.any_rank(error is not None, env.device) and error is None:
        raise ShardError("corrupt", f"rank {env.rank} stops: another rank's data loader failed (its error line "
                         "names the shard)")
    if error is not None:
        raise error
    return batch


def _log_samples(run: Run, sampler: EmaSampler | None) -> None:
    _, ema = run.engine.consolidated()  # collective: every rank takes part
    if sampler is not None:
        # sampling must not move the training RNG streams (exact resume)
        with torch.random.fork_rng(devices=[run.env.device] if run.env.device.type == "cuda" else []):
            run.logger.image(run.step, "samples/ema", sampler.grid(ema))


def train(cfg: StageConfig, objective: Objective,
          build_model: Callable[[ModelConfig], torch.nn.Module] | None = None,
          on_step: Callable[[eng.Engine, int, eng.StepResult], None] | None = None) -> Summary:
    """Run one stage: minimise `objective` (stages 1-2: `SupervisedObjective`, stage 3: `structmar.grpo`).
    `build_model` (default StructMAR) and `on_step` are hooks for tests and tools. SIGTERM/SIGUSR1 during
    the run save a checkpoint at the next step boundary and return (Summary.preempted). The process's signal
    handlers, launcher variables and process group are as train() found them when it returns or raises."""
    stop = _StopFlag()
    stop.install()
    try:
        with eng.process_group_scope():
            return _train(cfg, objective, build_model or StructMAR, on_step, stop)
    finally:
        stop.restore()


def run_train(cfg: TrainConfig) -> Summary:
    """`structmar train`: stage 1 or 2, as `cfg.train_mode` says."""
    return train(cfg, SupervisedObjective(cfg.train_mode))


def _train(cfg: StageConfig, objective: Objective, build_model, on_step, stop: _StopFlag) -> Summary:
    start, weights, model_cfg, trained_with = _check_start(cfg, objective)
    env = eng.init_distributed(cfg.device)
    loader = _open_loader(cfg, model_cfg, env)
    model, notes = _build_and_freeze(cfg, objective, build_model, model_cfg, start, weights)
    engine, base_lr, plan = _make_engine(cfg, model, objective, start, env, len(loader))
    run = Run(cfg, model_cfg, objective, engine, loader, base_lr, trained_with=trained_with)
    torch.manual_seed(cfg.seed * 1000 + env.rank)  # masks, noise and dropout differ per rank
    if start.saved is not None:
        notes.append(_restore(run, start))
    run.logger = _open_logger(run, notes + [plan])
    sampler = _ema_sampler(run)
    meter, losses = Meter(run), []
    consecutive_bad, preempted = 0, False
    while run.step < run.total_steps and run.epoch < cfg.epochs and not preempted:
        batches = iter(loader)
        meter.begin_step()
        while run.step < run.total_steps:
            batch = _next_batch(batches, env)
            if batch is None:
                break
            meter.batch_ready()
            lr = cfg.lr_at(base_lr, run.epoch + (loader.batches - 1) / len(loader))
            result = engine.train_step(batch, lr)
            if result.skipped:
                consecutive_bad += 1
                _count_nonfinite(run, consecutive_bad)
                continue
            consecutive_bad = 0
            meter.micro_batch(result.loss)
            if not result.applied:
                continue
            run.step += 1
            losses.append(result.loss)
            if on_step is not None:
                on_step(engine, run.step, result)
            meter.step(result, env.device)
            if run.step % cfg.log_every == 0 or run.step == run.total_steps:
                meter.report(run, lr)
            if cfg.sample_every and run.step % cfg.sample_every == 0:
                _log_samples(run, sampler)
            if eng.any_rank(stop.requested, env.device):
                run.logger.text(f"step {run.step}: stop requested ({stop.signal_name or 'on another rank'}); saving")
                preempted = True
                break
            if save_due(run, "step"):
                save(run)
            meter.begin_step()
        if not preempted and loader.batches >= len(loader):
            run.epoch += 1
            if save_due(run, "epoch"):
                save(run)
            loader.set_epoch(run.epoch)
    if save_due(run, "stop"):
        save(run)
    run.logger.close()
    eng.barrier()
    return Summary(run.step, run.epoch, losses, run.nonfinite_total, preempted, run.export)


def _export(run: Run, path: str, step: int, epoch: int) -> None:
    """The stage export of `run` at `step`: what a save writes, and what a continued run rewrites when a kill
    left it behind its checkpoint."""
    export_weights(run.engine, run.model_cfg, path, dict(step=step, epoch=epoch, stage=run.objective.name),
                   run.trained_with)


def export_weights(engine: eng.Engine, model_cfg: ModelConfig, path: str, meta: dict,
                   trained_with: TrainedWith | None = None) -> None:
    """Write the consolidated model + EMA as one safetensors file (rank 0; every rank must call it)."""
    model_sd, ema_sd = engine.consolidated()
    if engine.env.is_main:
        write_export(path, model_sd, ema_sd, model_cfg, meta, trained_with)

