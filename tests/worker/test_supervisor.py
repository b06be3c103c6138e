"""worker.supervisor: children started, restarted after a death, stopped on a signal; real
child processes (small Python programs standing in for workers; the real-worker cases are in
tests/faults/test_faults_supervisor.py)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from worker.cpus import available_cpus
from worker.supervisor import (
    Supervisor,
    child_commands,
    child_env,
    resolve_processes,
    split_evenly,
)


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def supervisor(commands: list[list[str]], events: list[str], grace: float = 5.0) -> Supervisor:
    return Supervisor(commands, dict(os.environ), stop_grace_s=grace, on_event=events.append)


def test_split_evenly() -> None:
    assert split_evenly(7, 3) == [3, 2, 2]
    assert split_evenly(1, 3) == [1, 0, 0]
    assert sum(split_evenly(1000, 7)) == 1000


def test_resolve_processes() -> None:
    assert resolve_processes("3", "cpu") == 3
    assert resolve_processes(" Auto ", "cpu") == available_cpus()
    assert resolve_processes("auto", "cuda") == 1  # one process per GPU
    for bad in ("0", "-2", "two", ""):
        with pytest.raises(ValueError, match=r"--processes / HPO_WORKER_PROCESSES: expected"):
            resolve_processes(bad, "cpu")


def test_child_commands_share_max_trials_and_pass_options_through() -> None:
    cmds = child_commands(3, population=4, once=True, max_trials=4)
    assert [c[-1] for c in cmds] == ["2", "1", "1"]
    assert all(c[:6] == [sys.executable, "-m", "hpo", "worker", "--processes", "1"] for c in cmds)
    assert all({"--population", "4", "--once"} <= set(c) for c in cmds)
    assert len(child_commands(4, population=None, once=False, max_trials=2)) == 2
    plain = child_commands(2, population=None, once=False, max_trials=None)
    assert plain == [[sys.executable, "-m", "hpo", "worker", "--processes", "1"]] * 2


def test_child_env_shares_the_cpus_and_carries_the_storage_url() -> None:
    env = child_env(available_cpus() * 2, None, None)
    assert env["HPO_TORCH_THREADS"] == "1" and env["HPO_WORKER_PROCESSES"] == "1"
    assert env["HPO_WORKER_SIBLINGS"] == str(available_cpus() * 2)  # they share start-up trials
    assert env.get("HPO_DATABASE_URL") == os.environ.get("HPO_DATABASE_URL")
    env = child_env(2, 3, "postgresql+psycopg://u:secret@db/hpo")
    assert env["HPO_TORCH_THREADS"] == "3"
    assert env["HPO_DATABASE_URL"] == "postgresql+psycopg://u:secret@db/hpo"  # not on argv


def test_children_that_finish_end_the_supervisor_with_0() -> None:
    events: list[str] = []
    assert supervisor([py("pass"), py("pass")], events).run() == 0
    assert events == []


def test_a_dead_child_is_restarted_and_the_rest_keep_running(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    dies_once = py(
        "import os, signal, sys\n"
        f"p = {str(runs)!r}\n"
        "open(p, 'a').write('x')\n"
        "if len(open(p).read()) == 1: os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    events: list[str] = []
    started = time.monotonic()
    assert supervisor([dies_once, py("import time; time.sleep(1.5)")], events).run() == 0
    assert runs.read_text() == "xx"  # killed once, restarted once, then finished
    assert any("died (signal SIGKILL); restarting in 1 s" in e for e in events), events
    assert "restarting worker process 0" in events
    assert time.monotonic() - started >= 1.0  # the back-off was waited


def test_a_configuration_error_stops_everything_with_exit_2() -> None:
    events: list[str] = []
    sleeper = py("import time; time.sleep(60)")
    started = time.monotonic()
    assert supervisor([py("import sys; sys.exit(2)"), sleeper], events).run() == 2
    assert time.monotonic() - started < 10  # the sleeper was stopped, not waited for
    assert any("exited 2: a configuration error" in e for e in events)


def test_stop_forwards_sigterm_and_kills_a_child_past_the_grace(tmp_path: Path) -> None:
    graceful = py(
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(tmp_path / 'got')!r}, 'w').close(),"
        " sys.exit(0)))\n"
        "time.sleep(60)\n"
    )
    deaf = py("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)")
    events: list[str] = []
    sup = supervisor([graceful, deaf], events, grace=0.5)
    sup.kill_margin_s = 0.5
    threading.Timer(1.0, sup.stop).start()
    started = time.monotonic()
    assert sup.run() == 1  # the deaf child was SIGKILLed
    assert (tmp_path / "got").exists()  # the graceful one got SIGTERM and exited 0
    assert any("outlived the stop grace: SIGKILL" in e for e in events)
    assert time.monotonic() - started < 10


def test_signal_handlers_stop_the_children() -> None:
    events: list[str] = []
    sup = supervisor([py("import time; time.sleep(60)")], events)
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        sup.install_signal_handlers()
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        started = time.monotonic()
        assert sup.run() == 1  # the child died of the forwarded SIGTERM (it has no handler)
        assert time.monotonic() - started < 10
        assert events[0] == "signal SIGTERM: stopping every worker process"
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
