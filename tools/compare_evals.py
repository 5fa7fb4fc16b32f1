"""Paired differences between two evaluations of the same layouts (`structmar eval` output directories):
AP50, success rate and reward of B minus A, with the standard errors of the difference.

Two arms evaluated on one split with one sampling seed see the same layouts, so each layout's difficulty
cancels in their difference: a difference well below either evaluation's own standard error can show.
tools/grpo_heldout.py writes RUN/eval_raw, RUN/eval_raw_rollout_temperature and RUN/eval_ema.

    python tools/compare_evals.py output/arms/ctrl/eval_raw output/arms/b8_g4/eval_raw
    python tools/compare_evals.py --mean output/arms/start/eval_raw output/arms/s{0,1,2}/eval_ema
"""

from __future__ import annotations

import argparse
import json

from structmar.evaluate import load_evaluation, paired_differences


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="the baseline's evaluation directory")
    ap.add_argument("b", nargs="+", help="evaluation directories compared with A")
    ap.add_argument("--coco_root", help="the dataset root, where it moved since the evaluations ran")
    ap.add_argument("--bootstrap", type=int, default=100, help="resamples behind AP50's standard error")
    ap.add_argument("--mean", action="store_true",
                    help="one line: the mean over the B directories (seeds of one arm) of B minus A")
    args = ap.parse_args()
    base = load_evaluation(args.a, args.coco_root)
    diffs = paired_differences(base, [load_evaluation(b, args.coco_root) for b in args.b], args.bootstrap, args.mean)
    for other, diff in zip([" + ".join(args.b)] if args.mean else args.b, diffs):
        print(json.dumps(dict(a=args.a, b=other, **{k: round(v, 4) if isinstance(v, float) else v
                                                     for k, v in diff.items()})))


if __name__ == "__main__":
    main()
