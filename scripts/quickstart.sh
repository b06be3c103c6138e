#!/usr/bin/env bash
# Quickstart: install, start the API and one worker, submit a job over HTTP, print the best
# configuration, then stop what it started.
#
#   ./scripts/quickstart.sh                          # examples/digits-random.yaml
#   ./scripts/quickstart.sh examples/digits-grid.yaml
#
# Everything lives under HPO_DATA_ROOT (default ./hpo-data): the SQLite database, artifacts,
# uploads, reports/ (the job's HTML report) and logs/ of the two background processes. The
# server binds 127.0.0.1 on HPO_PORT (default 8000, or a free port when 8000 is taken);
# HPO_DATABASE_URL and HPO_API_TOKENS are ignored here, so the demo never touches another
# installation's database.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
SPEC="${1:-examples/digits-random.yaml}"
VENV_DIR="${VENV_DIR:-.venv}"

bash scripts/install.sh
case "$VENV_DIR" in /*) BIN="$VENV_DIR/bin" ;; *) BIN="$ROOT/$VENV_DIR/bin" ;; esac
HPO="$BIN/hpo"
PY="$BIN/python"

unset HPO_DATABASE_URL HPO_API_TOKENS HPO_TOKEN HPO_SERVER
export HPO_DATA_ROOT="${HPO_DATA_ROOT:-$ROOT/hpo-data}"
mkdir -p "$HPO_DATA_ROOT/logs"
HPO_DATA_ROOT="$(cd "$HPO_DATA_ROOT" && pwd)"
LOGS="$HPO_DATA_ROOT/logs"
DB_URL="sqlite:///$HPO_DATA_ROOT/hpo.db"

port_free() { "$PY" -c 'import socket, sys; s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null; }
PORT="${HPO_PORT:-8000}"
if ! port_free "$PORT"; then
    PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
URL="http://127.0.0.1:$PORT"

SERVER_PID="" WORKER_PID="" SUBMIT_PID=""
cleanup() {
    local pid
    for pid in $SUBMIT_PID $WORKER_PID $SERVER_PID; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in $SUBMIT_PID $WORKER_PID $SERVER_PID; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "==> starting the API on $URL and one worker (logs: $LOGS)"
"$HPO" serve --host 127.0.0.1 --port "$PORT" >"$LOGS/serve.log" 2>&1 &
SERVER_PID=$!
"$HPO" worker >"$LOGS/worker.log" 2>&1 &
WORKER_PID=$!

died() { # name pid log
    if ! kill -0 "$2" 2>/dev/null; then
        echo "error: the $1 exited; last lines of $3:" >&2
        tail -n 20 "$3" >&2
        exit 1
    fi
}
ready() { "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/readyz", timeout=2)' "$URL" 2>/dev/null; }
for _ in $(seq 1 120); do
    ready && break
    died server "$SERVER_PID" "$LOGS/serve.log"
    sleep 0.5
done
ready || { echo "error: the API did not become ready within 60 s; see $LOGS/serve.log" >&2; exit 1; }

echo "==> hpo submit $SPEC --wait --server $URL"
"$HPO" submit "$SPEC" --wait --server "$URL" &
SUBMIT_PID=$!
# A crashed worker would leave the job queued forever: watch both background processes.
while kill -0 "$SUBMIT_PID" 2>/dev/null; do
    died worker "$WORKER_PID" "$LOGS/worker.log"
    died server "$SERVER_PID" "$LOGS/serve.log"
    sleep 1
done
status=0
wait "$SUBMIT_PID" || status=$?
SUBMIT_PID=""
[ "$status" -ne 2 ] || exit 2 # the spec was refused before any job existed; the reason is above

job="$("$HPO" jobs --server "$URL" --limit 1 --json | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["items"][0]["id"])')"
mkdir -p "$HPO_DATA_ROOT/reports"
REPORT="$HPO_DATA_ROOT/reports/$job.html"
"$HPO" report "$job" -o "$REPORT" --server "$URL" >/dev/null
echo
echo "Job $job: database $DB_URL"
echo "  HTML report:     $REPORT"
echo "  open the study:  $VENV_DIR/bin/optuna-dashboard $DB_URL --port 8080   # then http://127.0.0.1:8080"
echo "  (the same:       $VENV_DIR/bin/hpo dashboard --storage $DB_URL)"
exit "$status"
