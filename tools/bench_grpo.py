"""GRPO step cost: time and peak memory of rollout, reward, reference and update, per step.

Runs `structmar.engine.Engine.train_step` with the GRPO objective (`grpo.GRPOObjective`, what
`structmar rl` trains with) on synthetic layouts of the training contract's shapes (tools/bench_train.py's
batches), a random-init model of the preset and a random-init tokenizer of the preset's architecture, so
no weights, shards or detector files are needed. The reward is the near-red pixel share (`--reward
colour`, next to free) or a random-weight torchvision Faster R-CNN ResNet50-FPN v2 loaded through the
reward's own loader (`--reward frcnn`: the real detector's cost). The reference is a frozen DeepSpeed engine
in the policy's precision, its parameters partitioned over the ranks and offloaded to the CPU (`--ref_offload`,
the default) or resident on the GPU (`--no-ref_offload`), computing on the GPU either way; run both to read the
GPU memory the offload saves. Prints one JSON line: seconds per step and their split, rollout images/s,
peak memory (on CUDA: the rollout with the reference's means, and the update, each its own peak; on CPU
the process's peak resident memory) and the reference's size on this rank (its partitions).

    python tools/bench_grpo.py --model tiny --device cpu --precision fp32 --vae_ch 32
    python tools/bench_grpo.py --model mar_huge --batch_size 4 --group_size 4 --num_iter 64
    python tools/bench_grpo.py --model mar_huge --batch_size 4 --group_size 4 --num_iter 64 --no-ref_offload
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_train import synthetic_batch  # noqa: E402

from structmar import engine as eng  # noqa: E402
from structmar.config import PRECISIONS, PRESETS, GRPOConfig, OptimizerConfig, model_config  # noqa: E402
from structmar.tokenizer import KL16_ARCH, KLTokenizer, build_tokenizer  # noqa: E402


def frcnn_reward(device: str):
    """The layout reward with a random-weight Faster R-CNN v2 written to a temporary state-dict file and
    read back through `reward.load_detector`, as `structmar rl --detector torchvision_frcnn` reads it."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_V2_Weights, fasterrcnn_resnet50_fpn_v2

    from structmar.grpo import layout_reward
    from structmar.reward import RewardWeights, load_detector

    names = FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1.meta["categories"]
    categories = {i: n for i, n in enumerate(names) if n not in ("__background__", "N/A")}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "frcnn.pth")
        torch.save(fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91).state_dict(), path)
        detector = load_detector("torchvision_frcnn", path, categories, device=device)
    return layout_reward(detector, RewardWeights())


def main(argv=None) -> dict:
    d = GRPOConfig
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--deepspeed_config", default="zero2")
    p.add_argument("--batch_size", type=int, default=4, help="layouts per rank per step")
    p.add_argument("--group_size", type=int, default=d.group_size)
    p.add_argument("--num_iter", type=int, default=8, help="AR steps per rollout")
    p.add_argument("--rollout_steps", type=int, default=25, help="diffusion steps per token in rollouts")
    p.add_argument("--rl_step_ratio", type=float, default=d.rl_step_ratio)
    p.add_argument("--diffusion_step_ratio", type=float, default=d.diffusion_step_ratio)
    p.add_argument("--min_sigma", type=float, default=d.min_sigma)
    p.add_argument("--train_head", action="store_true", help="train the diffusion head too (frozen by default)")
    p.add_argument("--ref_offload", action=argparse.BooleanOptionalAction, default=True,
                   help="the reference's parameters live offloaded in CPU memory (default), or resident on the device")
    p.add_argument("--reward", default="colour", choices=("colour", "frcnn"))
    p.add_argument("--num_boxes", type=int, default=8)
    p.add_argument("--text_length", type=int, default=77)
    p.add_argument("--vae_ch", type=int, default=KL16_ARCH["ch"], help="KL-16 width (128: MAR's; 32: a quick CPU run)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (each a fresh rollout)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--precision", default="bf16", choices=PRECISIONS)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = p.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from structmar.grpo import GRPOObjective, ReferencePolicy, colour_reward
    from structmar.model import StructMAR

    cfg = model_config(args.model, grad_checkpointing=args.grad_checkpointing)
    env = eng.init_distributed(args.device)
    torch.manual_seed(0)
    model = StructMAR(cfg)
    for name, q in model.named_parameters():
        q.requires_grad_(args.train_head or not name.startswith("diffloss."))
    reference = ReferencePolicy(model, env, torch.bfloat16 if args.precision == "bf16" else torch.float32,
                                offload=args.ref_offload)
    reference_mb = sum(q.ds_tensor.numel() * q.ds_tensor.element_size() for q in reference.model.parameters()) / 2**20
    tokenizer = (KLTokenizer(ch=args.vae_ch) if cfg.tokenizer == "kl16" else build_tokenizer(cfg.tokenizer,
                 pixel_patch=cfg.pixel_patch)).eval().to(env.device)
    reward = frcnn_reward(str(env.device)) if args.reward == "frcnn" else colour_reward((1.0, 0.0, 0.0), 0.5)
    settings = GRPOConfig(group_size=args.group_size, num_iter=args.num_iter, rollout_steps=args.rollout_steps,
                            rl_step_ratio=args.rl_step_ratio, diffusion_step_ratio=args.diffusion_step_ratio,
                            min_sigma=args.min_sigma)
    objective = GRPOObjective(settings, tokenizer, reward, reference, generator=None)
    ds_config = eng.build_ds_config(args.deepspeed_config, micro_batch=args.batch_size, grad_accum=1,
                                    world_size=env.world_size, lr=1e-5, optimizer=OptimizerConfig(),
                                    precision=args.precision)
    engine = eng.Engine(model, ds_config, env, ema_rate=0.9999, loss_fn=objective.loss)

    cuda = env.device.type == "cuda"
    peaks = {"rollout": 0.0, "update": 0.0}
    plain_rollout = objective.new_rollout

    def new_rollout(module, batch):  # the rollout's peak (with the reference's means) apart from the update's
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ro = plain_rollout(module, batch)
        if cuda:
            peaks["rollout"] = max(peaks["rollout"], eng.memory_mb(env.device))
            torch.cuda.reset_peak_memory_stats()
        return ro

    objective.new_rollout = new_rollout
    gen = torch.Generator().manual_seed(env.rank)
    batch = synthetic_batch(cfg, args.batch_size, args.num_boxes, args.text_length, gen)
    split = {"rollout": 0.0, "reward": 0.0, "reference": 0.0, "update": 0.0}
    total = 0.0
    for i in range(args.warmup + args.steps):
        eng.synchronize(env.device)
        eng.barrier()
        start = eng.now()
        result = engine.train_step(batch, lr=1e-5)
        eng.synchronize(env.device)
        seconds = eng.now() - start
        if cuda:
            peaks["update"] = max(peaks["update"], eng.memory_mb(env.device))
        if i < args.warmup:
            peaks.update(rollout=0.0, update=0.0)
            continue
        m = result.metrics
        parts = {k: m[f"time_{k}_s"] for k in ("rollout", "reward", "reference")}
        for k, v in parts.items():
            split[k] += v / args.steps
        split["update"] += (seconds - sum(parts.values())) / args.steps  # recomputation, backward, optimizer
        total += seconds / args.steps
    rollouts = args.batch_size * args.group_size
    result = dict(model=args.model, device=args.device, precision=args.precision, world_size=env.world_size,
                  zero_stage=engine.zero_stage, layouts_per_rank=args.batch_size, group_size=args.group_size,
                  num_iter=args.num_iter, rollout_steps=args.rollout_steps, rl_step_ratio=args.rl_step_ratio,
                  diffusion_step_ratio=args.diffusion_step_ratio, train_head=args.train_head, reward=args.reward,
                  ref_offload=args.ref_offload, step_s=round(total, 3),
                  **{f"{k}_s": round(v, 3) for k, v in split.items()},
                  rollout_images_per_s=round(rollouts / max(split["rollout"], 1e-9), 2),
                  reference_mb=round(reference_mb, 1))
    if cuda:
        result.update(peak_rollout_mb=round(peaks["rollout"], 1), peak_update_mb=round(peaks["update"], 1))
    else:
        result.update(peak_resident_mb=round(eng.memory_mb(env.device), 1))
    if env.is_main:
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
