# Sourced by the launch scripts: their --help and their argument loop.
# shellcheck shell=bash

usage() {  # the comment block at the top of the calling script
  awk 'NR > 1 && !/^#/ { exit } NR > 1 && !/^#SBATCH/ { sub(/^# ?/, ""); print }' "$0"
  exit "${1:-0}"
}

# parse_args "NAMES" "SWITCHES" ARGS...: `--name VALUE` sets $name for each of NAMES, `--switch`
# sets $switch=1 for each of SWITCHES (dashes become underscores), `--` puts the rest in the
# array `extra`, -h/--help prints the usage; anything else is an error (exit 2).
# shellcheck disable=SC2034  # extra is the caller's
parse_args() {
  local names=" $1 " switches=" $2 " name
  shift 2
  extra=()
  while [ $# -gt 0 ]; do
    name="${1#--}"
    name="${name//-/_}"
    if [ "$1" = -- ]; then
      shift
      extra=("$@")
      return
    elif [ "$1" = -h ] || [ "$1" = --help ]; then
      usage 0
    elif [[ $1 == --* && $names == *" $name "* && $# -ge 2 ]]; then
      declare -g "$name=$2"
      shift 2
    elif [[ $1 == --* && $switches == *" $name "* ]]; then
      declare -g "$name=1"
      shift
    else
      echo "unknown argument: $1" >&2
      usage 2
    fi
  done
}
