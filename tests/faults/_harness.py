"""Fault-test harness: real ``hpo worker`` / ``hpo serve`` processes on a real database, small
heartbeat settings, job specs whose epochs are slow enough to kill mid-epoch, a private
PostgreSQL server that a test may stop and start, and the checks every fault test ends with.

Processes and PostgreSQL databases come from ``tests/support`` (shared with the other suites);
only what fault tests need on top lives here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import text

from service.config import Settings
from service.db import Job, JobStore, create_schema, make_engine
from service.spec import JobSpec
from service.studies import make_storage
from service.submission import submit
from tests.support.procs import HpoProcess, Server, free_port, hpo_env, wait_until

# Small heartbeat settings: a dead worker's trial is stale after GRACE_S without a beat, and
# every live worker's reaper looks every INTERVAL_S, so it is failed within INTERVAL_S + GRACE_S.
INTERVAL_S = 1
GRACE_S = 3
# Allowance on top of interval + grace for a loaded 2-core machine (process scheduling, the
# reaper's own queries); the measured figure is reported, the bound only catches regressions.
SLACK_S = 3.0
FAULT_ENV = {
    "HPO_HEARTBEAT_INTERVAL_S": str(INTERVAL_S),
    "HPO_HEARTBEAT_GRACE_S": str(GRACE_S),
    "HPO_POLL_INTERVAL_S": "0.3",
    "HPO_POPULATION": "1",  # one trial per process at a time: a kill hits exactly one trial
    "HPO_DEVICE": "cpu",
}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def slow_spec(
    name: str, *, n_trials: int = 3, epochs: int = 4, n_samples: int = 30_000, **over: Any
) -> dict[str, Any]:
    """A random search whose epochs take about a second on one core (21,000 training rows through
    a 64-512-512-4 MLP): slow enough to kill a worker mid-epoch, quick enough for CI. A fixed
    optimizer and a narrow learning-rate range keep every trial finite and equally long."""
    spec: dict[str, Any] = {
        "name": name,
        "dataset": {"name": "synthetic", "n_samples": n_samples, "n_features": 64, "n_classes": 4},
        "model": {"hidden_layers": [512, 512]},
        "search_space": {
            "parameters": {
                "optimizer": {"type": "fixed", "value": "adam"},
                "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True},
                "dropout": {"type": "float", "low": 0.0, "high": 0.3},
            }
        },
        "sampler": {"type": "random", "seed": 7},
        "n_trials": n_trials,
        "training": {"max_epochs": epochs, "early_stopping": None, "batch_size": 128},
        "pruner": {"type": "none"},
    }
    spec.update(over)
    return spec


def small_spec(name: str, *, n_trials: int = 3, grid: bool = False, **over: Any) -> dict[str, Any]:
    """A digits job whose trials take a fraction of a second (soak tests: many trials)."""
    space: dict[str, Any] = {
        "parameters": {
            "optimizer": {"type": "fixed", "value": "adam"},
            "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        }
    }
    spec: dict[str, Any] = {
        "name": name,
        "dataset": {"name": "digits"},
        "model": {"hidden_layers": [16]},
        "search_space": space,
        "sampler": {"type": "random", "seed": 1},
        "n_trials": n_trials,
        "training": {"max_epochs": 2, "early_stopping": None, "batch_size": 256},
        "pruner": {"type": "none"},
    }
    if grid:
        space["parameters"]["learning_rate"]["grid"] = [1e-3, 3e-3]
        space["parameters"]["dropout"] = {
            "type": "float",
            "low": 0.0,
            "high": 0.2,
            "grid": [0, 0.2],
        }
        spec["sampler"] = {"type": "grid"}
        spec.pop("n_trials")
    spec.update(over)
    return spec


@dataclass
class FaultEnv:
    """One installation under test: a database, a data root, processes, and read access."""

    root: Path
    url: str
    env_extra: dict[str, str] = field(default_factory=dict)
    procs: list[HpoProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data_root = self.root / "hpo-data"
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.root / "logs"
        self.log_dir.mkdir(exist_ok=True)
        self.settings = Settings(data_root=self.data_root, database_url=self.url)
        self.engine = make_engine(self.url)
        create_schema(self.engine)
        self.jobs = JobStore(self.engine)
        self.storage = make_storage(self.url, self.settings)  # no heartbeat: reads only

    # Processes --------------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        return hpo_env(self.data_root, self.url, **{**FAULT_ENV, **self.env_extra, **extra})

    def worker(self, name: str, *args: str, **env: str) -> HpoProcess:
        p = HpoProcess(["worker", *args], self.log_dir / f"{name}.log", self.env(**env), self.root)
        self.procs.append(p)
        return p

    def server(self, port: int | None = None, **env: str) -> Server:
        port = port or free_port()
        args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
        name = f"serve-{sum(1 for p in self.procs if p.args[0] == 'serve')}"
        p = HpoProcess(args, self.log_dir / f"{name}.log", self.env(**env), self.root)
        self.procs.append(p)
        server = Server(p, port)
        server.wait_ready()
        return server

    def dashboard(self, port: int) -> HpoProcess:
        args = ["dashboard", "--host", "127.0.0.1", "--port", str(port)]
        p = HpoProcess(args, self.log_dir / "dashboard.log", self.env(), self.root)
        self.procs.append(p)
        return p

    def logs(self) -> str:
        out = []
        for p in self.procs:
            out.append(f"===== {p.log.name} (pid {p.pid}, rc {p.proc.poll()}) =====")
            out.append(p.log_tail(3000))
        return "\n".join(out)

    def stop_all(self) -> None:
        stop_procs(self.procs)

    # Jobs and trials --------------------------------------------------------------------------
    def submit(self, spec: dict[str, Any], *, owner: str = "local", **limits: Any) -> Job:
        settings = self.settings.model_copy(update=limits) if limits else self.settings
        job, _ = submit(
            JobSpec.model_validate(spec),
            settings=settings,
            jobs=self.jobs,
            storage=self.storage,
            owner=owner,
            enforce_active_limit=False,
        )
        return job

    def job(self, job_id: str) -> Job:
        return self.jobs.get(job_id)

    def trials(self, job: Job) -> list[FrozenTrial]:
        sid = self.storage.get_study_id_from_name(job.study_name)
        return sorted(self.storage.get_all_trials(sid, deepcopy=False), key=lambda t: t.number)

    def trial(self, job: Job, number: int) -> FrozenTrial:
        return next(t for t in self.trials(job) if t.number == number)

    def describe(self, job: Job) -> str:
        j = self.job(job.id)
        rows = [
            f"job {j.id[:8]} state={j.state} reserved={j.reserved} finished={j.finished} "
            f"failures={j.failures} n={j.n_trials} error={j.error!r}"
        ]
        for t in self.trials(job):
            sa = {k: v for k, v in t.system_attrs.items() if k != "hpo_grid_point"}
            rows.append(
                f"  #{t.number} {t.state.name} steps={sorted(t.intermediate_values)} "
                f"params={t.params} sys={sa} fail={t.user_attrs.get('fail_reason')}"
            )
        return "\n".join(rows)

    def wait(
        self, check: Callable[[], Any], timeout: float, what: str, jobs: Iterable[Job] = ()
    ) -> Any:
        def diag() -> str:
            return "\n".join([*(self.describe(j) for j in jobs), self.logs()])

        return wait_until(check, timeout, interval=0.1, what=what, diagnostics=diag)

    def wait_trial(
        self, job: Job, pred: Callable[[FrozenTrial], bool], timeout: float, what: str
    ) -> FrozenTrial:
        def find() -> FrozenTrial | None:
            return next((t for t in self.trials(job) if pred(t)), None)

        return self.wait(find, timeout, what, [job])  # type: ignore[no-any-return]

    def wait_state(self, job: Job, states: set[str], timeout: float) -> Job:
        def done() -> Job | None:
            j = self.job(job.id)
            return j if j.state in states else None

        return self.wait(done, timeout, f"job {job.id[:8]} to reach {states}", [job])  # type: ignore[no-any-return]

    def assert_finished_on_budget(self, job: Job) -> list[FrozenTrial]:
        """Exactly n_trials COMPLETE/PRUNED trials, nothing RUNNING or WAITING, counts agree."""
        j = self.job(job.id)
        trials = self.trials(job)
        done = [t for t in trials if t.state in FINISHED]
        assert j.state == "succeeded", self.describe(job)
        assert len(done) == j.n_trials, self.describe(job)
        assert j.finished == j.n_trials, self.describe(job)
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], (
            self.describe(job)
        )
        return trials

    def integrity_ok(self) -> str:
        with self.engine.connect() as c:
            return str(c.execute(text("PRAGMA integrity_check")).scalar())


def stop_procs(procs: list[HpoProcess], grace: float = 15) -> list[int]:
    """SIGTERM every process at once, then collect exit codes (SIGKILL after ``grace``)."""
    for p in procs:
        if p.proc.poll() is None:
            p.signal(signal.SIGCONT)  # a SIGSTOPped process cannot act on SIGTERM
            p.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        # One SIGTERM only, as docker sends: a second one would land in the interpreter's
        # shutdown, where Python has already restored the default (fatal) disposition.
        if stopped(p, max(0.1, deadline - time.monotonic())) is None:
            p.signal(signal.SIGKILL)
    return [p.stop() for p in procs]


def worker_pid(t: FrozenTrial) -> int | None:
    """The pid of the worker that claimed ``t`` (it records host:pid), None if unclaimed."""
    claim = str(t.system_attrs.get("hpo_worker", ""))
    return int(claim.rsplit(":", 1)[1]) if ":" in claim else None


def worker_of(p: HpoProcess) -> Callable[[FrozenTrial], bool]:
    """Trials claimed by process ``p``."""
    return lambda t: worker_pid(t) == p.pid


def mid_epoch(p: HpoProcess, epoch: int = 1) -> Callable[[FrozenTrial], bool]:
    """A RUNNING trial of ``p`` that has reported ``epoch``: it is now inside the next epoch."""
    mine = worker_of(p)
    return lambda t: t.state == TrialState.RUNNING and mine(t) and epoch in t.intermediate_values


def stopped(p: HpoProcess, timeout: float) -> int | None:
    try:
        return p.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def grep_logs(procs: Iterable[HpoProcess], needle: str) -> list[str]:
    hits = []
    for p in procs:
        try:
            text_ = p.log.read_text(errors="replace")
        except OSError:
            continue
        hits += [f"{p.log.name}: {line}" for line in text_.splitlines() if needle in line]
    return hits


# A private PostgreSQL server -----------------------------------------------------------------


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return candidates[-1].parent if candidates else None


class PrivatePostgres:
    """A throwaway PostgreSQL server in a temp dir on a free port, which a test may stop and
    start again ("the database goes away"). The shared server on 5432 is never touched.
    initdb refuses to run as root, so under root the server runs as the ``postgres`` user."""

    def __init__(self) -> None:
        bindir = _pg_bin()
        if bindir is None:
            pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.bin = bindir
        # Not under pytest's tmp_path: its parents are private to root, and under root the
        # server runs as `postgres`, which must reach its data directory.
        root = Path(tempfile.mkdtemp(prefix="hpo-faults-pg-"))
        self.root = root
        self.data = root / "pgdata"
        self.sock = root / "pgsock"
        self.log = root / "postgres.log"
        self.port = free_port()
        self._as: list[str] = []
        root.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(root, "postgres")
            shutil.chown(self.sock, "postgres")
        self._run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ]
        )

    def _run(self, argv: list[str], timeout: float = 60) -> None:
        r = subprocess.run(
            [*self._as, *argv], capture_output=True, text=True, timeout=timeout, check=False
        )
        if r.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            [
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-o",
                opts,
                "-l",
                str(self.log),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )

    def stop(self, mode: str = "fast") -> None:
        """fast: the server ends every session at once ("terminating connection due to
        administrator command") and shuts down; clients then get connection refused."""
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def create_database(self, name: str = "hpo") -> str:
        import psycopg

        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def now() -> float:
    return time.monotonic()


def study_of(env: FaultEnv, job: Job) -> optuna.Study:
    return optuna.load_study(study_name=job.study_name, storage=env.storage)
