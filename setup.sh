#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with the pinned requirements,
# the test tools and dwise_jax itself (editable). Usage: ./setup.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")"
venv="${1:-.venv}"
python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -r requirements-dev.txt
"$venv/bin/python" -m pip install --quiet --no-deps -e .
"$venv/bin/python" -c "import sys, jax, flax; print('dwise_jax environment ready:', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__)"
