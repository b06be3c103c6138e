"""/datasets (upload round trip, a job on the upload) and /search-spaces."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient

from tests.support.api import assert_problem
from tests.support.specs import random_spec


def csv_bytes(rows: int = 60, features: int = 4, classes: int = 3) -> bytes:
    rng = np.random.default_rng(0)
    lines = [",".join([f"f{i}" for i in range(features)] + ["label"])]
    for r in range(rows):
        x = rng.normal(size=features)
        lines.append(",".join(f"{v:.5f}" for v in x) + f",c{r % classes}")
    return ("\n".join(lines) + "\n").encode()


def test_upload_csv_round_trip_and_a_job_on_it(client: TestClient) -> None:
    data = csv_bytes()
    r = client.post("/datasets", files={"file": ("../../evil name.csv", data, "text/csv")})
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["name"] == "upload" and info["format"] == "csv"
    assert (info["rows"], info["features"], info["n_classes"]) == (60, 4, 3)
    assert info["class_names"] == ["c0", "c1", "c2"]
    assert "/" not in info["filename"]  # a request's file name never becomes a path

    got = client.get(f"/datasets/{info['id']}").json()
    assert got["id"] == info["id"] and got["rows"] == 60
    listing = client.get("/datasets").json()
    assert [u["id"] for u in listing["uploads"]] == [info["id"]]
    assert any(b["name"] == "digits" for b in listing["builtin"])

    # the same bytes again: the same id, nothing new stored
    assert client.post("/datasets", files={"file": ("again.csv", data)}).json()["id"] == info["id"]

    spec = random_spec(dataset={"name": "upload", "id": info["id"]})
    v = client.post("/jobs/validate", json=spec).json()
    assert v["estimated_parameters"] == 4 * 32 + 32 + 32 * 3 + 3  # the upload's shape
    r = client.post("/jobs", json=spec)
    assert r.status_code == 201, r.text
    detail = client.get(f"/jobs/{r.json()['id']}").json()
    assert detail["spec"]["dataset"] == {"name": "upload", "id": info["id"]}


def test_job_on_unknown_upload_is_422(client: TestClient) -> None:
    spec = random_spec(dataset={"name": "upload", "id": "0" * 16})
    assert_problem(client.post("/jobs", json=spec), 422, "dataset.id")


def test_bad_uploads(client: TestClient) -> None:
    assert_problem(client.post("/datasets", files={"file": ("empty.csv", b"")}), 400, "file")
    assert_problem(client.post("/datasets", files={"file": ("x.exe", b"MZ\x00\x01")}), 400)
    bad = b"a,b,label\n1,2,x\n3,oops,y\n"
    assert_problem(client.post("/datasets", files={"file": ("bad.csv", bad)}), 400)
    assert client.get("/datasets").json()["uploads"] == []


def test_unknown_dataset_id_is_404(client: TestClient) -> None:
    assert_problem(client.get("/datasets/" + "a" * 16), 404)


def test_server_side_paths_cannot_leave_the_data_dir(client: TestClient) -> None:
    spec = random_spec(dataset={"name": "csv", "path": "/etc/passwd"})
    assert_problem(client.post("/jobs", json=spec), 422, "dataset.path")
    spec = random_spec(dataset={"name": "npz", "path": "../../x.npz"})
    assert_problem(client.post("/jobs", json=spec), 422, "dataset.path")


def test_search_spaces(client: TestClient) -> None:
    listing = client.get("/search-spaces").json()
    assert [s["name"] for s in listing] == [
        "default",
        "grid-small",
        "lecture",
        "practical-defaults",
    ]
    by_name = {s["name"]: s for s in listing}
    assert set(by_name["default"]["parameters"]) == {
        "optimizer",
        "learning_rate",
        "weight_decay",
        "dropout",
        "init",
        "momentum",
    }
    lecture = client.get("/search-spaces/lecture").json()
    lr = lecture["parameters"]["learning_rate"]
    wd = lecture["parameters"]["weight_decay"]
    assert (lr["low"], lr["high"], lr["log"]) == (1e-6, 1e-2, True)
    assert (wd["low"], wd["high"], wd["log"]) == (1e-8, 1e-4, True)
    body = assert_problem(client.get("/search-spaces/nope"), 404, "name")
    assert "grid-small" in body["detail"]
