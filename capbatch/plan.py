"""The plan: before the first request, how many rows, how many requests, at what rate, how long.

Built from the ledger's counts and the few settings that change the request count (mode, resume
check, generate-missing, canary) or the pace (rate, read rate, time windows). The API quota, not
capbatch, sets the pace of a real backfill, so the time is requests / rate, stretched over the
sending windows when there are any ("the ETA counts only window time").

Requests per row:
- every row to send gets one PUT (an upper bound in reconcile mode and for rows whose read on
  resume shows the PUT had already landed — "~" in the message);
- reconcile and ``--record-previous`` read every card first (one GET each);
- otherwise the rows of the job's rolling audit (``--audit-fraction``) are read first — and only
  put when the card drifted, so their PUTs are an upper bound too — and so are rows in flight
  when an earlier run stopped (``--resume-check read``);
- ``--retry-failed`` sends the failed rows again: they count as rows to send (the plan is made
  after ``--skip-confirmed`` settled what earlier runs confirmed, so those do not count);
- ``--generate-missing`` asks GET /v2/cardNumber once per row without an external ID;
- the canary (``--canary K``) reads back each of the K rows it settles before the pool opens, and
  ``--read-back`` reads every card after its PUT.
Retries are not in the plan: they depend on the API on the day (the summary's actual figures show them).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from .config import Rate
from .errors import PlanError
from .window import Schedule, human_duration
from .wording import plural

log = logging.getLogger("capbatch.plan")


@dataclass(frozen=True)
class PlanSettings:
    """What the plan needs to know beyond the ledger's counts."""

    mode: str = "backfill"
    resume_check: str = "read"
    generate_missing: bool = False
    rate: Rate | None = None
    read_rate: Rate | None = None
    canary_reads: int = 0          # hook for issue 11's --canary K: reads before the pool starts
    read_back: bool = False        # hook for issue 11's --read-back: one GET after every PUT
    record_previous: bool = False  # --record-previous: one GET before every PUT
    retry_failed: bool = False     # --retry-failed: the failed rows go out again
    deadline: float | None = None  # epoch seconds
    deadline_text: str | None = None


@dataclass(frozen=True)
class Plan:
    rows_to_send: int
    puts: int
    reads: int
    read_detail: dict[str, int]
    requests_expected: int
    rate: str | None
    rate_per_second: float | None
    send_seconds: float | None       # requests at the rate, as if always open
    eta_seconds: float | None        # wall-clock seconds until done, counting only window time
    made_at: float
    finishes_at: float | None
    windows: str
    shared_with: int = 0
    deadline: float | None = None
    deadline_text: str | None = None
    deadline_met: bool | None = None
    rows_by_deadline: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The summary.json form: the four figures the issue names first, then the detail."""
        d = asdict(self)
        for k in ("rate_per_second", "send_seconds", "eta_seconds"):
            if d[k] is not None:
                d[k] = round(d[k], 3)
        for k in ("made_at", "finishes_at", "deadline"):
            d[k] = _iso(d[k])
        head = {k: d.pop(k) for k in ("rows_to_send", "requests_expected", "rate_per_second", "eta_seconds")}
        return {**head, **d}

    def line(self, schedule: Schedule | None = None) -> str:
        """'1,234,567 rows → ~1,240,000 requests at 1,000/min: about 20 h 40 min'."""
        rows = f"{self.rows_to_send:,} row{'s' if self.rows_to_send != 1 else ''}"
        approx = "~" if self.requests_expected >= 10_000 or self.read_detail.get("resume") \
            or self.read_detail.get("reconcile") or self.read_detail.get("audit") else ""
        requests = f"{approx}{_round_sig(self.requests_expected):,} request{'s' if self.requests_expected != 1 else ''}"
        if not self.rows_to_send:
            return "nothing left to send"
        if self.rate_per_second is None or self.send_seconds is None:
            return f"{rows} → {requests}, no rate cap: the time depends on how fast the API answers"
        text = f"{rows} → {requests} at {self.rate}: {_about(self.send_seconds)}"
        if schedule is not None and not schedule.always_open and self.eta_seconds is not None:
            text += (f" of sending; inside the windows {schedule.describe()} that takes until "
                     f"{_when(self.finishes_at, self.made_at)} (in {human_duration(self.eta_seconds)})")
        if self.shared_with:
            text += (f"; the key's quota is shared with {plural(self.shared_with, 'other run')} right now, so "
                     "expect longer while they send")
        return text


def _about(seconds: float) -> str:
    """'about 20 h 40 min'; a plan that rounds to no time at all is 'under a second'."""
    return "under a second" if seconds < 0.5 else f"about {human_duration(seconds)}"


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _round_sig(n: int, digits: int = 3) -> int:
    if n < 10_000:
        return n
    scale = 10 ** (int(math.log10(n)) - digits + 1)
    return int(round(n / scale) * scale)


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "?"
    fmt = "%H:%M" if ts - now < 20 * 3600 else "%a %d %b %H:%M"
    return time.strftime(fmt, time.localtime(ts))


def format_rate(rate: Rate) -> str:
    unit = {1.0: "s", 60.0: "min", 3600.0: "h"}.get(rate.period, f"{rate.period:g} s")
    return f"{rate.requests:,.10g}/{unit}"


def make_plan(counts: dict[str, int], missing_external_ids: int, ps: PlanSettings, schedule: Schedule,
              now: float, shared_with: int = 0, audit: int = 0) -> Plan:
    """The plan for the rows a ledger still holds (``counts`` = Ledger.counts(); ``audit``: rows of
    the rolling audit among them, not settled yet)."""
    unknown = int(counts.get("in_flight", 0))
    retried = int(counts.get("failed", 0)) if ps.retry_failed else 0
    rows = int(counts.get("pending", 0)) + unknown + retried
    reads_all = ps.mode == "reconcile" or ps.record_previous      # every row is read before its PUT
    reads = {
        "reconcile": rows if ps.mode == "reconcile" else 0,
        "record_previous": rows if ps.record_previous and ps.mode != "reconcile" else 0,
        "audit": min(audit, rows) if not reads_all else 0,
        "resume": unknown if not reads_all and ps.resume_check == "read" else 0,
        "generate_missing": missing_external_ids if ps.generate_missing else 0,
        "read_back": rows if ps.read_back else 0,
        "canary": min(ps.canary_reads, rows) if rows else 0,
    }
    puts = rows
    read_total = sum(reads.values())
    requests = puts + read_total
    send_seconds: float | None = None
    rate_per_second: float | None = None
    if ps.rate is not None:
        rate_per_second = ps.rate.per_second
        if ps.read_rate is not None:
            send_seconds = max(puts / ps.rate.per_second, read_total / ps.read_rate.per_second)
        else:
            send_seconds = requests / ps.rate.per_second
    finishes = eta = None
    if send_seconds is not None:
        finishes = schedule.finish_time(now, send_seconds)
        eta = finishes - now
    met = by_deadline = None
    if ps.deadline is not None and send_seconds is not None and finishes is not None:
        met = finishes <= ps.deadline
        if not met:
            share = schedule.open_seconds(now, ps.deadline) / send_seconds if send_seconds else 1.0
            by_deadline = max(0, min(rows, int(rows * share)))
    return Plan(rows_to_send=rows, puts=puts, reads=read_total, read_detail=reads, requests_expected=requests,
                rate=format_rate(ps.rate) if ps.rate else None, rate_per_second=rate_per_second,
                send_seconds=send_seconds, eta_seconds=eta, made_at=now, finishes_at=finishes,
                windows=schedule.describe(), shared_with=shared_with, deadline=ps.deadline,
                deadline_text=ps.deadline_text, deadline_met=met, rows_by_deadline=by_deadline)


def announce(plan: Plan, schedule: Schedule) -> None:
    """Log the plan, and warn when it cannot meet the deadline."""
    log.info("plan: %s", plan.line(schedule))
    detail = {k: v for k, v in plan.read_detail.items() if v}
    if plan.rows_to_send and detail:
        log.info("plan: %s PUTs + %s read%s (%s)", f"{plan.puts:,}", f"{plan.reads:,}", "s" if plan.reads != 1 else "",
                 ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in detail.items()))
    if plan.deadline is None or not plan.rows_to_send:
        return
    if plan.rate_per_second is None:
        log.warning("--deadline %s cannot be checked without a --rate", plan.deadline_text)
    elif plan.deadline_met:
        log.info("plan: finishes before the deadline %s", plan.deadline_text)
    else:
        log.warning("%s", _deadline_missed(plan))


def check_deadline(plan: Plan, strict: bool) -> None:
    """--deadline-strict: refuse to start (exit 2) when the plan cannot finish by the deadline."""
    if strict and plan.rows_to_send and plan.deadline_met is False:
        raise PlanError(_deadline_missed(plan) + f" ({plan.line()})",
                        "raise --rate if the key's quota allows it, widen --window, split the input, or move "
                        "the deadline (nothing was sent)")


def _deadline_missed(plan: Plan) -> str:
    return (f"the plan cannot finish by the deadline {plan.deadline_text} ({_when(plan.deadline, plan.made_at)}): "
            f"it needs until {_when(plan.finishes_at, plan.made_at)}; about {plan.rows_by_deadline or 0:,} of "
            f"{plan.rows_to_send:,} rows would be done by then")


def actual(plan: dict[str, Any] | None, rows_settled: int, requests: int, seconds: float,
           waiting_seconds: float) -> dict[str, Any]:
    """The figures of the invocation that made ``plan``, for summary.json beside it."""
    sending = max(seconds - waiting_seconds, 0.0)
    return {
        "rows_settled": rows_settled,
        "requests": requests,
        "rate_per_second": round(requests / sending, 3) if sending > 0 else 0.0,
        "seconds": round(seconds, 3),
        "waiting_for_window_seconds": round(waiting_seconds, 3),
        "planned_eta_seconds": (plan or {}).get("eta_seconds"),
    }
