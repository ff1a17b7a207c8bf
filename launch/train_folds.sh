#!/usr/bin/env bash
# Train the folds of one experiment in parallel, one fold per GPU.
#
#   launch/train_folds.sh CONFIG [--folds 0,1,2,3,4,5,6] [--gpus 0,1,2,3,4,5,6] [--dry-run] \
#       [-- extra flags for dwise_jax.train, e.g. --workdir=/workdir --data_root=/data]
#
# Fold i of the list runs on GPU i of the list (CUDA_VISIBLE_DEVICES), each as its own process
# with its own log in logs/<config>_fold_<k>.log. With fewer GPUs than folds, folds wait for a
# free GPU. --dry-run prints the commands instead of running them.
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

[ $# -ge 1 ] || usage 2
config="$1"; shift
folds="0,1,2,3,4,5,6"
gpus=""
dry_run=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --folds) folds="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
done
if [ -z "$gpus" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)
  else
    gpus="0"
  fi
fi
IFS=, read -r -a fold_list <<< "$folds"
IFS=, read -r -a gpu_list <<< "$gpus"
name=$(basename "$config" .py)
python="${PYTHON:-python}"
[ "$dry_run" -eq 1 ] || mkdir -p logs

pids=()
for i in "${!fold_list[@]}"; do
  fold="${fold_list[$i]}"
  gpu="${gpu_list[$((i % ${#gpu_list[@]}))]}"
  cmd=(env CUDA_VISIBLE_DEVICES="$gpu" "$python" -m dwise_jax.train --config "$config"
       --folds "$fold" "${extra[@]}")
  log="logs/${name}_fold_${fold}.log"
  if [ "$dry_run" -eq 1 ]; then
    printf '%q ' "${cmd[@]}"; printf '> %q 2>&1\n' "$log"
    continue
  fi
  # More folds than GPUs: wait for the process that holds this GPU.
  if [ "$i" -ge "${#gpu_list[@]}" ]; then
    wait "${pids[$((i - ${#gpu_list[@]}))]}"
  fi
  "${cmd[@]}" > "$log" 2>&1 &
  pids+=("$!")
  echo "fold $fold on GPU $gpu: pid $!, log $log"
done
[ "$dry_run" -eq 1 ] || wait
