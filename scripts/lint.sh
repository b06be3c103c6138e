#!/usr/bin/env bash
# Lint, format check and type check, with the pinned tools from pyproject.toml's [test] extra.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV_DIR="${VENV_DIR:-.venv}"
bash scripts/install.sh test
bin="$VENV_DIR/bin"

status=0
echo "==> ruff check" && "$bin/ruff" check . || status=1
echo "==> ruff format --check" && "$bin/ruff" format --check . || status=1
echo "==> mypy search_spaces service worker hpo bench" && "$bin/mypy" search_spaces service worker hpo bench || status=1
exit "$status"
