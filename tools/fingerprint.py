"""Bit-identity fingerprint of a structmar checkout, for refactors that must not change behaviour.

Runs a seeded `structmar train` (tiny, ZeRO-2, 2 ranks under the deepspeed launcher, 20 steps of batch 2 x
accumulation 2, a checkpoint at step 10) and a seeded `structmar rl` from it (5 steps, Shapes' detector as
reward, half the AR and denoising steps recomputed, 2 updates per rollout) on 64 Shapes images at 32 px, and
prints as JSON every logged scalar (timings left out) and the sha256 of each export's model and EMA tensors.
Two checkouts behave identically when their outputs are byte-identical:

    python tools/fingerprint.py OLD_CHECKOUT /tmp/fp-old > old.json
    python tools/fingerprint.py NEW_CHECKOUT /tmp/fp-new > new.json && cmp old.json new.json

The checkout's own code runs (PYTHONPATH=CHECKOUT) with this interpreter's packages; ~1 minute on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def _run(cmd: list[str], cwd: Path, env: dict) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"fingerprint: failed: {' '.join(cmd)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digests(path: Path) -> dict:
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), "pt") as f:
        names = sorted(f.keys())
        for group in ("model", "model_ema"):
            h = hashlib.sha256()
            for name in names:
                if name.split(".")[0] == group:
                    h.update(name.encode())
                    h.update(f.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            out[group] = h.hexdigest()[:16]
        out["n_tensors"] = len(names)
    return out


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: python tools/fingerprint.py CHECKOUT WORKDIR")
    repo, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(repo), PATH=f"{bin_dir}:{env['PATH']}", OMP_NUM_THREADS="1")
    py = [sys.executable, "-m", "structmar"]
    if not (work / "init.safetensors").exists():
        _run([*py, "shapes", "--out", "coco", "--num_train", "64", "--num_val", "8", "--image_size", "32"], work, env)
        _run([sys.executable, "-c", "from structmar.text import write_random_clip; "
              "write_random_clip('clip', seed=0, size='tiny')"], work, env)
        _run([*py, "build-shards", "--coco_root", "coco", "--coco_split", "train2014", "--out", "shards",
              "--tokenizer", "pixel", "--pixel_patch", "4", "--clip_path", "clip", "--image_size", "32",
              "--samples_per_shard", "16", "--device", "cpu"], work, env)
        # no zero-initialised tensor left: a zero head output would ignore its condition
        _run([sys.executable, "-c", "import torch\n"
              "from structmar.config import model_config\n"
              "from structmar.model import StructMAR, write_export\n"
              "cfg = model_config('tiny', text_dim=32, num_sampling_steps=10)\n"
              "torch.manual_seed(0)\n"
              "sd = StructMAR(cfg).state_dict()\n"
              "[t.normal_(0, 0.02) for t in sd.values() if t.is_floating_point() and not t.any()]\n"
              "write_export('init.safetensors', sd, sd, cfg)\n"], work, env)
    for run in ("train", "rl"):
        subprocess.run(["rm", "-rf", str(work / run)], check=True)
    common = ["--device", "cpu", "--precision", "fp32", "--num_workers", "0", "--log_every", "1", "--sample_every",
              "0", "--deepspeed_config", "zero2", "--data", "shards"]
    _run([str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "structmar",
          "train", "--output_dir", "train", "--resume", "init.safetensors", "--train_mode", "full", "--batch_size", "2",
          "--grad_accum", "2", "--epochs", "10", "--max_steps", "20", "--warmup_epochs", "1", "--lr", "1e-3",
          "--ema_rate", "0.9", "--save_steps", "10", "--seed", "1", *common], work, env)
    _run([*py, "rl", "--output_dir", "rl", "--resume", "train", "--batch_size", "2", "--group_size", "2", "--num_iter",
          "2", "--rollout_steps", "5", "--min_sigma", "0.05", "--lr", "1e-3", "--detector", "shapes",
          "--max_steps", "5",
          "--rl_step_ratio", "0.5", "--diffusion_step_ratio", "0.5", "--kl_coef", "0.5", "--inner_steps", "2", *common],
         work, env)
    result = {}
    for run in ("train", "rl"):
        rows = [json.loads(line) for line in (work / run / "log.jsonl").read_text().splitlines()]
        scalars = [{k: v for k, v in r.items() if not k.startswith("perf/") and "time" not in k and "per_s" not in k}
                   for r in rows]
        result[run] = {"scalars": scalars, "export": _digests(work / run / "checkpoint-last.safetensors")}
    json.dump(result, sys.stdout, indent=0)


if __name__ == "__main__":
    main()
