"""Per-process job state: the dataset is loaded and split once per job, as the spec says."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from service.config import Settings
from service.db import JobStore, create_schema, make_engine
from service.spec import JobSpec
from service.studies import make_storage
from service.submission import submit
from tests.support.specs import random_spec
from worker.runtime import JobRuntime, RuntimeCache, describe, subsample


def test_runtime_is_loaded_once_per_job(tmp_path: Path) -> None:
    s = Settings(data_root=tmp_path)
    engine = make_engine(s.resolved_database_url)
    create_schema(engine)
    jobs, storage = JobStore(engine), make_storage(s.resolved_database_url, s)
    spec = JobSpec.model_validate(
        random_spec(training={"validation_split": 0.25, "test_split": 0.1})
    )
    job, _ = submit(spec, settings=s, jobs=jobs, storage=storage)
    cache = RuntimeCache(s, storage)
    rt = cache.get(job)
    assert cache.get(job) is rt
    d = describe(rt)
    # digits, 1797 rows: ceil(0.1 * 1797) = 180 test, ceil(0.25 * 1797) = 450 validation
    assert (d["train"], d["val"], d["test"]) == (1797 - 450 - 180, 450, 180)
    assert (d["features"], d["classes"]) == (64, 10)
    cache.forget(job.id)
    assert cache.get(job) is not rt


def test_jobs_on_the_same_split_share_its_resident_tensors(tmp_path: Path) -> None:
    s = Settings(data_root=tmp_path)
    engine = make_engine(s.resolved_database_url)
    create_schema(engine)
    jobs, storage = JobStore(engine), make_storage(s.resolved_database_url, s)
    cache = RuntimeCache(s, storage)

    def runtime(**training: object) -> JobRuntime:
        spec = JobSpec.model_validate(random_spec(training={"validation_split": 0.2, **training}))
        return cache.get(submit(spec, settings=s, jobs=jobs, storage=storage)[0])

    first, second = runtime(), runtime()
    assert first.job_id != second.job_id
    # one copy per process: what the first job derived from it is there for the second
    assert second.data is first.data
    key = ("test", "derived")
    assert first.data.derived(key, lambda: object()) is second.data.derived(key, lambda: 1)
    # another split or another training subset is other data
    other_split = runtime(validation_split=0.25)
    subset = runtime(train_subset=300)
    assert other_split.data is not first.data and subset.data is not first.data
    assert describe(other_split)["val"] == 450 and describe(subset)["train"] == 300
    assert runtime(train_subset=300).data is subset.data


def test_train_subset_is_stratified_and_seeded() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1000, 3)).astype(np.float32)
    y = np.repeat(np.arange(10), 100)
    Xa, ya = subsample(X, y, 300, seed=4)
    Xb, yb = subsample(X, y, 300, seed=4)
    assert np.array_equal(Xa, Xb) and np.array_equal(ya, yb)
    assert np.bincount(ya).tolist() == [30] * 10
    assert not np.array_equal(subsample(X, y, 300, seed=5)[1], ya) or not np.array_equal(
        subsample(X, y, 300, seed=5)[0], Xa
    )


def test_a_bf16_job_on_a_cpu_with_slow_bf16_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from worker.training.matmul_speed import BF16_SLOWER_BELOW, cpu_bf16_speedup

    s = Settings(data_root=tmp_path)
    engine = make_engine(s.resolved_database_url)
    create_schema(engine)
    jobs, storage = JobStore(engine), make_storage(s.resolved_database_url, s)
    cache = RuntimeCache(s, storage)
    for precision in ("fp32", "bf16"):
        spec = JobSpec.model_validate(random_spec(training={"precision": precision}))
        job, _ = submit(spec, settings=s, jobs=jobs, storage=storage)
        with caplog.at_level(logging.WARNING, logger="worker.runtime"):
            caplog.clear()
            cache.get(job)
        warned = [
            r.getMessage() for r in caplog.records if "training.precision bf16" in r.getMessage()
        ]
        # this machine's own measurement decides: CI machines differ (AMX, AVX-512 BF16, none)
        slow = precision == "bf16" and cpu_bf16_speedup() < BF16_SLOWER_BELOW
        assert len(warned) == (1 if slow else 0), (precision, cpu_bf16_speedup(), warned)
        if slow:
            assert warned[0].startswith(f"job {job.id}: ")
