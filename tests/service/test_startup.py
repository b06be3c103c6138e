"""Objects alive after start-up are frozen out of garbage collection (service.startup)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import gc, sys
{imports}
before = len(gc.get_objects())
{call}
print(before, gc.get_freeze_count(), len(gc.get_objects()))
"""


@pytest.mark.parametrize(
    ("imports", "call"),
    [
        # the worker: warm_up ends by freezing
        ("from worker.runtime import warm_up", "warm_up()"),
        # the API server: its lifespan start-up ends by freezing
        (
            "from fastapi.testclient import TestClient\nfrom service.api.app import create_app\n"
            "from service.config import Settings\n"
            "client = TestClient(create_app(Settings(data_root=sys.argv[1])))",
            "client.__enter__()",
        ),
    ],
    ids=["worker", "api"],
)
def test_start_up_freezes_what_it_imported(imports: str, call: str, tmp_path: object) -> None:
    script = CHECK.format(imports=imports, call=call)
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True
    )
    before, frozen, tracked = map(int, out.stdout.split())
    assert before > 50_000  # torch / FastAPI and friends
    assert frozen >= before * 0.9  # what was alive is frozen ...
    assert tracked < 0.05 * frozen  # ... and full collections no longer walk it
