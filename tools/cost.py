"""Cost of a StructMAR stage: parameters, FLOPs per image, memory per GPU, wall time of the paper's recipe.

    python tools/cost.py --preset mar_huge --stage 3 --world_size 8
    python tools/cost.py --table                  # mar_base/large/huge x stages 1-3 (docs/cost.md)
    python tools/cost.py --check_cpu              # the model against a measured mar_base step on this CPU

FLOPs are counted by torch's FlopCounterMode on the real model built on the meta device (no memory, no
values), with each stage's requires_grad settings: a frozen parameter gets no weight gradient, so its
layers' backward costs ~1x their forward instead of 2x, as counted. Counting is per image (batch 1;
every op is per image) and covers matmuls and attention (what FlopCounterMode counts), not element-wise ops.

- training (stages 1-2): one forward + backward at the mask ratio's mean (MAR's truncated normal:
  0.867 of the tokens masked), plus the forward of every checkpointed block again under
  --grad_checkpointing (counted: those blocks' forward FLOPs).
- a rollout image (stage 3): one AR step's backbone pass, counted at the schedule's mean number of
  known tokens and multiplied by num_iter, plus one denoising step of the head over the 256 tokens,
  multiplied by the denoising steps (every token is denoised once); x2 with CFG (one pass over
  [conditional; unconditional]). A pass's FLOPs are quadratic in its encoder length only through
  attention (~4% of a pass at these widths), so the mean-length pass is within ~1% of the sum.
- the update (stage 3): at rl_step_ratio x num_iter AR steps a backbone pass with gradient, and at
  diffusion_step_ratio of each generated token's denoising steps with noise (all but the last) the
  head's mean, forward + backward (the head is frozen unless --train_head: input gradients only).
- the reference: the same transitions' forward (no backward), in the policy's bf16 on the policy's GPU
  (a never-stepped ZeRO-3 engine whose layers are gathered onto the GPU one at a time).
Not counted: the VAE decode and the reward detector of a rollout (estimated ~1 TFLOP per image together, under
1% of a mar_huge rollout), element-wise ops, the optimizer step, communication.

Memory per GPU = model states + activations. Model states come from DeepSpeed's own estimators for
the trainable parameters (bf16 weights with fp32 master, gradients and AdamW moments; ZeRO-1 has no
estimator: the ZeRO-2 one's terms with the 16-bit gradients unpartitioned), plus the frozen
parameters in bf16 and structmar's fp32 EMA of every parameter (both partitioned under ZeRO-3).
Activations are autograd's saved tensors at real shapes, counted on the meta device in bf16 (storages
deduplicated, parameters excluded); under gradient checkpointing, what is saved outside the
checkpointed blocks, their inputs, and the largest block's own saved tensors (rebuilt one at a time
in backward). Attention runs SDPA's math path on the meta device, which saves the (H, N, N)
probabilities that fused GPU kernels do not: that share is printed separately. --activations_gb_per_image
replaces the count. Stage 3 keeps the graph of every selected AR step of a chunk (--grad_accum chunks)
alive until the backward: rollouts per GPU x selected steps x one pass's activations. Stage 3's reference
(bf16, ZeRO-3) holds on the GPU the module being gathered, DeepSpeed's prefetch bucket, the persistent
parameters (<= 1e4 elements each) and StructMAR's own parameters (gathered for the whole call), and with
--no-ref_offload its partition; on the host (pinned) its partition, 2 bytes x parameters / world size.

Time = FLOPs / (GPUs x bf16 peak x MFU), the reference's forward included. The reference's traffic is an
estimate, printed apart and not added: each selected AR step's forward gathers every layer (2 bytes x
parameters onto every GPU), of which each rank's own share (1/world size) crosses from its host when
offloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from structmar import model as model_module  # noqa: E402
from structmar.config import model_config  # noqa: E402
from structmar.engine import PERSISTENCE_THRESHOLD  # noqa: E402
from structmar.model import StructMAR, is_addition, mask_by_order, parameter_counts, sample_orders  # noqa: E402

GB = 1e9
COCO_TRAIN_IMAGES = 82_783  # COCO 2014 train
H100_BF16_TFLOPS = 989.0  # dense
PREFETCH_BUCKET = 50_000_000  # DeepSpeed's stage3_prefetch_bucket_size default (elements), which frozen_engine keeps
STAGE_NAMES = {1: "text_layout (backbone frozen)", 2: "full", 3: "GRPO"}


@dataclass
class Recipe:
    """One stage of the paper's recipe (its README's commands; batch sizes are per GPU)."""

    epochs: float
    batch_size: int
    grad_checkpointing: bool
    zero: int
    group_size: int = 4
    num_iter: int = 256
    denoising_steps: int | None = None  # None: the preset's num_sampling_steps (100)
    cfg: float = 1.0
    rl_step_ratio: float = 1.0
    diffusion_step_ratio: float = 1.0
    grad_accum: int = 1
    train_head: bool = False
    ref_offload: bool = True  # stage 3: the reference's partition in pinned host memory (else on the GPU)


RECIPE = {
    1: Recipe(epochs=20, batch_size=64, grad_checkpointing=False, zero=2),
    2: Recipe(epochs=100, batch_size=64, grad_checkpointing=True, zero=3),
    3: Recipe(epochs=10, batch_size=4, grad_checkpointing=True, zero=2),
}


def mean_mask_ratio(min_ratio: float = 0.7, centre: float = 1.0, std: float = 0.25) -> float:
    """Mean of MAR's mask ratio: a normal (centre, std) truncated to [min_ratio, 1]."""
    a, b = (min_ratio - centre) / std, (1.0 - centre) / std
    pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    return centre + std * (pdf(a) - pdf(b)) / (cdf(b) - cdf(a))


def mean_known_tokens(seq_len: int, num_iter: int) -> float:
    """Mean number of already generated tokens over a rollout's AR steps (sample.sample_latents' schedule)."""
    masked, known = seq_len, []
    for step in range(num_iter):
        known.append(seq_len - masked)
        after = math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / num_iter))
        masked = max(1, min(masked - 1, after))
    return sum(known) / num_iter


# ---- counting on the meta device ------------------------------------------------------------------


class _NonzeroRows(TorchDispatchMode):
    """aten.nonzero on a meta tensor, whose values do not exist, returns `rows` rows: the count the caller
    knows (the encoder's kept tokens)."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.nonzero.default and args[0].is_meta:
            return torch.empty(self.rows, args[0].dim(), dtype=torch.long, device="meta")
        return func(*args, **(kwargs or {}))


@dataclass
class Count:
    """One counted pass: FLOPs (forward+backward as run), the checkpointed blocks' forward FLOPs, and
    activation bytes (autograd's saved tensors)."""

    flops: int = 0
    checkpointed_forward_flops: int = 0
    saved_bytes: int = 0  # without checkpointing
    kept_bytes: int = 0  # with it: saved outside the checkpointed blocks + their inputs
    rebuilt_bytes: int = 0  # with it: the largest block's own saved tensors
    # the (H, N, N) tensors among each
    attention_bytes: int = 0
    kept_attention_bytes: int = 0
    rebuilt_attention_bytes: int = 0

    def flops_with(self, grad_checkpointing: bool) -> int:
        return self.flops + (self.checkpointed_forward_flops if grad_checkpointing else 0)

    def activations(self, grad_checkpointing: bool, passes: float = 1) -> float:
        """Peak activation bytes of `passes` such passes whose graphs are alive together (one backward)."""
        if grad_checkpointing:
            return passes * self.kept_bytes + self.rebuilt_bytes
        return passes * self.saved_bytes

    def attention(self, grad_checkpointing: bool, passes: float = 1) -> float:
        if grad_checkpointing:
            return passes * self.kept_attention_bytes + self.rebuilt_attention_bytes
        return passes * self.attention_bytes


def checkpointed_blocks(model: StructMAR) -> list[torch.nn.Module]:
    """The modules `--grad_checkpointing` recomputes in backward (StructMAR._run, AdaLNMLP.forward)."""
    return [*model.encoder_blocks, *model.decoder_blocks, *model.diffloss.net.res_blocks]


@contextmanager
def counting(model: StructMAR, nonzero_rows: int | None = None):
    """FLOPs and saved activations of what runs inside, with the model's checkpointing off (its cost is
    derived from the per-block counts, so one pass gives both settings)."""
    result = Count()
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    blocks = checkpointed_blocks(model)
    names = {id(b): i for i, b in enumerate(blocks)}
    current: list[int | None] = [None]
    outside: dict[int, int] = {}
    inside: dict[int, dict[int, int]] = {i: {} for i in range(len(blocks))}
    inputs: dict[int, int] = {}
    alive: list[torch.Tensor] = []
    attention: set[int] = set()  # storages of (B, H, N, N) probabilities
    forward_flops = {}
    counter = FlopCounterMode(display=False)

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in params:
            where = outside if current[0] is None else inside[current[0]]
            where[s._cdata] = s.nbytes()
            if t.dim() == 4 and t.shape[-1] == t.shape[-2] and t.shape[-1] > 1:  # (B, H, N, N)
                attention.add(s._cdata)
        return t

    def pre(module, args):
        if not torch.is_grad_enabled():  # checkpointing applies only where a graph is built
            return
        current[0] = names[id(module)]
        for a in args:
            if torch.is_tensor(a):
                alive.append(a)  # as checkpointing would; and a freed storage's address could be reused
                inputs[a.untyped_storage()._cdata] = a.untyped_storage().nbytes()
        forward_flops[id(module)] = counter.get_total_flops()

    def post(module, args, out):
        if id(module) in forward_flops:
            current[0] = None
            result.checkpointed_forward_flops += counter.get_total_flops() - forward_flops.pop(id(module))

    saved = (model.cfg.grad_checkpointing, model.diffloss.net.grad_checkpointing)
    model.cfg.grad_checkpointing = model.diffloss.net.grad_checkpointing = False
    handles = [h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
    try:
        with ExitStack() as stack:
            stack.enter_context(counter)
            if nonzero_rows is not None:
                stack.enter_context(_NonzeroRows(nonzero_rows))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            yield result
    finally:
        for h in handles:
            h.remove()
        model.cfg.grad_checkpointing, model.diffloss.net.grad_checkpointing = saved
    result.flops = counter.get_total_flops()
    everything = dict(outside)
    for d in inside.values():
        everything.update(d)
    kept = {**outside, **inputs}
    rebuilt = [{k: v for k, v in d.items() if k not in kept} for d in inside.values()]
    largest = max(rebuilt, key=lambda d: sum(d.values()), default={})
    share = lambda d: sum(v for k, v in d.items() if k in attention)  # noqa: E731
    result.saved_bytes, result.attention_bytes = sum(everything.values()), share(everything)
    result.kept_bytes, result.kept_attention_bytes = sum(kept.values()), share(kept)
    result.rebuilt_bytes, result.rebuilt_attention_bytes = sum(largest.values()), share(largest)


def build(preset: str, stage: int, device="meta", dtype=torch.bfloat16, train_head: bool = False,
          **overrides) -> StructMAR:
    """The preset's model with the stage's requires_grad: stage 1 trains the additions, stage 2 everything,
    stage 3 everything but the diffusion head (unless train_head)."""
    cfg = model_config(preset, **overrides)
    with torch.device(device):
        model = StructMAR(cfg)
    model.to(dtype)
    for name, p in model.named_parameters():
        trains = {1: is_addition(name), 2: True, 3: train_head or not name.startswith("diffloss.")}[stage]
        p.requires_grad_(trains)
    return model


def example_batch(cfg, images: int, device, boxes: int = 4, text_tokens: int = 77) -> dict:
    """A training batch of the real shapes (CLIP ViT-B/32 text: 77 tokens of 512)."""
    g, k = cfg.grid_size, boxes
    box = torch.tensor([0.1, 0.2, 0.6, 0.7])
    return {
        "latents": torch.randn(images, cfg.token_channels, g, g, device=device),
        "text_pooled": torch.randn(images, cfg.text_dim, device=device),
        "text_tokens": torch.randn(images, text_tokens, cfg.text_dim, device=device),
        "text_mask": torch.ones(images, text_tokens, dtype=torch.bool, device=device),
        "boxes": box.repeat(images, k, 1).to(device),
        "box_mask": torch.ones(images, k, dtype=torch.bool, device=device),
        "tag_embeds": torch.randn(images, k, cfg.text_dim, device=device),
    }


def masked_count(seq_len: int, ratio: float) -> int:
    """The masked tokens of a training pass at `ratio` (StructMAR.forward's ceil)."""
    return int(torch.ceil(seq_len * torch.tensor([ratio], dtype=torch.float64)))


def count_training(model: StructMAR, ratio: float, images: int = 1) -> Count:
    """One training step's forward (+ backward when anything trains) at mask ratio `ratio`."""
    cfg = model.cfg
    dev = model.fake_latent.device
    kept = cfg.buffer_size + cfg.seq_len - masked_count(cfg.seq_len, ratio)
    fixed = torch.tensor([ratio], dtype=torch.float64)
    batch = example_batch(cfg, images, dev)
    with mock.patch.object(model_module, "sample_mask_ratio", lambda *a, **k: fixed), \
            counting(model, images * kept if dev.type == "meta" else None) as result:
        loss, _ = model(batch)
        if loss.requires_grad:
            loss.backward()
    return result


def count_backbone(model: StructMAR, known: int, grad: bool, images: int = 1) -> Count:
    """One AR step's backbone pass (model.predict) with `known` tokens generated; backward when `grad`."""
    cfg = model.cfg
    dev = model.fake_latent.device
    batch = example_batch(cfg, images, dev)
    tokens = batch["latents"].flatten(2).transpose(1, 2).to(model.fake_latent.dtype)
    mask = mask_by_order(cfg.seq_len - known, sample_orders(images, cfg.seq_len, device=dev))
    with torch.set_grad_enabled(grad), counting(model, images * (cfg.buffer_size + known)) as result:
        z = model.predict(tokens, mask, model.condition(batch))
        if grad:
            z.backward(torch.ones_like(z))
    return result


def count_head_step(model: StructMAR, tokens: int, grad: bool) -> Count:
    """One denoising step of the head (step_mean) over `tokens` tokens; backward (to z, and to the head's
    weights where they train) when `grad`."""
    cfg = model.cfg
    dev = model.fake_latent.device
    z = torch.randn(tokens, cfg.width, device=dev, dtype=model.fake_latent.dtype, requires_grad=grad)
    x_t = torch.randn(tokens, cfg.token_channels, device=dev)
    with torch.set_grad_enabled(grad), counting(model) as result:
        mean, _ = model.diffloss.step_mean(z, x_t, 1)
        if grad:
            mean.backward(torch.ones_like(mean))
    return result


# ---- the stage's numbers ---------------------------------------------------------------------------


@dataclass
class Params:
    backbone: int  # MAR's backbone (transformer) without the head
    additions: int
    head: int
    trainable: int
    largest_layer: int  # DeepSpeed's ZeRO-3 estimator input: the largest module's own parameters
    persistent: int  # in parameters of <= PERSISTENCE_THRESHOLD elements: whole on every rank under ZeRO-3
    own: int  # StructMAR's own (not a submodule's) larger parameters: gathered for the reference's whole call

    @property
    def total(self) -> int:
        return self.backbone + self.additions + self.head


def param_counts(model: StructMAR) -> Params:
    mar, additions = parameter_counts(model.cfg)
    head = sum(p.numel() for p in model.diffloss.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    persistent = sum(p.numel() for p in model.parameters() if p.numel() <= PERSISTENCE_THRESHOLD)
    own = sum(p.numel() for p in model.parameters(recurse=False) if p.numel() > PERSISTENCE_THRESHOLD)
    return Params(mar - head, additions, head, trainable, largest, persistent, own)


def model_states_bytes(params: Params, zero: int, world: int, gpus_per_node: int = 8) -> dict[str, float]:
    """Model-state bytes per GPU: DeepSpeed's estimate for the trainable parameters, the frozen ones in
    bf16, and structmar's fp32 EMA of every parameter."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    per_node = min(world, gpus_per_node)
    nodes = max(1, world // per_node)
    trainable, frozen = params.trainable, params.total - params.trainable
    if zero == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=trainable, largest_layer_params=params.largest_layer, num_gpus_per_node=per_node,
            num_nodes=nodes, cpu_offload=False, cpu_offload_params=False)
        return {"deepspeed": gpu, "frozen": 2 * frozen / world, "ema": 4 * params.total / world}
    if zero == 2:
        _, gpu = estimate_zero2_model_states_mem_needs(total_params=trainable, num_gpus_per_node=per_node,
                                                       num_nodes=nodes, cpu_offload=False)
    elif zero == 1:  # the ZeRO-2 estimate's terms with the 16-bit gradients kept whole on every GPU
        gpu = 4 * trainable + 16 * trainable / world
    else:
        raise ValueError(f"zero stage {zero} is not 1, 2 or 3")
    return {"deepspeed": gpu, "frozen": 2 * frozen, "ema": 4 * params.total}


def reference_bytes(params: Params, world: int, offload: bool) -> tuple[dict[str, float], float]:
    """The stage-3 reference (bf16 ZeRO-3 engine, never stepped): its bytes per GPU by part, and its pinned
    host bytes per rank."""
    partition = 2 * params.total / world
    gpu = {"gathered module": 2 * params.largest_layer, "prefetch": 2 * min(PREFETCH_BUCKET, params.total),
           "persistent + StructMAR's own": 2 * (params.persistent + params.own)}
    if not offload:
        gpu["partition"] = partition
    return gpu, partition if offload else 0.0


@dataclass
class StageCost:
    preset: str
    stage: int
    world: int
    recipe: Recipe
    params: Params
    flops_per_image: dict[str, float]  # what one image costs, by part
    activations_per_image: float  # bytes (one training image; one rollout's update graph in stage 3)
    attention_share: float  # of the activations: SDPA math path's attention probabilities
    activations_source: str
    step_images: int  # images (rollouts in stage 3) per GPU per optimizer step
    live_images: int  # of those, the images whose activations are alive together (one micro-batch's)
    steps: int  # optimizer steps of the stage
    gpu_tflops: float
    mfu: float
    ref_gathers: int = 0  # stage 3: the reference's passes per step that gather every layer (its AR steps)

    def memory(self, zero: int) -> dict[str, float]:
        m = model_states_bytes(self.params, zero, self.world)
        m["activations"] = self.activations_per_image * self.live_images
        if self.stage == 3:
            m["reference"] = sum(self.reference[0].values())
        return m

    @property
    def reference(self) -> tuple[dict[str, float], float]:
        """reference_bytes at this stage's world size and offload."""
        return reference_bytes(self.params, self.world, self.recipe.ref_offload)

    @property
    def reference_traffic(self) -> tuple[float, float]:
        """Estimated bytes per step onto each GPU for the reference: gathered (all of every layer at each
        of its AR steps) and of that, host-to-device (the rank's own partition when offloaded)."""
        gathered = self.ref_gathers * 2 * self.params.total
        return gathered, gathered / self.world if self.recipe.ref_offload else 0.0

    @property
    def step_seconds(self) -> float:
        return self.step_images * sum(self.flops_per_image.values()) / (self.gpu_tflops * 1e12 * self.mfu)

    @property
    def stage_seconds(self) -> float:
        return self.steps * self.step_seconds


def stage_cost(preset: str, stage: int, world: int = 8, recipe: Recipe | None = None, images: int = COCO_TRAIN_IMAGES,
               gpu_tflops: float = H100_BF16_TFLOPS, mfu: float = 0.4,
               activations_gb_per_image: float | None = None) -> StageCost:
    recipe = recipe or RECIPE[stage]
    model = build(preset, stage, train_head=recipe.train_head)
    cfg = model.cfg
    params = param_counts(model)
    ckpt = recipe.grad_checkpointing
    L = cfg.seq_len
    ar_steps = 0
    if stage in (1, 2):
        c = count_training(model, mean_mask_ratio(cfg.mask_ratio_min))
        flops = {"training forward+backward": c.flops_with(ckpt)}
        acts, attn = c.activations(ckpt), c.attention(ckpt)
        step_images, live_images = recipe.batch_size * recipe.grad_accum, recipe.batch_size
        steps = math.ceil(images * recipe.epochs / (world * recipe.batch_size * recipe.grad_accum))
    else:
        guided = 2 if recipe.cfg != 1.0 else 1
        denoise = recipe.denoising_steps or cfg.num_sampling_steps
        known = round(mean_known_tokens(L, recipe.num_iter))
        ar_steps = max(1, round(recipe.rl_step_ratio * recipe.num_iter))
        chain = max(1, round(recipe.diffusion_step_ratio * (denoise - 1)))  # the last step adds no noise
        head_steps = L * recipe.rl_step_ratio * chain  # selected (token, denoising step) pairs per image
        roll_bb, roll_head = count_backbone(model, known, grad=False), count_head_step(model, L, grad=False)
        upd_bb, upd_head = count_backbone(model, known, grad=True), count_head_step(model, L, grad=True)
        rollout = guided * (recipe.num_iter * roll_bb.flops + denoise * roll_head.flops)
        reference = guided * (ar_steps * roll_bb.flops + head_steps / L * roll_head.flops)
        update = guided * (ar_steps * upd_bb.flops_with(ckpt) + head_steps / L * upd_head.flops_with(ckpt))
        flops = {"rollout": rollout, "update forward+backward": update, "reference forward": reference}
        passes = guided * ar_steps / recipe.grad_accum  # per rollout image, alive until one backward
        acts = upd_bb.activations(ckpt, passes) + upd_head.activations(ckpt, passes * head_steps / L / ar_steps)
        attn = upd_bb.attention(ckpt, passes)
        # --grad_accum chunks the AR steps of one rollout (GRPOObjective's ar_chunks): one rollout per step,
        # a chunk's graphs alive at a time (in acts)
        step_images = live_images = recipe.batch_size * recipe.group_size
        # and the step's other grad_accum - 1 batches of layouts go unused: an epoch holds 1/grad_accum the rollouts
        steps = math.ceil(images * recipe.epochs / (world * recipe.batch_size * recipe.grad_accum))
    source = "counted (autograd's saved tensors at real shapes, bf16, meta device)"
    if activations_gb_per_image is not None:
        acts, attn, source = activations_gb_per_image * GB, 0.0, "given (--activations_gb_per_image)"
    return StageCost(preset, stage, world, recipe, params, flops, acts, attn / max(acts, 1), source, step_images,
                     live_images, steps, gpu_tflops, mfu, ar_steps)


# ---- printing ---------------------------------------------------------------------------------------


def hours(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def report(c: StageCost) -> str:
    p, r = c.params, c.recipe
    lines = [f"== {c.preset}, stage {c.stage} ({STAGE_NAMES[c.stage]}), {c.world} GPUs ==",
             f"recipe: {r}",
             "-- parameters",
             f"backbone (MAR transformer) {p.backbone / 1e6:.1f}M, additions {p.additions / 1e6:.1f}M, "
             f"head {p.head / 1e6:.1f}M; total {p.total / 1e6:.1f}M, trainable {p.trainable / 1e6:.1f}M",
             "-- FLOPs per image (FlopCounterMode, meta device, this stage's requires_grad)"]
    for k, v in c.flops_per_image.items():
        lines.append(f"{k}: {v / 1e12:.3f} TFLOP")
    if c.stage == 3:
        lines.append("(rollout and update: one AR step's backbone pass at the schedule's mean known tokens x the "
                     "steps, one head denoising step over 256 tokens x the steps; x2 with CFG)")
    lines.append("-- memory per GPU (GB; model states: DeepSpeed's estimators + frozen bf16 + fp32 EMA)")
    lines.append(f"activations: {c.activations_per_image / GB:.2f} GB per image, {c.activations_source}; "
                 f"{100 * c.attention_share:.0f}% of it attention probabilities (not kept by fused kernels)")
    for zero in (1, 2, 3):
        m = c.memory(zero)
        parts = ", ".join(f"{k} {v / GB:.1f}" for k, v in m.items())
        mark = "  <- the recipe's" if zero == r.zero else ""
        lines.append(f"ZeRO-{zero}: {sum(m.values()) / GB:.1f} GB ({parts}){mark}")
    if c.stage == 3:
        gpu, host = c.reference
        where = "offloaded (--ref_offload)" if r.ref_offload else "resident (--no-ref_offload)"
        lines.append(f"-- the reference: bf16 ZeRO-3 engine over {c.world} ranks, {where}")
        lines.append(f"GPU: {sum(gpu.values()) / 1e6:.0f} MB ("
                     + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in gpu.items()) + f"); pinned host: {host / GB:.2f} GB "
                     f"per rank ({host * min(c.world, 8) / GB:.1f} GB a node of {min(c.world, 8)})")
        gathered, h2d = c.reference_traffic
        lines.append(f"traffic per step (estimate: {c.ref_gathers} AR steps, each gathering every layer): "
                     f"{gathered / GB:.0f} GB gathered onto each GPU, {h2d / GB:.1f} GB of it host-to-device per GPU")
    lines.append(f"-- time at {c.gpu_tflops:.0f} TFLOPS bf16 x MFU {c.mfu:.0%}")
    lines.append(f"step ({c.step_images} {'rollouts' if c.stage == 3 else 'images'} per GPU): "
                 f"{hours(c.step_seconds)}; {c.steps} steps for {r.epochs:g} epochs: {hours(c.stage_seconds)}")
    return "\n".join(lines)


def table(world: int = 8, **kwargs) -> str:
    rows = ["| preset | stage | params (trainable) | TFLOP / image | memory / GPU: total = states + activations "
            "(of which H x N x N) [+ reference] | step | stage |",
            "|---|---|---|---|---|---|---|"]
    for preset in ("mar_base", "mar_large", "mar_huge"):
        for stage in (1, 2, 3):
            c = stage_cost(preset, stage, world, **kwargs)
            mem = c.memory(c.recipe.zero)
            fl = " + ".join(f"{v / 1e12:.1f}" for v in c.flops_per_image.values())
            ref = mem.pop("reference", None)
            states = sum(mem.values()) - mem["activations"]
            total = sum(mem.values()) + (ref or 0.0)
            rows.append(f"| {preset} | {stage} | {c.params.total / 1e6:.0f}M ({c.params.trainable / 1e6:.0f}M) | "
                        f"{fl} | {total / GB:.1f} GB (ZeRO-{c.recipe.zero}) = {states / GB:.1f} + "
                        f"{mem['activations'] / GB:.1f} ({c.attention_share * mem['activations'] / GB:.1f})"
                        + (f" + {ref / GB:.2f}" if ref is not None else "")
                        + f" | {hours(c.step_seconds)} | {hours(c.stage_seconds)} |")
    return "\n".join(rows)


# ---- the check on this CPU --------------------------------------------------------------------------


def matmul_gflops(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """This CPU's fp32 matmul throughput at torch's current thread count: GFLOP per wall second (median of
    `repeats`) and per CPU second of this process (all its threads; what other jobs' load does not change)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        a @ b
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return 2 * n**3 / sorted(wall)[repeats // 2] / 1e9, 2 * n**3 / sorted(cpu)[repeats // 2] / 1e9


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def check_cpu(preset: str = "mar_base", images: int = 1, steps: int = 2) -> str:
    """Measured fp32 eager training steps (AdamW, stage 2, one process) against the model's prediction."""
    ratio = mean_mask_ratio()
    meta = build(preset, 2, dtype=torch.float32)
    counted = count_training(meta, ratio, images)
    params = param_counts(meta)
    del meta
    gflops, cpu_gflops = matmul_gflops()
    base = rss_bytes()
    torch.manual_seed(0)
    model = build(preset, 2, device="cpu", dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch = example_batch(model.cfg, images, "cpu")
    fixed = torch.tensor([ratio], dtype=torch.float64)
    times, cpu_times = [], []
    with mock.patch.object(model_module, "sample_mask_ratio", lambda *a, **k: fixed):
        for _ in range(1 + steps):  # the first is warm-up (allocations, AdamW's state)
            t, c = time.perf_counter(), time.process_time()
            loss, _ = model(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
        # one more step under the profiler: how much of a step the counted ops (matmuls) take
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss, _ = model(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    step, cpu_step = sum(times[1:]) / steps, sum(cpu_times[1:]) / steps
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    matmul_us = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    predicted_time, predicted_cpu = counted.flops / (gflops * 1e9), counted.flops / (cpu_gflops * 1e9)
    states = 16 * params.total  # fp32 weights, gradients and AdamW's two moments
    predicted_mem = base + states + counted.saved_bytes
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return "\n".join([
        f"CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}",
        f"{preset}, batch {images}, fp32 eager, AdamW, mask ratio {ratio:.3f}, {steps} steps after 1 warm-up",
        f"matmul throughput (2048^3 fp32, median of 5): {gflops:.1f} GFLOP per wall second, {cpu_gflops:.1f} per "
        "CPU second",
        f"counted: {counted.flops / 1e12:.3f} TFLOP per step -> predicted {predicted_time:.2f} s wall, "
        f"{predicted_cpu:.2f} CPU s; measured {step:.2f} s wall (steps {', '.join(f'{t:.2f}' for t in times)}), "
        f"{cpu_step:.2f} CPU s; measured / predicted {step / predicted_time:.2f} wall, {cpu_step / predicted_cpu:.2f} "
        "CPU time",
        f"profiled step: matmuls (mm, addmm, bmm) {matmul_us / 1e6:.2f} s of {total_us / 1e6:.2f} s "
        f"({100 * matmul_us / total_us:.0f}%), i.e. {counted.flops / matmul_us / 1e3:.1f} GFLOP/s inside them; "
        "largest self times: " + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e6:.2f} s" for e in top),
        f"memory: RSS before the model {base / GB:.2f} GB + states 16 B x {params.total / 1e6:.1f}M = "
        f"{states / GB:.2f} GB + activations {counted.saved_bytes / GB:.2f} GB (counted, fp32) = predicted peak "
        f"{predicted_mem / GB:.2f} GB; measured peak RSS {peak / GB:.2f} GB; measured / predicted "
        f"{peak / predicted_mem:.2f}",
    ])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mar_huge", choices=("tiny", "small", "mar_base", "mar_large", "mar_huge"))
    p.add_argument("--stage", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("--world_size", type=int, default=8)
    p.add_argument("--images", type=int, default=COCO_TRAIN_IMAGES, help="images (layouts) per epoch")
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch_size", type=int, help="per GPU (layouts per GPU in stage 3)")
    p.add_argument("--grad_checkpointing", action=argparse.BooleanOptionalAction)
    p.add_argument("--zero", type=int, choices=(1, 2, 3), help="the stage marked in the memory lines")
    p.add_argument("--num_iter", type=int)
    p.add_argument("--denoising_steps", type=int, help="diffusion steps per token in rollouts")
    p.add_argument("--cfg", type=float)
    p.add_argument("--rl_step_ratio", type=float)
    p.add_argument("--diffusion_step_ratio", type=float)
    p.add_argument("--group_size", type=int)
    p.add_argument("--grad_accum", type=int)
    p.add_argument("--train_head", action=argparse.BooleanOptionalAction)
    p.add_argument("--ref_offload", action=argparse.BooleanOptionalAction,
                   help="stage 3: the reference's partition in pinned host memory (default) or on the GPU")
    p.add_argument("--gpu_tflops", type=float, default=H100_BF16_TFLOPS, help="bf16 peak per GPU (H100: 989 dense)")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--activations_gb_per_image", type=float, help="replace the counted activations")
    p.add_argument("--table", action="store_true", help="mar_base/large/huge x stages 1-3 as a markdown table")
    p.add_argument("--check_cpu", action="store_true", help="measure a mar_base step on this CPU against the model")
    a = p.parse_args(argv)
    common = dict(gpu_tflops=a.gpu_tflops, mfu=a.mfu)
    if a.table:
        print(table(a.world_size, images=a.images, **common))
        return
    if a.check_cpu:
        print(check_cpu())
        return
    fields = {f.name for f in dataclasses.fields(Recipe)}
    given = {k: v for k, v in vars(a).items() if k in fields and v is not None}
    recipe = dataclasses.replace(RECIPE[a.stage], **given)
    print(report(stage_cost(a.preset, a.stage, a.world_size, recipe, a.images,
                            activations_gb_per_image=a.activations_gb_per_image, **common)))


if __name__ == "__main__":
    main()
