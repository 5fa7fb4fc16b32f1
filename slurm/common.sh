# shellcheck shell=bash
# Shared by the sbatch scripts (sourced from the repository root, where jobs are submitted).
#
# Launch model: one srun task per GPU on every node; structmar maps SLURM_PROCID / SLURM_LOCALID /
# SLURM_STEP_NUM_TASKS onto torch.distributed's RANK / LOCAL_RANK / WORLD_SIZE and takes the first
# node as the rendezvous host. srun forwards signals to every task, so a preemption notice reaches
# each trainer directly and the checkpoint it triggers is never cut short by a per-node launcher's
# kill timeout (torchrun SIGKILLs its workers 30 s after a forwarded signal); no ssh between nodes.

# NCCL: fail fast on a broken collective instead of hanging until the job's time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-4}}"
# Site-specific interfaces (e.g. NCCL_SOCKET_IFNAME=ib0, NCCL_IB_HCA=mlx5) come from the caller's environment.

STRUCTMAR="${STRUCTMAR:-python -m structmar}"

# run_requeueable LOGDIR CMD...: run CMD as one srun step per GPU. On USR1 (sbatch --signal=B:USR1@120)
# the signal is passed to the tasks, which checkpoint and exit; the job is then requeued, and the
# requeued job reruns the same command, which resumes from its output directory by itself.
run_requeueable() {
  local logdir="$1"; shift
  mkdir -p "$logdir"
  local preempted=0 pid
  trap 'preempted=1; echo "structmar: USR1 at $(date -Is): checkpointing, then requeue"; kill -USR1 "$pid" 2>/dev/null || true' USR1
  srun --kill-on-bad-exit=1 --output "$logdir/%x-%j-rank%t.log" "$@" &
  pid=$!
  local rc=0
  # wait returns early when a trapped signal arrives; keep waiting until srun itself exits
  while true; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - USR1
  if [ "$preempted" = 1 ] && [ "$rc" = 0 ]; then
    echo "structmar: checkpoint saved; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
  fi
  return "$rc"
}
