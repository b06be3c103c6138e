#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment and install the project into it.
#
#   scripts/install.sh          # runtime: torch==2.13.0, then `pip install -e .`
#   scripts/install.sh test     # plus the test/lint tools: `pip install -e '.[test]'`
#
# Needs only Python >= 3.11 with its venv module. torch is installed first, pinned, on its own:
# `pip install torch==2.13.0` is the CPU build that these machines install offline (from the
# local wheel directory in pip's config); letting pip resolve torch any other way can pull
# gigabytes of CUDA wheels. Elsewhere, set TORCH_INDEX_URL (for example
# https://download.pytorch.org/whl/cpu) to choose where that one wheel comes from.
#
# Environment: VENV_DIR (default .venv), PYTHON (interpreter used to create the venv),
# TORCH_INDEX_URL (see above). Re-running is cheap: a stamp file records what was installed
# for which pyproject.toml, and nothing is reinstalled while both are unchanged.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS="${1:-}"
VENV_DIR="${VENV_DIR:-.venv}"
TORCH_VERSION="2.13.0"
TORCH_SPEC="torch==$TORCH_VERSION"
TRITON_SPEC="triton==3.6.0"

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.11 python3 python; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        # venv without ensurepip (Debian's python3 minus python3-venv) cannot make a usable venv.
        if "$candidate" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' \
            >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    echo "error: no Python >= 3.11 with the venv module found (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

if [ ! -x "$VENV_DIR/bin/python" ]; then
    py="$(find_python)"
    echo "==> creating $VENV_DIR with $py ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
    "$py" -m venv "$VENV_DIR"
fi
PY="$VENV_DIR/bin/python"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "error: $VENV_DIR uses Python < 3.11; remove it and re-run" >&2
    exit 1
}

stamp="$VENV_DIR/.hpo-installed${EXTRAS:+-$EXTRAS}"
want="$(cat pyproject.toml scripts/install.sh | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
up_to_date() { [ -f "$1" ] && [ "$(cat "$1")" = "$want" ]; }
# The runtime is part of every extra, so a venv installed with [test] also serves plain use.
if { up_to_date "$stamp" || { [ -z "$EXTRAS" ] && up_to_date "$VENV_DIR/.hpo-installed-test"; }; } &&
    "$VENV_DIR/bin/hpo" --help >/dev/null 2>&1; then
    echo "==> $VENV_DIR is up to date${EXTRAS:+ (with [$EXTRAS])}"
    exit 0
fi

# -qq: errors only (pip's per-index warnings would bury them); the steps are announced instead.
pip_install() { "$PY" -m pip install --disable-pip-version-check -qq "$@"; }

if ! "$PY" -c 'import importlib.metadata as m, sys; sys.exit(m.version("torch").split("+")[0] != sys.argv[1])' \
    "$TORCH_VERSION" >/dev/null 2>&1; then
    echo "==> installing $TORCH_SPEC${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        pip_install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
    else
        pip_install "$TORCH_SPEC"
    fi
fi
target="."
[ -z "$EXTRAS" ] || target=".[$EXTRAS]"
echo "==> installing the project and its pinned dependencies: pip install -e '$target' (a minute or two)"
pip_install -e "$target"
if [ "$EXTRAS" = "test" ] && ! "$PY" -c 'import triton' >/dev/null 2>&1; then
    # torch's CPU wheels come without Triton; the fused CUDA optimizer's tests then run its
    # kernel through Triton's interpreter (tests/worker/population/test_population_fused_update.py).
    # torch's CUDA wheels bring their own Triton, which this leaves alone.
    echo "==> installing $TRITON_SPEC for the interpreted kernel tests"
    pip_install "$TRITON_SPEC"
fi
echo "$want" >"$stamp"
echo "==> ready: $VENV_DIR ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
