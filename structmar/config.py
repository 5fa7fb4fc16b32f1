"""Typed configuration: one default per knob, named presets, and the mapping from the paper's flags.

A `ModelConfig` is saved in every checkpoint and shard manifest and is the only thing needed to
rebuild a model. Presets name the published MAR shapes plus small CPU sizes; the paper's
`--diffloss_d/--diffloss_w` override the diffusion head of a preset.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import ClassVar

# Tokenizers: name -> (latent channels per token, pixels per token side).
# kl16 is MAR's KL-16 VAE (16 channels, stride 16); pixel is a weight-free RGB patch tokenizer
# whose token is one patch (3 * patch * patch channels).
TOKENIZERS = ("kl16", "pixel")

ATTENTION_BACKENDS = ("auto", "sdpa", "flex")
LAYOUT_BIAS_MODES = ("none", "soft", "hard")


class SavedConfig:
    """A model's config as its checkpoints and exports save it (a dict) and read it back."""

    kind = "model"  # named in errors

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.kind} config keys {unknown}")
        return cls(**d).validate()


@dataclass
class ModelConfig(SavedConfig):
    """Everything that fixes a StructMAR's parameters and forward semantics."""

    preset: str = "tiny"

    # Tokens: the model sees a (token_channels, image_size/token_stride, ...) latent grid.
    tokenizer: str = "pixel"
    image_size: int = 32
    pixel_patch: int = 4  # pixel tokenizer only: patch side in pixels

    # MAR backbone
    width: int = 64
    encoder_depth: int = 2
    decoder_depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    buffer_size: int = 64
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    mask_ratio_min: float = 0.7
    grad_checkpointing: bool = False

    # Per-token diffusion head
    diffusion_depth: int = 2
    diffusion_width: int = 128
    diffusion_batch_mul: int = 4
    num_sampling_steps: int = 100
    clip_denoised: bool = True  # sampling clamps the predicted x_0 to the tokenizer's data range, where known
    noise_shift: float = 1.0  # the head's schedule with SNR / noise_shift^2 (1: MAR's; see diffusion.cosine_betas)

    # StructMAR additions (all off = numerically MAR)
    rope: bool = True
    layout: bool = True
    layout_bias: str = "soft"  # none | soft (learnable per-head -lambda) | hard (-inf)
    layout_bias_init: float = 2.0  # initial lambda of the soft bias
    layout_bias_bonus: float = 0.0  # + on an image token's logits for the layout tokens whose box covers it
    text: bool = True
    text_dim: int = 512  # CLIP ViT-B/32 text hidden size
    max_objects: int = 16  # layout tokens; buffer slot 0 holds the pooled caption
    label_drop_prob: float = 0.1
    layout_to_image: str = "box"  # box: a layout token attends only the image cells of its box | open
    bias_text_slot: bool = False  # also penalise image tokens' attention to the text slot
    bias_null_slots: bool = False  # also penalise image tokens' attention to null buffer slots
    truncate_boxes: bool = False  # keep the max_objects largest boxes instead of raising on more

    attention: str = "auto"  # auto: flex on CUDA, sdpa elsewhere
    # text cross-attention: auto (flash-attn where installed, on CUDA; else sdpa) | sdpa | flash
    cross_attention: str = "auto"

    # ---- derived -------------------------------------------------------------------------
    @property
    def token_stride(self) -> int:
        return 16 if self.tokenizer == "kl16" else self.pixel_patch

    @property
    def token_channels(self) -> int:
        return 16 if self.tokenizer == "kl16" else 3 * self.pixel_patch**2

    @property
    def data_range(self) -> float | None:
        """Bound of the token values: pixel tokens lie in [-1, 1]; kl16 latents have no fixed range (and MAR
        samples them unclipped)."""
        return 1.0 if self.tokenizer == "pixel" else None

    @property
    def grid_size(self) -> int:
        return self.image_size // self.token_stride

    @property
    def seq_len(self) -> int:
        return self.grid_size**2

    def validate(self) -> ModelConfig:
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer {self.tokenizer!r} is not one of {TOKENIZERS}")
        if self.image_size % self.token_stride:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the {self.tokenizer} stride {self.token_stride}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.rope and (self.width // self.num_heads) % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {self.width // self.num_heads}")
        if not 0 <= self.max_objects < self.buffer_size:
            raise ValueError(f"max_objects {self.max_objects} must lie in [0, {self.buffer_size - 1}]")
        if self.layout_bias not in LAYOUT_BIAS_MODES:
            raise ValueError(f"layout_bias {self.layout_bias!r} is not one of {LAYOUT_BIAS_MODES}")
        if self.noise_shift <= 0:
            raise ValueError(f"noise_shift {self.noise_shift} must be > 0")
        if self.layout_bias_bonus < 0:
            raise ValueError(f"layout_bias_bonus {self.layout_bias_bonus} must be >= 0")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention {self.attention!r} is not one of {ATTENTION_BACKENDS}")
        if self.cross_attention not in ("auto", "sdpa", "flash"):
            raise ValueError(f"cross_attention {self.cross_attention!r} is not one of ('auto', 'sdpa', 'flash')")
        if self.layout_to_image not in ("box", "open"):
            raise ValueError(f"layout_to_image {self.layout_to_image!r} is not one of ('box', 'open')")
        return self



# Published MAR shapes (LTH14/mar) and small CPU sizes. kl16 at 256 px gives a 16x16 grid.
_MAR = dict(tokenizer="kl16", image_size=256)
PRESETS: dict[str, dict] = {
    "tiny": dict(width=64, encoder_depth=2, decoder_depth=2, num_heads=4, diffusion_depth=2, diffusion_width=128),
    # the CPU demo's model (~2M): one diffusion sample per token, 25 sampling steps, no dropout (a quarter
    # of a CPU step, and no use in minutes-long runs) and a 24-slot buffer (1 caption + 16 boxes + 7 null;
    # MAR's 64 made the encoder's sequence mostly null slots and a step 1.5x slower) keep training near 100
    # images/s and sampling at a fraction of a second per image on 2 cores. The hard bias with null slots
    # penalised and a +4 bonus on the covering layout tokens is what makes a few hundred steps put content
    # inside the boxes, and the noise shift 4 (= the 4-pixel patch side: a flat patch repeats each colour 16
    # times) what makes the head take the colour from the backbone (docs/demo.md)
    "small": dict(width=128, encoder_depth=2, decoder_depth=2, num_heads=4, diffusion_depth=3, diffusion_width=128,
                  diffusion_batch_mul=1, num_sampling_steps=25, attn_dropout=0.0, proj_dropout=0.0, buffer_size=24,
                  layout_bias="hard", bias_null_slots=True, layout_bias_bonus=4.0, noise_shift=4.0),
    "mar_base": dict(_MAR, width=768, encoder_depth=12, decoder_depth=12, num_heads=12,
                     diffusion_depth=6, diffusion_width=1024),
    "mar_large": dict(_MAR, width=1024, encoder_depth=16, decoder_depth=16, num_heads=16,
                      diffusion_depth=8, diffusion_width=1280),
    "mar_huge": dict(_MAR, width=1280, encoder_depth=20, decoder_depth=20, num_heads=16,
                     diffusion_depth=12, diffusion_width=1536),
}


def model_config(preset: str, **overrides) -> ModelConfig:
    """The preset's config with `overrides` applied (None values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known presets: {', '.join(PRESETS)}")
    values = dict(PRESETS[preset], preset=preset)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**values).validate()



# ---- sampling ----------------------------------------------------------------------------------
CFG_SCHEDULES = ("linear", "constant")


@dataclass
class SamplingConfig:
    """How images are sampled (`sample`, `eval`, GRPO's rollouts, the demo): one default per knob.

    A command whose default differs says why in its help (GRPO follows the paper's stage-3 command).
    """

    num_iter: int = 64  # autoregressive steps
    cfg: float = 1.0  # classifier-free guidance scale (1: off)
    cfg_schedule: str = "linear"  # linear: the scale grows with the tokens already generated (MAR); constant
    temperature: float = 1.0  # multiplies the diffusion head's sampling noise

    def validate(self) -> SamplingConfig:
        if self.num_iter < 1:
            raise ValueError(f"num_iter must be >= 1, got {self.num_iter}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule {self.cfg_schedule!r} is not one of {CFG_SCHEDULES}")
        return self


# ---- training stages: what stages 1-3 share ----------------------------------------------------------
PRECISIONS = ("bf16", "fp32")


def knob(default, help: str, choices: tuple | None = None):
    """A field of a knob group with its flag's help (and allowed values): the CLI generates the flag
    `--<field name>` from it, so a new knob is this one declaration."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class OptimizerConfig:
    """AdamW and gradient clipping, MAR's values; the engine puts them into the DeepSpeed config."""

    adam_betas: tuple[float, float] = knob((0.9, 0.95), "AdamW's beta1 and beta2")
    adam_eps: float = knob(1e-8, "AdamW's epsilon")
    weight_decay: float = knob(0.02, "AdamW's weight decay, on weight matrices only (biases and norms get none)")
    grad_clip: float = knob(3.0, "clip the global gradient norm to this (0: off)")

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)  # a flag gives a list

    def validate(self) -> OptimizerConfig:
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas {self.adam_betas} must be two values in [0, 1)")
        if self.adam_eps <= 0:
            raise ValueError(f"adam_eps must be > 0, got {self.adam_eps}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay} and {self.grad_clip}")
        return self


BAD_DATA_POLICIES = ("raise", "skip")


@dataclass
class BadDataConfig:
    """What training does with a bad sample or shard (`structmar.shards.ShardLoader`); each knob is a flag of its
    name."""

    on_bad_data: str = knob("raise", "raise: every rank stops with one line naming the shard and member; skip: drop "
                                     "a bad sample (or the rest of a corrupt shard), counted by reason in the log",
                            choices=BAD_DATA_POLICIES)
    max_bad_fraction: float = knob(0.01, "with --on_bad_data skip: stop, naming the shards, once more than this "
                                         "share of a rank's epoch is bad")

    def validate(self) -> BadDataConfig:
        if self.on_bad_data not in BAD_DATA_POLICIES:
            raise ValueError(f"on_bad_data {self.on_bad_data!r} is not one of {BAD_DATA_POLICIES}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction {self.max_bad_fraction} must lie in [0, 1]")
        return self


def knob_groups(cls) -> dict[str, type]:
    """The nested knob groups of a config class: field name -> dataclass (their fields are flat flags)."""
    return {f.name: f.default_factory for f in dataclasses.fields(cls)
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)}


@dataclass
class StageConfig:
    """What every training stage has: data, model, run directory, batch and optimizer, the engine's and the
    checkpoints' knobs. `TrainConfig` (stages 1-2) and `RLConfig` (stage 3) add their own; each field is one
    flag of its command, and the whole config is saved in every checkpoint next to the ModelConfig.

    Field names are the paper's flags. Batch size is per GPU (rank); the global batch is
    batch_size x grad_accum x world size.
    """

    output_dir: str = "output"
    data: str | None = None  # shard directory; None: <coco_root>/shards/<coco_split>
    coco_root: str = "data/coco"
    coco_split: str = "train2014"
    model: str | None = None  # ModelConfig preset; None: the --resume file's config
    diffloss_d: int | None = None  # diffusion head depth; None keeps the preset's
    diffloss_w: int | None = None  # diffusion head width; None keeps the preset's
    resume: str | None = None  # MAR weights, a stage export, or a checkpoint directory
    init_ema: bool = False  # a fresh run starts from the --resume file's EMA weights (model_ema), not its raw ones
    batch_size: int = 16  # per rank
    grad_accum: int = 1
    epochs: int = 400
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    lr: float | None = None  # absolute lr
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    ema_rate: float = 0.9999
    grad_checkpointing: bool = False
    deepspeed_config: str = "zero2"  # a packaged ZeRO json (zero2, zero3, zero3_offload) or a path to one
    precision: str = "bf16"  # bf16 (fp32 master weights and gradient accumulation) or fp32
    device: str = "cuda"
    seed: int = 1
    num_workers: int = 2
    bad_data: BadDataConfig = dataclasses.field(default_factory=BadDataConfig)
    save_last_freq: int = 5  # epochs between checkpoints
    save_steps: int = 0  # also checkpoint every this many optimizer steps (0: off)
    keep_checkpoints: int = 2  # DeepSpeed checkpoint tags kept in output_dir/checkpoints
    log_dir: str | None = None  # TensorBoard directory; None: output_dir/tensorboard
    log_every: int = 20  # steps between progress lines and scalar logs
    sample_every: int = 1000  # steps between TensorBoard grids of EMA samples (0: off)
    vae_path: str | None = None  # kl16 decoder; None: the one the shards or --resume export record, else the default
    max_nonfinite: int = 10  # consecutive non-finite losses that abort the run

    @classmethod
    def flag_names(cls) -> set[str]:
        """The command's flags: the config's fields, those of its knob groups in their place."""
        groups = knob_groups(cls)
        names = {f.name for f in dataclasses.fields(cls)} - set(groups)
        for group in groups.values():
            names |= {f.name for f in dataclasses.fields(group)}
        return names

    @classmethod
    def from_flags(cls, flags: dict):
        """The config of flat flag values (a command's, or a tool's name=value pairs): a knob group's fields
        go to the group."""
        unknown = sorted(set(flags) - cls.flag_names())
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}")
        groups = knob_groups(cls)
        values = {k: v for k, v in flags.items() if k in {f.name for f in dataclasses.fields(cls)}}
        for name, group in groups.items():
            values[name] = group(**{f.name: flags[f.name] for f in dataclasses.fields(group) if f.name in flags})
        return cls(**values)

    def validate(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device {self.device!r} is not 'cuda' or 'cpu'")
        if self.sample_every < 0 or self.save_steps < 0 or self.max_steps < 0:
            raise ValueError("sample_every, save_steps and max_steps must be >= 0")
        for name in ("batch_size", "grad_accum", "epochs", "max_nonfinite", "log_every", "keep_checkpoints",
                     "save_last_freq"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_rate < 1.0:
            raise ValueError(f"ema_rate {self.ema_rate} must lie in [0, 1)")
        self.optimizer.validate()
        self.bad_data.validate()
        return self

    def base_lr(self, global_batch: int) -> float:
        """The learning rate after warmup, for `global_batch` images per optimizer step."""
        return self.lr

    def lr_at(self, base_lr: float, epoch: float) -> float:
        """The learning rate at fractional `epoch`: constant unless a stage has a schedule."""
        return base_lr

    def compile_backend(self) -> str | None:
        """The torch.compile backend of the model's forward, None for eager: stage 3 (GRPO) runs eager, its
        rollouts and recomputation call the model outside forward."""
        return None

    def model_overrides(self) -> dict:
        """The ModelConfig fields this stage sets on the model it builds or continues."""
        return dict(grad_checkpointing=self.grad_checkpointing)

    # whether the loader mirrors half the samples (image and boxes); the planner's stage turns it off, since a
    # caption's "to the left of" does not mirror with the boxes
    mirror_samples: ClassVar[bool] = True

    def model_config_from_dict(self, d: dict) -> ModelConfig:
        """The model config a continued run's checkpoint recorded."""
        return ModelConfig.from_dict(d)

    def shard_model_config(self, model_cfg: ModelConfig) -> ModelConfig:
        """The ModelConfig the shards are checked against and read for: the model's own (the planner's stage
        gives the shards' image side, which its model does not have)."""
        return model_cfg

    @property
    def shard_dir(self) -> str:
        """Where the training shards are: --data, else <coco_root>/shards/<coco_split> (as slurm/ builds them)."""
        return self.data or f"{self.coco_root.rstrip('/')}/shards/{self.coco_split}"

    def model_config(self) -> ModelConfig:
        """The ModelConfig this stage builds when no checkpoint brings one."""
        if self.model is None:
            raise ValueError("--model is required when no checkpoint brings a model config")
        return model_config(self.model, diffusion_depth=self.diffloss_d, diffusion_width=self.diffloss_w,
                            **self.model_overrides())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- training (stages 1-2) --------------------------------------------------------------------
TRAIN_MODES = ("text_layout", "full")
LR_SCHEDULES = ("constant", "cosine")
COMPILE_BACKENDS = ("inductor", "aot_eager")  # torch.compile backends `structmar train --compile` takes


@dataclass
class TrainConfig(StageConfig):
    """One supervised stage: what `structmar train` runs. lr = blr x global batch / 256 unless `lr` is given,
    on MAR's schedule: linear warmup, then constant or half-cosine."""

    train_mode: str = "full"  # text_layout: only StructMAR's new modules train; full: everything
    warmup_epochs: float = 100.0
    blr: float = 1e-4
    min_lr: float = 0.0
    lr_schedule: str = "constant"
    label_drop_prob: float = 0.1
    compile: str | None = knob(None, "compile the model's forward and backward with this torch.compile backend, "
                                     "through DeepSpeed's engine.compile(): inductor generates fused kernels (the "
                                     "speed-up, after a compile of minutes at the first steps; its random draws are "
                                     "its own, so losses differ from eager's by the noise drawn); aot_eager traces "
                                     "the same graphs and runs them eagerly (eager's losses exactly: checks that a "
                                     "model compiles, in seconds); default: eager", COMPILE_BACKENDS)

    def validate(self) -> TrainConfig:
        super().validate()
        if self.train_mode not in TRAIN_MODES:
            raise ValueError(f"train_mode {self.train_mode!r} is not one of {TRAIN_MODES}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} is not one of {LR_SCHEDULES}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} must lie in [0, epochs={self.epochs}]")
        return self

    def base_lr(self, global_batch: int) -> float:
        return self.lr if self.lr is not None else self.blr * global_batch / 256

    def lr_at(self, base_lr: float, epoch: float) -> float:
        """MAR's per-iteration schedule at fractional `epoch`: linear warmup, then constant or half-cosine."""
        if epoch < self.warmup_epochs:
            return base_lr * epoch / self.warmup_epochs
        if self.lr_schedule == "constant":
            return base_lr
        progress = (epoch - self.warmup_epochs) / max(self.epochs - self.warmup_epochs, 1e-8)
        return self.min_lr + (base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def compile_backend(self) -> str | None:
        return self.compile

    def model_overrides(self) -> dict:
        return dict(super().model_overrides(), label_drop_prob=self.label_drop_prob)


# ---- stage 3: GRPO with detector rewards ----------------------------------------------------------
DETECTOR_KINDS = ("torchvision_frcnn", "hf", "shapes")
SIGMA_MODES = ("exclude", "floor")
CREDITS = ("image", "box")  # how GRPO assigns advantages to tokens
REWARD_SCALES = ("group", "batch", "none")  # how GRPO scales rewards centred on their group's mean
_PAPER = "the paper's stage-3 command"


@dataclass
class GRPOConfig:
    """The knobs of one GRPO step (`structmar.grpo.GRPOObjective`); each is an `rl` flag of its name.

    The rollouts sample with SamplingConfig's defaults except `num_iter` and `cfg_schedule`: the paper's
    stage-3 command's.
    """

    group_size: int = knob(4, "rollouts per layout (advantage group)")
    num_iter: int = knob(256, f"AR steps per rollout (default: %(default)s, {_PAPER}; sampling's is "
                              f"{SamplingConfig.num_iter})")
    rl_step_ratio: float = knob(1.0, "share of the AR steps whose transitions are recomputed with gradient")
    diffusion_step_ratio: float = knob(1.0, "share of each selected AR step's denoising steps recomputed")
    rollout_steps: int | None = knob(None, "diffusion steps per token in rollouts (default: the model's "
                                           "num_sampling_steps)")
    rollout_cfg: float = knob(SamplingConfig.cfg, "classifier-free guidance in rollouts")
    cfg_schedule: str = knob("constant", f"guidance schedule of rollouts (constant: {_PAPER} samples without "
                                         "guidance, where the schedule does not matter; sampling defaults to "
                                         f"{SamplingConfig.cfg_schedule})", CFG_SCHEDULES)
    temperature: float = knob(SamplingConfig.temperature, "sampling temperature of rollouts")
    clip_range: float = knob(0.2, "PPO ratio clip: [1 - c, 1 + c]")
    kl_coef: float = knob(0.02, "weight of the KL to the frozen reference")
    min_sigma: float = knob(0.02, "denoising steps whose rollout sigma is below this are excluded (or floored, see "
                                  "--sigma_mode): the log-prob gradient scales as 1/sigma, so the last cosine steps "
                                  "would dominate it (30-50x the noisiest step's, measured on the tiny preset)")
    sigma_mode: str = knob("exclude", "exclude: leave small-sigma steps out; floor: evaluate them with sigma = "
                                      "--min_sigma", SIGMA_MODES)
    inner_steps: int = knob(1, "optimizer steps per rollout (the same selection and reference means)")
    anchor_coef: float = knob(0.0, "weight of the supervised loss kept as an anchor (0: off)")
    best_of_group_coef: float = knob(0.0, "weight of the supervised loss on each group's highest-reward rollout, its "
                                          "generated latents as the target (reward-ranked fine-tuning on the "
                                          "policy's own samples; groups whose rewards are all equal are left out; "
                                          "0: off)")
    policy_coef: float = knob(1.0, "weight of the clipped policy objective with its KL term (0: only the supervised "
                                   "terms train, and rollouts keep no trajectories, the reference computes nothing "
                                   "and nothing is recomputed: no ratio or KL is logged, and --min_sigma does not "
                                   "apply)")
    credit: str = knob("image", "image: every token of a rollout gets its image's advantage; box: each box's reward "
                                "is normalised within its group and given to the tokens its cells cover (the "
                                "image's advantage where no box covers a token)", CREDITS)
    shared_orders: bool = knob(False, "the rollouts of a group share one generation order, so their rewards differ "
                                      "only through the policy's own draws")
    scale_rewards: str = knob("group", "advantages are rewards minus their group's mean, divided by: group: the "
                                       "group's std; batch: one std over the batch, so a group whose rewards barely "
                                       "differ keeps small advantages; none: nothing", REWARD_SCALES)
    math_attention: bool = knob(True, "attention that runs through SDPA uses its math kernel in rollouts and "
                                      "recomputation, so an update's first recomputation reproduces the rollout's "
                                      "log-densities exactly (ratio 1); --no-math_attention: SDPA's fused kernels, "
                                      "faster, ratios off 1 by their rounding (on CPU by ~1e-6, which an untrained "
                                      "head amplifies)")

    def rollout_sampling(self) -> SamplingConfig:
        return SamplingConfig(self.num_iter, self.rollout_cfg, self.cfg_schedule, self.temperature)

    def validate(self) -> GRPOConfig:
        self.rollout_sampling().validate()
        if self.credit not in CREDITS:
            raise ValueError(f"credit {self.credit!r} is not one of {CREDITS}")
        if self.scale_rewards not in REWARD_SCALES:
            raise ValueError(f"scale_rewards {self.scale_rewards!r} is not one of {REWARD_SCALES}")
        if self.sigma_mode not in SIGMA_MODES:
            raise ValueError(f"sigma_mode {self.sigma_mode!r} is not one of {SIGMA_MODES}")
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {self.inner_steps}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative within a group), got {self.group_size}")
        for name in ("rl_step_ratio", "diffusion_step_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in (0, 1], got {getattr(self, name)}")
        if self.rollout_steps is not None and self.rollout_steps < 2:
            raise ValueError(f"rollout_steps must be >= 2, got {self.rollout_steps}")
        for name in ("anchor_coef", "best_of_group_coef", "policy_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.policy_coef == 0 and self.anchor_coef == 0 and self.best_of_group_coef == 0:
            raise ValueError("policy_coef, anchor_coef and best_of_group_coef are all 0: nothing would train")
        if self.clip_range <= 0 or self.kl_coef < 0 or self.min_sigma < 0:
            raise ValueError("clip_range must be > 0; kl_coef and min_sigma >= 0")
        return self


@dataclass
class RLConfig(StageConfig):
    """Stage 3 (GRPO): what `structmar rl` runs; the loop, engine and checkpoints are stage 1-2's.

    Defaults are the paper's stage-3 command (group 4, batch 4, 256 AR iterations, kl 0.02, lr 1e-6,
    10 epochs): a constant lr, no warmup. The policy starts from --resume; a frozen copy of those weights,
    kept on the CPU, is the KL reference. The diffusion head is frozen unless `train_head`.
    """

    epochs: int = 10
    batch_size: int = 4  # layouts per rank; each yields group_size rollouts
    lr: float = 1e-6
    ema_rate: float = 0.999
    detector: str = "torchvision_frcnn"
    detector_path: str | None = None
    detector_threshold: float = 0.05  # detections below this score are ignored by the reward
    reward_iou: float = 1.0
    reward_confidence: float = 0.25
    reward_centroid: float = 0.5
    reward_missing: float = 0.5
    train_head: bool = False
    ref_offload: bool = True  # the frozen reference's parameters live in pinned CPU memory (else on the device)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)

    def validate(self) -> RLConfig:
        super().validate()
        if self.detector not in DETECTOR_KINDS:
            raise ValueError(f"detector {self.detector!r} is not one of {DETECTOR_KINDS}")
        self.grpo.validate()
        if self.lr is None or self.lr <= 0:
            raise ValueError(f"lr must be > 0 for GRPO, got {self.lr}")
        if not self.resume:
            raise ValueError("--resume is required: GRPO starts from a trained model (and keeps it as the reference)")
        return self


# ---- the app: a page to draw layouts and sample them ------------------------------------------------------


@dataclass
class AppConfig:
    """What `structmar app` serves and the bounds of one request; each field is one flag of its name."""

    checkpoint: str | None = knob(None, "a stage export (checkpoint-last.safetensors) or its run directory; required, "
                                                "no default")
    host: str = knob("127.0.0.1", "address to listen on (127.0.0.1: this machine only; 0.0.0.0 opens it to the "
                                  "network, without authentication)")
    port: int = knob(7860, "port to listen on")
    clip_path: str | None = knob(None, "the CLIP directory the model's shards were built with (default: the one the "
                                       "export records, as `structmar sample` loads it)")
    vae_path: str | None = knob(None, "MAR's kl16.ckpt (kl16 models only; default: the one the export records)")
    device: str = knob("auto", "auto (cuda if available, else cpu), cpu, cuda:N")
    categories: str | None = knob(None, "a shard directory whose category names the tag menu offers (default: the "
                                        "names the export recorded; a tag may also be free text)")
    planner: str | None = knob(None, "a planner export (structmar train-planner) or its run directory: adds a "
                                     "\"Plan from caption\" button that fills the canvas with the layout it plans "
                                     "(default: no button)")
    max_images: int = knob(8, "images one request may ask for (sampled as one batch)")
    max_num_iter: int = knob(64, "autoregressive steps one request may ask for")
    max_text: int = knob(200, "characters of a caption or a tag")
    canvas: int = knob(512, "side of the square drawing canvas in pixels (boxes are stored normalised)")

    def validate(self) -> AppConfig:
        if not self.checkpoint:
            raise ValueError("--checkpoint is required: a stage export or its run directory")
        for name in ("max_images", "max_num_iter", "max_text"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 64 <= self.canvas <= 2048:
            raise ValueError(f"canvas must lie in [64, 2048], got {self.canvas}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must lie in [0, 65535], got {self.port}")
        return self


# ---- the layout planner: caption -> layout (`structmar train-planner`) --------------------------------
PLANNER_TEXT_INPUTS = ("tokens", "pooled", "both")  # what the planner's queries attend to


@dataclass
class PlannerConfig(SavedConfig):
    """Everything that fixes a layout planner's parameters and loss, with the categories it predicts (class i is
    `categories[i]`, an (id, name) pair; one more class is "no object"). Saved in its export."""

    kind = "planner"

    preset: str = "tiny"
    categories: list = dataclasses.field(default_factory=list)  # [[id, name], ...] of the shards it learnt
    text_dim: int = 512
    width: int = 32
    depth: int = 2  # decoder layers
    num_heads: int = 2
    num_queries: int = 8  # the most boxes a plan holds
    dropout: float = 0.1
    text_input: str = "both"  # tokens: the caption's token states; pooled: its pooled vector; both
    aux_loss: bool = True  # the set loss after every decoder layer, not only the last
    class_weight: float = 1.0  # DETR's matching cost and loss weights
    l1_weight: float = 5.0
    giou_weight: float = 2.0  # 0: no generalised IoU in the matching cost or the loss
    no_object_weight: float = 0.1  # weight of the no-object class in the cross-entropy

    def validate(self) -> PlannerConfig:
        if not self.categories:
            raise ValueError("a planner needs at least one category")
        if self.text_input not in PLANNER_TEXT_INPUTS:
            raise ValueError(f"text_input {self.text_input!r} is not one of {PLANNER_TEXT_INPUTS}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        for name in ("depth", "num_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        return self



PLANNER_PRESETS: dict[str, dict] = {
    "tiny": dict(width=32, depth=2, num_heads=2, num_queries=8),  # tests
    # Shapes (at most 6 objects): the demo trains it in about a minute on 2 cores
    "small": dict(width=128, depth=3, num_heads=4, num_queries=12),
    # COCO (shards keep up to 16 boxes); DETR's decoder is 6 layers of 256
    "base": dict(width=256, depth=6, num_heads=8, num_queries=32),
}


@dataclass
class PlannerOptions:
    """The planner's own knobs of `structmar train-planner` (the rest are every stage's)."""

    text_input: str = knob("both", "what the queries attend to: the caption's CLIP token states, its pooled vector, "
                                   "or both", PLANNER_TEXT_INPUTS)
    aux_loss: bool = knob(True, "the set loss after every decoder layer (DETR's auxiliary losses)")
    giou_weight: float = knob(2.0, "weight of the generalised IoU in the matching cost and the loss (0: off)")
    l1_weight: float = knob(5.0, "weight of the L1 box distance (cxcywh) in the matching cost and the loss")
    no_object_weight: float = knob(0.1, "cross-entropy weight of the no-object class")
    dropout: float = knob(0.1, "dropout in the decoder")


@dataclass
class PlannerTrainConfig(StageConfig):
    """`structmar train-planner`: a caption -> layout set predictor trained on the shards' caption states and
    layouts through the loop and engine of every stage. `--model` names a planner preset."""

    model: str | None = "small"
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-4  # DETR's transformer lr
    ema_rate: float = 0.999
    sample_every: int = 0
    planner: PlannerOptions = dataclasses.field(default_factory=PlannerOptions)

    mirror_samples: ClassVar[bool] = False

    def validate(self) -> PlannerTrainConfig:
        super().validate()
        if self.model not in PLANNER_PRESETS:
            raise ValueError(f"unknown planner preset {self.model!r}; known: {', '.join(PLANNER_PRESETS)}")
        if self.sample_every:
            raise ValueError("--sample_every: a planner draws no samples; leave it 0")
        for name in ("diffloss_d", "diffloss_w"):
            if getattr(self, name) is not None:
                raise ValueError(f"--{name} does not apply to the planner")
        if self.init_ema or self.grad_checkpointing:
            raise ValueError("--init_ema and --grad_checkpointing do not apply to the planner")
        if self.resume and os.path.realpath(self.resume) != os.path.realpath(self.output_dir):
            raise ValueError(f"--resume {self.resume}: a planner trains from scratch; --resume may only name its "
                             "own --output_dir (rerunning the command continues it anyway)")
        if self.planner.text_input not in PLANNER_TEXT_INPUTS:
            raise ValueError(f"text_input {self.planner.text_input!r} is not one of {PLANNER_TEXT_INPUTS}")
        return self

    def model_overrides(self) -> dict:
        return {}

    def _manifest(self) -> dict:
        from structmar.shards import read_manifest

        return read_manifest(self.shard_dir, self.coco_split)

    def model_config(self) -> PlannerConfig:
        """The preset with this run's knobs, predicting the categories of the shards."""
        manifest = self._manifest()
        categories = [[int(k), str(v)] for k, v in sorted(manifest["categories"].items(), key=lambda kv: int(kv[0]))]
        values = dict(PLANNER_PRESETS[self.model], preset=self.model, categories=categories,
                      text_dim=manifest["text_encoder"]["dim"], **dataclasses.asdict(self.planner))
        return PlannerConfig(**values).validate()

    def model_config_from_dict(self, d: dict) -> PlannerConfig:
        return PlannerConfig.from_dict(d)

    def shard_model_config(self, model_cfg: PlannerConfig) -> ModelConfig:
        """The shards as they are (the planner reads only their captions and layouts), at most `num_queries`
        boxes per sample, the largest."""
        manifest = self._manifest()
        tokenizer = manifest["tokenizer"]
        return ModelConfig(tokenizer=tokenizer["name"], image_size=manifest["image_size"],
                           pixel_patch=tokenizer["stride"] if tokenizer["name"] == "pixel" else 4,
                           text_dim=manifest["text_encoder"]["dim"],
                           max_objects=min(manifest["splits"][self.coco_split]["max_objects"],
                                           model_cfg.num_queries)).validate()
