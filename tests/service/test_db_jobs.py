"""Contract tests of the jobs table (``service.db.JobStore``), run on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import Engine, event

from service.db import JobStore, create_schema, make_engine
from service.errors import ConflictError, InvalidTransitionError, NotFoundError
from service.spec import JobSpec
from service.states import TERMINAL_STATES, TRANSITIONS, JobState
from tests.support.specs import grid_spec, random_spec

S = JobState


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    create_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine: Engine) -> JobStore:
    return JobStore(engine)


def spec(**over: object) -> JobSpec:
    return JobSpec.model_validate(random_spec(**over))


# A path of allowed transitions from queued into each state.
PATH = {
    S.QUEUED: [],
    S.RUNNING: [S.RUNNING],
    S.CANCELLING: [S.RUNNING, S.CANCELLING],
    S.CANCELLED: [S.CANCELLED],
    S.SUCCEEDED: [S.RUNNING, S.SUCCEEDED],
    S.FAILED: [S.RUNNING, S.FAILED],
}


def job_in(store: JobStore, state: JobState, **over: object) -> str:
    job, _ = store.create(spec(**over))
    for step in PATH[state]:
        assert store.transition(job.id, step)
    assert store.get(job.id).state == state
    return job.id


def test_schema_creation_is_idempotent(engine: Engine) -> None:
    create_schema(engine)
    create_schema(engine)


class TestCreate:
    def test_new_job_is_queued_with_its_budget(self, store: JobStore) -> None:
        job, created = store.create(spec(n_trials=7), owner="alice")
        assert created
        got = store.get(job.id)
        assert (got.state, got.n_trials, got.reserved, got.finished, got.failures) == (
            "queued",
            7,
            0,
            0,
            0,
        )
        assert got.owner == "alice" and got.name == "small-random"
        assert got.study_name == f"small-random.{job.id[:8]}"
        assert JobSpec.model_validate_json(got.spec_json) == spec(n_trials=7)
        assert got.created_at is not None and got.started_at is None and got.finished_at is None

    def test_grid_budget_is_grid_size(self, store: JobStore) -> None:
        job, _ = store.create(JobSpec.model_validate(grid_spec()))
        assert store.get(job.id).n_trials == 16

    def test_same_key_same_spec_returns_the_same_job(self, store: JobStore) -> None:
        a, created_a = store.create(spec(), idempotency_key="k1")
        b, created_b = store.create(spec(), idempotency_key="k1")
        assert created_a and not created_b
        assert a.id == b.id
        assert len(store.list_jobs()) == 1

    def test_same_key_other_spec_conflicts(self, store: JobStore) -> None:
        a, _ = store.create(spec(), idempotency_key="k1")
        with pytest.raises(ConflictError) as info:
            store.create(spec(n_trials=9), idempotency_key="k1")
        assert info.value.field == "Idempotency-Key"
        assert a.id in str(info.value)

    def test_keys_are_per_owner(self, store: JobStore) -> None:
        a, _ = store.create(spec(), owner="alice", idempotency_key="k")
        b, created = store.create(spec(), owner="bob", idempotency_key="k")
        assert created and a.id != b.id

    def test_concurrent_creates_with_one_key_make_one_job(self, store: JobStore) -> None:
        barrier = threading.Barrier(6)

        def create() -> str:
            barrier.wait()
            return store.create(spec(), idempotency_key="race")[0].id

        with ThreadPoolExecutor(6) as pool:
            ids = list(pool.map(lambda _: create(), range(6)))
        assert len(set(ids)) == 1
        assert len(store.list_jobs()) == 1


class TestReads:
    def test_get_unknown_and_other_owner(self, store: JobStore) -> None:
        job, _ = store.create(spec(), owner="alice")
        with pytest.raises(NotFoundError):
            store.get("nope")
        with pytest.raises(NotFoundError) as info:
            store.get(job.id, owner="bob")
        assert isinstance(info.value, KeyError)
        assert store.get(job.id, owner="alice").id == job.id

    def test_list_newest_first_with_keyset_pages(self, store: JobStore) -> None:
        ids = [store.create(spec(name=f"j{i}"))[0].id for i in range(5)]
        everything = store.list_jobs()
        assert [j.id for j in everything] == ids[::-1]
        pages, before = [], None
        while True:
            page = store.list_jobs(limit=2, before=before)
            if not page:
                break
            pages.append([j.id for j in page])
            before = (page[-1].created_at, page[-1].id)
        assert [len(p) for p in pages] == [2, 2, 1]
        assert [i for p in pages for i in p] == ids[::-1]

    def test_list_filters_owner_and_state(self, store: JobStore) -> None:
        a = job_in(store, S.RUNNING)
        job_in(store, S.QUEUED)
        store.create(spec(), owner="bob")
        assert [j.id for j in store.list_jobs(state="running")] == [a]
        assert len(store.list_jobs(owner="local")) == 2
        assert len(store.list_jobs(owner="bob")) == 1

    def test_find_by_name(self, store: JobStore) -> None:
        a, _ = store.create(spec(name="same"))
        b, _ = store.create(spec(name="same", n_trials=5))
        store.create(spec(name="other"))
        assert [j.id for j in store.find_by_name("same")] == [b.id, a.id]

    def test_runnable_oldest_first_with_budget_left(self, store: JobStore) -> None:
        q = job_in(store, S.QUEUED, n_trials=1)
        r = job_in(store, S.RUNNING, n_trials=2)
        job_in(store, S.CANCELLING)
        job_in(store, S.SUCCEEDED)
        job_in(store, S.CANCELLED)
        assert [j.id for j in store.runnable()] == [q, r]
        assert store.reserve_slot(q)
        assert [j.id for j in store.runnable()] == [r]  # q's budget is fully reserved

    def test_counts(self, store: JobStore) -> None:
        job_in(store, S.QUEUED)
        job_in(store, S.RUNNING)
        job_in(store, S.CANCELLING)
        job_in(store, S.FAILED)
        store.create(spec(), owner="bob")
        assert store.count_active("local") == 3
        assert store.count_active("bob") == 1
        assert store.counts_by_state() == {"queued": 2, "running": 1, "cancelling": 1, "failed": 1}
        assert [j.state for j in store.in_state(S.RUNNING)] == ["running"]


class TestTransitions:
    # One database per source state (not per pair): every target is tried on its own fresh job.
    @pytest.mark.parametrize("current", list(JobState), ids=lambda s: s.value)
    def test_table(self, store: JobStore, current: JobState) -> None:
        for target in JobState:
            jid = job_in(store, current)
            if target in TRANSITIONS[current]:
                assert store.transition(jid, target, error="why" if target is S.FAILED else None)
                after = store.get(jid)
                assert after.state == target.value
                if target is S.RUNNING:
                    assert after.started_at is not None
                assert (after.finished_at is not None) == (target in TERMINAL_STATES), target
                if target is S.FAILED:
                    assert after.error == "why"
            else:
                with pytest.raises(InvalidTransitionError) as info:
                    store.transition(jid, target)
                assert f"from {current.value} to {target.value}" in str(info.value)
                assert not store.try_transition(jid, target)
                assert store.get(jid).state == current.value

    def test_unknown_job(self, store: JobStore) -> None:
        with pytest.raises(NotFoundError):
            store.transition("nope", S.RUNNING)

    def test_racing_transitions_have_one_winner(self, store: JobStore) -> None:
        jid = job_in(store, S.RUNNING)
        barrier = threading.Barrier(8)
        targets = [S.SUCCEEDED, S.FAILED, S.CANCELLING, S.SUCCEEDED] * 2

        def go(target: JobState) -> bool:
            barrier.wait()
            return store.try_transition(jid, target)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(go, targets))
        assert sum(results) == 1, results
        winner = targets[results.index(True)]
        assert store.get(jid).state == winner.value


class TestBudget:
    def test_reserve_never_exceeds_n_trials_under_8_threads(self, store: JobStore) -> None:
        jid = job_in(store, S.RUNNING, n_trials=13)
        barrier = threading.Barrier(8)
        taken = [0] * 8

        def take(i: int) -> None:
            barrier.wait()
            while store.reserve_slot(jid):
                taken[i] += 1

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(take, range(8)))
        assert sum(taken) == 13
        assert store.get(jid).reserved == 13
        assert not store.reserve_slot(jid)

    def test_reserve_slots_takes_at_most_what_is_left_under_8_threads(
        self, store: JobStore
    ) -> None:
        jid = job_in(store, S.RUNNING, n_trials=29)
        barrier = threading.Barrier(8)
        taken = [0] * 8

        def take(i: int) -> None:
            barrier.wait()
            while got := store.reserve_slots(jid, 3):
                assert 1 <= got <= 3
                taken[i] += got

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(take, range(8)))
        assert sum(taken) == 29
        assert store.get(jid).reserved == 29
        assert store.reserve_slots(jid, 5) == 0
        other = job_in(store, S.QUEUED, n_trials=4)
        assert store.reserve_slots(other, 0) == 0
        assert store.reserve_slots(other, 3) == 3
        assert store.reserve_slots(other, 3) == 1  # only one left
        assert store.reserve_slots(job_in(store, S.CANCELLING), 2) == 0
        assert store.reserve_slots("nope", 2) == 0

    def test_reserve_only_while_runnable(self, store: JobStore) -> None:
        for state in (S.CANCELLING, S.CANCELLED, S.SUCCEEDED, S.FAILED):
            jid = job_in(store, state)
            assert not store.reserve_slot(jid), state
            assert store.get(jid).reserved == 0
        assert store.reserve_slot(job_in(store, S.QUEUED))
        assert not store.reserve_slot("nope")

    def test_release_gives_the_slot_back_and_counts_failures(self, store: JobStore) -> None:
        jid = job_in(store, S.RUNNING, n_trials=1)
        assert store.reserve_slot(jid)
        assert not store.reserve_slot(jid)
        store.release_slot(jid)
        assert store.get(jid).reserved == 0 and store.get(jid).failures == 0
        assert store.reserve_slot(jid)
        store.release_slot(jid, failed=True)
        job = store.get(jid)
        assert (job.reserved, job.failures) == (0, 1)
        store.release_slot(jid)  # nothing reserved: never below zero
        assert store.get(jid).reserved == 0

    def test_record_finished_returns_the_updated_row(self, store: JobStore) -> None:
        jid = job_in(store, S.RUNNING, n_trials=3)
        before = store.get(jid).updated_at
        time.sleep(0.01)
        assert store.record_finished(jid).finished == 1
        job = store.record_finished(jid)
        assert job.finished == 2 and job.id == jid
        assert store.get(jid).finished == 2
        assert store.get(jid).updated_at >= before

    def test_record_finished_concurrently_counts_every_trial(self, store: JobStore) -> None:
        jid = job_in(store, S.RUNNING, n_trials=20)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: store.record_finished(jid), range(20)))
        assert store.get(jid).finished == 20

    def test_sync_finished_raises_the_count_and_succeeds_at_the_budget_in_one_commit(
        self, store: JobStore
    ) -> None:
        jid = job_in(store, S.RUNNING, n_trials=3)
        commits: list[object] = []

        def committed(conn: object) -> None:
            commits.append(conn)

        event.listen(store.engine, "commit", committed)
        try:
            job = store.sync_finished(jid, 2)
            assert (job.finished, job.state) == (2, S.RUNNING)
            job = store.sync_finished(jid, 3)
        finally:
            event.remove(store.engine, "commit", committed)
        assert (job.finished, job.state) == (3, S.SUCCEEDED) and job.finished_at is not None
        assert len(commits) == 2  # one per call: the count and the end together
        assert store.sync_finished(jid, 1).finished == 3  # never lowered, still succeeded

    @pytest.mark.parametrize("state", [S.QUEUED, S.CANCELLING, S.CANCELLED, S.FAILED])
    def test_sync_finished_at_the_budget_succeeds_only_where_the_table_allows(
        self, store: JobStore, state: JobState
    ) -> None:
        jid = job_in(store, state, n_trials=1)
        job = store.sync_finished(jid, 1)
        assert job.finished == 1
        assert job.state == (S.SUCCEEDED if S.SUCCEEDED in TRANSITIONS[state] else state)

    def test_state_reads_the_state_alone(self, store: JobStore) -> None:
        for state in S:
            assert store.state(job_in(store, state)) == state
        with pytest.raises(NotFoundError, match="nope"):
            store.state("nope")


def test_delete(store: JobStore) -> None:
    jid = job_in(store, S.QUEUED)
    assert store.delete(jid)
    assert not store.delete(jid)
    with pytest.raises(NotFoundError):
        store.get(jid)
