#!/usr/bin/env bash
# Install the project with its test tools, then run the whole test suite (slow and PostgreSQL
# tests included; PostgreSQL tests skip with the reason when 127.0.0.1:5432 is down, and fail
# instead when CI is set).
#
#   ./scripts/test.sh                      # everything
#   ./scripts/test.sh tests/hpo -x         # any pytest arguments
#
# "No tests collected" (pytest exit 5) is a failure: a suite that runs nothing proves nothing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV_DIR="${VENV_DIR:-.venv}"
bash scripts/install.sh test

# Tests never reach the network: MNIST / Fashion-MNIST downloads are off.
export HPO_OFFLINE=1 PYTHONUNBUFFERED=1

status=0
"$VENV_DIR/bin/python" -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests (exit 5); treating that as a failure" >&2
fi
exit "$status"
