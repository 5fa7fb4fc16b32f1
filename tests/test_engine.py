"""structmar.engine: DeepSpeed config building, launcher environments, ZeRO-3 partitions, checkpoint
bookkeeping, and (in one plain subprocess) the step's non-finite skip, the EMA and bf16 exports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from structmar import atomic, engine
from structmar.config import OptimizerConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, cfg: dict) -> str:
    path.write_text(json.dumps(cfg))
    return str(path)


def _build(path: str, **kw) -> dict:
    spec = dict(micro_batch=1, grad_accum=1, world_size=1, lr=1.0, optimizer=OptimizerConfig(), precision="fp32")
    return engine.build_ds_config(path, **{**spec, **kw})


def test_ds_config_filled_from_cli(tmp_path):
    path = _write(tmp_path / "z.json", {"zero_optimization": {"stage": 2}})
    optimizer = OptimizerConfig(adam_betas=(0.8, 0.99), adam_eps=1e-6, weight_decay=0.05, grad_clip=1.5)
    cfg = _build(path, micro_batch=8, grad_accum=2, world_size=4, lr=3e-4, optimizer=optimizer, precision="bf16")
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (
        8, 2, 64)
    assert cfg["optimizer"] == {"type": "AdamW",
                                "params": {"lr": 3e-4, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.05}}
    assert cfg["gradient_clipping"] == 1.5
    assert cfg["bf16"]["enabled"] and cfg["data_types"]["grad_accum_dtype"] == "fp32"
    fp32 = _build(path, load_universal=True)
    assert not fp32["bf16"]["enabled"] and "data_types" not in fp32
    assert fp32["checkpoint"]["load_universal"]


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, r"zero_optimization.reduce_bucket_size"),
        ({"train_micro_batch_size_per_gpu": 4}, "batch sizes come from --batch_size"),
        ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param needs ZeRO stage 3"),
        ({"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.1}}}, "sets optimizer; .* --weight_decay"),
        ({"gradient_clipping": 1.0}, "sets gradient_clipping; .* --grad_clip"),
    ],
)
def test_ds_config_rejects(tmp_path, cfg, match):
    with pytest.raises(ValueError, match=match):
        _build(_write(tmp_path / "bad.json", cfg))


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_shipped_ds_configs(name, stage):
    """The shipped jsons hold ZeRO and communication knobs; the optimizer is MAR's, from the stage config."""
    path = os.path.join(engine.DS_CONFIGS, f"{name}.json")
    saved = json.loads(json.dumps(TrainConfig().to_dict()))["optimizer"]  # as train_config.json keeps it
    cfg = _build(path, micro_batch=64, world_size=8, lr=1e-4, optimizer=OptimizerConfig(**saved), precision="bf16")
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["gradient_clipping"] == 3.0
    opt = cfg["optimizer"]
    assert opt["type"] == "AdamW" and opt["params"] == {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                        "weight_decay": 0.02}
    assert cfg["data_types"]["grad_accum_dtype"] == "fp32" and cfg["bf16"]["enabled"]
    with open(path) as f:
        assert set(json.load(f)) == {"zero_optimization", "wall_clock_breakdown"}


def test_ds_config_names_a_packaged_json_or_a_path_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ds_configs/ here
    assert engine.packaged_ds_configs() == ["zero2", "zero3", "zero3_offload"]
    packaged = os.path.join(engine.DS_CONFIGS, "zero3.json")
    assert engine.resolve_ds_config("zero3") == engine.resolve_ds_config("zero3.json") == packaged
    assert engine.resolve_ds_config(TrainConfig().deepspeed_config) == os.path.join(engine.DS_CONFIGS, "zero2.json")
    (tmp_path / "zero3.json").write_text("{}")  # a file of that path is the user's, never shadowed
    assert engine.resolve_ds_config("zero3.json") == "zero3.json"
    for missing in ("zero4", "configs/zero2.json"):
        with pytest.raises(FileNotFoundError, match=f"^DeepSpeed config {missing} does not exist; name a packaged "
                                                    r"one \(zero2, zero3, zero3_offload\) or a json file$"):
            engine.resolve_ds_config(missing)


def test_a_non_editable_install_ships_the_ds_configs(tmp_path):
    """setup.py's package data: what `pip install .` copies into site-packages (setuptools' build_py)."""
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shipped = sorted(p.name for p in (tmp_path / "structmar" / "ds_configs").iterdir())
    assert shipped == [f"{name}.json" for name in engine.packaged_ds_configs()]


def test_launcher_environments(monkeypatch):
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "8"}
    monkeypatch.setattr(engine, "subprocess", SimpleNamespace(run=_no_scontrol, CalledProcessError=OSError))
    engine._fill_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("5", "8", "1", "gpu07")
    assert env["MASTER_PORT"] == str(20000 + 1234)
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    before = dict(torchrun)
    engine._fill_launcher_env(torchrun)
    assert torchrun == before
    plain: dict = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}  # inside sbatch but not srun: a world of one
    engine._fill_launcher_env(plain)
    assert (plain["RANK"], plain["WORLD_SIZE"], plain["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")


def _no_scontrol(*args, **kwargs):
    raise OSError("scontrol not installed")


def test_zero3_partitions_reassemble():
    full = torch.arange(10.0).reshape(2, 5)
    parts = []
    for rank in range(3):
        p = SimpleNamespace(ds_tensor=torch.empty(4))  # ceil(10 / 3) = 4, padded at the end
        parts.append(engine._local_partition(full, p, SimpleNamespace(rank=rank, world_size=3)))
    flat = torch.cat(parts)
    assert torch.equal(flat[:10].view(2, 5), full) and not flat[10:].any()


def test_a_frozen_engine_that_cannot_pin_its_offload_says_so_and_names_the_flag(monkeypatch):
    def no_pinned_memory(**kwargs):
        raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")

    monkeypatch.setitem(sys.modules, "deepspeed", SimpleNamespace(initialize=no_pinned_memory))
    env = engine.DistEnv(0, 2, 0, torch.device("cpu"))
    model = torch.nn.Linear(2**16, 2**14, bias=False, device="meta")  # 4 GiB in fp32: 2 GiB per rank
    with pytest.raises(ValueError) as err:
        engine.frozen_engine(model, env, torch.float32, offload=True, flag="--no-ref_offload")
    assert "\n" not in str(err.value)
    assert re.search(r"cannot allocate 2\.00 GiB of pinned CPU memory per rank .*CUDA error: out of memory\); "
                     r"keep them on the device with --no-ref_offload$", str(err.value)), str(err.value)
    with pytest.raises(RuntimeError, match="out of memory"):  # kept on the device: no offload to blame
        engine.frozen_engine(model, env, torch.float32, offload=False, flag="--no-ref_offload")


def test_latest_survives_an_interrupted_save(tmp_path):
    ckpt = tmp_path / engine.CHECKPOINTS
    for step in (2, 4, 6):
        tag = ckpt / f"step_{step:08d}"
        tag.mkdir(parents=True)
        (tag / engine.TRAINER_STATE).write_text(json.dumps({"step": step}))
        os.utime(tag / engine.TRAINER_STATE, (step, step))
    atomic.write_text(str(ckpt / engine.LATEST), "step_00000006")
    (ckpt / "step_00000008").mkdir()  # a save killed before it completed: no trainer state, `latest` unmoved
    (ckpt / "step_00000008" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    tag, state = engine.latest_checkpoint(str(tmp_path))
    assert tag == "step_00000006" and state["step"] == 6
    (ckpt / "step_00000002" / engine.TRAINER_STATE).unlink()  # a removal killed part-way
    (ckpt / "step_00000006_universal").mkdir()
    engine.prune_checkpoints(str(ckpt), keep=2, current="step_00000006")
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000004", "step_00000006",
                                                      "step_00000006_universal"]
    assert engine.latest_checkpoint(str(tmp_path / "nothing")) is None


_STEP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from structmar import engine
    from structmar.config import OptimizerConfig

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 1)
            self.register_buffer("scale", torch.tensor(2.0))
            self.poison = False

        def forward(self, batch):
            loss = self.head(torch.tanh(self.body(batch["x"]))).pow(2).mean() * self.scale.float()
            if self.poison:
                loss = loss * float("inf")
            return loss, {"sq": loss.detach()}

    env = engine.init_distributed("cpu")
    out = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = Toy()
        with torch.no_grad():
            model.body.weight.add_(1e-3)  # values bf16 cannot hold
        model.body.requires_grad_(False)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        cfg = engine.build_ds_config(sys.argv[1], micro_batch=2, grad_accum=1, world_size=1, lr=0.1,
                                     optimizer=OptimizerConfig(), precision=precision)
        eng = engine.Engine(model, cfg, env, ema_rate=0.5, loss_fn=lambda m, b: m(b), forward_only=True)
        batch = {"x": torch.randn(2, 4)}
        eng.module.poison = True
        before = {k: v.detach().clone() for k, v in eng.module.named_parameters()}
        skipped = eng.train_step(batch, lr=0.1)
        unchanged = all(torch.equal(before[k], v) for k, v in eng.module.named_parameters())
        eng.module.poison = False
        ok = eng.train_step(batch, lr=0.1)
        model_sd, ema_sd = eng.consolidated()
        w = model_sd["head.weight"]
        out[precision] = dict(
            skipped=skipped.skipped, applied=skipped.applied, unchanged=unchanged, ok=ok.applied,
            loss_finite=ok.loss == ok.loss, metric=ok.metrics["sq"], grad_norm=ok.grad_norm,
            keys=sorted(model_sd) == sorted(initial) == sorted(ema_sd),
            frozen_exact=torch.equal(model_sd["body.weight"], initial["body.weight"])
                         and torch.equal(ema_sd["body.weight"], initial["body.weight"]),
            ema_formula=(ema_sd["head.weight"] - (0.5 * initial["head.weight"] + 0.5 * w)).abs().max().item(),
            moved=(w - initial["head.weight"]).abs().max().item(),
        )
    # an objective replacing the forward (stage 3's interface), and its refusal under ZeRO-3
    torch.manual_seed(0)
    model = Toy()
    cfg = engine.build_ds_config(sys.argv[1], micro_batch=2, grad_accum=1, world_size=1, lr=0.1,
                                 optimizer=OptimizerConfig(), precision="fp32")
    handed = {}

    def objective(forward_only):
        def loss_fn(m, b):
            handed[forward_only] = type(m).__name__
            return 3 * m(b)[0], {"three": torch.tensor(3.0)}
        return loss_fn

    eng = engine.Engine(model, cfg, env, ema_rate=0.5, loss_fn=objective(False))
    with torch.no_grad():
        plain = model(batch)[0].item()
    r = eng.train_step(batch, lr=0.1)
    out["objective"] = dict(ratio=r.loss / plain, metrics=sorted(r.metrics), applied=r.applied)
    engine.Engine(Toy(), cfg, env, ema_rate=0.5, loss_fn=objective(True), forward_only=True).train_step(batch, 0.1)
    out["handed"] = [handed[False], handed[True]]
    zero3 = dict(cfg, zero_optimization={"stage": 3})
    try:
        engine.Engine(Toy(), zero3, env, ema_rate=0.5, loss_fn=lambda m, b: m(b))
        out["zero3_refused"] = False
    except ValueError as e:
        out["zero3_refused"] = "ZeRO stage 0-2" in str(e)
    print("RESULT" + json.dumps(out))
    """
)


def test_engine_step_skip_ema_and_export_in_one_process(tmp_path):
    """One plain process (no launcher): world of one, ZeRO-2, fp32 then bf16 on CPU."""
    script = tmp_path / "step.py"
    script.write_text(_STEP_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), "zero2"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    objective = result.pop("objective")
    assert objective["applied"] and objective["metrics"] == ["three"] and objective["ratio"] == pytest.approx(3.0)
    assert result.pop("zero3_refused")
    # a forward-only objective gets the DeepSpeed engine (its forward, as under ZeRO-3), any other the bare module
    assert result.pop("handed") == ["Toy", "DeepSpeedEngine"]
    for precision, r in result.items():
        assert r["skipped"] and not r["applied"] and r["unchanged"], precision  # inf loss: nothing applied
        assert r["ok"] and r["loss_finite"] and r["grad_norm"] > 0 and r["keys"], precision
        assert r["frozen_exact"], precision  # frozen weights export bit-identical, bf16 engine included
        assert r["moved"] > 1e-3, precision
        # EMA from the fp32 weights as loaded and the fp32 master after the step, bf16 engine included
        assert r["ema_formula"] <= 1e-7, (precision, r["ema_formula"])


_SHM_SCRIPT = textwrap.dedent(
    """
    import json, os
    import torch
    from structmar import engine

    env = engine.init_distributed("cpu")
    import deepspeed.comm as ds_dist

    t = torch.full((4,), float(env.rank + 1))
    ds_dist.inference_all_reduce(t)  # DeepSpeed's shared-memory allreduce, through the unlinked segments
    own = engine.shm_workspace(env.rank)
    print("RESULT" + json.dumps(dict(rank=env.rank, local_size=os.environ.get("LOCAL_SIZE"), sum=t.tolist(),
                                     own_exists=os.path.exists(own), port=os.environ["MASTER_PORT"])))
    engine.barrier()
    """
)


@pytest.mark.slow
def test_cpu_launch_leaves_no_shared_memory(tmp_path, launch):
    """Under `deepspeed --num_gpus 2` on CPU, DeepSpeed maps a 66 MB /dev/shm workspace per rank and never
    unlinks it; init_distributed unlinks each rank's own name once every peer has mapped it, so the
    shared-memory allreduce still works and the run leaves nothing in /dev/shm."""
    script = tmp_path / "shm.py"
    script.write_text(_SHM_SCRIPT)
    proc = launch(2, [str(script)], cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(m) for m in re.findall(r"RESULT(\{[^}]*\})", proc.stdout)]  # the ranks' lines interleave
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["local_size"] == "2"  # the condition under which DeepSpeed creates the workspace
        assert r["sum"] == [3.0] * 4 and not r["own_exists"], r
    port = results[0]["port"]
    left = [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]
    assert left == [], left
