"""structmar.train: the stage loop, resume rules, and end-to-end runs under the real launchers.

The slow tests launch 2 gloo ranks with `deepspeed --num_gpus 2` (or one plain process) on a tiny
StructMAR over real Shapes shards, through `tests/train_driver.py` (the library's `train` with test
hooks) or through `structmar train` itself.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from structmar.cli import build_parser
from structmar.config import TrainConfig, model_config
from structmar.engine import CHECKPOINTS, DS_CONFIGS, LATEST, TRAINER_STATE
from structmar.model import StructMAR, is_addition, read_weights, write_export
from structmar.shards import ShardLoader
from structmar.train import EXPORT, LOG, Objective, Start, SupervisedObjective, plan_start, resolve_model_config

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "train_driver.py"
MODEL = model_config("tiny", text_dim=32)  # the tiny random CLIP is 32 wide


# ---- fast: schedule, flags, resume rules ------------------------------------------------------


def test_lr_schedule_warmup_then_constant_or_cosine():
    cfg = TrainConfig(epochs=10, warmup_epochs=2, lr_schedule="constant")
    assert cfg.lr_at(1.0, 0.0) == 0.0
    assert cfg.lr_at(1.0, 1.0) == pytest.approx(0.5)
    assert cfg.lr_at(1.0, 7.3) == 1.0
    cos = dataclasses.replace(cfg, lr_schedule="cosine", min_lr=0.1)
    assert cos.lr_at(1.0, 2.0) == pytest.approx(1.0)
    assert cos.lr_at(1.0, 6.0) == pytest.approx(0.55)
    assert cos.lr_at(1.0, 10.0) == pytest.approx(0.1)


def test_every_train_flag_maps_to_config_and_is_read():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parser = sub.choices["train"]
    dests = {a.dest for a in parser._actions} - {"help", "local_rank"}
    fields = TrainConfig.flag_names()  # the optimizer's knobs among them
    assert dests == fields
    source = (REPO / "structmar" / "train.py").read_text() + (REPO / "structmar" / "config.py").read_text()
    unread = [name for name in fields if f"cfg.{name}" not in source and f"self.{name}" not in source]
    assert not unread, f"flags never read: {unread}"
    for flag in ("--output_dir", "--coco_root", "--coco_split", "--model", "--diffloss_d", "--diffloss_w", "--resume",
                 "--batch_size", "--epochs", "--warmup_epochs", "--train_mode", "--blr", "--label_drop_prob",
                 "--save_last_freq", "--grad_checkpointing", "--device", "--data", "--deepspeed_config",
                 "--ema_rate", "--seed", "--lr_schedule", "--log_dir", "--weight_decay", "--grad_clip"):
        assert flag in parser._option_string_actions, flag


def test_supervised_objective_is_the_models_loss_over_its_train_modes_parameters():
    model = StructMAR(MODEL)
    names = [n for n, _ in model.named_parameters()]
    full, text_layout = SupervisedObjective("full"), SupervisedObjective("text_layout")
    for objective in (full, text_layout):
        assert isinstance(objective, Objective) and objective.forward_only  # may run under ZeRO-3
        assert objective.state_dict() == {}
    assert full.name == "full" and all(full.trainable(n) for n in names)
    added = {n for n in names if text_layout.trainable(n)}
    assert text_layout.name == "text_layout" and added == {n for n in names if is_addition(n)}
    assert added and len(added) < len(names)
    with pytest.raises(ValueError, match="train_mode 'stage2'"):
        SupervisedObjective("stage2")


def test_the_grpo_stage_is_an_objective_for_zero_stages_0_to_2():
    from structmar.config import RLConfig
    from structmar.grpo import GRPOStage, colour_reward

    stage = GRPOStage(RLConfig(resume="x"), reward_fn=colour_reward((1.0, 0.0, 0.0)))
    assert isinstance(stage, Objective) and stage.name == "grpo"
    assert not stage.forward_only  # its rollouts call the policy outside forward: the engine refuses ZeRO-3


def test_compile_is_a_train_flag_and_only_forward_only_objectives_compile():
    from structmar.config import RLConfig
    from structmar.engine import DistEnv, Engine

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert TrainConfig().compile_backend() is None and RLConfig(resume="x").compile_backend() is None
    args = vars(sub.choices["train"].parse_args(["--compile", "inductor"]))
    assert TrainConfig.from_flags({k: v for k, v in args.items() if k != "func"}).compile_backend() == "inductor"
    assert "--compile" not in sub.choices["rl"]._option_string_actions  # GRPO calls the model outside forward
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="calls only the model's forward"):
        Engine(StructMAR(MODEL), {}, env, 0.9, SupervisedObjective("full").loss, forward_only=False,
               compile="inductor")


def test_missing_shards_error_names_the_build_command(tmp_path, capsys):
    from structmar.cli import main

    code = main(["train", "--model", "tiny", "--device", "cpu", "--output_dir", str(tmp_path / "out"),
                 "--coco_root", str(tmp_path / "coco")])
    assert code == 2
    err = capsys.readouterr().err
    assert "structmar build-shards" in err and str(tmp_path / "coco" / "shards" / "train2014") in err


def test_resume_rules(tmp_path):
    init = tmp_path / "init.safetensors"
    sd = StructMAR(MODEL).state_dict()
    write_export(str(init), sd, sd, MODEL)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), resume=str(init))
    start = plan_start(cfg)
    assert start == Start(weights_path=str(init))
    # the file's config is used without --model; --model must agree with its shape
    assert resolve_model_config(cfg, start, read_weights(str(init)).config).text_dim == 32
    with pytest.raises(ValueError, match="width"):
        resolve_model_config(dataclasses.replace(cfg, model="small"), start, read_weights(str(init)).config)
    with pytest.raises(FileNotFoundError, match="without checkpoint-last"):
        plan_start(dataclasses.replace(cfg, resume=str(tmp_path)))
    # another run's directory means its export
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(init, other / EXPORT)
    assert plan_start(dataclasses.replace(cfg, resume=str(other))).weights_path == str(other / EXPORT)


# ---- slow: real launchers ---------------------------------------------------------------------


def _drive(launch, ranks: int, spec: dict, tmp: Path, name: str):
    """Run tests/train_driver.py on `spec` (one plain process for ranks 0, else `deepspeed --num_gpus ranks`)."""
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    return launch(ranks, [str(DRIVER), str(path)], cwd=tmp)


def _log_losses(run_dir: Path) -> dict[int, float]:
    """step -> logged loss; a continued run appends, so the last row of a step wins."""
    rows = [json.loads(line) for line in (run_dir / LOG).read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _eval_loss(state_dict: dict, shard_dir: Path) -> float:
    """Mean model loss on 64 fixed samples with a fixed torch seed: the same masks, timesteps and noise for
    any weights, so two calls compare the weights alone (eval mode: no dropout, no condition drop)."""
    model = StructMAR(MODEL)
    model.load_state_dict(state_dict)
    model.eval()
    batches = list(iter(ShardLoader(str(shard_dir), "train2014", MODEL, 16, shuffle=False)))
    torch.manual_seed(123)
    with torch.no_grad():
        return sum(model(b)[0].item() for b in batches) / len(batches)


@pytest.fixture(scope="module")
def data(pixel_shards) -> Path:
    """Shapes (64 train images, 32 px) -> pixel-token shards with a tiny random CLIP, and an init export."""
    root = pixel_shards("train", 64, 8, samples_per_shard=16)
    torch.manual_seed(0)
    sd = StructMAR(MODEL).state_dict()
    # a stand-in for pretrained MAR weights: no zero-initialised backbone/head tensor left (a zero
    # diffusion-head output layer would give the frozen-backbone stage exactly zero gradients)
    for name, t in sd.items():
        if not is_addition(name) and t.is_floating_point() and not t.any():
            t.normal_(0, 0.02)
    write_export(str(root / "init.safetensors"), sd, sd, MODEL)
    # the shipped ZeRO-3 config keeps parameters under 1e5 elements whole (all of the tiny model's); partition
    # every parameter here so the EMA shards and the universal checkpoint see real partitions
    zero3 = json.loads((Path(DS_CONFIGS) / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (root / "ds_zero3.json").write_text(json.dumps(zero3))
    return root


@pytest.fixture(scope="module")
def init_loss(data) -> float:
    return _eval_loss(read_weights(str(data / "init.safetensors")).model, data / "shards")


def _spec(data: Path, out: Path, **kw) -> dict:
    spec = dict(output_dir=str(out), data=str(data / "shards"), resume=str(data / "init.safetensors"), batch_size=2,
                epochs=1, max_steps=8, warmup_epochs=0, lr=1e-3, device="cpu", precision="fp32",
                deepspeed_config=str(data / "ds_zero3.json"), num_workers=0, log_every=1, ema_rate=0.9,
                sample_every=0)
    spec.update(kw)
    return spec


@pytest.fixture(scope="module")
def zero3_run(data, launch):
    """8 uninterrupted ZeRO-3 steps on 2 ranks, checking the sharded EMA against the reference recurrence."""
    out = data / "zero3"
    spec = _spec(data, out, save_steps=4, hooks=dict(ema_reference=str(data / "ema.json"),
                                                     summary=str(data / "zero3_summary.json")))
    proc = _drive(launch, 2, spec, data, "zero3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, spec


@pytest.mark.slow
def test_zero3_trains_with_ema_equal_to_reference(data, zero3_run, init_loss):
    out, _ = zero3_run
    summary = json.loads((data / "zero3_summary.json").read_text())
    assert summary["step"] == 8 and len(summary["losses"]) == 8 and summary["nonfinite"] == 0
    ema = json.loads((data / "ema.json").read_text())
    assert ema["max_moved"] > 1e-4  # the EMA moved, and exactly as one process computes it
    assert ema["max_diff"] <= 1e-6
    final = read_weights(str(out / EXPORT))
    assert (out / CHECKPOINTS / LATEST).read_text() == "step_00000008"
    assert json.loads((out / CHECKPOINTS / "step_00000008" / TRAINER_STATE).read_text())["zero_stage"] == 3
    assert final.config == MODEL
    after = _eval_loss(final.model, data / "shards")
    assert after < 0.9 * init_loss, (init_loss, after)


@pytest.mark.slow
def test_kill9_then_cli_resume_repeats_the_uninterrupted_losses(data, zero3_run, launch):
    reference = _log_losses(zero3_run[0])
    out = data / "killed"
    proc = _drive(launch, 2, _spec(data, out, save_steps=3, hooks=dict(kill_at=5)), data, "killed")
    assert proc.returncode != 0  # rank 0 died by SIGKILL after step 5
    assert (out / CHECKPOINTS / LATEST).read_text() == "step_00000003"
    # the same command again, through the real CLI: it continues its own output_dir
    proc = launch(2, ["structmar", "train", "--output_dir", str(out), "--data", str(data / "shards"),
                       "--resume", str(data / "init.safetensors"), "--batch_size", "2", "--epochs", "1",
                       "--max_steps", "8", "--warmup_epochs", "0", "--lr", "1e-3", "--device", "cpu",
                       "--precision", "fp32", "--deepspeed_config", str(data / "ds_zero3.json"),
                       "--num_workers", "0", "--log_every", "1", "--ema_rate", "0.9", "--save_steps", "3",
                       "--sample_every", "2"],  # sampling must leave the training RNG streams alone
                   cwd=data, module=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "continuing" in proc.stdout
    resumed = _log_losses(out)
    for step in range(4, 9):
        assert abs(resumed[step] - reference[step]) <= 1e-5, (step, resumed[step], reference[step])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 2])
def test_resume_two_ranks_on_one_plain_process(data, zero3_run, zero2_run, stage, launch):
    """DeepSpeed's universal checkpoint for the model and optimizer, the EMA reassembled by name."""
    src, spec = zero3_run if stage == 3 else zero2_run[:2]
    saved_step = 8 if stage == 3 else 6
    out = data / f"one_rank_zero{stage}"
    shutil.copytree(src, out)
    summary = data / f"one_rank_zero{stage}_summary.json"
    spec = dict(spec, output_dir=str(out), max_steps=saved_step + 1, sample_every=0, hooks=dict(summary=str(summary)))
    proc = _drive(launch, 0, spec, data, f"one_rank_zero{stage}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "saved with 2 ranks, now 1" in proc.stdout
    assert json.loads(summary.read_text())["step"] == saved_step + 1
    before, after = read_weights(str(src / EXPORT)), read_weights(str(out / EXPORT))
    # EMA shards reassembled by name: ema_9 = r * ema_8 + (1 - r) * w_9
    for name, w in after.model.items():
        expected = 0.9 * before.ema[name] + 0.1 * w
        assert torch.allclose(after.ema[name], expected, atol=1e-6), name
    # Adam moments came through: a fresh AdamW's first step moves every weight by ~lr
    delta = torch.cat([(after.model[k] - before.model[k]).flatten() for k in before.model])
    near_lr = ((delta.abs() - 1e-3).abs() < 5e-5).float().mean().item()
    assert near_lr < 0.2, near_lr


@pytest.fixture(scope="module")
def zero2_run(data, launch):
    """ZeRO-2 on 2 ranks: a NaN loss on rank 1 at its 3rd forward, SIGTERM to rank 0 after step 6."""
    out = data / "zero2"
    spec = _spec(data, out, deepspeed_config="zero2", max_steps=10, sample_every=3,
                 hooks=dict(nan_at=[3], nan_ranks=[1], sigterm_at=6, summary=str(data / "zero2_summary.json"),
                            ema_reference=str(data / "zero2_ema.json")))
    proc = _drive(launch, 2, spec, data, "zero2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, spec, proc


@pytest.mark.slow
def test_zero2_skips_nonfinite_steps_and_saves_on_sigterm(data, zero2_run, init_loss):
    out, _, proc = zero2_run
    summary = json.loads((data / "zero2_summary.json").read_text())
    assert summary["preempted"] and summary["step"] == 6 and summary["nonfinite"] == 1
    assert all(v == v for v in summary["losses"])  # no NaN reached an applied step
    assert "non-finite loss on some rank" in proc.stdout and "stop requested (SIGTERM)" in proc.stdout
    assert (out / CHECKPOINTS / LATEST).read_text() == "step_00000006"
    assert json.loads((out / CHECKPOINTS / "step_00000006" / TRAINER_STATE).read_text())["zero_stage"] == 2
    ema = json.loads((data / "zero2_ema.json").read_text())  # each rank updates the fragments it owns
    assert ema["max_moved"] > 1e-4 and ema["max_diff"] <= 1e-6
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Images("samples/ema")] == [3, 6]
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/images_per_s", "perf/tokens_per_s",
            "perf/step_time_s", "perf/data_wait_share", "perf/memory_mb"} <= set(events.Tags()["scalars"])
    after = _eval_loss(read_weights(str(out / EXPORT)).model, data / "shards")
    assert after < 0.9 * init_loss, (init_loss, after)


@pytest.mark.slow
def test_text_layout_freezes_mar_weights_and_aborts_after_k_nonfinite(data, launch):
    out = data / "stage1"
    spec = _spec(data, out, deepspeed_config="zero2", train_mode="text_layout",
                 save_steps=2, max_nonfinite=3, hooks=dict(nan_at=[5, 6, 7]))
    proc = _drive(launch, 0, spec, data, "stage1")
    assert proc.returncode != 0
    assert "3 consecutive non-finite losses at step 4" in proc.stderr
    init, export = read_weights(str(data / "init.safetensors")), read_weights(str(out / EXPORT))
    frozen = [n for n in init.model if not is_addition(n)]
    added = [n for n in init.model if is_addition(n)]
    assert frozen and added
    for name in frozen:  # bit-identical, in the model and in its EMA
        assert torch.equal(export.model[name], init.model[name]), name
        assert torch.equal(export.ema[name], init.model[name]), name
    assert any(not torch.equal(export.model[n], init.model[n]) for n in added)


def test_init_ema_starts_a_stage_from_the_resume_files_ema_weights(data, launch):
    init = read_weights(str(data / "init.safetensors"))
    g = torch.Generator().manual_seed(3)
    ema = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
           for k, v in init.model.items()}
    write_export(str(data / "init_ema.safetensors"), init.model, ema, MODEL)
    out = data / "stage1_ema"
    spec = _spec(data, out, resume=str(data / "init_ema.safetensors"), deepspeed_config="zero2",
                 train_mode="text_layout", max_steps=2, init_ema=True)
    proc = _drive(launch, 0, spec, data, "stage1_ema")
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = read_weights(str(out / EXPORT))
    frozen = [n for n in init.model if not is_addition(n)]
    assert all(torch.equal(export.model[n], ema[n]) for n in frozen)  # the frozen backbone is the EMA's
    assert not any(torch.equal(export.model[n], init.model[n]) for n in frozen if init.model[n].is_floating_point())


def _cli_flags(data: Path, out: Path) -> list[str]:
    """`structmar train` flags for 1 fp32 CPU step on the tiny shards, with the default --deepspeed_config."""
    return ["train", "--output_dir", str(out), "--data", str(data / "shards"), "--resume",
            str(data / "init.safetensors"), "--batch_size", "2", "--epochs", "1", "--max_steps", "1",
            "--warmup_epochs", "0", "--lr", "1e-3", "--device", "cpu", "--precision", "fp32", "--num_workers", "0",
            "--sample_every", "0", "--log_every", "1"]


@pytest.mark.slow
def test_in_process_train_from_any_directory_leaves_the_process_as_it_found_it(data, tmp_path, monkeypatch, launch):
    """`structmar train` in this process, twice, from an empty directory with the default (packaged) ZeRO config:
    each run leaves the environment, signal handlers and process group as before, so both form a world of
    their own with the same losses, and processes started from this process afterwards run: a plain one (it
    once inherited RANK and the MASTER_PORT this process held: EADDRINUSE) and the deepspeed launcher's."""
    import os
    import signal

    import deepspeed  # noqa: F401 - importing it sets PYTORCH_NVML_BASED_CUDA_CHECK, once per process
    import torch.distributed as dist

    from structmar.cli import main

    cwd = tmp_path / "empty"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    environ = dict(os.environ)
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)]
    for run in ("first", "second"):
        assert main(_cli_flags(data, tmp_path / run)) == 0
        assert dict(os.environ) == environ
        assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)] == handlers
        assert not dist.is_initialized()
    assert _log_losses(tmp_path / "first") == _log_losses(tmp_path / "second")
    assert list(cwd.iterdir()) == []
    proc = launch(0, ["-m", "structmar", *_cli_flags(data, tmp_path / "second"), "--max_steps", "2"], cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "second" / CHECKPOINTS / LATEST).read_text() == "step_00000002"
    proc = launch(2, ["structmar", *_cli_flags(data, tmp_path / "launched")], cwd=cwd, module=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "launched" / CHECKPOINTS / LATEST).read_text() == "step_00000001"


def test_a_save_that_fails_part_way_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch, capsys):
    """A full disk while checkpoint step 4 is half-written (DeepSpeed's files are in, this rank's state is
    not): one line naming the checkpoint directory and the intact step 2, which `latest` still names, and the
    same command again continues from step 2 with the losses the failed run had."""
    import errno
    import os

    from structmar import atomic
    from structmar.cli import main

    out = tmp_path / "run"
    flags = [*_cli_flags(data, out), "--max_steps", "4", "--save_steps", "2"]
    torch_save = atomic.torch_save

    def disk_full_at_step_4(obj, path):
        if "step_00000004" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        torch_save(obj, path)

    monkeypatch.setattr(atomic, "torch_save", disk_full_at_step_4)
    assert main(flags) == 2
    err = capsys.readouterr().err
    checkpoints = out / CHECKPOINTS
    assert "Traceback" not in err  # the rest of stderr is torch's warnings
    [err] = [line for line in err.splitlines() if line.startswith("structmar: error: ")]
    assert err.startswith("structmar: error: checkpoint step_00000004 "), err
    assert f"in {checkpoints} was not completed (" in err and "No space left on device" in err
    assert "the previous checkpoint step_00000002 is intact and `latest` names it" in err
    assert (checkpoints / LATEST).read_text() == "step_00000002"
    assert any((checkpoints / "step_00000004").iterdir())  # half-written, never named by `latest`
    assert not (checkpoints / "step_00000004" / TRAINER_STATE).exists()
    failed = _log_losses(out)

    monkeypatch.setattr(atomic, "torch_save", torch_save)
    assert main(flags) == 0
    assert "continuing" in capsys.readouterr().out
    assert (checkpoints / LATEST).read_text() == "step_00000004"
    resumed = _log_losses(out)
    assert [resumed[s] for s in (3, 4)] == [failed[s] for s in (3, 4)]


# ---- bad data: --on_bad_data raise / skip under the launcher ------------------------------------------------


def test_the_bad_data_flags_are_train_and_rl_flags():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command in ("train", "rl"):
        args = sub.choices[command].parse_args(["--resume", "x", "--on_bad_data", "skip", "--max_bad_fraction", "0.5"])
        assert (args.on_bad_data, args.max_bad_fraction) == ("skip", 0.5)
    with pytest.raises(ValueError, match="max_bad_fraction 2.0 must lie in"):
        TrainConfig.from_flags(dict(max_bad_fraction=2.0)).validate()


@pytest.fixture(scope="module")
def truncated(data) -> Path:
    """The shards with train2014-000001.tar cut inside a member (read by one of two ranks)."""
    shards = data / "truncated"
    shutil.copytree(data / "shards", shards)
    tar = shards / "train2014-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2 + 600])
    return shards


def _bad_data_run(data, shards: Path, out: Path, launch, *flags: str, ranks: int = 2):
    flags = ["train", "--output_dir", str(out), "--data", str(shards), "--resume", str(data / "init.safetensors"),
             "--batch_size", "2", "--epochs", "1", "--max_steps", "2", "--warmup_epochs", "0", "--lr", "1e-3",
             "--device", "cpu", "--precision", "fp32", "--num_workers", "1", "--sample_every", "0",
             "--log_every", "1", "--deepspeed_config", "zero2", *flags]
    return launch(ranks, ["structmar", *flags], cwd=data, module=True)


@pytest.mark.slow
def test_bad_data_raise_stops_every_rank_with_one_line(data, truncated, launch):
    proc = _bad_data_run(data, truncated, data / "bad_raise", launch)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if "structmar: error:" in line]
    assert any(re.search(r"shard train2014-000001.tar: corrupt or truncated tar after sample \d{12} "
                         r"\((tar header after )?member \d{12}\.\w+\.\w+ cut short\)$", line) for line in lines), lines
    assert any("another rank's data loader failed" in line for line in lines), lines


@pytest.mark.slow
def test_bad_data_skip_counts_over_ranks_then_stops_past_max_bad_fraction(data, truncated, launch):
    out = data / "bad_skip"
    proc = _bad_data_run(data, truncated, out, launch, "--on_bad_data", "skip", "--max_bad_fraction", "0.5")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
    lost = [r["data/skipped_corrupt"] for r in rows if "data/skipped_corrupt" in r]
    assert lost and 0 < lost[-1] < 16  # the samples after the cut, counted on the rank that read them
    assert re.search(r"step 2/2 .* bad data skipped \{'corrupt': \d+\}", proc.stdout)
    # the default --max_bad_fraction (0.01), on one process (stopping every rank is the raise test's): one line
    proc = _bad_data_run(data, truncated, data / "bad_skip_stop", launch, "--on_bad_data", "skip", ranks=0)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert re.search(r"structmar: error: more than 0.01 of rank 0's epoch 0 is bad data .* in 1 shards: "
                     r"train2014-000001.tar; rerun build-shards", output), output[-3000:]


@pytest.mark.slow
def test_a_compiled_run_trains_as_the_eager_one(data, tmp_path):
    """`structmar train --compile aot_eager` (ZeRO-2, in this process) goes through DeepSpeed's engine.compile()
    and torch.compile's graph capture (Dynamo, AOTAutograd) as `--compile inductor` does, minus code generation,
    which takes minutes on this CPU: the same losses as eager, bit for bit, and an export with the eager model's
    names and values (the module is compiled in place); the config records the backend."""
    import torch._dynamo

    from structmar.cli import main

    assert main([*_cli_flags(data, tmp_path / "eager"), "--max_steps", "3"]) == 0
    try:
        assert main([*_cli_flags(data, tmp_path / "compiled"), "--max_steps", "3", "--compile", "aot_eager"]) == 0
    finally:
        torch._dynamo.reset()  # no compiled code or guards left for the tests after this one
    assert _log_losses(tmp_path / "compiled") == _log_losses(tmp_path / "eager")
    eager, compiled = (read_weights(str(tmp_path / run / EXPORT)) for run in ("eager", "compiled"))
    assert compiled.model.keys() == eager.model.keys() and compiled.ema.keys() == eager.ema.keys()
    assert all(torch.equal(compiled.model[k], eager.model[k]) for k in eager.model)
    saved = json.loads((tmp_path / "compiled" / "train_config.json").read_text())["train"]
    assert saved["compile"] == "aot_eager"
