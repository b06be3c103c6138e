"""Hostile input: a corpus of malformed specs (422 naming the field), dataset references that
try to leave the data directory (422, nothing created outside it), corrupt uploads (400 with a
reason, nothing stored), and no code path that unpickles or evaluates anything."""

from __future__ import annotations

import ast
import gzip
import io
import json
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from tests.security.conftest import ALICE

REPO = Path(__file__).resolve().parents[2]


def base(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "hostile",
        "dataset": {"name": "digits"},
        "model": {"hidden_layers": [16]},
        "search_space": {
            "parameters": {
                "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
                "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            }
        },
        "n_trials": 3,
        "training": {"max_epochs": 2},
    }
    spec.update(over)
    return spec


def space(**params: Any) -> dict[str, Any]:
    return {"parameters": params}


LR = "search_space.parameters.learning_rate"
MALFORMED: list[tuple[str, Any, str]] = [
    # (case, request body (dict, or raw JSON text), a field the answer must name)
    ("n_trials is text", base(n_trials="ten"), "n_trials"),
    ("n_trials negative", base(n_trials=-3), "n_trials"),
    ("n_trials huge", base(n_trials=10**30), "n_trials"),
    ("epochs is text", base(training={"max_epochs": "many"}), "training.max_epochs"),
    ("epochs zero", base(training={"max_epochs": 0}), "training.max_epochs"),
    ("hidden_layers not a list", base(model={"hidden_layers": "wide"}), "model.hidden_layers"),
    ("negative width", base(model={"hidden_layers": [16, -4]}), "model.hidden_layers"),
    ("dataset is a string", base(dataset="digits"), "dataset"),
    ("unknown dataset", base(dataset={"name": "imagenet"}), "dataset"),
    ("unknown field", base(nope=1), "nope"),
    ("name with a path", base(name="../etc"), "name"),
    (
        "negative learning rate",
        base(search_space=space(learning_rate={"type": "float", "low": -1, "high": 0.1})),
        LR,
    ),
    (
        "NaN bound",
        '{"name": "x", "n_trials": 2, "search_space": {"parameters": {"learning_rate": {"type": "float", "low": NaN, "high": 0.1}}}}',
        LR,
    ),
    (
        "infinite bound",
        '{"name": "x", "n_trials": 2, "search_space": {"parameters": {"learning_rate": {"type": "float", "low": 0.001, "high": Infinity}}}}',
        LR,
    ),
    (
        "low > high",
        base(search_space=space(learning_rate={"type": "float", "low": 0.1, "high": 0.001})),
        LR,
    ),
    (
        "log with low = 0",
        base(
            search_space=space(learning_rate={"type": "float", "low": 0, "high": 0.1, "log": True})
        ),
        LR,
    ),
    (
        "log with low < 0",
        base(
            search_space=space(
                weight_decay={"type": "float", "low": -1e-3, "high": 0.1, "log": True}
            )
        ),
        "search_space.parameters.weight_decay",
    ),
    (
        "int low > high",
        base(search_space=space(batch_size={"type": "int", "low": 256, "high": 16})),
        "search_space.parameters.batch_size",
    ),
    (
        "unknown optimizer",
        base(search_space=space(optimizer={"type": "categorical", "choices": ["adam", "lion"]})),
        "search_space.parameters.optimizer",
    ),
    (
        "unknown init",
        base(search_space=space(init={"type": "categorical", "choices": ["he_normal", "zeros"]})),
        "search_space.parameters.init",
    ),
    (
        "empty categorical",
        base(search_space=space(optimizer={"type": "categorical", "choices": []})),
        "search_space.parameters.optimizer",
    ),
    (
        "unknown parameter",
        base(search_space=space(rm_rf={"type": "fixed", "value": 1})),
        "search_space",
    ),
    (
        "parameter kind is code",
        base(search_space=space(learning_rate={"type": "__import__('os')"})),
        LR,
    ),
    ("unknown preset", base(search_space="../../etc/passwd"), "search_space"),
    (
        "huge grid",
        {
            **base(n_trials=None),
            "sampler": {"type": "grid"},
            "search_space": space(
                batch_size={"type": "int", "low": 1, "high": 100_000},
                hidden_width={"type": "int", "low": 1, "high": 100_000},
            ),
        },
        "search_space",
    ),
    ("body is a list", [], "body"),
    ("body is not JSON", "{'name': 'x',", "body"),
]


@pytest.mark.parametrize(("case", "body", "field"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_specs_get_422_naming_the_field(
    client: TestClient, case: str, body: Any, field: str
) -> None:
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if v is not None}
    for path in ("/jobs", "/jobs/validate"):
        if isinstance(body, str):
            r = client.post(
                path, content=body, headers={**ALICE, "Content-Type": "application/json"}
            )
        else:
            r = client.post(path, json=body, headers=ALICE)
        assert r.status_code == 422, (case, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        problem = r.json()
        fields = [problem.get("field") or ""] + [e["field"] for e in problem.get("errors") or []]
        assert any(f == field or f.startswith(field + ".") for f in fields), (case, problem)
        assert problem["detail"]
    assert client.get("/jobs", headers=ALICE).json()["items"] == []


def _tree(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under root (but the database files), with size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.parent == skip and name.startswith("hpo.db"):
                continue
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def test_dataset_paths_cannot_leave_the_data_directory(
    client: TestClient, settings: Settings, tmp_path: Path, figure: Callable[[str], None]
) -> None:
    data_dir = settings.resolved_data_dir
    outside = tmp_path / "secret.csv"
    outside.write_text("a,label\n1,0\n2,1\n3,0\n4,1\n")
    (data_dir / "link.csv").symlink_to(outside)
    (data_dir / "sub").mkdir()
    (data_dir / "sub" / "uplink").symlink_to(tmp_path, target_is_directory=True)
    (data_dir / "ok.csv").write_text(outside.read_text())
    hostile = [
        "../secret.csv",
        "sub/../../secret.csv",
        "..\\secret.csv",
        str(outside),
        "/etc/passwd",
        "~/secret.csv",
        "C:\\Windows\\win.ini",
        "ok.csv\x00.png",
        "link.csv",
        "sub/uplink/secret.csv",
        "file:///etc/passwd",
        "",
    ]
    before = _tree(tmp_path, settings.data_root)
    for path in hostile:
        for fmt in ("csv", "npz"):
            body = base(dataset={"name": fmt, "path": path})
            for route in ("/jobs", "/jobs/validate"):
                r = client.post(route, json=body, headers=ALICE)
                assert r.status_code == 422, (path, r.text)
                fields = [r.json().get("field")] + [
                    e["field"] for e in r.json().get("errors") or []
                ]
                assert any(f and f.startswith("dataset") for f in fields), (path, r.json())
    # The legitimate file is accepted, so the refusals above are about the paths.
    ok = client.post(
        "/jobs/validate", json=base(dataset={"name": "csv", "path": "ok.csv"}), headers=ALICE
    )
    assert ok.status_code == 200, ok.text
    assert _tree(tmp_path, settings.data_root) == before  # nothing created, nothing touched
    assert client.get("/jobs", headers=ALICE).json()["items"] == []
    figure(
        f"{len(hostile)} hostile paths x csv/npz x 2 routes: all 422 on dataset.path; "
        "no file created or modified"
    )


class _Marker:
    """Unpickling this creates a file: proof that something unpickled user data."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def corrupt_uploads(marker: Path) -> list[tuple[str, str, bytes]]:
    good_csv = b"a,b,label\n" + b"".join(f"{i},{i % 3},{i % 2}\n".encode() for i in range(30))
    good_npz = _npz(X=np.ones((30, 3), dtype=np.float32), y=np.arange(30) % 2)
    objects = np.empty(30, dtype=object)
    objects[:] = [_Marker(marker) for _ in range(30)]
    pickled_raw = io.BytesIO()
    with zipfile.ZipFile(pickled_raw, "w") as z:  # a bare pickle dressed as an .npy member
        z.writestr("X.npy", pickle.dumps(np.ones((30, 3))))
        z.writestr("y.npy", pickle.dumps(_Marker(marker)))
    return [
        ("truncated gzip", "data.csv", gzip.compress(good_csv)[:40]),
        ("gzip file", "data.csv.gz", gzip.compress(good_csv)),
        ("ragged rows", "data.csv", good_csv + b"1,2\n"),
        ("NaN feature", "data.csv", good_csv + b"nan,1,0\n"),
        ("infinite feature", "data.csv", good_csv + b"inf,1,0\n"),
        ("text in a numeric column", "data.csv", good_csv + b"1,abc,0\n"),
        ("no label column", "data.csv", b"a,b\n1,2\n3,4\n"),
        ("header only", "data.csv", b"a,b,label\n"),
        ("binary garbage", "data.csv", bytes(range(256)) * 4),
        ("empty file", "data.csv", b""),
        ("truncated npz", "data.npz", good_npz[: len(good_npz) // 2]),
        ("not a zip", "data.npz", b"PK\x03\x04 not really"),
        ("pickled object array", "data.npz", _npz(X=objects, y=np.arange(30) % 2)),
        ("pickled object labels", "data.npz", _npz(X=np.ones((30, 3)), y=objects)),
        ("raw pickle members", "data.npz", pickled_raw.getvalue()),
        ("NaN in npz", "data.npz", _npz(X=np.full((30, 3), np.nan), y=np.arange(30) % 2)),
        ("python script", "data.py", b"import os\nos.system('id')\n"),
    ]


def test_corrupt_uploads_get_400_with_a_reason(
    client: TestClient, settings: Settings, tmp_path: Path, figure: Callable[[str], None]
) -> None:
    marker = tmp_path / "UNPICKLED"
    cases = corrupt_uploads(marker)
    for case, filename, content in cases:
        r = client.post("/datasets", files={"file": (filename, content)}, headers=ALICE)
        assert r.status_code == 400, (case, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json"), case
        detail = r.json()["detail"]
        assert len(detail) > 15, (case, detail)  # a reason, not just "bad request"
    assert not marker.exists(), "an upload was unpickled"
    assert client.get("/datasets", headers=ALICE).json()["uploads"] == []
    stored = [p for p in settings.resolved_upload_dir.rglob("*") if p.is_file()]
    assert stored == [], stored
    figure(
        f"{len(cases)} corrupt uploads (csv, gzip, npz, pickles): all 400 with a reason; "
        "nothing stored; nothing unpickled"
    )


# Nothing in the project unpickles or evaluates ------------------------------------------------

_SKIP_DIRS = {
    ".venv",
    "venv",
    ".git",
    "build",
    "dist",
    "node_modules",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
}


def _project_python_files() -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        out += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return out


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    aliases: dict[str, str] = {}  # local name -> "module.attr" for from-imports
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = ""
        if isinstance(f, ast.Name):
            name = aliases.get(f.id, f.id)
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            name = f"{f.value.id}.{f.attr}"
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        if name in ("eval", "exec", "builtins.eval", "builtins.exec") or name in (
            "pickle.load",
            "pickle.loads",
            "cPickle.load",
            "cPickle.loads",
            "dill.load",
            "dill.loads",
            "joblib.load",
            "marshal.loads",
            "shelve.open",
            "pickle.Unpickler",
        ):
            found.append((node.lineno, name))
        elif name == "torch.load":
            wo = kwargs.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append((node.lineno, "torch.load without weights_only=True"))
        elif name in ("np.load", "numpy.load"):
            ap = kwargs.get("allow_pickle")
            if isinstance(ap, ast.Constant) and ap.value is True:
                found.append((node.lineno, "np.load(allow_pickle=True)"))
        elif name == "yaml.load" and "Loader" not in kwargs:
            found.append((node.lineno, "yaml.load without a Loader"))
        elif name in ("yaml.unsafe_load", "yaml.full_load"):
            found.append((node.lineno, name))
    return found


def test_no_unpickling_eval_exec_or_unsafe_torch_load_anywhere(
    figure: Callable[[str], None],
) -> None:
    files = _project_python_files()
    assert len(files) > 50  # the walk really saw the project
    offenders = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        offenders += [
            f"{path.relative_to(REPO)}:{line}: {what}" for line, what in _unsafe_calls(tree)
        ]
    assert not offenders, "\n".join(offenders)
    # The checker itself catches each form it is meant to catch.
    probe = ast.parse(
        "import pickle, torch\nfrom pickle import loads as l\neval('1')\nexec('x=1')\n"
        "pickle.load(f)\nl(b'')\ntorch.load('m.pt')\ntorch.load('m.pt', weights_only=False)\n"
        "np.load('a.npz', allow_pickle=True)\nyaml.load(s)\n"
    )
    assert len(_unsafe_calls(probe)) == 8
    assert not _unsafe_calls(ast.parse("torch.load('m.pt', weights_only=True)\nmodel.eval()\n"))
    figure(f"{len(files)} project .py files parsed: 0 eval/exec/pickle loads/unsafe torch.load")


def test_uploads_keep_the_bytes_only_as_data(client: TestClient, settings: Settings) -> None:
    """A valid upload is stored under a server-side id; its file name never becomes a path."""
    name = "../../../../tmp/evil.csv"
    content = b"a,label\n" + b"".join(f"{i},{i % 2}\n".encode() for i in range(20))
    r = client.post("/datasets", files={"file": (name, content)}, headers=ALICE)
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["filename"] == "evil.csv" and "/" not in info["id"]
    stored = [p for p in settings.resolved_upload_dir.rglob("*") if p.is_file()]
    assert {p.name for p in stored} == {f"{info['id']}.csv", f"{info['id']}.json"}
    assert all(p.resolve().is_relative_to(settings.resolved_upload_dir.resolve()) for p in stored)
    assert json.loads((stored[0].parent / f"{info['id']}.json").read_text())["id"] == info["id"]
