"""Launch target for tests/test_train.py: `structmar.train.train` with test hooks, under a real launcher.

The argument is a JSON file: TrainConfig fields plus "hooks":
  nan_at:      1-based forward calls (per rank) whose loss is replaced by NaN
  nan_ranks:   ranks that inject (default all)
  kill_at:     optimizer step after which rank 0 kills itself with SIGKILL (a crash, no cleanup)
  sigterm_at:  optimizer step after which rank 0 receives SIGTERM (preemption)
  ema_reference: path; rank 0 writes the max |EMA - reference EMA| there, the reference being the
               single-process recurrence ema = r * ema + (1 - r) * w over the consolidated weights
               after every step, started from the --resume file's weights
  summary:     path; rank 0 writes the Summary there
Not collected by pytest (no test_ prefix); the launcher's --local_rank argument is ignored.
"""

import dataclasses
import json
import os
import signal
import sys

from structmar.config import TrainConfig
from structmar.model import StructMAR, read_weights
from structmar.train import EXPORT, SupervisedObjective, train


def main() -> None:
    path = next(a for a in sys.argv[1:] if not a.startswith("--local_rank"))
    with open(path) as f:
        spec = json.load(f)
    hooks = spec.pop("hooks", {})
    cfg = TrainConfig(**spec)
    nan_at = set(hooks.get("nan_at", []))
    nan_ranks = hooks.get("nan_ranks")

    class InjectingStructMAR(StructMAR):
        calls = 0

        def forward(self, batch):
            loss, metrics = super().forward(batch)
            InjectingStructMAR.calls += 1
            rank = int(os.environ["RANK"])
            if InjectingStructMAR.calls in nan_at and (nan_ranks is None or rank in nan_ranks):
                loss = loss * float("nan")
            return loss, metrics

    reference = {}
    if hooks.get("ema_reference"):
        reference = {k: v.float() for k, v in read_weights(cfg.resume).model.items()}

    def on_step(engine, step, result):
        if reference:
            model_sd, _ = engine.consolidated()
            for k, w in model_sd.items():
                reference[k].mul_(cfg.ema_rate).add_(w, alpha=1 - cfg.ema_rate)
        if hooks.get("kill_at") == step and engine.env.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if hooks.get("sigterm_at") == step and engine.env.rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    summary = train(cfg, SupervisedObjective(cfg.train_mode), build_model=InjectingStructMAR, on_step=on_step)
    if int(os.environ.get("RANK", "0")) != 0:  # a plain process (a world of one) has no RANK after train()
        return
    if hooks.get("summary"):
        with open(hooks["summary"], "w") as f:
            json.dump(dataclasses.asdict(summary), f)
    if reference:
        ema = read_weights(os.path.join(cfg.output_dir, EXPORT)).ema
        diff = max((ema[k] - reference[k]).abs().max().item() for k in reference)
        moved = max((ema[k] - read_weights(cfg.resume).model[k].float()).abs().max().item() for k in reference)
        with open(hooks["ema_reference"], "w") as f:
            json.dump({"max_diff": diff, "max_moved": moved}, f)


if __name__ == "__main__":
    main()
