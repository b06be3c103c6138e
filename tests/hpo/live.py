"""Running ``hpo`` commands against a live server as a user would, and reading their results."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.procs import HpoProcess, Server, hpo_env, run_hpo

# Small enough that a job takes seconds on 2 cores, large enough to have a best trial, pruning
# off so every trial completes and has a saved model.
TINY_SPEC: dict[str, Any] = {
    "name": "cli-tiny",
    "dataset": {"name": "digits"},
    "model": {"hidden_layers": [32]},
    "search_space": "default",
    "sampler": {"type": "random", "seed": 0},
    "n_trials": 3,
    "training": {"max_epochs": 2},
    "pruner": {"type": "none"},
}


@dataclass
class Result:
    """A finished ``hpo`` command: exit code, stdout, stderr (and ``.json()`` of stdout)."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def error_line(self) -> str:
        """The one line of stderr a failing command prints (asserts that it is exactly one)."""
        lines = [ln for ln in self.err.splitlines() if ln.strip()]
        assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{self.err}"
        assert lines[0].startswith("error: "), lines[0]
        return lines[0]


@dataclass
class Live:
    server: Server
    worker: HpoProcess
    data_root: Path
    workdir: Path

    @property
    def url(self) -> str:
        return self.server.url

    def hpo(self, *args: str, timeout: float = 180) -> Result:
        """Run ``hpo ARGS`` with HPO_SERVER pointing at the live server."""
        env = hpo_env(self.data_root, HPO_SERVER=self.url, HPO_LOG_LEVEL="WARNING")
        try:
            p = run_hpo(list(args), self.workdir, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(
                f"hpo {' '.join(args)} timed out after {timeout} s\n"
                f"worker log:\n{self.worker.log_tail()}\nserver log:\n{self.server.process.log_tail()}"
            ) from e
        return Result(p.returncode, p.stdout, p.stderr)

    def ok(self, *args: str, timeout: float = 180) -> Result:
        r = self.hpo(*args, timeout=timeout)
        assert r.code == 0, (
            f"hpo {' '.join(args)} exited {r.code}\nstdout:\n{r.out}\nstderr:\n{r.err}\n"
            f"worker log:\n{self.worker.log_tail(2000)}"
        )
        return r

    def spec_file(self, name: str, **changes: Any) -> Path:
        spec = {**TINY_SPEC, "name": name, **changes}
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path
