import os

import pytest


@pytest.fixture(scope="session")
def pixel_shards(tmp_path_factory):
    """Builds Shapes (32 px) -> pixel-token shards with a tiny random CLIP: root/{coco,clip,shards}."""
    from structmar.shapes import generate_shapes
    from structmar.shards import run_build
    from structmar.text import write_random_clip

    def build(name: str, num_train: int, num_val: int, samples_per_shard: int):
        root = tmp_path_factory.mktemp(name)
        generate_shapes(root / "coco", num_train, num_val, 32, seed=0)
        write_random_clip(str(root / "clip"), seed=0, size="tiny")
        run_build(dict(coco_root=str(root / "coco"), coco_split="train2014", out=str(root / "shards"),
                       tokenizer="pixel", vae_path=None, pixel_patch=4, clip_path=str(root / "clip"), image_size=32,
                       max_objects=16, min_box_area=0.002, samples_per_shard=samples_per_shard, batch_size=64,
                       num_workers=1, worker_rank=None, device="cpu", verify=False, progress=False))
        return root

    return build


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """Writes a random tiny StructMAR export (pixel tokenizer, 32 px) whose EMA differs from its raw weights, and the
    tiny random CLIP it reads: tiny_export(name, max_objects=4, categories=None) -> dict(dir, clip, path), the export
    at dir/checkpoint-last.safetensors (so dir is also a run directory), recording `categories` ({id: name}) if given
    as a stage's export records its shards'."""
    import torch

    from structmar.config import model_config
    from structmar.model import EXPORT, StructMAR, TrainedWith, write_export
    from structmar.text import write_random_clip

    def build(name: str, max_objects: int = 4, categories: dict | None = None):
        d = tmp_path_factory.mktemp(name)
        clip = write_random_clip(str(d / "clip"), seed=0, size="tiny")
        cfg = model_config("tiny", text_dim=32, num_sampling_steps=4, max_objects=max_objects)
        torch.manual_seed(0)
        model = StructMAR(cfg)
        ema = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
               for k, v in model.state_dict().items()}
        path = str(d / EXPORT)
        # the encoders recorded without a path or digest: any tiny CLIP of this width may sample it
        trained_with = TrainedWith(dict(id="clip:32", path=None, sha256=None), dict(name="pixel", path=None,
                                                                                   sha256=None), categories)
        write_export(path, model.state_dict(), ema, cfg, {"step": 0}, trained_with if categories else None)
        return dict(dir=d, clip=clip, path=path)

    return build


@pytest.fixture(scope="session")
def tiny_planner(pixel_shards, tmp_path_factory):
    """A tiny layout planner trained a few steps on small Shapes pixel shards, on one torch thread (a small model's
    steps are overhead-bound: more threads on 2 shared cores only contend): dict(run, root), its export in run and
    the shards, their CLIP and COCO files under root."""
    import torch

    from structmar.config import PlannerTrainConfig
    from structmar.planner import run_train_planner

    root = pixel_shards("tiny_planner", 64, 4, 64)
    run = tmp_path_factory.mktemp("tiny_planner_run") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_train_planner(PlannerTrainConfig(output_dir=str(run), data=str(root / "shards"), coco_split="train2014",
                                             model="tiny", batch_size=16, max_steps=6, lr=2e-3, device="cpu",
                                             precision="fp32", deepspeed_config="zero2", num_workers=0, seed=0))
    finally:
        torch.set_num_threads(threads)
    return dict(run=run, root=root)


@pytest.fixture(scope="session")
def launch():
    """Runs a command as one plain process (ranks 0) or under `deepspeed --num_gpus <ranks>` (gloo on CPU):
    launch(ranks, args, cwd, module=False, timeout=300, env=None) -> CompletedProcess. With `module`, the
    launcher runs `python -m <args[0]> --local_rank=N <args[1:]>`, as users type it."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    deepspeed = Path(sys.executable).parent / "deepspeed"

    def run(ranks: int, args: list[str], cwd, module: bool = False, timeout: int = 300, env: dict | None = None):
        full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))  # 2 ranks share 2 cores
        if ranks == 0:
            cmd = [sys.executable, *(["-m"] if module else []), *args]
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(port),
                   *(["--module"] if module else []), *args]
        return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)

    return run
