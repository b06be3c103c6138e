"""Bad specs answer 422 problem details naming the field; limits name the limit; POST
/jobs/validate sizes a job without creating it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from tests.support.api import assert_problem
from tests.support.specs import grid_spec, random_spec


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({"n_trials": 2}, "name", "Field required"),
        (random_spec(n_trials=0), "n_trials", "greater than or equal to 1"),
        (random_spec(n_trials=None), "n_trials", "required for the random sampler"),
        (random_spec(colour="red"), "colour", "unknown field"),
        (
            random_spec(training={"max_epochs": 0}),
            "training.max_epochs",
            "greater than or equal to 1",
        ),
        (
            random_spec(training={"validation_split": 1.5}),
            "training.validation_split",
            "less than 1",
        ),
        (random_spec(model={"hidden_layers": []}), "model.hidden_layers", "at least 1"),
        (random_spec(dataset={"name": "imagenet"}), "dataset", "imagenet"),
        (
            random_spec(dataset={"name": "upload", "id": "../../etc/passwd"}),
            "dataset.id",
            "pattern",
        ),
        (random_spec(search_space="nope"), "search_space", "available: default"),
        (
            random_spec(
                search_space={
                    "parameters": {"optimizer": {"type": "categorical", "choices": ["lbfgs"]}}
                }
            ),
            "search_space.parameters.optimizer",
            "unknown optimizer 'lbfgs'",
        ),
        (
            random_spec(
                search_space={
                    "parameters": {
                        "learning_rate": {"type": "float", "low": 0.0, "high": 0.1, "log": True}
                    }
                }
            ),
            "search_space.parameters.learning_rate",
            "log scale needs low > 0",
        ),
        (
            random_spec(
                search_space={
                    "parameters": {
                        "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
                        "momentum": {"type": "float", "low": 0.5, "high": 0.9},
                    }
                }
            ),
            "search_space.parameters.momentum",
            "when",
        ),
        (grid_spec(n_trials=5), "n_trials", "grid size (16)"),
        (grid_spec(search_space="default"), "search_space", "parameters.learning_rate"),
    ],
)
def test_bad_spec_is_422_problem_naming_the_field(
    client: TestClient, body: dict[str, Any], field: str, fragment: str
) -> None:
    body = {k: v for k, v in body.items() if v is not None}
    for path in ("/jobs", "/jobs/validate"):
        problem = assert_problem(client.post(path, json=body), 422, field)
        assert problem["errors"][0]["field"] == field
        assert fragment in problem["errors"][0]["message"], problem
        assert field in problem["detail"]
        assert "valid string" not in problem["detail"]  # no noise from the preset-name branch
    assert client.get("/jobs").json()["items"] == []


def test_every_problem_is_listed(client: TestClient) -> None:
    body = random_spec(n_trials=0, training={"max_epochs": 0, "batch_size": 0})
    problem = assert_problem(client.post("/jobs", json=body), 422)
    assert {e["field"] for e in problem["errors"]} == {
        "n_trials",
        "training.max_epochs",
        "training.batch_size",
    }


def test_body_that_is_not_json(client: TestClient) -> None:
    r = client.post("/jobs", content=b"name: yaml", headers={"content-type": "application/json"})
    assert_problem(r, 422)


@pytest.mark.parametrize(
    ("limits", "body", "field", "numbers"),
    [
        ({"max_grid_size": 10}, grid_spec(), "search_space", ["16", "10"]),
        ({"max_n_trials": 3}, random_spec(n_trials=4), "n_trials", ["4", "3"]),
        (
            {"max_epochs": 5},
            random_spec(training={"max_epochs": 50}),
            "training.max_epochs",
            ["50", "5"],
        ),
        (
            {"max_hidden_width": 64},
            random_spec(model={"hidden_layers": [65]}),
            "model.hidden_layers",
            ["65", "64"],
        ),
    ],
)
def test_limits_are_422_with_the_numbers(
    make_client: Callable[[Settings], TestClient],
    settings: Settings,
    limits: dict[str, int],
    body: dict[str, Any],
    field: str,
    numbers: list[str],
) -> None:
    client = make_client(settings.model_copy(update=limits))
    for path in ("/jobs", "/jobs/validate"):
        problem = assert_problem(client.post(path, json=body), 422, field)
        for n in numbers:
            assert n in problem["detail"], problem
    assert client.get("/jobs").json()["items"] == []


def test_active_job_limit_is_429_with_retry_after(
    make_client: Callable[[Settings], TestClient], settings: Settings
) -> None:
    client = make_client(settings.model_copy(update={"max_active_jobs_per_owner": 1}))
    assert client.post("/jobs", json=random_spec()).status_code == 201
    r = client.post("/jobs", json=random_spec(name="second"))
    assert_problem(r, 429)
    assert int(r.headers["retry-after"]) > 0


class TestValidate:
    def test_grid_size_without_creating_a_job(self, client: TestClient) -> None:
        r = client.post("/jobs/validate", json=grid_spec())
        assert r.status_code == 200, r.text
        v = r.json()
        assert v["valid"] is True and v["sampler"] == "grid"
        assert v["grid_size"] == 16 and v["n_trials"] == 16
        assert set(v["search_space"]["parameters"]) == {
            "optimizer",
            "learning_rate",
            "dropout",
            "init",
        }
        # digits 64 -> 32 -> 10
        assert v["estimated_parameters"] == 64 * 32 + 32 + 32 * 10 + 10
        assert v["estimated_seconds"] > 0
        assert client.get("/jobs").json()["items"] == []
        assert client.app.state.jobs.counts_by_state() == {}  # type: ignore[attr-defined]

    def test_random_job(self, client: TestClient) -> None:
        v = client.post("/jobs/validate", json=random_spec(n_trials=12)).json()
        assert v["grid_size"] is None and v["n_trials"] == 12 and v["sampler"] == "random"

    def test_conditional_grid_size(self, client: TestClient) -> None:
        body = grid_spec(
            search_space={
                "parameters": {
                    "optimizer": {
                        "type": "categorical",
                        "choices": ["sgd", "momentum", "nesterov"],
                    },
                    "momentum": {
                        "type": "categorical",
                        "choices": [0.5, 0.9, 0.99],
                        "when": {"optimizer": ["momentum", "nesterov"]},
                    },
                    "learning_rate": {
                        "type": "float",
                        "low": 1e-3,
                        "high": 1e-1,
                        "grid": [1e-3, 1e-2, 1e-1],
                    },
                }
            }
        )
        assert client.post("/jobs/validate", json=body).json()["grid_size"] == (1 + 3 + 3) * 3
