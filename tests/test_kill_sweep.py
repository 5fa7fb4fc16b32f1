"""tools/kill_sweep.py at a small N: `kill -9` of `structmar build-shards` at seeded random moments and of `structmar
train` (the launcher and its 2 ranks) at the moment a save is most exposed, then the same command again:
identical to an uninterrupted run, nothing half-written left under a final name, nothing left over."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import kill_sweep  # noqa: E402


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    work = tmp_path_factory.mktemp("kill_sweep")
    return work, kill_sweep.commands(kill_sweep.prepare(work))


def _clean(trial: kill_sweep.Trial) -> None:
    assert not trial.torn, trial.torn
    assert not trial.differences, trial.differences
    assert not trial.leftovers, trial.leftovers


@pytest.mark.slow
def test_build_shards_killed_at_random_reruns_to_the_same_bytes(commands):
    work, cmds = commands
    trials = kill_sweep.sweep(cmds["build-shards"], work, kills=2, seed=0)
    assert len(trials) == 2 and any(t.landed for t in trials)
    for trial in trials:
        _clean(trial)


@pytest.mark.slow
def test_train_killed_right_after_its_last_checkpoint_resumes_exactly(commands):
    """The kill lands once `latest` names the last checkpoint: before the prune of the oldest one and the export
    of the last one could finish. The rerun (it continues its own output_dir) must still end with the final
    export and the pruned checkpoint set, and log the reference's losses. (Kills at random moments of train, rl
    and eval: `tools/kill_sweep.py`, whose figures are in docs/reliability.md.)"""
    work, cmds = commands
    train = cmds["train"]
    ref = work / "train" / "ref"
    ref.parent.mkdir()
    kill_sweep.run_to_end(train, ref)
    assert (ref / "checkpoints" / "latest").read_text() == "step_00000012"

    def last_checkpoint_named(out: Path) -> bool:
        latest = out / "checkpoints" / "latest"
        return latest.is_file() and latest.read_text() == "step_00000012"

    out = work / "train" / "last_save"
    assert kill_sweep.run_killed(train, out, kill_at=600, when=last_checkpoint_named)
    with safe_open(str(out / "checkpoint-last.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "8"  # the kill came before the last export
    assert kill_sweep.torn(out) == []
    kill_sweep.run_to_end(train, out)
    assert kill_sweep.compare(ref, out) == [] and kill_sweep.leftovers(ref, out) == []
