#!/usr/bin/env bash
# Train the folds of one experiment in parallel, one fold per GPU.
#
#   launch/train_folds.sh CONFIG [--folds 0,1,2,3,4,5,6] [--gpus 0,1,2,3,4,5,6] [--all-gpus] \
#       [--dry-run] [-- extra flags for dwise_jax.train, e.g. --workdir=/workdir --data_root=/data]
#
# Fold i of the list runs on GPU i of the list (CUDA_VISIBLE_DEVICES; default every GPU), each
# a process logging to logs/<config>_fold_<k>.log; with fewer GPUs than folds, folds wait for a
# free GPU. --all-gpus: one process trains the folds one after another, each on all the --gpus
# as one data-parallel mesh (log logs/<config>_all_gpus.log). --dry-run prints the commands.
# PYTHON names the interpreter (default: python), LOG_DIR the log folder (default: logs).
set -euo pipefail

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

[ $# -ge 1 ] || usage 2
case "$1" in -h|--help) usage 0 ;; esac
config="$1"; shift
folds="0,1,2,3,4,5,6" gpus="" dry_run=0 all_gpus=0
parse_args "folds gpus" "all_gpus dry_run" "$@"
name=$(basename "$config" .py)
python="${PYTHON:-python}"
logs="${LOG_DIR:-logs}"
[ "$dry_run" -eq 1 ] || mkdir -p "$logs"

if [ "$all_gpus" -eq 1 ]; then
  cmd=("$python" -m dwise_jax.train --config "$config" --folds "$folds" "${extra[@]}")
  [ -z "$gpus" ] || cmd=(env CUDA_VISIBLE_DEVICES="$gpus" "${cmd[@]}")
  log="$logs/${name}_all_gpus.log"
  if [ "$dry_run" -eq 1 ]; then
    printf '%q ' "${cmd[@]}"; printf '> %q 2>&1\n' "$log"
    exit 0
  fi
  echo "folds $folds on GPUs ${gpus:-all}, one after another: log $log"
  exec "${cmd[@]}" > "$log" 2>&1
fi

if [ -z "$gpus" ] && command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)
fi
IFS=, read -r -a fold_list <<< "$folds"
IFS=, read -r -a gpu_list <<< "${gpus:-0}"
n=${#gpu_list[@]} pids=() failed=0
for i in "${!fold_list[@]}"; do
  fold="${fold_list[$i]}" gpu="${gpu_list[$((i % n))]}"
  cmd=(env CUDA_VISIBLE_DEVICES="$gpu" "$python" -m dwise_jax.train --config "$config"
       --folds "$fold" "${extra[@]}")
  log="$logs/${name}_fold_${fold}.log"
  if [ "$dry_run" -eq 1 ]; then
    printf '%q ' "${cmd[@]}"; printf '> %q 2>&1\n' "$log"
    continue
  fi
  # More folds than GPUs: wait for the process that holds this GPU.
  [ "$i" -lt "$n" ] || wait "${pids[$((i - n))]}" || failed=$((failed + 1))
  "${cmd[@]}" > "$log" 2>&1 &
  pids+=("$!")
  echo "fold $fold on GPU $gpu: pid $!, log $log"
done
# The processes not yet waited for: the last one on each GPU.
for pid in "${pids[@]:$(( ${#pids[@]} > n ? ${#pids[@]} - n : 0 ))}"; do
  wait "$pid" || failed=$((failed + 1))
done
if [ "$failed" -gt 0 ]; then
  echo "$failed of ${#fold_list[@]} folds failed: see $logs/${name}_fold_*.log" >&2
  exit 1
fi
