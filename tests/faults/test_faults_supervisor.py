"""``hpo worker --processes N``: real worker children on a real database; one is SIGKILLed
mid-epoch and restarted, the job still ends on budget; SIGTERM to the supervisor stops them all
within the stop grace with exit 0 and no trial left RUNNING."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.faults._harness import FaultEnv, slow_spec, small_spec, stopped, worker_pid

pytestmark = pytest.mark.slow


def test_supervised_children_share_a_job_a_killed_one_is_restarted_sigterm_stops_all(
    sqlite_env: FaultEnv, figure: Callable[[str], None]
) -> None:
    env = sqlite_env
    grace = 8.0
    job = env.submit(slow_spec("supervised", n_trials=6, epochs=3))
    sup = env.worker("sup", "--processes", "2", HPO_STOP_GRACE_S=str(grace))
    # a child inside its second epoch: kill it there
    victim = env.wait_trial(
        job,
        lambda t: t.state == TrialState.RUNNING and 1 in t.intermediate_values,
        120,
        "a child inside epoch 2",
    )
    victim_pid = worker_pid(victim)
    assert victim_pid not in (None, sup.pid)  # trials are run by the children, not the supervisor
    os.kill(victim_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    env.wait(
        lambda: "restarting worker process" in sup.log_tail(20_000),
        30,
        "the supervisor to restart the killed child",
        [job],
    )
    restarted_after = time.monotonic() - killed_at
    env.wait_state(job, {"succeeded", "failed"}, 240)
    trials = env.assert_finished_on_budget(job)
    assert env.trial(job, victim.number).state == TrialState.FAIL  # reaped, then retried
    pids = {worker_pid(t) for t in trials if t.state != TrialState.WAITING}
    assert victim_pid in pids and len(pids) >= 3, pids  # two children, then the restarted one
    # a seeded random search: the children never sample the same parameters (service.samplers)
    originals = [t for t in trials if t.system_attrs.get("failed_trial") is None]
    assert len({tuple(sorted(t.params.items())) for t in originals}) == len(originals) == 6
    assert sup.alive()
    log = sup.log_tail(20_000)
    assert f"(pid {victim_pid}) died (signal SIGKILL)" in log, log
    assert log.count("worker ready") == 3, log
    # each child switched denormal flushing on before torch's thread pool started, so every
    # one of its intra-op threads flushes (worker.training.numerics)
    assert log.count("denormals flushed\n") == 3, log

    sup.signal(signal.SIGTERM)
    sent = time.monotonic()
    rc = stopped(sup, grace + 10)
    took = time.monotonic() - sent
    assert rc == 0, sup.log_tail()
    for pid in pids:  # every child is gone (reaped by the supervisor, so no zombie either)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not [t for t in env.trials(job) if t.state == TrialState.RUNNING]
    figure(
        f"--processes 2: {len(trials)} trials by {len(pids)} child pids; SIGKILLed child "
        f"restarted {restarted_after:.1f}s later; job on budget; SIGTERM -> exit 0 in {took:.1f}s"
    )
    assert took <= grace + 2, took


def test_sigterm_mid_epoch_requeues_each_childs_trial(
    sqlite_env: FaultEnv, figure: Callable[[str], None]
) -> None:
    env = sqlite_env
    grace = 8.0
    job = env.submit(slow_spec("supervised-stop", n_trials=4, epochs=4))
    sup = env.worker("sup", "--processes", "2", HPO_STOP_GRACE_S=str(grace))
    env.wait(
        lambda: sum(t.state == TrialState.RUNNING for t in env.trials(job)) == 2,
        120,
        "both children to run a trial",
        [job],
    )
    running = [t.number for t in env.trials(job) if t.state == TrialState.RUNNING]
    sup.signal(signal.SIGTERM)
    sent = time.monotonic()
    assert stopped(sup, grace + 10) == 0, sup.log_tail()
    took = time.monotonic() - sent
    trials = env.trials(job)
    assert not [t for t in trials if t.state == TrialState.RUNNING], env.describe(job)
    requeued = {t.system_attrs.get("hpo_requeue_of") for t in trials}
    for n in running:  # each interrupted trial is FAIL with a WAITING copy, or finished in time
        state = env.trial(job, n).state
        assert state in (TrialState.COMPLETE, TrialState.PRUNED) or n in requeued, env.describe(job)
    assert env.job(job.id).reserved == 0
    figure(f"--processes 2, SIGTERM with 2 trials running: exit 0 in {took:.1f}s, 0 RUNNING")
    assert took <= grace + 2, took


def _children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _gone(pid: int) -> bool:
    try:  # a zombie (exited, not yet reaped by whoever adopted it) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's prctl")
def test_children_stop_when_the_supervisor_is_sigkilled(
    sqlite_env: FaultEnv, figure: Callable[[str], None]
) -> None:
    env = sqlite_env
    sup = env.worker("sup", "--processes", "2")
    env.wait(lambda: sup.log_tail(20_000).count("worker ready") == 2, 60, "both children ready", [])
    kids = _children_of(sup.pid)
    assert len(kids) == 2, kids
    sup.signal(signal.SIGKILL)
    killed = time.monotonic()
    env.wait(lambda: all(_gone(k) for k in kids), 20, "the orphaned children to stop", [])
    figure(f"supervisor SIGKILLed: both children stopped {time.monotonic() - killed:.1f}s later")


def test_max_trials_is_shared_out_and_once_exits_when_done(
    sqlite_env: FaultEnv, figure: Callable[[str], None]
) -> None:
    env = sqlite_env
    job = env.submit(small_spec("supervised-once", n_trials=6))
    sup = env.worker("sup", "--processes", "2", "--once", "--max-trials", "3")
    started = time.monotonic()
    assert stopped(sup, 120) == 0, sup.log_tail()
    took = time.monotonic() - started
    trials = env.trials(job)
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    by_child: dict[int, int] = {}
    for t in finished:
        by_child[worker_pid(t)] = by_child.get(worker_pid(t), 0) + 1
    # 3 trials in all: 2 for one child and 1 for the other, each exits after its share
    assert sorted(by_child.values()) == [1, 2], by_child
    assert sup.log_tail(20_000).count("worker stopped after") == 2
    assert env.job(job.id).state == "running"  # 3 of 6 done; nothing left RUNNING
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    figure(
        f"--processes 2 --once --max-trials 3: exit 0 after {took:.1f}s, trials per child {by_child}"
    )
