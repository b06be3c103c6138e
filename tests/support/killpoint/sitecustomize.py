"""Loaded at start-up by an ``hpo`` process whose PYTHONPATH holds this folder (see
``tests.support.killpoint.env``): when ``HPO_TEST_SIGKILL_AT`` names ``module:attribute``
(a function, or ``Class.method``), the process SIGKILLs itself the first time that is
called, so a fault test kills a real process at an exact point of its code."""

from __future__ import annotations

import importlib
import os
import signal
from typing import Any

_target = os.environ.get("HPO_TEST_SIGKILL_AT")
if _target:
    _module_name, _, _path = _target.partition(":")
    _owner: Any = importlib.import_module(_module_name)
    *_parents, _name = _path.split(".")
    for _part in _parents:
        _owner = getattr(_owner, _part)

    def _killed(*args: Any, **kwargs: Any) -> Any:
        print(f"killpoint: SIGKILL at {_target}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(_owner, _name, _killed)
