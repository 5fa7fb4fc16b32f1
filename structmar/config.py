"""Typed configuration: one default per knob, named presets, and the mapping from the paper's flags.

A `ModelConfig` is saved in every checkpoint and shard manifest and is the only thing needed to
rebuild a model. Presets name the published MAR shapes plus small CPU sizes; the paper's
`--diffloss_d/--diffloss_w` override the diffusion head of a preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Tokenizers: name -> (latent channels per token, pixels per token side).
# kl16 is MAR's KL-16 VAE (16 channels, stride 16); pixel is a weight-free RGB patch tokenizer
# whose token is one patch (3 * patch * patch channels).
TOKENIZERS = ("kl16", "pixel")

ATTENTION_BACKENDS = ("auto", "sdpa", "flex")
LAYOUT_BIAS_MODES = ("none", "soft", "hard")


@dataclass
class ModelConfig:
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}")
        return cls(**d).validate()


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
    # times) what makes the head take the colour from the backbone (README)
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


# ---- training (stages 1-2) --------------------------------------------------------------------
TRAIN_MODES = ("text_layout", "full")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("bf16", "fp32")


@dataclass
class TrainConfig:
    """One supervised stage: what `structmar train` runs. Saved in every checkpoint next to the ModelConfig.

    Field names are the paper's flags. Batch size is per GPU (rank); the global batch is
    batch_size x grad_accum x world size and lr = blr x global batch / 256 unless `lr` is given.
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
    train_mode: str = "full"  # text_layout: only StructMAR's new modules train; full: everything
    batch_size: int = 16  # per rank
    grad_accum: int = 1
    epochs: int = 400
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    warmup_epochs: float = 100.0
    blr: float = 1e-4
    lr: float | None = None  # absolute lr; None: blr x global batch / 256
    min_lr: float = 0.0
    lr_schedule: str = "constant"
    ema_rate: float = 0.9999
    label_drop_prob: float = 0.1
    grad_checkpointing: bool = False
    deepspeed_config: str = "ds_configs/zero2.json"
    precision: str = "bf16"  # bf16 (fp32 master weights and gradient accumulation) or fp32
    device: str = "cuda"
    seed: int = 1
    num_workers: int = 2
    save_last_freq: int = 5  # epochs between checkpoints
    save_steps: int = 0  # also checkpoint every this many optimizer steps (0: off)
    keep_checkpoints: int = 2  # DeepSpeed checkpoint tags kept in output_dir/checkpoints
    log_dir: str | None = None  # TensorBoard directory; None: output_dir/tensorboard
    log_every: int = 20  # steps between progress lines and scalar logs
    sample_every: int = 1000  # steps between TensorBoard grids of EMA samples (0: off)
    vae_path: str = "pretrained_models/vae/kl16.ckpt"  # kl16 decoder for those samples
    max_nonfinite: int = 10  # consecutive non-finite losses that abort the run

    def validate(self) -> TrainConfig:
        if self.train_mode not in TRAIN_MODES:
            raise ValueError(f"train_mode {self.train_mode!r} is not one of {TRAIN_MODES}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} is not one of {LR_SCHEDULES}")
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
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} must lie in [0, epochs={self.epochs}]")
        if not 0.0 <= self.ema_rate < 1.0:
            raise ValueError(f"ema_rate {self.ema_rate} must lie in [0, 1)")
        return self

    @property
    def shard_dir(self) -> str:
        """Where the training shards are: --data, else <coco_root>/shards/<coco_split> (as slurm/ builds them)."""
        return self.data or f"{self.coco_root.rstrip('/')}/shards/{self.coco_split}"

    def model_config(self) -> ModelConfig:
        """The ModelConfig this stage builds when no checkpoint brings one."""
        if self.model is None:
            raise ValueError("--model is required when no checkpoint brings a model config")
        return model_config(
            self.model,
            diffusion_depth=self.diffloss_d,
            diffusion_width=self.diffloss_w,
            grad_checkpointing=self.grad_checkpointing,
            label_drop_prob=self.label_drop_prob,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- stage 3: GRPO with detector rewards ----------------------------------------------------------
DETECTOR_KINDS = ("torchvision_frcnn", "hf", "shapes")
SIGMA_MODES = ("exclude", "floor")
CREDITS = ("image", "box")  # how GRPO assigns advantages to tokens
REWARD_SCALES = ("group", "batch", "none")  # how GRPO scales rewards centred on their group's mean


@dataclass
class RLConfig(TrainConfig):
    """Stage 3 (GRPO): what `structmar rl` runs; the loop, engine and checkpoints are stage 1-2's.

    Defaults are the paper's stage-3 command (group 4, batch 4, 256 AR iterations, kl 0.02, lr 1e-6,
    10 epochs). The policy starts from --resume; a frozen copy of those weights, kept on the CPU, is the
    KL reference. The diffusion head is frozen unless `train_head`.
    """

    epochs: int = 10
    batch_size: int = 4  # layouts per rank; each yields group_size rollouts
    warmup_epochs: float = 0.0
    lr: float | None = 1e-6
    ema_rate: float = 0.999
    detector: str = "torchvision_frcnn"
    detector_path: str | None = None
    detector_threshold: float = 0.05  # detections below this score are ignored by the reward
    reward_iou: float = 1.0
    reward_confidence: float = 0.25
    reward_centroid: float = 0.5
    reward_missing: float = 0.5
    group_size: int = 4
    num_iter: int = 256  # AR steps per rollout
    rl_step_ratio: float = 1.0  # share of the AR steps whose transitions an update recomputes
    diffusion_step_ratio: float = 1.0  # share of each selected step's denoising steps recomputed
    rollout_steps: int | None = None  # diffusion steps per token in rollouts; None: the model's num_sampling_steps
    rollout_cfg: float = 1.0
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    clip_range: float = 0.2
    kl_coef: float = 0.02
    min_sigma: float = 0.02
    sigma_mode: str = "exclude"
    inner_steps: int = 1  # optimizer steps per rollout
    anchor_coef: float = 0.0  # weight of the supervised loss kept as an anchor
    best_of_group_coef: float = 0.0  # weight of the supervised loss on each group's highest-reward rollout
    policy_coef: float = 1.0  # weight of the clipped policy objective with its KL term
    credit: str = "image"  # image: a token's advantage is its image's; box: that of the boxes covering it
    shared_orders: bool = False  # the rollouts of a group share one generation order
    scale_rewards: str = "group"  # centred rewards / group std, / one std over the batch, or unscaled
    train_head: bool = False
    ref_device: str = "cpu"
    # attention through SDPA uses its math kernel in rollouts and recomputation, so an update's first
    # recomputation reproduces the rollout's log-densities exactly (ratio 1); off: SDPA's fused kernels
    # (faster; on CPU they differ by ~1e-6 between no-grad and with-grad, which an untrained head amplifies)
    math_attention: bool = True

    def validate(self) -> RLConfig:
        super().validate()
        if self.detector not in DETECTOR_KINDS:
            raise ValueError(f"detector {self.detector!r} is not one of {DETECTOR_KINDS}")
        if self.credit not in CREDITS:
            raise ValueError(f"credit {self.credit!r} is not one of {CREDITS}")
        if self.scale_rewards not in REWARD_SCALES:
            raise ValueError(f"scale_rewards {self.scale_rewards!r} is not one of {REWARD_SCALES}")
        if self.sigma_mode not in SIGMA_MODES:
            raise ValueError(f"sigma_mode {self.sigma_mode!r} is not one of {SIGMA_MODES}")
        if self.ref_device not in ("cpu", "cuda") or (self.ref_device == "cuda" and self.device != "cuda"):
            raise ValueError(f"ref_device {self.ref_device!r} must be 'cpu', or 'cuda' with --device cuda")
        if self.cfg_schedule not in ("constant", "linear"):
            raise ValueError(f"cfg_schedule {self.cfg_schedule!r} is not 'constant' or 'linear'")
        for name in ("group_size", "num_iter", "inner_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
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
        if self.clip_range <= 0 or self.kl_coef < 0 or self.min_sigma < 0 or self.temperature <= 0:
            raise ValueError("clip_range and temperature must be > 0; kl_coef and min_sigma >= 0")
        if self.lr is None or self.lr <= 0:
            raise ValueError(f"lr must be > 0 for GRPO, got {self.lr}")
        if not self.resume:
            raise ValueError("--resume is required: GRPO starts from a trained model (and keeps it as the reference)")
        return self
