"""One GRPO arm from the demo's stage 2 and its held-out layout fidelity: the experiment behind
docs/grpo_shapes.md's tables, so an arm is one command and its row is comparable with the others.

It runs `structmar rl` (through `grpo.run_rl`) from `DEMO/stage2_full` (or `--start`) on the demo's shards
with the recipe below, any `structmar rl` flag overridden with `--set name=value` (`--set device=cuda` on a GPU),
then evaluates the run's export on `--layouts` val layouts with the analytic Shapes detector on the run's
device: raw weights at the evaluation temperature (the demo's 0.25) and at the rollout temperature, and the
EMA at the evaluation temperature. Two controls replace the reward, with the same steps, data and optimizer:
`--control constant` makes every advantage 0, so only the supervised anchor (`--anchor_coef`) trains (the
policy term's whole effect is an arm minus this); `--control random` draws each rollout's reward from
N(0, 1), a policy gradient of the real one's size and no direction (an arm that does no better than this
has moved its weights by noise; with `--set best_of_group_coef=1` it trains on a random rollout of each
group: self-distillation without the reward); a control still measures and logs its rollouts' layout
reward. It prints one JSON line (the arm, its figures with standard errors, the per-step training reward
(the layout reward's), the last KL where a policy term measures one, and the raw weights' relative change
from the start, |theta - theta_0| / |theta_0|). The rollout-temperature evaluation is skipped when that
temperature is the evaluation's (e.g. best-of-group alone, `--set policy_coef=0`, sampled at 0.25). ~6
minutes per 40-step arm of 32 rollouts per step on a 2-core CPU, plus ~40 s per evaluation.
tools/compare_evals.py gives the paired differences of arms' evaluations (RUN/eval_raw,
RUN/eval_raw_rollout_temperature, RUN/eval_ema) from one baseline's, e.g. arms minus their control.

    bash tools/demo.sh                               # output/demo with stage2_full
    python tools/grpo_heldout.py output/demo output/arms/b8_g4 --set batch_size=8 --set group_size=4
    python tools/grpo_heldout.py output/demo output/arms/ctrl --set batch_size=8 --set group_size=4 \\
        --control constant
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from structmar.config import RLConfig
from structmar.demo import DemoConfig, train_args
from structmar.evaluate import EvalOptions, run_eval
from structmar.grpo import BOX_REWARDS, GRPOStage, run_rl
from structmar.model import EXPORT, read_weights
from structmar.train import LOG, train

# the flat-colour test's recipe (tests/test_grpo.py), which climbs the layout reward on one fixed batch
RECIPE = dict(detector="shapes", batch_size=4, group_size=8, num_iter=8, temperature=1.0, min_sigma=0.3, kl_coef=0.0,
              clip_range=0.2, train_head=True, anchor_coef=1.0, lr=3e-4)
FIGURES = ("ap50", "success_rate", "reward")


def parse_set(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or name not in RLConfig.flag_names():
        raise argparse.ArgumentTypeError(f"--set {text!r} is not name=value with name a `structmar rl` flag")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value  # a bare string, e.g. credit=box


def control_reward(kind: str, seed: int, measured):
    """The reward of a control arm: 0 for every rollout, or N(0, 1) from a generator of its own (the
    sampler's random stream stays the arm's). The layout reward is still measured and logged as the
    component `layout` (train/reward_layout), so a control's training reward is comparable with an arm's."""
    generator = torch.Generator().manual_seed(seed)

    def reward(images: torch.Tensor, batch: dict):
        layout, components = measured(images, batch)
        components = {k: v for k, v in components.items() if k != BOX_REWARDS}
        given = torch.zeros(images.shape[0]) if kind == "constant" else torch.randn(images.shape[0],
                                                                                    generator=generator)
        return given, {**components, "layout": layout}

    return reward


def weight_change(start: str, end: str) -> float:
    """|theta - theta_0| / |theta_0| over every floating-point tensor of the raw weights of two exports: the
    drift of an arm, comparable between arms with and without a policy term (which alone measures a KL)."""
    a, b = read_weights(start).model, read_weights(end).model
    keys = [k for k in a if a[k].is_floating_point()]
    diff = sum(float((b[k].double() - a[k].double()).square().sum()) for k in keys)
    return (diff / sum(float(a[k].double().square().sum()) for k in keys)) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo", help="a demo output directory (bash tools/demo.sh) with stage2_full, shards, shapes")
    ap.add_argument("run_dir")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", type=parse_set, action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--control", choices=("constant", "random"),
                    help="constant: only the anchor trains; random: N(0, 1) rewards, a policy gradient of noise")
    ap.add_argument("--layouts", type=int, default=256)
    ap.add_argument("--eval_temperature", type=float, default=DemoConfig.temperature)
    ap.add_argument("--start", help="the weights the arm starts from (an export of the demo's model), instead of "
                                    "DEMO/stage2_full: e.g. stage 2 trained on further")
    args = ap.parse_args()

    start = args.start or os.path.join(args.demo, "stage2_full", EXPORT)
    if not os.path.isfile(start):
        how = "" if args.start else f": run bash tools/demo.sh {args.demo} first"
        raise SystemExit(f"{start} is missing{how}")
    demo = DemoConfig(out=args.demo, seed=args.seed)
    paths = dict(shards=os.path.join(args.demo, "shards"), ds_config="zero2")
    flags = {**train_args(demo, paths, args.run_dir, args.steps, model=demo.preset, resume=start, init_ema=True),
             "log_every": 1, **RECIPE, **dict(args.set)}
    cfg = RLConfig.from_flags(flags)

    t = time.time()
    if args.control:
        stage = GRPOStage(cfg)  # its reward is the run's layout reward, which the control still measures
        stage.reward_fn = control_reward(args.control, args.seed, stage.reward_fn)
        train(cfg, objective=stage)
    else:
        run_rl(cfg)
    minutes = (time.time() - t) / 60

    figures = {}
    evaluations = [("raw", args.eval_temperature, False), ("ema", args.eval_temperature, None)]
    if cfg.grpo.temperature != args.eval_temperature:
        evaluations.insert(1, ("raw_rollout_temperature", cfg.grpo.temperature, False))
    for name, temperature, ema in evaluations:
        opts = EvalOptions(checkpoint=os.path.join(args.run_dir, EXPORT), coco_root=os.path.join(args.demo, "shapes"),
                           out=os.path.join(args.run_dir, f"eval_{name}"), num_layouts=args.layouts,
                           eval_detector="shapes", clip_path=os.path.join(args.demo, "clip-random-vit-b32"),
                           num_iter=demo.num_iter, temperature=temperature, cfg=1.0, seed=0, batch_size=64,
                           device=cfg.device, ema=ema)
        generated = run_eval(opts, rank=0, world_size=1)["layout"]["eval"]["generated"]
        figures[name] = {k: [round(generated[k], 4), round(generated[f"{k}_se"] or 0.0, 4)] for k in FIGURES}
    with open(os.path.join(args.run_dir, LOG)) as f:
        rows = [json.loads(line) for line in f]
    print(json.dumps(dict(arm=dict(args.set), start=start, control=args.control, seed=args.seed, steps=args.steps,
                          rl_minutes=round(minutes, 2), heldout=figures,
                          weight_change=round(weight_change(start, os.path.join(args.run_dir, EXPORT)), 5),
                          train_reward=[round(r.get("train/reward_layout", r.get("train/reward_mean")), 3)
                                        for r in rows if "train/reward_mean" in r],
                          kl_last=next((round(r["train/kl"], 3) for r in reversed(rows) if "train/kl" in r), None))))


if __name__ == "__main__":
    main()
