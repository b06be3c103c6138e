from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_the_api_side_never_imports_torch_or_sklearn(tmp_path: Path) -> None:
    # What the API process does: import the package, store and list an upload.
    code = (
        "import sys, pathlib\n"
        "import service.datasets as d\n"
        "info = d.store_upload(b'a,label\\n1,0\\n2,1\\n', 'x.csv', pathlib.Path(sys.argv[1]))\n"
        "assert d.list_uploads(pathlib.Path(sys.argv[1])) == [info]\n"
        "d.describe_builtin_datasets(pathlib.Path(sys.argv[1]))\n"
        "print(sorted(m for m in ('torch', 'sklearn', 'scipy') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HPO_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == "[]"
