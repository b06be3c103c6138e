"""docker-compose.yml against the Compose Specification schema, and the wiring it promises."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.compose_local import (
    COMPOSE_FILE,
    VOLUME_TARGET,
    InterpolationError,
    compose_config,
    compose_validator,
    container_ports,
    environment_of,
    interpolate_str,
    raw_compose,
)

HPO_SERVICES = ("api", "worker", "dashboard")
PG_URL = "postgresql+psycopg://hpo:hpo@postgres:5432/hpo"


def _errors(doc: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in compose_validator().iter_errors(doc)
    ]


def test_the_raw_file_is_valid() -> None:
    assert _errors(raw_compose()) == []


@pytest.mark.parametrize("profiles", [(), ("postgres",)], ids=["sqlite", "postgres-profile"])
def test_the_interpolated_file_is_valid(compose_env: dict[str, str], profiles: tuple[str]) -> None:
    env = {**compose_env, **({"HPO_DATABASE_URL": PG_URL} if profiles else {})}
    assert _errors(compose_config(env, profiles)) == []


def test_the_validator_rejects_mistakes() -> None:
    """The schema is strict enough to catch what a typo would break (so the tests above mean
    something): an unknown key, a wrong depends_on condition, a number for a duration."""
    doc = raw_compose()
    cases: list[tuple[str, Any]] = [
        ("healthchek", {}),
        ("depends_on", {"api": {"condition": "service_ready"}}),
        ("stop_grace_period", 10),
    ]
    for key, value in cases:
        bad = {**doc, "services": {**doc["services"], "worker": {**doc["services"]["worker"]}}}
        bad["services"]["worker"][key] = value
        assert _errors(bad), f"{key}={value!r} was accepted"


def test_interpolation_matches_compose() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate_str("${SET:-d} ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} $$HOME $SET", env) == (
        "x d d  $HOME x"
    )
    with pytest.raises(InterpolationError, match="UNSET"):
        interpolate_str("${UNSET:?needed}", env)


def test_the_api_token_is_required_with_no_default() -> None:
    """0.0.0.0 without tokens is refused by the server, and a default token in a public file is
    no secret: the file makes Compose stop with a message instead."""
    with pytest.raises(InterpolationError, match="HPO_API_TOKENS"):
        compose_config({})
    api = raw_compose()["services"]["api"]
    assert environment_of(api)["HPO_API_TOKENS"].startswith("${HPO_API_TOKENS:?")


def test_services(compose_env: dict[str, str]) -> None:
    services = compose_config(compose_env)["services"]
    assert set(services) == set(HPO_SERVICES)  # postgres only with its profile
    for name in HPO_SERVICES:
        svc = services[name]
        assert svc["command"][0] == "hpo"
        assert f"hpo-data:{VOLUME_TARGET}" in svc["volumes"]
        env = environment_of(svc)
        assert env["HPO_DATA_ROOT"] == VOLUME_TARGET
        assert env["HPO_DATABASE_URL"] == f"sqlite:///{VOLUME_TARGET}/hpo.db"
    assert services["api"]["command"][:2] == ["hpo", "serve"]
    assert services["worker"]["command"] == ["hpo", "worker"]
    assert services["dashboard"]["command"][:2] == ["hpo", "dashboard"]
    assert "hpo-data" in compose_config(compose_env)["volumes"]


def test_the_worker_scales(compose_env: dict[str, str]) -> None:
    """`docker compose up --scale worker=4` needs a worker without fixed name or host port."""
    worker = compose_config(compose_env)["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker
    # SIGTERM re-queues the running trial within the grace the worker is told about.
    grace = worker["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) == float(
        environment_of(worker)["HPO_STOP_GRACE_S"]
    )


def test_healthchecks_and_start_order(compose_env: dict[str, str]) -> None:
    services = compose_config(compose_env)["services"]
    api = services["api"]
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    for name in ("worker", "dashboard"):
        assert services[name]["depends_on"]["api"]["condition"] == "service_healthy"
    assert "/api/studies" in " ".join(services["dashboard"]["healthcheck"]["test"])
    # The api waits for PostgreSQL when the profile is on, and ignores it when it is off.
    pg = api["depends_on"]["postgres"]
    assert pg == {"condition": "service_healthy", "required": False}


def test_ports(compose_env: dict[str, str]) -> None:
    services = compose_config(compose_env)["services"]
    assert services["api"]["ports"] == ["8000:8000"]
    # optuna-dashboard has no authentication: published on the host's loopback only.
    assert services["dashboard"]["ports"] == ["127.0.0.1:8080:8080"]
    assert container_ports(services["dashboard"]) == ["8080"]
    text = COMPOSE_FILE.read_text()
    dashboard = text[text.index("\n  dashboard:") :]
    assert "no authentication" in dashboard[: dashboard.index("volumes:")]  # the comment says why


def test_the_postgres_profile_switches_every_service(compose_env: dict[str, str]) -> None:
    config = compose_config({**compose_env, "HPO_DATABASE_URL": PG_URL}, ("postgres",))
    services = config["services"]
    assert set(services) == {*HPO_SERVICES, "postgres"}
    for name in HPO_SERVICES:
        assert environment_of(services[name])["HPO_DATABASE_URL"] == PG_URL
    pg = services["postgres"]
    assert pg["profiles"] == ["postgres"]
    assert "ports" not in pg  # reachable on the compose network only
    env = environment_of(pg)
    user, password, db = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]
    assert f"postgresql+psycopg://{user}:{password}@postgres:5432/{db}" == PG_URL
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert "postgres-data" in config["volumes"]
