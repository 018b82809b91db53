#!/usr/bin/env bash
# The demo: executes the notebooks in notebooks/ against the real engine and prints what they showed.
# `make demo` runs it after scripts/setup.sh; arguments go to the demo module.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python  # made by setup.sh when $PYTHON cannot install packages
if ! "$PY" -c 'import hotbox_jupyter.demo' >/dev/null 2>&1; then
  echo "demo.sh: hotbox_jupyter.demo cannot be imported with $PY; run scripts/setup.sh first" >&2
  "$PY" -c 'import hotbox_jupyter.demo'  # shows why
  exit 1
fi
exec "$PY" -m hotbox_jupyter.demo "$@"
