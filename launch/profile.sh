#!/usr/bin/env bash
# Capture a profile of the train step: a jax.profiler trace of a few steps and the optimised HLO.
#
#   launch/profile.sh CONFIG [--fold 0] [--steps 10:20] [--gpus 0] [--workdir DIR] [--dry-run] \
#       [-- extra flags for dwise_jax.train, e.g. --data_root=/data]
#
# Trains fold --fold from scratch for END steps in a work folder of its own (default
# profiles/<config>_fold<k>_steps<START>-<END>, since the run writes a checkpoint), tracing steps
# START..END (after compilation and warm-up; it also validates before step 0 and after END) and
# writing the train step's HLO. The trace lands in <workdir>/<experiment>/fold_<k>/profile/:
# open it with `tensorboard --logdir <workdir>` or the .trace.json.gz in Perfetto. --gpus sets
# CUDA_VISIBLE_DEVICES (default: every GPU). --dry-run prints the command.
set -euo pipefail

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

[ $# -ge 1 ] || usage 2
case "$1" in -h|--help) usage 0 ;; esac
config="$1"; shift
fold=0 steps="10:20" gpus="" workdir="" dry_run=0
parse_args "fold steps gpus workdir" "dry_run" "$@"
if ! [[ "$steps" =~ ^([0-9]+):([0-9]+)$ ]] || [ "${BASH_REMATCH[1]}" -ge "${BASH_REMATCH[2]}" ]
then
  echo "--steps must be START:END with START < END, got $steps" >&2; exit 2
fi
end="${BASH_REMATCH[2]}"
workdir="${workdir:-profiles/$(basename "$config" .py)_fold${fold}_steps${steps/:/-}}"

cmd=("${PYTHON:-python}" -m dwise_jax.train --config "$config" --folds "$fold" --workdir
     "$workdir" --profile_steps "$steps" --max_steps "$end" --dump_hlo "${extra[@]}")
[ -z "$gpus" ] || cmd=(env CUDA_VISIBLE_DEVICES="$gpus" "${cmd[@]}")
if [ "$dry_run" -eq 1 ]; then
  printf '%q ' "${cmd[@]}"; printf '\n'
  exit 0
fi
if [ -e "$workdir" ]; then
  echo "$workdir exists: a run there would resume instead of profiling; remove it or pass" \
       "--workdir" >&2
  exit 2
fi
"${cmd[@]}"
echo "trace: $workdir/*/fold_$fold/profile/  (tensorboard --logdir $workdir)"
echo "HLO:   $workdir/*/fold_$fold/train_step.hlo.txt"
