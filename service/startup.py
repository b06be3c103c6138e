"""What a long-lived process (API server, worker) does once its start-up work is done."""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Keep the objects alive now out of every later garbage collection.

    A full (generation 2) collection walks every object the collector tracks. After importing
    torch, scikit-learn, Optuna and SQLAlchemy a worker holds about 400,000 of them, almost all
    module-level and alive for good, and each full collection took 110-190 ms (seen with
    gc.callbacks in the service benchmark's worker: one fell at the start of the measured job,
    before its first trial). ``gc.freeze`` moves them to a permanent generation that
    collections skip (the use the Python docs give for long-lived servers), so later
    collections walk only what was allocated since. No collection first: it would cost that
    same full walk, and found 15 unreachable objects after a worker's start-up. Nor a count
    of what was frozen: ``gc.get_freeze_count`` walks the permanent generation, 39 ms here,
    paid by every ``hpo run`` (tests/service/test_startup.py counts it instead).
    """
    gc.freeze()
