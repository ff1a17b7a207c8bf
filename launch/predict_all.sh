#!/usr/bin/env bash
# Predict every split with every experiment, then blend the experiments on every split.
#
#   launch/predict_all.sh --workdir DIR [--experiments distillation_001,true_batch_001] \
#       [--splits live_test_main,live_test_bonus,final_test_main,final_test_bonus,folds] \
#       [--data_root DIR] [--gpu 0] [--dry-run] [-- extra flags for dwise_jax.predict]
#
# For each experiment and split: python -m dwise_jax.predict --experiment E --split S
# --workdir DIR (each fold model of E predicts, the folds are averaged; `folds` is the
# out-of-fold split, scored). Then, with two or more experiments, for each split:
# python -m dwise_jax.predict --experiment E1,E2 --blend_only --split S --workdir DIR (the
# mean of the experiments' predictions, the original's last step). --data_root goes to both. Runs one after another on
# one GPU (--gpu, default as visible); stops at the first failure. Logs:
# logs/predict_<experiment>_<split>.log and logs/blend_<split>.log. Extra flags go to every
# predict call (e.g. --anchor_stride=2). --dry-run prints the commands. PYTHON names the
# interpreter (default: python), LOG_DIR the log folder (default: logs).
set -euo pipefail

usage() {  # the comment block at the top of this file
  awk 'NR > 1 && !/^#/ { exit } NR > 1 && !/^#SBATCH/ { sub(/^# ?/, ""); print }' "$0"
  exit "${1:-0}"
}

workdir=""
experiments="distillation_001,true_batch_001"
splits="live_test_main,live_test_bonus,final_test_main,final_test_bonus,folds"
data_root=""
gpu=""
dry_run=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --workdir) workdir="$2"; shift 2 ;;
    --experiments) experiments="$2"; shift 2 ;;
    --splits) splits="$2"; shift 2 ;;
    --data_root) data_root="$2"; shift 2 ;;
    --gpu) gpu="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
done
[ -n "$workdir" ] || { echo "--workdir is required" >&2; usage 2; }
IFS=, read -r -a experiment_list <<< "$experiments"
IFS=, read -r -a split_list <<< "$splits"
for split in "${split_list[@]}"; do
  case "$split" in
    live_test_main|live_test_bonus|final_test_main|final_test_bonus|folds) ;;
    *) echo "unknown split: $split" >&2; usage 2 ;;
  esac
done
python="${PYTHON:-python}"
prefix=()
[ -z "$gpu" ] || prefix=(env CUDA_VISIBLE_DEVICES="$gpu")
logs="${LOG_DIR:-logs}"
[ "$dry_run" -eq 1 ] || mkdir -p "$logs"

step() {  # step LOG COMMAND...: print it (dry run) or run it into LOG
  local log="$1"; shift
  if [ "$dry_run" -eq 1 ]; then
    printf '%q ' "$@"; printf '> %q 2>&1\n' "$log"
    return
  fi
  echo "$* > $log"
  "$@" > "$log" 2>&1 || { echo "failed: see $log" >&2; exit 1; }
}

for experiment in "${experiment_list[@]}"; do
  for split in "${split_list[@]}"; do
    cmd=("${prefix[@]}" "$python" -m dwise_jax.predict --experiment "$experiment"
         --split "$split" --workdir "$workdir")
    [ -z "$data_root" ] || cmd+=(--data_root "$data_root")
    step "$logs/predict_${experiment}_${split}.log" "${cmd[@]}" "${extra[@]}"
  done
done
if [ "${#experiment_list[@]}" -ge 2 ]; then
  for split in "${split_list[@]}"; do
    cmd=("${prefix[@]}" "$python" -m dwise_jax.predict --experiment "$experiments"
         --blend_only --split "$split" --workdir "$workdir")
    [ -z "$data_root" ] || cmd+=(--data_root "$data_root")
    step "$logs/blend_${split}.log" "${cmd[@]}"
  done
fi
