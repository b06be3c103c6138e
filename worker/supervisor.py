"""``hpo worker --processes N``: N ordinary worker processes on one machine, kept running.

Why processes, not threads: a small MLP uses torch's intra-op threads poorly while trials are
independent. In the bench (MNIST 784-128-10, 2 cores) two single-threaded workers trained 1.6x
the model-epochs per second of one two-threaded worker (27.7 vs 17.1), and one's storage
writes and sampling overlap the other's training. More trials in flight also means more of a
small budget runs before the pruner has finished trials to compare with, so the wall-time
gain of a 48-trial job was 1.0-1.3x.

The supervisor itself trains nothing and imports no torch: it starts each child as
``python -m hpo worker`` with ``HPO_TORCH_THREADS`` = its share of the cores, forwards SIGTERM /
SIGINT to every child (each then re-queues its trial within the stop grace, as a lone worker
does), and restarts a child that dies (SIGKILL, out of memory, a crash) after a back-off; its
trial is failed and re-queued by the stale-trial reaper like any dead worker's. A child that
exits with code 2 (bad configuration) is not restarted: the supervisor stops the others and
exits 2, since every restart would fail the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

from worker.cpus import available_cpus

CONFIG_ERROR_EXIT = 2  # typer's usage errors and ``fail(..., 2)``: the same on every restart
RESTART_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # consecutive quick deaths back off this far
STABLE_AFTER_S = 60.0  # a child that ran this long starts the back-off over when it dies
KILL_MARGIN_S = 5.0  # past the stop grace, a child that has not exited is SIGKILLed


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal non-negative shares, larger ones first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def resolve_processes(value: str | int, device: str) -> int:
    """``--processes``: a positive number, or ``auto``: one per CPU on CPU, one with CUDA (one
    process per GPU trains a population better than several processes sharing it).

    Raises ValueError naming the option for anything else."""
    if str(value).strip().lower() == "auto":
        if device == "cuda" or (device == "auto" and _cuda_available()):
            return 1
        return available_cpus()
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(
            f"--processes / HPO_WORKER_PROCESSES: expected 'auto' or a number >= 1, got {value!r}"
        )
    return n


def _cuda_available() -> bool:
    import torch  # only for 'auto' with device 'auto': the supervisor otherwise never needs it

    return bool(torch.cuda.is_available())


def child_commands(
    n: int, *, population: int | None, once: bool, max_trials: int | None
) -> list[list[str]]:
    """One ``hpo worker`` command line per child; ``max_trials`` is shared out among them (a
    child whose share is 0 is not started)."""
    base = [sys.executable, "-m", "hpo", "worker", "--processes", "1"]
    if population is not None:
        base += ["--population", str(population)]
    if once:
        base.append("--once")
    if max_trials is None:
        return [list(base) for _ in range(n)]
    return [[*base, "--max-trials", str(k)] for k in split_evenly(max_trials, n) if k > 0]


def child_env(n: int, torch_threads: int | None, database_url: str | None) -> dict[str, str]:
    """The children's environment: each gets ``torch_threads`` intra-op threads, by default its
    equal share of the CPUs (at least one), so together they never oversubscribe the cores.
    ``HPO_WORKER_SIBLINGS`` tells each how many were started together (see
    ``worker.loop.pruner_startup_cap`` and ``sibling_share_cap``). A ``--storage`` URL travels in the environment, not on
    command lines ``ps`` shows."""
    threads = torch_threads or max(1, available_cpus() // n)
    env = {
        **os.environ,
        "HPO_TORCH_THREADS": str(threads),
        "HPO_WORKER_PROCESSES": "1",
        "HPO_WORKER_SIBLINGS": str(n),
    }
    if database_url:
        env["HPO_DATABASE_URL"] = database_url
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child before exec
    # If the supervisor is SIGKILLed, its children get SIGTERM and stop gracefully instead of
    # running on unsupervised (Linux; elsewhere they run until stopped).
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@dataclass
class _Child:
    index: int
    command: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None
    exit_code: int | None = None  # final: this child is done (exited 0, or stopped)


@dataclass
class Supervisor:
    """Runs one child per command until they all exit, restarting dead ones unless stopping."""

    commands: Sequence[list[str]]
    env: dict[str, str]
    stop_grace_s: float
    on_event: Callable[[str], None] = lambda _msg: None
    kill_margin_s: float = KILL_MARGIN_S
    _children: list[_Child] = field(default_factory=list, init=False)
    _stopping: bool = field(default=False, init=False)
    _kill_at: float | None = field(default=None, init=False)

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def stop(self) -> None:
        """Ask every child to stop (SIGTERM); SIGKILL those still running past the grace."""
        if self._stopping:
            return
        self._stopping = True
        self._kill_at = time.monotonic() + self.stop_grace_s + self.kill_margin_s
        for c in self._children:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.on_event(f"signal {signal.Signals(signum).name}: stopping every worker process")
        self.stop()

    def run(self) -> int:
        """Until every child is done: 0 when they all exited 0 (stopped or finished), 2 after a
        child's configuration error, else 1."""
        self._children = [_Child(i, list(cmd)) for i, cmd in enumerate(self.commands)]
        for c in self._children:
            self._start(c)
        while any(c.exit_code is None for c in self._children):
            now = time.monotonic()
            for c in self._children:
                if c.exit_code is None:
                    self._tend(c, now)
            if self._kill_at is not None and now >= self._kill_at:
                for c in self._children:
                    if c.proc is not None and c.proc.poll() is None:
                        self.on_event(f"worker process {c.index} outlived the stop grace: SIGKILL")
                        c.proc.kill()
                self._kill_at = None
            time.sleep(0.1)
        codes = {c.exit_code for c in self._children}
        if CONFIG_ERROR_EXIT in codes:
            return CONFIG_ERROR_EXIT
        return 0 if codes == {0} else 1

    def _start(self, c: _Child) -> None:
        c.proc = subprocess.Popen(
            c.command,
            env=self.env,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        c.started_at = time.monotonic()
        c.restart_at = None
        if self._stopping:  # a signal came while it was being started: it was not told
            c.proc.send_signal(signal.SIGTERM)

    def _tend(self, c: _Child, now: float) -> None:
        if c.proc is None:  # waiting to be restarted
            if self._stopping:
                c.exit_code = 0  # nothing running, nothing lost
            elif c.restart_at is not None and now >= c.restart_at:
                self.on_event(f"restarting worker process {c.index}")
                self._start(c)
            return
        rc = c.proc.poll()
        if rc is None:
            return
        pid, c.proc = c.proc.pid, None
        if rc == 0 or self._stopping:
            c.exit_code = rc
            return
        if rc == CONFIG_ERROR_EXIT:
            self.on_event(f"worker process {c.index} (pid {pid}) exited 2: a configuration error")
            c.exit_code = rc
            self.stop()
            return
        # Deaths in a row, each soon after its start, back off; a long run starts over.
        c.quick_deaths = 1 if now - c.started_at >= STABLE_AFTER_S else c.quick_deaths + 1
        delay = RESTART_DELAYS_S[min(c.quick_deaths, len(RESTART_DELAYS_S)) - 1]
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        self.on_event(
            f"worker process {c.index} (pid {pid}) died ({how}); restarting in {delay:g} s "
            "(its trial is re-queued by the stale-trial reaper)"
        )
        c.restart_at = now + delay
