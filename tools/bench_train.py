"""Training throughput of one preset under one DeepSpeed config: images/s and tokens/s.

Times `structmar.engine.Engine.train_step` (forward, backward, optimizer step, EMA) on synthetic
batches of the training contract's shapes, so no shards are needed. Runs as one process or under a
launcher (numbers are global: all ranks' images):

    python tools/bench_train.py --model tiny --device cpu --precision fp32
    deepspeed --num_gpus 8 tools/bench_train.py --model mar_huge --batch_size 64 --structure on
    deepspeed --num_gpus 8 tools/bench_train.py --model mar_huge --batch_size 64 --structure off

`--structure off` turns 2D RoPE, layout tokens/bias and text cross-attention off (MAR's cost). `--compile`
times the step compiled (`structmar train --compile`); its compile falls in the untimed warmup, whose
seconds are printed as warmup_s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from structmar import engine as eng  # noqa: E402
from structmar.config import COMPILE_BACKENDS, PRECISIONS, PRESETS, OptimizerConfig, model_config  # noqa: E402
from structmar.train import SupervisedObjective  # noqa: E402


def synthetic_batch(cfg, batch_size: int, num_boxes: int, text_length: int, generator: torch.Generator) -> dict:
    """A batch with the loader's keys, shapes and dtypes (random values, valid boxes and masks)."""
    b, k, g, d = batch_size, min(num_boxes, cfg.max_objects), cfg.grid_size, cfg.text_dim
    xy = torch.rand(b, k, 2, generator=generator) * 0.6
    wh = 0.1 + torch.rand(b, k, 2, generator=generator) * 0.3
    return {
        "latents": torch.randn(b, cfg.token_channels, g, g, generator=generator),
        "text_tokens": torch.randn(b, text_length, d, generator=generator),
        "text_mask": torch.arange(text_length).expand(b, -1) < text_length // 2,
        "text_pooled": torch.randn(b, d, generator=generator),
        "boxes": torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=-1),
        "box_mask": torch.ones(b, k, dtype=torch.bool),
        "tag_embeds": torch.randn(b, k, d, generator=generator),
        "category_ids": torch.randint(1, 80, (b, k), generator=generator),
        "image_ids": torch.arange(b),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--structure", default="on", choices=("on", "off"), help="StructMAR additions on or off")
    p.add_argument("--deepspeed_config", default="zero2")
    p.add_argument("--batch_size", type=int, default=16, help="per rank")
    p.add_argument("--num_boxes", type=int, default=8)
    p.add_argument("--text_length", type=int, default=77)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--precision", default="bf16", choices=PRECISIONS)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--attention", default="auto", help="attention backend (auto, sdpa, flex)")
    p.add_argument("--compile", choices=COMPILE_BACKENDS, help="compile the model's forward with this backend "
                                                             "(structmar train --compile)")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = p.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    structure = args.structure == "on"
    cfg = model_config(args.model, rope=structure, layout=structure, text=structure,
                       grad_checkpointing=args.grad_checkpointing, attention=args.attention)
    env = eng.init_distributed(args.device)
    from structmar.model import StructMAR

    torch.manual_seed(0)
    model = StructMAR(cfg)
    n_params = sum(q.numel() for q in model.parameters())
    ds_config = eng.build_ds_config(args.deepspeed_config, micro_batch=args.batch_size, grad_accum=1,
                                    world_size=env.world_size, lr=1e-4, optimizer=OptimizerConfig(),
                                    precision=args.precision)
    objective = SupervisedObjective("full")
    engine = eng.Engine(model, ds_config, env, 0.9999, objective.loss, forward_only=objective.forward_only,
                        compile=args.compile)
    gen = torch.Generator().manual_seed(env.rank)
    batches = [synthetic_batch(cfg, args.batch_size, args.num_boxes, args.text_length, gen) for _ in range(2)]
    start = eng.now()
    for i in range(args.warmup):
        engine.train_step(batches[i % 2], lr=1e-4)
    eng.synchronize(env.device)
    eng.barrier()
    warmup_s = eng.now() - start
    start = eng.now()
    for i in range(args.steps):
        engine.train_step(batches[i % 2], lr=1e-4)
    eng.synchronize(env.device)
    eng.barrier()
    seconds = eng.now() - start
    images_s = args.steps * args.batch_size * env.world_size / seconds
    result = dict(model=args.model, structure=args.structure, params_m=round(n_params / 1e6, 2),
                  zero_stage=engine.zero_stage, precision=args.precision, compiled=args.compile, device=args.device,
                  threads=torch.get_num_threads(), warmup_s=round(warmup_s, 1),
                  world_size=env.world_size, batch_per_rank=args.batch_size, step_s=round(seconds / args.steps, 4),
                  images_per_s=round(images_s, 2), tokens_per_s=round(images_s * cfg.seq_len, 1),
                  memory_mb=round(eng.memory_mb(env.device), 1))
    if env.is_main:
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
