#!/usr/bin/env bash
# The demo: executes the notebooks in notebooks/ against the real engine and prints what they showed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
exec "$PY" -m hotbox_jupyter.demo "$@"
