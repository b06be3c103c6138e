"""Prometheus metrics. Job and trial figures are read from the database at scrape time, so every
API replica reports the same numbers and nothing lives only in process memory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, text

from service.db import JobStore, reader
from service.states import JobState

TRIAL_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _DatabaseCollector(Collector):
    def __init__(self, engine: Engine, jobs: JobStore) -> None:
        self.engine, self.jobs = engine, jobs

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        try:
            counts = self.jobs.counts_by_state()
            with reader(self.engine).connect() as c:
                rows = c.execute(
                    text(
                        "SELECT state, datetime_start, datetime_complete FROM trials "
                        "WHERE state IN ('COMPLETE', 'PRUNED', 'FAIL')"
                    )
                ).all()
        except Exception:
            return  # a scrape while the database is away reports only request metrics
        g = GaugeMetricFamily("hpo_jobs", "Jobs by state", labels=["state"])
        for st in JobState:
            g.add_metric([st.value], counts.get(st.value, 0))
        yield g
        c_ = CounterMetricFamily(
            "hpo_trials_finished", "Finished trials by state", labels=["state"]
        )
        by_state: dict[str, int] = {}
        durations = []
        for state, start, end in rows:
            by_state[state] = by_state.get(state, 0) + 1
            if start is not None and end is not None and state in ("COMPLETE", "PRUNED"):
                s, e = _ts(start), _ts(end)
                durations.append(max(0.0, e - s))
        for name in ("COMPLETE", "PRUNED", "FAIL"):
            c_.add_metric([name.lower()], by_state.get(name, 0))
        yield c_
        buckets = []
        for b in TRIAL_BUCKETS:
            buckets.append((str(b), sum(1 for d in durations if d <= b)))
        buckets.append(("+Inf", len(durations)))
        h = HistogramMetricFamily("hpo_trial_duration_seconds", "Wall time of finished trials")
        h.add_metric([], buckets, sum_value=sum(durations))
        yield h


def _ts(v: object) -> float:
    from datetime import datetime

    if isinstance(v, datetime):
        return v.timestamp()
    return datetime.fromisoformat(str(v)).timestamp()


@dataclass
class Metrics:
    engine: Engine
    jobs: JobStore
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.request_latency = Histogram(
            "hpo_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.registry.register(_DatabaseCollector(self.engine, self.jobs))
