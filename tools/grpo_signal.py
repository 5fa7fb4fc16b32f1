"""How much of one GRPO step's gradient is signal: the lever to size batches and groups before long RL runs.

For a stage export and its shards, one fixed batch of layouts is rolled out `--estimates` times (each time
`--batch_size` layouts x `--group_size` rollouts, the objective of `structmar rl` without the KL term) and
the gradients are compared: the signal share |mu|^2 / E|g|^2 (`grpo.gradient_signal_share`) for the
diffusion head and for the rest of the model, over the whole gradient and per coordinate (each coordinate's
own share, averaged: what Adam, scaling each coordinate by its RMS, sees). A share s at n rollouts per step
becomes about 0.5 at n (1 - s) / s rollouts (the noise averages down as 1/n); that figure is printed for the
per-coordinate share. Each setting given with `--setting` (credit,shared_orders,temperature,min_sigma) is
one markdown row. Read small shares with care: on the flat-colour model of tests/test_grpo.py, where GRPO
raises its reward within 30 steps, they are as small as on Shapes (~0.03 per coordinate at 32 rollouts),
since Adam's momentum and the steps themselves average the noise; a share says which setting carries more
signal, not whether a run will move.

    python tools/grpo_signal.py output/demo/stage2_full/checkpoint-last.safetensors output/demo/shards \\
        --setting image,0,0.25,0.075 --setting box,1,0.25,0.075
"""

from __future__ import annotations

import argparse
import time

import torch

from structmar.config import DETECTOR_KINDS, GRPOConfig
from structmar.grpo import GRPOObjective, ReferencePolicy, gradient_signal_share, layout_reward
from structmar.model import StructMAR, load_weights, read_weights
from structmar.reward import RewardWeights, load_detector
from structmar.shards import ShardLoader
from structmar.tokenizer import build_tokenizer


def parse_setting(text: str) -> dict:
    try:
        credit, shared, temperature, min_sigma = text.split(",")
        return dict(credit=credit, shared_orders=shared in ("1", "true", "True"), temperature=float(temperature),
                    min_sigma=float(min_sigma))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--setting {text!r} is not credit,shared_orders,temperature,min_sigma "
                                         "(e.g. box,1,0.25,0.075)") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("shards")
    ap.add_argument("--split", default="train2014")
    ap.add_argument("--setting", type=parse_setting, action="append", required=True)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--group_size", type=int, default=8)
    ap.add_argument("--num_iter", type=int, default=8)
    ap.add_argument("--estimates", type=int, default=6)
    ap.add_argument("--detector", default="shapes", choices=DETECTOR_KINDS)
    ap.add_argument("--detector_path")
    ap.add_argument("--vae_path")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    weights = read_weights(args.checkpoint)
    if weights.config is None:
        raise SystemExit(f"{args.checkpoint} carries no model config: pass a structmar stage export")
    model = StructMAR(weights.config)
    load_weights(model, weights.select(weights.ema is not None))
    model.eval()
    reference = ReferencePolicy(model)
    loader = ShardLoader(args.shards, args.split, weights.config, args.batch_size, seed=args.seed)
    categories = {int(k): v for k, v in loader.manifest["categories"].items()}
    detector = load_detector(args.detector, args.detector_path, categories)
    reward = layout_reward(detector, RewardWeights())
    tokenizer = build_tokenizer(weights.config.tokenizer, vae_path=args.vae_path,
                                pixel_patch=weights.config.pixel_patch).eval()
    batch = next(iter(loader))
    rollouts = args.batch_size * args.group_size

    print(f"{args.checkpoint}: {args.estimates} gradient estimates per setting, {args.batch_size} layouts x group "
          f"{args.group_size} = {rollouts} rollouts each, {args.num_iter} AR steps")
    print()
    print("| credit | shared orders | temperature | min_sigma | reward (std) | signal share, head (whole / per "
          "coordinate) | rollouts/step for 0.5, head | signal share, rest (whole / per coordinate) | rollouts/step "
          "for 0.5, rest | s per estimate |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for setting in args.setting:
        settings = GRPOConfig(group_size=args.group_size, num_iter=args.num_iter, kl_coef=0.0, **setting)
        torch.manual_seed(args.seed)
        objective = GRPOObjective(settings, tokenizer, reward, reference)
        head, rest, rewards = [], [], []
        t0 = time.perf_counter()
        for _ in range(args.estimates):
            objective.current = None  # a fresh rollout of the same batch
            model.zero_grad(set_to_none=True)
            loss, metrics = objective.loss(model, batch)
            loss.backward()
            grads = [(n, p.grad.reshape(-1)) for n, p in model.named_parameters() if p.grad is not None]
            head.append(torch.cat([g for n, g in grads if n.startswith("diffloss.")]))
            rest.append(torch.cat([g for n, g in grads if not n.startswith("diffloss.")]))
            rewards.append((metrics["reward_mean"].item(), metrics["reward_std"].item()))
        seconds = (time.perf_counter() - t0) / args.estimates
        cells = []
        for grads in (head, rest):
            whole, share = gradient_signal_share(grads), gradient_signal_share(grads, per_coordinate=True)
            needed = rollouts * (1 - share) / share if share > 0 else float("inf")
            cells += [f"{whole:+.3f} / {share:+.3f}", f"{needed:,.0f}" if share > 0 else "no signal measured"]
        mean_r = sum(r for r, _ in rewards) / len(rewards)
        mean_s = sum(s for _, s in rewards) / len(rewards)
        print(f"| {setting['credit']} | {'yes' if setting['shared_orders'] else 'no'} | {setting['temperature']} | "
              f"{setting['min_sigma']} | {mean_r:+.3f} ({mean_s:.3f}) | " + " | ".join(cells) + f" | {seconds:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
