"""A run's figures in the Prometheus text format: a file for node_exporter's textfile collector
(``--metrics-file``) and a push to a Pushgateway (``--pushgateway``).

The figures come from the summary at the end of an invocation, and while it runs from the ledger's
figures at its start plus the engine's live counters (see :class:`LiveFigures`). Nothing here talks to
the engine: the runner calls :meth:`LiveFigures.figures` every ``--progress-interval``.

Exposition is prometheus_client's own (a private CollectorRegistry, ``write_to_textfile``,
``push_to_gateway``), never a hand-written format.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from prometheus_client import CollectorRegistry, push_to_gateway, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .exitcodes import COMPLETED
from .report import retry_totals

if TYPE_CHECKING:
    from .engine import Counters
    from .ledger import Ledger

log = logging.getLogger("capbatch.metrics")

PUSH_TIMEOUT = 10.0
STATES = ("pending", "in_flight", "succeeded", "failed", "rejected", "unchanged", "duplicate")
LAST_SUCCESS = "capbatch_last_success_timestamp_seconds"
COMPLETED_EXIT_CODES = COMPLETED     # every row settled (1: some of them failed or were rejected)


@dataclass(frozen=True)
class Figures:
    """What one snapshot of a run exposes. ``exit_code`` is None while the invocation runs."""

    job: str
    input: str
    rows: Mapping[str, int] = field(default_factory=dict)
    requests_by_status: Mapping[str, int] = field(default_factory=dict)
    retries: int = 0
    throttled: int = 0
    duration_seconds: float = 0.0
    throughput: float = 0.0
    last_success: float | None = None
    exit_code: int | None = None
    updated_at: float = field(default_factory=time.time)


def job_label(job: str | None) -> str:
    return job or "capbatch"


def figures_from_summary(summary: Mapping[str, Any], job: str | None, exit_code: int,
                         last_success: float | None) -> Figures:
    """The end-of-invocation figures (run totals across all of the run directory's invocations)."""
    now = time.time()
    if exit_code in COMPLETED_EXIT_CODES:
        last_success = now
    return Figures(
        job=job_label(job), input=str((summary.get("input") or {}).get("name") or ""),
        rows=dict(summary.get("counts") or {}),
        requests_by_status=dict(summary.get("requests_by_status") or {}),
        retries=int(summary.get("retries") or 0), throttled=int(summary.get("throttled_responses") or 0),
        duration_seconds=float(summary.get("duration_seconds") or 0.0),
        throughput=float(summary.get("throughput_rows_per_second") or 0.0),
        last_success=last_success, exit_code=exit_code, updated_at=now)


class LiveFigures:
    """Run totals while an invocation runs: the ledger's figures at its start + the live counters."""

    def __init__(self, ledger: Ledger, job: str | None, last_success: float | None) -> None:
        self.job = job_label(job)
        self.input = ledger.get_meta("input_name") or ""
        self.rows_before = ledger.counts()
        invocations = ledger.invocations()
        earlier = invocations[:-1] if invocations and not invocations[-1]["ended_at"] else invocations
        self.duration_before = sum(i["duration"] for i in earlier)
        self.requests_before: dict[str, int] = {}
        for inv in earlier:
            for status_class, n in inv["requests_by_status"].items():
                self.requests_before[status_class] = self.requests_before.get(status_class, 0) + n
        self.retries_before, self.throttled_before = retry_totals(ledger)
        self.last_success = last_success
        self.started = time.time()

    def figures(self, counters: Counters | None = None) -> Figures:
        rows = dict(self.rows_before)
        requests = dict(self.requests_before)
        retries, throttled = self.retries_before, self.throttled_before
        settled_before = rows.get("succeeded", 0) + rows.get("failed", 0) + rows.get("unchanged", 0)
        settled_now = 0
        if counters is not None:
            # while running, rows in flight count as pending: the ledger says which at the end
            rows["pending"] = max(0, rows.get("pending", 0) + rows.get("in_flight", 0) - counters.settled)
            rows["in_flight"] = 0
            rows["succeeded"] = rows.get("succeeded", 0) + counters.ok
            rows["unchanged"] = rows.get("unchanged", 0) + counters.unchanged
            rows["failed"] = rows.get("failed", 0) + counters.failed
            settled_now = counters.settled
            for status_class, n in counters.by_status.items():
                requests[status_class] = requests.get(status_class, 0) + n
            retries += counters.retries
            throttled += counters.throttled
        now = time.time()
        duration = self.duration_before + (now - self.started)
        return Figures(job=self.job, input=self.input, rows=rows, requests_by_status=requests, retries=retries,
                       throttled=throttled, duration_seconds=round(duration, 3),
                       throughput=round((settled_before + settled_now) / duration, 2) if duration > 0 else 0.0,
                       last_success=self.last_success, exit_code=None, updated_at=now)


class _RunCollector(Collector):
    """Turns one :class:`Figures` snapshot into metric families (no process-wide state)."""

    def __init__(self, figures: Figures, with_job_label: bool = True) -> None:
        self.f = figures
        self.with_job_label = with_job_label

    def collect(self) -> Iterator[Metric]:
        f = self.f
        names = (["job"] if self.with_job_label else []) + ["input"]
        base = ([f.job] if self.with_job_label else []) + [f.input]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(base, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(base, value)
            return c

        rows = GaugeMetricFamily("capbatch_rows", "Input rows of the run by ledger state.", labels=names + ["state"])
        for state in STATES:
            rows.add_metric(base + [state], f.rows.get(state, 0))
        yield rows
        requests = CounterMetricFamily("capbatch_requests", "HTTP requests sent by the run, by status class "
                                       "(none: no answer, e.g. a timeout).", labels=names + ["status_class"])
        for status_class in sorted(set(f.requests_by_status) | {"2xx", "4xx", "5xx"}):
            requests.add_metric(base + [status_class], f.requests_by_status.get(status_class, 0))
        yield requests
        yield counter("capbatch_retries", "Requests retried after a transient error.", f.retries)
        yield counter("capbatch_throttled_responses", "429 (rate limited) answers.", f.throttled)
        yield gauge("capbatch_duration_seconds", "Active time of the run across its invocations.", f.duration_seconds)
        yield gauge("capbatch_throughput_rows_per_second", "Rows settled through the API per active second.",
                    f.throughput)
        yield gauge("capbatch_running", "1 while an invocation is running, 0 once it ended.",
                    1 if f.exit_code is None else 0)
        if f.exit_code is not None:
            yield gauge("capbatch_exit_code", "Exit code of the last invocation (0 ok, 1 rows failed, 2 usage/input, "
                        "3 aborted, 70 internal error, 130 interrupted).", f.exit_code)
        if f.last_success is not None:
            yield gauge(LAST_SUCCESS, "Unix time the last invocation ended with every row settled (exit 0 or 1).",
                        f.last_success)
        yield gauge("capbatch_metrics_updated_timestamp_seconds", "Unix time these figures were taken.",
                    f.updated_at)


def registry_for(figures: Figures, with_job_label: bool = True) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_RunCollector(figures, with_job_label))
    return registry


def write_textfile(path: Path, figures: Figures) -> None:
    """Write atomically (temporary file + rename in the same directory), as the collector needs."""
    write_to_textfile(str(path), registry_for(figures))


def push(url: str, figures: Figures, timeout: float = PUSH_TIMEOUT) -> None:
    """Replace the job's group on the Pushgateway. The job is the grouping key there, so the pushed
    metrics do not carry a ``job`` label of their own (the Pushgateway refuses that)."""
    push_to_gateway(url, job=figures.job, registry=registry_for(figures, with_job_label=False), timeout=timeout)


def previous_last_success(path: Path | None, job: str | None, ledger: Ledger | None = None) -> float | None:
    """When this job last completed: from the metrics file it wrote before and this run's ledger."""
    found: list[float] = []
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = ""
        try:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == LAST_SUCCESS and sample.labels.get("job") == job_label(job):
                        found.append(float(sample.value))
        except ValueError:
            log.warning("metrics file %s is not in the Prometheus text format; it will be replaced", path)
    if ledger is not None:
        found += [float(i["ended_at"]) for i in ledger.invocations()
                  if i["ended_at"] and i["exit_code"] in COMPLETED_EXIT_CODES]
    return max(found) if found else None


def without_run(job: str | None, input_name: str, exit_code: int, last_success: float | None) -> Figures:
    """An invocation that ended before it had a run (input refused, settings wrong): exit code only."""
    return Figures(job=job_label(job), input=input_name, exit_code=exit_code, last_success=last_success)


def ended(figures: Figures, exit_code: int) -> Figures:
    """Live figures turned into the end of an invocation that had no summary (a crash, a lost ledger)."""
    return replace(figures, exit_code=exit_code, updated_at=time.time(),
                   last_success=time.time() if exit_code in COMPLETED_EXIT_CODES else figures.last_success)
