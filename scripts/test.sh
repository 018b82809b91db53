#!/usr/bin/env bash
# The whole test suite, on the real Docker engine and real microVMs. Called by `make test` after setup.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
set +e
"$PY" -m pytest "$@"
rc=$?
set -e
# pytest's 5 means "no tests collected": that is a failure of the suite, not a pass.
exit $rc
