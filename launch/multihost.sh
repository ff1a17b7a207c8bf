#!/usr/bin/env bash
# Train folds on several hosts at once: one process per host, all the GPUs of all the hosts in
# one data-parallel mesh (jax.distributed; the global batch is split over every GPU).
#
#   launch/multihost.sh CONFIG --hosts host0,host1[,...] [--port 12355] [--folds 0] \
#       [--dir /path/to/dwise_jax] [--dry-run] [-- extra flags for dwise_jax.train]
#
# Starts `python -m dwise_jax.train` on each host over ssh (keys, no password) with
# JAX_COORDINATOR_ADDRESS=host0:PORT, JAX_NUM_PROCESSES=<hosts> and JAX_PROCESS_ID=<index>
# (dwise_jax.sharding.initialize_distributed). The repository (--dir, default this checkout),
# --data_root and --workdir must have the same path on every host, the workdir on a shared
# filesystem. Logs: logs/<config>_host<index>.log (LOG_DIR: another folder). --dry-run prints
# the ssh commands. Other launchers: set those three variables per process; SLURM:
# slurm_train.sbatch.
set -euo pipefail

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

[ $# -ge 1 ] || usage 2
case "$1" in -h|--help) usage 0 ;; esac
config="$1"; shift
hosts="" port=12355 folds="" dir="$(cd "$(dirname "$0")/.." && pwd)" dry_run=0
parse_args "hosts port folds dir" "dry_run" "$@"
[ -n "$hosts" ] || { echo "--hosts is required" >&2; usage 2; }
IFS=, read -r -a host_list <<< "$hosts"
name=$(basename "$config" .py)
logs="${LOG_DIR:-logs}"
[ "$dry_run" -eq 1 ] || mkdir -p "$logs"

pids=()
for i in "${!host_list[@]}"; do
  train=(env JAX_COORDINATOR_ADDRESS="${host_list[0]}:$port"
         JAX_NUM_PROCESSES="${#host_list[@]}" JAX_PROCESS_ID="$i" "${PYTHON:-python}"
         -m dwise_jax.train --config "$config" ${folds:+--folds "$folds"} "${extra[@]}")
  # ssh hands the remote shell one string: quote every word for it.
  remote="cd $(printf '%q' "$dir") && $(printf '%q ' "${train[@]}")"
  cmd=(ssh -o BatchMode=yes "${host_list[$i]}" "$remote")
  log="$logs/${name}_host${i}.log"
  if [ "$dry_run" -eq 1 ]; then
    printf '%q ' "${cmd[@]}"; printf '> %q 2>&1\n' "$log"
    continue
  fi
  "${cmd[@]}" > "$log" 2>&1 &
  pids+=("$!")
  echo "process $i on ${host_list[$i]}: pid $!, log $log"
done
failed=0
for pid in "${pids[@]}"; do
  wait "$pid" || failed=$((failed + 1))
done
if [ "$failed" -gt 0 ]; then
  echo "$failed of ${#host_list[@]} processes failed: see $logs/${name}_host*.log" >&2
  exit 1
fi
