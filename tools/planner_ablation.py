"""What each choice of the layout planner buys on Shapes: trains one planner per arm on a demo directory's shards
(`structmar demo` writes them) and scores its plans for the val captions: category-set precision and recall,
mean best IoU against the ground truth, and the share of stated relations satisfied.

    python tools/planner_ablation.py DEMO_DIR OUT [--steps 200] [--batch_size 32] [--seeds 0] [--arms default ...]
"""

import argparse
import json
import os
import time

import torch

from structmar.coco import CocoLayouts
from structmar.config import PlannerOptions, PlannerTrainConfig
from structmar.planner import layout_agreement, load_planner, plan_captions, relation_shares, run_train_planner
from structmar.text import TextEncoder

ARMS = {
    "default": {},  # token states + pooled, GIoU, auxiliary losses
    "no_giou": dict(giou_weight=0.0),
    "no_aux": dict(aux_loss=False),
    "pooled_only": dict(text_input="pooled"),
    "tokens_only": dict(text_input="tokens"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo_dir")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    clip = TextEncoder.from_pretrained(os.path.join(args.demo_dir, "clip-random-vit-b32"))
    val = CocoLayouts(os.path.join(args.demo_dir, "shapes"), "val2014", image_size=32).layouts
    rows = []
    for arm in args.arms:
        for seed in args.seeds:
            run = os.path.join(args.out, f"{arm}-seed{seed}")
            cfg = PlannerTrainConfig(output_dir=run, data=os.path.join(args.demo_dir, "shards"), coco_split="train2014",
                                     model="small", batch_size=args.batch_size, epochs=10_000, max_steps=args.steps,
                                     lr=args.lr, device="cpu", precision="fp32", num_workers=0, log_every=50,
                                     save_last_freq=10_000, seed=seed, planner=PlannerOptions(**ARMS[arm]))
            started = time.time()
            run_train_planner(cfg)
            minutes = (time.time() - started) / 60
            planner = load_planner(run)
            captions = [lay.captions[0] for lay in val]
            plans = [p for s in range(0, len(val), 64)
                     for p in plan_captions(planner, clip, captions[s:s + 64], max_boxes=16, notify=False)]
            scores = layout_agreement([(p.boxes, p.category_ids) for p in plans],
                                      [(lay.boxes, lay.category_ids) for lay in val])
            rows.append(dict(arm=arm, seed=seed, minutes=minutes, **scores,
                             relations=relation_shares(planner, clip, val, seed=seed)))
            print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("| arm | seed | category precision | category recall | mean best IoU | relations satisfied | minutes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['arm']} | {r['seed']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['mean_best_iou']:.3f} | "
              f"{r['relations']['planned']:.3f} | {r['minutes']:.1f} |")
    rel = rows[0]["relations"]
    print(f"\nrelations: ground truth {rel['ground_truth']:.3f}, shuffled {rel['shuffled']:.3f} "
          f"({rel['num_captions']} captions)")


if __name__ == "__main__":
    main()
