#!/usr/bin/env bash
# On a GPU machine: the GPU tests and benchmarks in one run, inside a time budget, each step's output in a
# log of its own under $OUT (or output/gpu_check). Steps run in the order given (default: all, below),
# each with its own limit cut to what is left of GPU_CHECK_SECONDS (default 480: the whole pass stays within
# 8 minutes on one H100, the measurements first); a step that no longer fits is skipped and said so. Wheels
# gathered by tools/gpu_kit.sh (.whl/) are installed first.
#
#   grpo_ref_resident, grpo_ref_offload  MAR-H GRPO step split and peak GPU memory, the frozen reference's
#                                ZeRO-3 partitions resident on the GPU or offloaded to CPU memory (the
#                                difference is what the offload saves, and what it costs in time)
#   train, train_compiled        tools/bench_train.py, MAR-H, one GPU, ZeRO-2 bf16, batch 32, 5 timed steps
#                                after 2 untimed, eager or compiled (`structmar train --compile`; the
#                                compile falls in the untimed steps, its seconds printed as warmup_s)
#   tests                        python -m pytest gpu_tests (FlexAttention backward, flex vs sdpa in the
#                                model, bf16 vs fp32, GRPO on the GPU, the reference engine on the GPU)
#   attention                    tools/bench_attention.py at MAR-H's decoder shapes
#
#   bash tools/gpu_check.sh                   # every step
#   bash tools/gpu_check.sh tests attention   # some
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
out="${OUT:-output/gpu_check}"
budget="${GPU_CHECK_SECONDS:-480}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c \
  "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"; } \
  > "$out/machine.log" 2>&1
cat "$out/machine.log"

grpo=(tools/bench_grpo.py --model mar_huge --batch_size 1 --group_size 4 --num_iter 64 --rl_step_ratio 0.125
      --reward frcnn --steps 1 --warmup 1)
train=(tools/bench_train.py --model mar_huge --batch_size 32 --steps 5 --warmup 2)
declare -A limit=([grpo_ref_resident]=90 [grpo_ref_offload]=120 [train]=60 [train_compiled]=120 [tests]=120
                  [attention]=30)
set_command() {  # cmd=(the command of step $1)
  case $1 in
    grpo_ref_resident) cmd=(python3 "${grpo[@]}" --no-ref_offload) ;;
    grpo_ref_offload) cmd=(python3 "${grpo[@]}" --ref_offload) ;;
    tests) cmd=(python3 -m pytest -q -p no:cacheprovider gpu_tests) ;;
    attention) cmd=(python3 tools/bench_attention.py) ;;
    train) cmd=(python3 "${train[@]}") ;;
    train_compiled) cmd=(python3 "${train[@]}" --compile inductor) ;;
  esac
}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(grpo_ref_resident grpo_ref_offload train train_compiled tests attention)
for name in "${steps[@]}"; do
  if [ -z "${limit[$name]:-}" ]; then echo "gpu_check: unknown step $name (known: ${!limit[*]})" >&2; exit 2; fi
done
status=0
for name in "${steps[@]}"; do
  set_command "$name"
  left=$((budget - SECONDS))
  seconds=$(( limit[$name] < left ? limit[$name] : left ))
  if [ "$seconds" -lt 30 ]; then echo "== $name: skipped, ${left}s of the budget left"; status=1; continue; fi
  echo "== $name (limit ${seconds}s): ${cmd[*]}"
  start=$SECONDS
  timeout "$seconds" "${cmd[@]}" > "$out/$name.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && status=1
  echo "   rc $rc in $((SECONDS - start))s; last line: $(tail -n 1 "$out/$name.log")"
done
exit $status
