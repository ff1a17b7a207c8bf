#!/usr/bin/env bash
# Predict every split with every experiment, then blend the experiments on every split.
#
#   launch/predict_all.sh --workdir DIR [--experiments distillation_001,true_batch_001] \
#       [--splits live_test_main,live_test_bonus,final_test_main,final_test_bonus,folds] \
#       [--data_root DIR] [--gpu 0] [--dry-run] [-- extra flags for dwise_jax.predict]
#
# Runs `python -m dwise_jax.predict --experiment E --split S --workdir DIR` for each experiment
# and split (the folds averaged; `folds` is the scored out-of-fold split), then, with two or
# more experiments, `--experiment E1,E2 --blend_only` for each split (the original's last step).
# One after another on one GPU (--gpu, default as visible), stopping at the first failure; logs
# logs/predict_<experiment>_<split>.log and logs/blend_<split>.log. --data_root goes to every
# call, extra flags (e.g. --anchor_stride=2) to the predictions. --dry-run prints the commands.
# PYTHON names the interpreter (default: python), LOG_DIR the log folder (default: logs).
set -euo pipefail

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

workdir="" experiments="distillation_001,true_batch_001" data_root="" gpu="" dry_run=0
splits="live_test_main,live_test_bonus,final_test_main,final_test_bonus,folds"
parse_args "workdir experiments splits data_root gpu" "dry_run" "$@"
[ -n "$workdir" ] || { echo "--workdir is required" >&2; usage 2; }
IFS=, read -r -a experiment_list <<< "$experiments"
IFS=, read -r -a split_list <<< "$splits"
for split in "${split_list[@]}"; do
  case "$split" in
    live_test_main|live_test_bonus|final_test_main|final_test_bonus|folds) ;;
    *) echo "unknown split: $split" >&2; usage 2 ;;
  esac
done
common=("${PYTHON:-python}" -m dwise_jax.predict)
[ -z "$gpu" ] || common=(env CUDA_VISIBLE_DEVICES="$gpu" "${common[@]}")
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
    step "$logs/predict_${experiment}_${split}.log" "${common[@]}" --experiment "$experiment" \
        --split "$split" --workdir "$workdir" ${data_root:+--data_root "$data_root"} "${extra[@]}"
  done
done
[ "${#experiment_list[@]}" -ge 2 ] || exit 0
for split in "${split_list[@]}"; do
  step "$logs/blend_${split}.log" "${common[@]}" --experiment "$experiments" --blend_only \
      --split "$split" --workdir "$workdir" ${data_root:+--data_root "$data_root"}
done
