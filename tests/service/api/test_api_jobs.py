"""/jobs: submit (links, idempotency), list (cursor pages, state filter), inspect, cancel, delete,
trials, best and the model download."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from fastapi.testclient import TestClient
from optuna.trial import TrialState

from service.config import Settings
from service.states import JobState
from tests.support.api import assert_problem, submit
from tests.support.specs import grid_spec, random_spec


def jobs_store(client: TestClient):  # type: ignore[no-untyped-def]
    return client.app.state.jobs  # type: ignore[attr-defined]


def study_of(client: TestClient, job: dict) -> optuna.Study:  # type: ignore[type-arg]
    return optuna.load_study(study_name=job["study_name"], storage=client.app.state.storage)  # type: ignore[attr-defined]


class TestSubmit:
    def test_created_with_links_and_location(self, client: TestClient) -> None:
        r = client.post("/jobs", json=random_spec(n_trials=3))
        assert r.status_code == 201
        job = r.json()
        jid = job["id"]
        assert r.headers["location"] == f"/jobs/{jid}"
        assert job["state"] == "queued" and job["n_trials"] == 3 and job["finished_trials"] == 0
        assert job["owner"] == "local"
        assert job["links"] == {
            "self": f"/jobs/{jid}",
            "trials": f"/jobs/{jid}/trials",
            "best": f"/jobs/{jid}/best",
            "model": f"/jobs/{jid}/best/model",
            "report": f"/jobs/{jid}/report",
            "cancel": f"/jobs/{jid}/cancel",
        }
        assert client.get(job["links"]["self"]).status_code == 200
        assert study_of(client, job).user_attrs["hpo_job_id"] == jid

    def test_minimal_body_uses_defaults(self, client: TestClient) -> None:
        r = client.post("/jobs", json={"name": "minimal", "n_trials": 2})
        assert r.status_code == 201, r.text
        detail = client.get(f"/jobs/{r.json()['id']}").json()
        assert detail["spec"]["dataset"] == {"name": "digits"}
        assert detail["spec"]["search_space"] == "default"

    def test_idempotency_key_same_body_same_job(self, client: TestClient) -> None:
        h = {"Idempotency-Key": "abc-123"}
        first = client.post("/jobs", json=random_spec(), headers=h)
        again = client.post("/jobs", json=random_spec(), headers=h)
        assert first.status_code == 201 and again.status_code == 200
        assert first.json()["id"] == again.json()["id"]
        assert again.headers["location"] == f"/jobs/{first.json()['id']}"
        assert len(client.get("/jobs").json()["items"]) == 1

    def test_idempotency_key_other_body_conflicts(self, client: TestClient) -> None:
        h = {"Idempotency-Key": "abc-123"}
        first = client.post("/jobs", json=random_spec(), headers=h).json()
        r = client.post("/jobs", json=random_spec(n_trials=5), headers=h)
        body = assert_problem(r, 409, "Idempotency-Key")
        assert first["id"] in body["detail"]
        assert len(client.get("/jobs").json()["items"]) == 1

    def test_inline_conditional_space_reads_back(self, client: TestClient) -> None:
        space = {
            "parameters": {
                "optimizer": {"type": "categorical", "choices": ["sgd", "nesterov"]},
                "momentum": {
                    "type": "float",
                    "low": 0.5,
                    "high": 0.9,
                    "when": {"optimizer": ["nesterov"]},
                },
            }
        }
        job = submit(client, search_space=space)
        r = client.get(f"/jobs/{job['id']}")
        assert r.status_code == 200, r.text
        assert list(r.json()["spec"]["search_space"]["parameters"]) == ["optimizer", "momentum"]

    def test_grid_job_enqueues_its_grid(self, client: TestClient) -> None:
        job = client.post("/jobs", json=grid_spec()).json()
        assert job["n_trials"] == 16
        detail = client.get(f"/jobs/{job['id']}").json()
        assert detail["trial_counts"]["waiting"] == 16
        assert detail["best"] is None and detail["elapsed_s"] is None


class TestList:
    def test_cursor_pages_newest_first_without_duplicates(self, client: TestClient) -> None:
        ids = [submit(client, name=f"job{i}")["id"] for i in range(7)]
        seen, cursor, pages = [], None, 0
        while True:
            params: dict[str, object] = {"limit": 3}
            if cursor:
                params["cursor"] = cursor
            page = client.get("/jobs", params=params).json()
            pages += 1
            seen += [j["id"] for j in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert pages == 3
        assert seen == ids[::-1]
        assert len(set(seen)) == 7

    @pytest.mark.postgres
    def test_cursor_pages_on_postgres(
        self, pg_url: str, settings: Settings, make_client: Callable[[Settings], TestClient]
    ) -> None:
        client = make_client(settings.model_copy(update={"database_url": pg_url}))
        ids = [submit(client, name=f"pg{i}")["id"] for i in range(5)]
        first = client.get("/jobs", params={"limit": 3}).json()
        second = client.get("/jobs", params={"limit": 3, "cursor": first["next_cursor"]}).json()
        assert [j["id"] for j in first["items"] + second["items"]] == ids[::-1]
        assert second["next_cursor"] is None

    def test_state_filter(self, client: TestClient) -> None:
        a = submit(client, name="a")["id"]
        b = submit(client, name="b")["id"]
        submit(client, name="c")
        for jid in (a, b):
            assert client.post(f"/jobs/{jid}/cancel").json()["state"] == "cancelled"
        items = client.get("/jobs", params={"state": "cancelled"}).json()["items"]
        assert [j["id"] for j in items] == [b, a]
        assert len(client.get("/jobs", params={"state": "queued"}).json()["items"]) == 1
        assert client.get("/jobs", params={"state": "running"}).json() == {
            "items": [],
            "next_cursor": None,
        }

    @pytest.mark.parametrize(
        ("params", "field"),
        [
            ({"state": "paused"}, "state"),
            ({"limit": 0}, "limit"),
            ({"limit": 201}, "limit"),
            ({"cursor": "!!!"}, "cursor"),
            ({"cursor": base64.urlsafe_b64encode(b'["not a date", "x"]').decode()}, "cursor"),
            (
                {"cursor": base64.urlsafe_b64encode(json.dumps({"a": 1}).encode()).decode()},
                "cursor",
            ),
        ],
    )
    def test_bad_query_is_422_naming_the_parameter(
        self, client: TestClient, params: dict[str, object], field: str
    ) -> None:
        assert_problem(client.get("/jobs", params=params), 422, field)


class TestNotFound:
    def test_unknown_job(self, client: TestClient) -> None:
        for method, path in [
            ("GET", "/jobs/nope"),
            ("GET", "/jobs/nope/trials"),
            ("GET", "/jobs/nope/trials/0"),
            ("GET", "/jobs/nope/best"),
            ("GET", "/jobs/nope/best/model"),
            ("GET", "/jobs/nope/report"),
            ("POST", "/jobs/nope/cancel"),
            ("DELETE", "/jobs/nope"),
        ]:
            body = assert_problem(client.request(method, path), 404, "job_id")
            assert "nope" in body["detail"], (method, path)

    def test_unknown_trial(self, client: TestClient) -> None:
        jid = submit(client)["id"]
        body = assert_problem(client.get(f"/jobs/{jid}/trials/999"), 404, "number")
        assert "999" in body["detail"]

    def test_no_best_yet(self, client: TestClient) -> None:
        jid = submit(client)["id"]
        assert_problem(client.get(f"/jobs/{jid}/best"), 404, "best")
        assert_problem(client.get(f"/jobs/{jid}/best/model"), 404)


class TestCancelAndDelete:
    def test_cancel_queued(self, client: TestClient) -> None:
        jid = submit(client)["id"]
        r = client.post(f"/jobs/{jid}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        assert r.json()["finished_at"] is not None
        # cancelling again is harmless
        assert client.post(f"/jobs/{jid}/cancel").json()["state"] == "cancelled"

    def test_cancel_running_with_a_running_trial_waits_for_it(self, client: TestClient) -> None:
        job = submit(client)
        jobs_store(client).transition(job["id"], JobState.RUNNING)
        study_of(client, job).ask()  # a worker's trial in flight
        assert client.post(f"/jobs/{job['id']}/cancel").json()["state"] == "cancelling"
        assert client.post(f"/jobs/{job['id']}/cancel").json()["state"] == "cancelling"
        assert_problem(client.delete(f"/jobs/{job['id']}"), 409, "state")

    def test_cancel_running_without_trials_is_immediate(self, client: TestClient) -> None:
        job = submit(client)
        jobs_store(client).transition(job["id"], JobState.RUNNING)
        assert client.post(f"/jobs/{job['id']}/cancel").json()["state"] == "cancelled"

    @pytest.mark.parametrize("final", [JobState.SUCCEEDED, JobState.FAILED])
    def test_cancel_finished_job_is_409(self, client: TestClient, final: JobState) -> None:
        jid = submit(client)["id"]
        jobs_store(client).transition(jid, JobState.RUNNING)
        jobs_store(client).transition(jid, final)
        body = assert_problem(client.post(f"/jobs/{jid}/cancel"), 409, "state")
        assert final.value in body["detail"]
        assert client.get(f"/jobs/{jid}").json()["state"] == final.value

    def test_delete_running_job_is_409(self, client: TestClient) -> None:
        jid = submit(client)["id"]
        jobs_store(client).transition(jid, JobState.RUNNING)
        body = assert_problem(client.delete(f"/jobs/{jid}"), 409, "state")
        assert "running" in body["detail"]
        assert client.get(f"/jobs/{jid}").status_code == 200

    def test_delete_removes_job_study_and_model(
        self, client: TestClient, settings: Settings
    ) -> None:
        job = submit(client)
        study = study_of(client, job)
        artifact = settings.resolved_artifact_dir / "0123abcd-ef"
        artifact.parent.mkdir(parents=True, exist_ok=True)
        artifact.write_bytes(b"weights")
        t = study.ask()
        t.set_user_attr("model_artifact_id", artifact.name)
        study.tell(t, 0.5)
        assert client.delete(f"/jobs/{job['id']}").status_code == 204
        assert client.get(f"/jobs/{job['id']}").status_code == 404
        assert job["study_name"] not in optuna.get_all_study_names(client.app.state.storage)  # type: ignore[attr-defined]
        assert not artifact.exists()


class TestTrials:
    def test_trial_pages_follow_the_cursor(self, client: TestClient) -> None:
        jid = client.post("/jobs", json=grid_spec()).json()["id"]
        numbers, cursor = [], None
        while True:
            params: dict[str, object] = {"limit": 5}
            if cursor:
                params["cursor"] = cursor
            page = client.get(f"/jobs/{jid}/trials", params=params).json()
            assert page["total"] == 16
            numbers += [t["number"] for t in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert numbers == list(range(16))
        waiting = client.get(
            f"/jobs/{jid}/trials", params={"state": "waiting", "limit": 500}
        ).json()
        assert len(waiting["items"]) == 16
        assert all(t["state"] == "waiting" and t["params"] for t in waiting["items"])
        assert client.get(f"/jobs/{jid}/trials", params={"state": "complete"}).json()["items"] == []

    def test_trial_detail_with_history(self, client: TestClient) -> None:
        job = submit(client)
        study = study_of(client, job)
        t = study.ask()
        t.suggest_float("learning_rate", 1e-4, 1e-1, log=True)
        t.report(0.5, 1)
        t.report(0.7, 2)
        t.set_user_attr(
            "history", [{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.7}]
        )
        t.set_user_attr("epochs_run", 2)
        study.tell(t, 0.7)
        d = client.get(f"/jobs/{job['id']}/trials/0").json()
        assert d["state"] == "complete" and d["value"] == 0.7 and d["epochs_run"] == 2
        assert d["intermediate_values"] == {"1": 0.5, "2": 0.7}
        assert [h["epoch"] for h in d["history"]] == [1, 2]
        assert "history" not in d["user_attrs"]


class TestBest:
    def _complete(self, study: optuna.Study, value: float, **attrs: object) -> None:
        t = study.ask()
        t.suggest_float("learning_rate", 1e-4, 1e-1, log=True)
        for k, v in attrs.items():
            t.set_user_attr(k, v)
        study.tell(t, value)

    def test_best_and_model_download(
        self, client: TestClient, settings: Settings, tmp_path: Path
    ) -> None:
        torch = pytest.importorskip("torch")
        from worker.training import (
            TrialConfig,
            architecture_dict,
            build_mlp,
            load_model,
            save_model,
        )

        job = submit(client, name="bestjob")
        study = study_of(client, job)
        cfg = TrialConfig(hidden_layers=(8,), seed=0)
        model = build_mlp(64, 10, cfg)
        aid = "feedbeef-0001"
        settings.resolved_artifact_dir.mkdir(parents=True, exist_ok=True)
        save_model(model, architecture_dict(64, 10, cfg), settings.resolved_artifact_dir / aid)
        self._complete(study, 0.6)
        self._complete(study, 0.9, model_artifact_id=aid, best_val_accuracy=0.9, test_accuracy=0.85)
        study.tell(study.ask(), state=TrialState.PRUNED)

        best = client.get(f"/jobs/{job['id']}/best").json()
        assert best["trial_number"] == 1 and best["value"] == 0.9
        assert best["model_artifact_id"] == aid and best["test_accuracy"] == 0.85
        assert best["objective"] == "val_accuracy"
        assert best["config"] == best["params"]  # the default preset fixes nothing
        assert set(best["params"]) == {"learning_rate"}

        r = client.get(f"/jobs/{job['id']}/best/model")
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/octet-stream"
        assert "bestjob-trial1.safetensors" in r.headers["content-disposition"]
        out = tmp_path / "m.safetensors"
        out.write_bytes(r.content)
        loaded = load_model(out)
        x = torch.randn(5, 64)
        model.eval()
        assert torch.equal(loaded(x), model(x))

        detail = client.get(f"/jobs/{job['id']}").json()
        assert detail["best"] == {"trial_number": 1, "value": 0.9, "params": best["params"]}
        assert detail["trial_counts"]["complete"] == 2 and detail["trial_counts"]["pruned"] == 1

    def test_missing_model_file_is_404(self, client: TestClient) -> None:
        job = submit(client)
        self._complete(study_of(client, job), 0.9, model_artifact_id="does-not-exist")
        assert_problem(client.get(f"/jobs/{job['id']}/best/model"), 404, "model")

    def test_artifact_id_cannot_escape_the_artifact_dir(
        self, client: TestClient, settings: Settings
    ) -> None:
        secret = settings.data_root / "secret.txt"
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_text("no")
        job = submit(client)
        self._complete(study_of(client, job), 0.9, model_artifact_id="../secret.txt")
        assert_problem(client.get(f"/jobs/{job['id']}/best/model"), 404, "model")

    def test_report_is_html(self, client: TestClient) -> None:
        job = submit(client, name="reported")
        self._complete(study_of(client, job), 0.8)
        r = client.get(f"/jobs/{job['id']}/report")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "reported" in r.text
