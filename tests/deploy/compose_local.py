"""Reading docker-compose.yml the way Compose does (YAML merge keys, ``${VAR}`` interpolation,
profiles) and turning a service into a local process: its own command and environment, with
the volume target mapped to a temporary folder and each container port to a free local port."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tests.support.procs import HpoProcess, free_port, hpo_executable

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
SCHEMA_FILE = Path(__file__).with_name("compose-spec.json")
VOLUME_TARGET = "/data"


class InterpolationError(ValueError):
    """A ``${VAR:?message}`` whose variable is unset or empty, as Compose reports it."""


# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?err}, ${NAME?err}, ${NAME:+alt},
# ${NAME+alt}, $NAME, and $$ (a literal dollar sign).
_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate_str(text: str, env: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("named")
        op, arg = m.group("op"), m.group("arg") or ""
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset_or_empty else str(value)
        if op in (":?", "?"):
            if unset_or_empty:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return str(value)
        if op in (":+", "+"):
            return "" if unset_or_empty else arg
        return value or ""

    return _VAR.sub(sub, text)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate_str(node, env)
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    return node


@cache
def raw_compose() -> dict[str, Any]:
    """The file as YAML (merge keys resolved), before interpolation."""
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


def compose_config(env: Mapping[str, str], profiles: tuple[str, ...] = ()) -> dict[str, Any]:
    """What ``docker compose [--profile P] config`` would print: interpolated, with the services
    of inactive profiles removed."""
    config = interpolate(json.loads(json.dumps(raw_compose())), env)
    config["services"] = {
        name: svc
        for name, svc in config["services"].items()
        if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)
    }
    return dict(config)


@cache
def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)  # type: ignore[no-any-return]


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def container_ports(service: Mapping[str, Any]) -> list[str]:
    """The container side of each ``ports`` entry ("127.0.0.1:8080:8080" -> "8080")."""
    out = []
    for p in service.get("ports") or []:
        target = str(p["target"]) if isinstance(p, dict) else str(p).rsplit(":", 1)[-1]
        out.append(target.split("/")[0])
    return out


@dataclass
class LocalService:
    """A compose service mapped onto this machine."""

    name: str
    command: list[str]
    env: dict[str, str]
    ports: dict[str, int]  # container port -> local port
    healthcheck: list[str] | None

    def url(self, container_port: str) -> str:
        return f"http://127.0.0.1:{self.ports[container_port]}"

    def start(self, log_dir: Path) -> HpoProcess:
        assert self.command[0] == "hpo", self.command
        base = {k: v for k, v in os.environ.items() if not k.startswith("HPO_")}
        # Test-only additions, not in the compose file: no network, one torch thread each.
        extra = {"HPO_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        return HpoProcess(
            self.command[1:], log_dir / f"{self.name}.log", {**base, **extra, **self.env}, log_dir
        )

    def run_healthcheck(self) -> subprocess.CompletedProcess[str]:
        """The service's healthcheck ``CMD`` run here, with ``python`` this interpreter."""
        assert self.healthcheck and self.healthcheck[0] == "CMD", self.healthcheck
        argv = list(self.healthcheck[1:])
        if argv[0] == "python":
            argv[0] = str(Path(hpo_executable()[0]).with_name("python"))
        env = {**os.environ, **self.env}
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)


def local_service(config: Mapping[str, Any], name: str, data_dir: Path) -> LocalService:
    """Map ``/data`` (the volume target) to ``data_dir`` and container ports to free ports."""
    svc = config["services"][name]
    ports = {p: free_port() for p in container_ports(svc)}

    def mapped(value: str) -> str:
        value = value.replace(VOLUME_TARGET, str(data_dir))
        for container, local in ports.items():
            value = re.sub(rf"(?<![0-9]){container}(?![0-9])", str(local), value)
        return value

    command = svc["command"]
    assert isinstance(command, list), f"{name}: use the exec (list) form of command"
    env = {k: mapped(v) for k, v in environment_of(svc).items()}
    check = svc.get("healthcheck", {}).get("test")
    return LocalService(
        name=name,
        command=[mapped(str(a)) for a in command],
        env=env,
        ports=ports,
        healthcheck=[mapped(str(a)) for a in check] if check else None,
    )


TOKEN = "ci-deploy-0123456789abcdef"  # what an operator would export before `docker compose up`


def venv_installed_by_install_sh() -> Path | None:
    """This interpreter's venv when scripts/install.sh made it and it is current (as in CI and
    `make test`); running the scripts against any other venv could install into it."""
    venv = Path(sys.prefix)
    stamp = venv / ".hpo-installed-test"
    digest = hashlib.sha256(
        (REPO / "pyproject.toml").read_bytes() + (REPO / "scripts/install.sh").read_bytes()
    ).hexdigest()
    if sys.prefix == sys.base_prefix or not stamp.is_file() or stamp.read_text().strip() != digest:
        return None
    return venv
