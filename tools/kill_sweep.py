"""Kill sweep: `kill -9` at random points of a command, the same command again, compared with an uninterrupted run.

For each of `structmar build-shards`, `structmar train` (2 ranks under the deepspeed launcher), `structmar rl` and
`structmar eval` on Shapes with the tiny preset: one uninterrupted reference run (its wall time is the range the
kill times are drawn from, with a seeded RNG), then N trials of: start the command in a fresh output directory,
SIGKILL its whole process group (the launcher and every rank) at the drawn time, check what the kill left, run the
same command to completion, compare with the reference. A trial passes three checks:

- intact after the kill: `latest` names a checkpoint whose every file loads, and every file under its final name
  is complete (JSON parses, exports and .pt files load, shards match their sidecar's sha256, PNGs decode);
- identical after the rerun: shard bytes, checkpoint files, exports, samples and figures byte for byte, every
  logged scalar row (perf/ and timings aside) equal to the reference's row of that step, results.json's numbers;
- no leftovers: no file or directory the reference run does not have (temp files, half-written checkpoints,
  checkpoints the reference pruned), TensorBoard's event files aside (one per process start by design).

A rerun of `train`/`rl` is the identical command line: a run continues its own output_dir's latest checkpoint,
which is also how a requeued SLURM job resumes. Only the launcher's --master_port changes between launches.

    python tools/kill_sweep.py --work /tmp/kill_sweep --kills 10 --seed 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PYTHON = Path(sys.executable)
DEEPSPEED = PYTHON.parent / "deepspeed"
COMMANDS = ("build-shards", "train", "rl", "eval")
# written once per process start, stamped with host, pid and wall time: a rerun adds one by design
EVENT_FILE = "events.out.tfevents."
VARYING_KEYS = ("perf/", "seconds", "time", "per_s")  # wall-clock figures: never equal between two runs


@dataclass
class Command:
    name: str
    args: Callable[[Path], list[str]]  # structmar's arguments for an output directory
    ranks: int = 0  # 0: one plain process; else that many ranks under the deepspeed launcher
    steps: int = 0  # optimizer steps it runs (train, rl): kills may be drawn over steps instead of time


@dataclass
class Trial:
    kill_at: float
    landed: bool  # the command was still running when killed
    continued: str | None = None  # the checkpoint `latest` named after the kill, which the rerun continued
    torn: list[str] = field(default_factory=list)  # what the kill left incomplete under a final name
    differences: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)


# ---- the data and the commands ----------------------------------------------------------------


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # 2 ranks share the cores
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    return env


def prepare(work: Path) -> Path:
    """Shapes (64 train / 8 val images, 32 px), a tiny random CLIP, shards and a tiny init export under work/data."""
    data = work / "data"
    if (data / "init.safetensors").is_file():
        return data
    data.mkdir(parents=True, exist_ok=True)
    code = """
import sys, torch
from structmar.config import model_config
from structmar.model import StructMAR, write_export
from structmar.shapes import generate_shapes
from structmar.shards import run_build
from structmar.text import write_random_clip
root = sys.argv[1]
generate_shapes(f"{root}/coco", 64, 8, 32, seed=0, overwrite=True)
write_random_clip(f"{root}/clip", seed=0, size="tiny")
run_build(dict(coco_root=f"{root}/coco", coco_split="train2014", out=f"{root}/shards", tokenizer="pixel",
               vae_path=None, pixel_patch=4, clip_path=f"{root}/clip", image_size=32, max_objects=16,
               min_box_area=0.002, samples_per_shard=16, batch_size=64, num_workers=1, worker_rank=None,
               device="cpu", verify=False, progress=False))
cfg = model_config("tiny", text_dim=32, num_sampling_steps=10)
torch.manual_seed(0)
sd = StructMAR(cfg).state_dict()
for t in sd.values():  # no all-zero tensor left: a stand-in for pretrained weights
    if t.is_floating_point() and not t.any():
        t.normal_(0, 0.02)
write_export(f"{root}/init.safetensors", sd, sd, cfg)
"""
    subprocess.run([str(PYTHON), "-c", code, str(data)], env=_env(), check=True, capture_output=True)
    return data


def commands(data: Path) -> dict[str, Command]:
    common = ["--device", "cpu", "--precision", "fp32", "--num_workers", "0", "--log_every", "1",
              "--sample_every", "0", "--data", str(data / "shards"), "--seed", "1"]
    return {
        "build-shards": Command("build-shards", lambda out: [
            "build-shards", "--coco_root", str(data / "coco"), "--coco_split", "train2014", "--out", str(out),
            "--tokenizer", "pixel", "--pixel_patch", "4", "--clip_path", str(data / "clip"), "--image_size", "32",
            "--samples_per_shard", "8", "--batch_size", "8", "--device", "cpu"]),
        # 12 steps, a checkpoint every 4 and 2 kept: saves, a prune and the final export all fall in the range
        "train": Command("train", lambda out: [
            "train", "--output_dir", str(out), "--resume", str(data / "init.safetensors"), "--train_mode", "full",
            "--batch_size", "2", "--epochs", "10", "--max_steps", "12", "--warmup_epochs", "1", "--lr", "1e-3",
            "--ema_rate", "0.9", "--save_steps", "4", *common], ranks=2, steps=12),
        "rl": Command("rl", lambda out: [
            "rl", "--output_dir", str(out), "--resume", str(data / "init.safetensors"), "--batch_size", "2",
            "--group_size", "2", "--num_iter", "2", "--rollout_steps", "5", "--min_sigma", "0.05", "--lr", "1e-3",
            "--detector", "shapes", "--max_steps", "6", "--save_steps", "2", "--rl_step_ratio", "0.5",
            "--diffusion_step_ratio", "0.5", "--kl_coef", "0.5", *common], steps=6),
        "eval": Command("eval", lambda out: [
            "eval", "--checkpoint", str(data / "init.safetensors"), "--coco_root", str(data / "coco"),
            "--coco_split", "val2014", "--num_layouts", "8", "--batch_size", "2", "--eval_detector", "shapes",
            "--clip_path", str(data / "clip"), "--num_iter", "4", "--device", "cpu", "--out", str(out)]),
    }


# ---- running and killing ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: Command, out: Path, log: Path) -> subprocess.Popen:
    """The command in a process group of its own (launcher, ranks and their workers all in it)."""
    if cmd.ranks:
        argv = [str(DEEPSPEED), "--num_gpus", str(cmd.ranks), "--master_port", str(_free_port()), "--module",
                "structmar", *cmd.args(out)]
    else:
        argv = [str(PYTHON), "-m", "structmar", *cmd.args(out)]
    with open(log, "ab") as f:
        return subprocess.Popen(argv, cwd=out.parent, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the command's group, and wait until none is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def run_to_end(cmd: Command, out: Path, timeout: float = 900) -> float:
    """Run the command to completion; returns its wall time. A failure raises with the end of its output."""
    log = out.parent / f"{out.name}.log"
    t0 = time.monotonic()
    proc = start(cmd, out, log)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        kill_group(proc)  # nothing of it may outlive it (a rank of a failed launch)
    if code != 0:
        raise RuntimeError(f"{cmd.name} into {out} exited {code}: {log.read_text()[-3000:]}")
    return time.monotonic() - t0


def run_killed(cmd: Command, out: Path, kill_at: float, when: Callable[[Path], bool] | None = None) -> bool:
    """Start the command and kill its group after `kill_at` seconds, or as soon as `when(out)` holds (polled every
    few milliseconds: a moment such as "`latest` names the last checkpoint"); False when it had already finished."""
    proc = start(cmd, out, out.parent / f"{out.name}.log")
    deadline = time.monotonic() + kill_at
    while proc.poll() is None and time.monotonic() < deadline and not (when is not None and when(out)):
        time.sleep(0.002)
    finished = proc.poll() is not None
    kill_group(proc)
    return not finished


# ---- what a directory holds -------------------------------------------------------------------


def listing(root: Path) -> set[str]:
    """Relative paths of every file and directory (directories end in '/'), TensorBoard's event files aside."""
    if not root.exists():
        return set()
    found = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            found.add(rel + "/")
        elif not path.name.startswith(EVENT_FILE):
            found.add(rel)
    return found


def _varying(key: str) -> bool:
    return any(v in key for v in VARYING_KEYS)


def _scalars(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not _varying(k)} for r in rows]


def _numbers(obj):
    """A JSON value with every wall-clock entry dropped."""
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in obj.items() if not _varying(k)}
    if isinstance(obj, list):
        return [_numbers(v) for v in obj]
    return obj


def _load_pt(path: Path):
    """A torch.save file a command wrote, loaded as structmar loads its own (weights_only=True: nothing in it
    runs), with the three DeepSpeed classes its optimizer states pickle beside their tensors allowed."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from structmar.files import load_torch_pickle

    return load_torch_pickle(str(path), "checkpoint file", (LossScaler, ZeroStageEnum, fragment_address))


def _same_part(a: Path, b: Path) -> bool:
    """Two evaluation parts: equal but for their generation time."""
    pa, pb = (_load_pt(p) for p in (a, b))
    pa.pop("generate_seconds"), pb.pop("generate_seconds")
    return _equal(pa, pb)


def _same_safetensors(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        keys = list(fa.keys())
        return (fa.metadata() == fb.metadata() and keys == list(fb.keys())
                and all(_equal(fa.get_tensor(k), fb.get_tensor(k)) for k in keys))


def _equal(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if type(a).__eq__ is object.__eq__ and hasattr(a, "__dict__"):  # a pickled object (DeepSpeed's loss scaler)
        return type(a) is type(b) and _equal(vars(a), vars(b))
    return a == b


def _same_pickle(a: Path, b: Path) -> bool:
    """Two torch.save files: the same bytes, or the same objects. A process that continued a checkpoint pickles
    DeepSpeed's equal config strings without the references the first process's shared objects gave them."""
    if a.read_bytes() == b.read_bytes():
        return True
    return _equal(*(_load_pt(p) for p in (a, b)))


def _text(path: Path, root: Path) -> str:
    """A text file with its run's own directory and per-image timings written as placeholders."""
    return re.sub(r"[\d.]+ s per generated image", "<t> s per generated image",
                  path.read_text().replace(str(root), "<out>"))


def compare(ref: Path, out: Path) -> list[str]:
    """Differences of `out` from the reference run `ref`: every file of the reference, compared byte for byte
    except where wall-clock figures are part of it (the scalar log, results, evaluation parts)."""
    diffs = []
    for rel in sorted(listing(ref)):
        a, b = ref / rel, out / rel
        if rel.endswith("/"):
            continue
        if not b.is_file():
            diffs.append(f"{rel}: missing")
        elif rel.endswith("log.jsonl"):
            # a continued run appends: every row, the killed run's included, must be the reference's row of its step
            by_step = {r["step"]: r for r in _scalars(a)}
            rows = _scalars(b)
            if {r["step"] for r in rows} != set(by_step) or any(r != by_step[r["step"]] for r in rows):
                diffs.append(f"{rel}: logged scalars differ")
        elif rel.endswith(".json"):
            if _numbers(json.loads(_text(a, ref))) != _numbers(json.loads(_text(b, out))):
                diffs.append(f"{rel}: differs")
        elif rel.endswith(".md"):
            if _text(a, ref) != _text(b, out):
                diffs.append(f"{rel}: differs")
        elif rel.endswith(".safetensors"):  # its header's metadata order varies between writes of the same file
            if not _same_safetensors(a, b):
                diffs.append(f"{rel}: tensors or metadata differ")
        elif rel.startswith("parts/"):
            if not _same_part(a, b):
                diffs.append(f"{rel}: differs")
        elif rel.endswith(".pt"):
            if not _same_pickle(a, b):
                diffs.append(f"{rel}: differs")
        elif a.read_bytes() != b.read_bytes():
            diffs.append(f"{rel}: bytes differ")
    return diffs


def leftovers(ref: Path, out: Path) -> list[str]:
    """What `out` holds that the reference run does not: temp files, half-written or unpruned checkpoints."""
    return sorted(listing(out) - listing(ref))


def torn(out: Path) -> list[str]:
    """Files under their final names that are incomplete right after a kill, and a `latest` naming a checkpoint
    that is not whole. Checkpoint directories `latest` does not name are a save in progress: not checked here
    (the rerun must replace or remove them; `leftovers` says whether it did)."""
    from PIL import Image
    from safetensors.torch import load_file

    problems = []
    ckpts = out / "checkpoints"
    unnamed = set()
    if ckpts.is_dir():
        latest = ckpts / "latest"
        tag = latest.read_text().strip() if latest.is_file() else None
        unnamed = {d for d in ckpts.iterdir() if d.is_dir() and d.name != tag}
        if tag is not None:
            state = ckpts / tag / "trainer_state.json"
            if not state.is_file():
                problems.append(f"latest names {tag}, which has no trainer_state.json")
            else:
                world = json.loads(state.read_text())["world_size"]
                missing = [r for r in range(world) if not (ckpts / tag / f"rank_{r:05d}.pt").is_file()]
                if missing:
                    problems.append(f"latest names {tag}, which lacks the state of ranks {missing}")
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        if any(d in path.parents for d in unnamed) or ".tmp" in path.name or path.name.startswith(EVENT_FILE):
            continue
        rel = path.relative_to(out).as_posix()
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".jsonl":
                [json.loads(line) for line in path.read_text().splitlines()]
            elif path.suffix == ".safetensors":
                load_file(str(path))
            elif path.suffix == ".pt":
                _load_pt(path)
            elif path.suffix == ".png":
                with Image.open(path) as im:
                    im.load()
            elif path.suffix == ".tar":
                from structmar.shard_tar import sha256

                side = path.with_suffix(".json")
                if side.is_file() and json.loads(side.read_text())["sha256"] != sha256(str(path)):
                    problems.append(f"{rel}: bytes do not match its sidecar")
        except Exception as e:  # noqa: BLE001 - any failure to read it back is the finding
            problems.append(f"{rel}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return problems


# ---- the sweep --------------------------------------------------------------------------------


def trial(cmd: Command, ref: Path, out: Path, kill_at: float, when: Callable[[Path], bool] | None = None) -> Trial:
    """Kill the command in `out` (see `run_killed`), check what the kill left, rerun it, compare with `ref`."""
    result = Trial(kill_at=kill_at, landed=run_killed(cmd, out, kill_at, when))
    result.torn = torn(out) if out.exists() else []
    latest = out / "checkpoints" / "latest"
    result.continued = latest.read_text() if latest.is_file() else None
    run_to_end(cmd, out)
    result.differences = compare(ref, out)
    result.leftovers = leftovers(ref, out)
    return result


def logged_step(step: int) -> Callable[[Path], bool]:
    """A kill moment: the run's log.jsonl has reached `step` (rank 0 logs each step as it completes)."""

    def reached(out: Path) -> bool:
        try:
            lines = (out / "log.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return False
        return any(json.loads(line)["step"] >= step for line in lines if line.endswith("}"))

    return reached


def sweep(cmd: Command, work: Path, kills: int, seed: int, log: Callable[[str], None] | None = None,
          by_step: bool = False) -> list[Trial]:
    """The reference run, then `kills` trials at times drawn uniformly over its wall time by a seeded RNG; with
    `by_step` (train, rl), once the log reaches a step drawn uniformly from the run's steps: the moments around
    saves, which launcher start-up otherwise takes most of the wall time from."""
    log = log or (lambda line: print(line, flush=True))
    base = work / cmd.name
    subprocess.run(["rm", "-rf", str(base)], check=True)
    base.mkdir(parents=True)
    ref = base / "ref"
    duration = run_to_end(cmd, ref)
    log(f"{cmd.name}: uninterrupted run {duration:.1f} s")
    rng = random.Random(f"{seed}-{cmd.name}")
    trials = []
    for i in range(kills):
        step = rng.randint(1, cmd.steps) if by_step else None
        t = trial(cmd, ref, base / f"kill{i:03d}", 3 * duration if step else rng.uniform(0, duration),
                  logged_step(step) if step else None)
        moment = f"step {step}" if step else f"{t.kill_at:.1f} s"
        log(f"{cmd.name}: kill {i + 1}/{kills} at {moment}{'' if t.landed else ' (had finished)'}"
            f"{'' if t.continued is None else ', rerun continued ' + t.continued}: "
            f"{'identical' if not t.differences else '; '.join(t.differences[:3])}"
            f"{'' if not t.torn else ' | torn: ' + '; '.join(t.torn[:3])}"
            f"{'' if not t.leftovers else ' | leftovers: ' + ', '.join(t.leftovers[:5])}")
        trials.append(t)
    return trials


def table(results: dict[str, list[Trial]]) -> str:
    lines = ["| command | kills | landed while running | reruns that continued a checkpoint | reruns identical | "
             "intact after the kill | leftovers found |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, trials in results.items():
        lines.append(f"| `structmar {name}` | {len(trials)} | {sum(t.landed for t in trials)} | "
                     f"{sum(t.continued is not None for t in trials)} | "
                     f"{sum(not t.differences for t in trials)} | {sum(not t.torn for t in trials)} | "
                     f"{sum(bool(t.leftovers) for t in trials)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="working directory (data and runs; reused data is kept)")
    p.add_argument("--kills", type=int, default=10, help="kills per command")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill times")
    p.add_argument("--commands", default=",".join(COMMANDS), help=f"comma-separated subset of {COMMANDS}")
    p.add_argument("--by_step", action="store_true",
                   help="train and rl: kill once the log reaches a random step, not at a random time")
    args = p.parse_args(argv)
    work = Path(args.work).resolve()
    cmds = commands(prepare(work))
    names = args.commands.split(",")
    unknown = set(names) - set(COMMANDS)
    if unknown:
        p.error(f"unknown commands {sorted(unknown)}")
    results = {name: sweep(cmds[name], work, args.kills, args.seed, by_step=args.by_step and cmds[name].steps > 0)
               for name in names}
    print(table(results))
    return 0 if all(not (t.differences or t.torn or t.leftovers) for ts in results.values() for t in ts) else 1


if __name__ == "__main__":
    sys.exit(main())
