#!/usr/bin/env bash
# The whole test suite, on the real Docker engine and real microVMs. `make test` runs it after
# scripts/setup.sh; arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python  # made by setup.sh when $PYTHON cannot install packages
set +e
"$PY" -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  # pytest's 5 means "no tests collected": a suite that tests nothing has failed, whatever else.
  echo "test.sh: pytest collected no tests" >&2
fi
exit "$rc"
