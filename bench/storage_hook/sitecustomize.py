"""Started by Python in a process whose PYTHONPATH holds this folder: the benchmark's storage
clock for its service workers (see bench/storage_clock.py)."""

import os
import sys

if os.environ.get("STORAGE_CLOCK_DIR"):
    sys.path.insert(0, os.environ["STORAGE_CLOCK_REPO"])
    from bench.storage_clock import start_from_env

    _clock = start_from_env()
