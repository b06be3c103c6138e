"""The Dockerfile, the scripts, the Makefile, the pre-commit config, CI and the README keep the
promises the README makes about them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from search_spaces import list_presets
from service.config import Settings
from service.datasets import spec as dataset_spec
from service.spec import JobSpec
from tests.deploy.compose_local import (
    REPO,
    compose_validator,
    interpolate_str,
    venv_installed_by_install_sh,
)

README = (REPO / "README.md").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = ["scripts/install.sh", "scripts/quickstart.sh", "scripts/test.sh", "scripts/lint.sh"]


def _pin(name: str, deps: list[str]) -> str:
    for d in deps:
        m = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==(\S+)", d)
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned in pyproject.toml")


TORCH = _pin("torch", PYPROJECT["project"]["dependencies"])


# Dockerfile --------------------------------------------------------------------------------------


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_dockerfile_installs_the_pinned_cpu_torch_first() -> None:
    text = _dockerfile()
    assert f"ARG TORCH_VERSION={TORCH}" in text
    assert "ARG TORCH_VARIANT=cpu" in text  # CPU by default; a build argument picks CUDA
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in text
    torch_at = text.index('"torch==${TORCH_VERSION}"')
    assert torch_at < text.index("pip install -r /tmp/requirements.txt")
    assert torch_at < text.index("pip install --no-deps .")


def test_dockerfile_gives_cuda_builds_a_c_compiler_for_triton() -> None:
    """The shell step as the build runs it, apt-get echoed instead of run: a CUDA variant
    installs gcc (Triton compiles its launcher with it), the CPU image stays without."""
    text = _dockerfile()
    start = text.index('RUN if [ "${TORCH_VARIANT}" != "cpu" ]')
    step = text[start + len("RUN ") : text.index("fi\n", start) + 2].replace("\\\n", " ")
    step = step.replace("apt-get", "echo apt-get").replace("rm -rf", "echo rm -rf")
    for variant, expect_gcc in (("cpu", False), ("cu128", True)):
        out = subprocess.run(
            ["sh", "-c", step],
            env={"TORCH_VARIANT": variant, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert ("install -y --no-install-recommends gcc" in out) == expect_gcc, (variant, out)


def test_dockerfile_copies_every_package() -> None:
    text = _dockerfile()
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert re.search(rf"^COPY {package} \./{package}$", text, re.M), package
    # README.md is the project's readme in pyproject.toml; the build needs it.
    assert "COPY pyproject.toml README.md ./" in text


def test_dockerfile_runs_unprivileged_with_the_volume() -> None:
    text = _dockerfile()
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in {"root", "0"}
    assert 'VOLUME ["/data"]' in text and "HPO_DATA_ROOT=/data" in text
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd is not None
    assert yaml.safe_load(cmd.group(1))[:2] == ["hpo", "serve"]


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "hpo-data", ".env", "tests"} <= ignored
    for needed in ("pyproject.toml", "README.md", "search_spaces", "service", "worker", "hpo"):
        assert needed not in ignored


def test_gpu_override_is_valid_compose() -> None:
    doc = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())
    assert list(compose_validator().iter_errors(doc)) == []
    worker = doc["services"]["worker"]
    assert worker["environment"]["HPO_DEVICE"] == "cuda"
    assert interpolate_str(worker["build"]["args"]["TORCH_VARIANT"], {}).startswith("cu")
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


# Scripts, Makefile, CI, pre-commit -----------------------------------------------------------------


@pytest.mark.parametrize("script", [*SCRIPTS, ".ci/run"])
def test_scripts_parse_and_are_executable(script: str) -> None:
    path = REPO / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in path.read_text()
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_install_pins_torch_before_the_project() -> None:
    text = (REPO / "scripts/install.sh").read_text()
    assert f'TORCH_VERSION="{TORCH}"' in text and 'TORCH_SPEC="torch==$TORCH_VERSION"' in text
    assert text.index('pip_install "$TORCH_SPEC"') < text.index('pip_install -e "$target"')


def test_ci_runs_the_readme_test_command_and_lint() -> None:
    ci = (REPO / ".ci/run").read_text()
    assert "bash scripts/test.sh" in ci and "bash scripts/lint.sh" in ci
    assert "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start" in ci
    assert 'export CI="${CI:-true}"' in ci
    lint = (REPO / "scripts/lint.sh").read_text()
    assert 'ruff" check .' in lint and 'ruff" format --check .' in lint
    assert 'mypy" search_spaces service worker hpo' in lint


def test_no_tests_collected_is_a_failure(tmp_path: Path) -> None:
    venv = venv_installed_by_install_sh()
    if venv is None:
        pytest.skip("this venv was not made by scripts/install.sh (CI runs this test)")
    empty = tmp_path / "no_tests_here"
    empty.mkdir()
    env = {**os.environ, "VENV_DIR": str(venv)}
    p = subprocess.run(
        ["bash", str(REPO / "scripts/test.sh"), str(empty), "-p", "no:cacheprovider"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 5, p.stdout + p.stderr
    assert "collected no tests" in p.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_makefile_targets_call_the_scripts() -> None:
    expected = {
        "install": "scripts/install.sh",
        "lint": "scripts/lint.sh",
        "test": "scripts/test.sh",
        "demo": "scripts/quickstart.sh",
        "bench": "-m bench.run",
    }
    for target, fragment in expected.items():
        p = subprocess.run(
            ["make", "-n", "-C", str(REPO), target], capture_output=True, text=True, check=True
        )
        assert fragment in p.stdout, (target, p.stdout)


def test_pre_commit_config() -> None:
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    hooks = {h["id"]: (repo, h) for repo in config["repos"] for h in repo["hooks"]}
    assert {"ruff", "ruff-format", "mypy"} <= set(hooks)
    ruff_repo = hooks["ruff"][0]
    assert ruff_repo["rev"] == "v" + _pin(
        "ruff", PYPROJECT["project"]["optional-dependencies"]["test"]
    )
    repo, mypy = hooks["mypy"]
    assert repo["repo"] == "local" and mypy["language"] == "system"
    assert mypy["entry"].endswith("mypy search_spaces service worker hpo")


# README --------------------------------------------------------------------------------------------


def test_readme_quickstart_has_exactly_two_commands() -> None:
    quickstart = README[README.index("## Quickstart") :]
    block = re.search(r"```bash\n(.*?)```", quickstart, re.S)
    assert block is not None
    commands = [ln.split("#")[0].strip() for ln in block.group(1).splitlines() if ln.strip()]
    assert commands == ["./scripts/quickstart.sh", "./scripts/test.sh"]
    intro = README[: README.index("## Quickstart")]
    assert len(re.findall(r"[.!?](\s|$)", intro.split("\n", 2)[2].strip())) == 2  # two sentences


def test_readme_lectures_and_benchmarks_sections() -> None:
    lectures = README.split("## The lectures, runnable", 1)[1].split("\n## ", 1)[0]
    assert "docs/lectures.md" in lectures
    for spec in sorted((REPO / "examples" / "lectures").glob("*.yaml")):
        assert f"`{spec.name}`" in lectures, f"README's lecture table lacks {spec.name}"
    bench = README.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    assert "`make bench`" in bench and "population_vs_baseline=" in bench


def test_readme_documents_every_setting() -> None:
    missing = [
        f"HPO_{name.upper()}"
        for name in Settings.model_fields
        if f"| `HPO_{name.upper()}` |" not in README
    ]
    assert missing == [], f"README's Configuration table lacks {missing}"


def _fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if not _models_in(field.annotation) or type(None) in getattr(
            field.annotation, "__args__", ()
        ):
            out.append(path)  # a leaf, or an optional section (null turns it off)
        for sub in _models_in(field.annotation):
            out += _fields(sub, f"{path}.")
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in getattr(annotation, "__args__", ()) for m in _models_in(a)]


def test_readme_documents_every_job_spec_field() -> None:
    spec_fields = [
        f
        for f in _fields(JobSpec)
        if not f.startswith(("dataset.", "search_space."))  # their own sections
    ]
    missing = [f for f in spec_fields if f"| `{f}` |" not in README]
    assert missing == [], f"README's job spec table lacks {missing}"


def test_readme_documents_every_dataset_and_option() -> None:
    section = README[README.index("## Datasets") : README.index("## Scaling out")]
    for model in dataset_spec.DatasetSpecModel.__args__:
        name = model.model_fields["name"].default
        assert f"name: {name}" in section, name
        for option in model.model_fields:
            assert f"`{option}`" in section or f"{option}:" in section, (name, option)


def test_readme_documents_every_preset_and_parameter() -> None:
    from search_spaces import KNOWN_PARAMETERS

    section = README[README.index("## Search spaces") : README.index("## Datasets")]
    for preset in list_presets():
        assert f"| `{preset}` |" in section, preset
    for name in KNOWN_PARAMETERS:
        assert f"`{name}`" in section, name


def test_readme_names_every_cli_command() -> None:
    from hpo.cli import app
    from hpo.client import datasets_app

    names = [c.name or c.callback.__name__ for c in app.registered_commands]  # type: ignore[union-attr]
    names += [f"datasets {c.name}" for c in datasets_app.registered_commands]
    for name in names:
        assert f"`hpo {name}" in README, name
