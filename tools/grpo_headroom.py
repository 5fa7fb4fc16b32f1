"""What a layout reward has left to sharpen: per-object success at pass@1 and pass@K, and the group reward's spread.

Samples K images for each of the first N layouts of a split (the same sampler as `structmar eval`), detects
objects with the evaluation detector and prints one JSON line (`headroom` below): per category and over all
objects, pass@1 and pass@K of an object in its box with its category, and the layout reward's mean, best of
K and spread within a layout. GRPO and best-of-group can at most move pass@1 toward pass@K.

    python tools/grpo_headroom.py output/demo/stage2_full --clip_path output/demo/clip-random-vit-b32 \\
        --coco_root output/demo/shapes --eval_detector shapes --temperature 0.25
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from structmar.coco import CocoLayouts
from structmar.config import SamplingConfig
from structmar.reward import RewardWeights, layout_rewards, load_detector, match_layout
from structmar.sampler import load_sampler


def headroom(generate, layouts, detector, categories: dict[int, str], image_size: int, samples: int,
             batch_size: int = 16) -> dict:
    """What a layout reward has left to sharpen: `samples` (K) images of each layout from `generate`, a
    callable from a list of layouts to their images (B, 3, H, W) in [0, 1].

    Per category and over all objects: the share of objects in their box with their category (IoU >= 0.5)
    averaged over the K samples (pass@1) and the share found in at least one of them (pass@K); and the layout
    reward's mean, its best of K per layout (what best-of-group fits) and its standard deviation within a
    layout's K samples (what group-normalised advantages divide by). GRPO and best-of-group can at most move
    pass@1 toward pass@K: where the two are equal, every sample of a layout agrees and a reward ranks nothing.
    """
    size = (image_size, image_size)
    hits: dict[str, list[np.ndarray]] = {}  # category -> per object: success in each of the K samples
    rewards = []  # per layout: (K,)
    for start in range(0, len(layouts), batch_size):
        chosen = layouts[start:start + batch_size]
        repeated = [lay for lay in chosen for _ in range(samples)]  # each layout's K samples side by side
        detections = [{k: v.detach().cpu() for k, v in d.items()} for d in detector(generate(repeated))]
        targets = [(lay.boxes, np.asarray(lay.category_ids)) for lay in repeated]
        reward, _ = layout_rewards(detections, targets, size, RewardWeights())
        rewards += list(reward.double().numpy().reshape(len(chosen), samples))
        for i, lay in enumerate(chosen):
            target = targets[i * samples]
            success = np.stack([match_layout(detections[i * samples + j], *target, size).iou >= 0.5
                                for j in range(samples)])  # (K, objects)
            for obj, category in enumerate(lay.category_ids):
                hits.setdefault(categories[int(category)], []).append(success[:, obj])

    def shares(rows: list[np.ndarray]) -> dict:
        table = np.stack(rows)  # (objects, K)
        return dict(objects=len(table), pass1=float(table.mean()), passk=float(table.any(1).mean()))

    per_layout = np.stack(rewards)  # (layouts, K)
    return dict(layouts=len(layouts), samples=samples, all=shares([r for v in hits.values() for r in v]),
                reward_mean=float(per_layout.mean()), reward_best_of_k=float(per_layout.max(1).mean()),
                reward_std_within=float(per_layout.std(1).mean()),
                by_category={name: shares(v) for name, v in sorted(hits.items())})



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a stage export or a run directory holding one")
    ap.add_argument("--coco_root", required=True)
    ap.add_argument("--coco_split", default="val2014")
    ap.add_argument("--clip_path", required=True)
    ap.add_argument("--eval_detector", default="shapes")
    ap.add_argument("--eval_detector_path")
    ap.add_argument("--num_layouts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=8, help="K: samples per layout")
    ap.add_argument("--temperature", type=float, default=0.25)
    ap.add_argument("--num_iter", type=int, default=8)
    ap.add_argument("--no-ema", dest="ema", action="store_false", help="the raw weights instead of the EMA")
    ap.add_argument("--batch_size", type=int, default=16, help="layouts per batch (x K images)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    gen = load_sampler(args.checkpoint, args.clip_path, ema=args.ema)
    size = gen.model.cfg.image_size
    coco = CocoLayouts(args.coco_root, args.coco_split, image_size=size, max_objects=gen.model.cfg.max_objects)
    detector = load_detector(args.eval_detector, args.eval_detector_path, coco.categories)
    generator = torch.Generator().manual_seed(args.seed)

    def generate(layouts):
        batch = gen.condition([lay.captions[0] for lay in layouts], [lay.boxes for lay in layouts],
                              [lay.tags for lay in layouts], [lay.category_ids for lay in layouts])
        return gen.generate(batch, generator, SamplingConfig(num_iter=args.num_iter, cfg=1.0, cfg_schedule="constant",
                                                             temperature=args.temperature))

    result = headroom(generate, coco.layouts[:args.num_layouts], detector, coco.categories, size, args.samples,
                      args.batch_size)
    rounded = json.loads(json.dumps(result), parse_float=lambda v: round(float(v), 3))
    print(json.dumps(dict(checkpoint=args.checkpoint, split=args.coco_split, temperature=args.temperature,
                          ema=gen.ema, **rounded)))


if __name__ == "__main__":
    main()
