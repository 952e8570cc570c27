"""How fast to send: the rate pacer (slots on a shared GCRA grid plus an exact sliding-window guard),
429 back-off shared by all workers — and by every run on the same API key — and the breaker.

Why not ``AsyncLimiter(R, 60)``: a leaky bucket as large as the quota lets a full bucket (R) go out
at once and then R more within the minute, so a server counting "R in any 60 s" sees nearly 2R.

How the pace is kept (measured against strict sliding 60 s and 1 s server windows, see
tests/perf/bench.py ``quota``):
- Every send takes a slot on the quota's grid (:mod:`capbatch.quota`): slots are
  ``(window + margin) / R`` apart, so no window of the quota's length can hold more than R of them
  even when a send leaves up to ``margin`` late (8 ms, or 0.2 % of the window if larger). That is
  99.2 % of a per-second quota and 99.8 % of a per-minute one, sustained, with no bursts.
- Slots are leased from a shared state — a file per API key on this host, a row per key in a
  PostgreSQL ledger's database (every host), or this process's memory — a batch at a time (a couple
  of slots from a file, about a second of this run's sends from the database), so every run on one
  key paces against the same grid and takes turns fairly.
- A thin guard on top keeps the exact promise for this process: it remembers when the last R sends
  really left (their bytes written, :mod:`capbatch.departure`, not when the pacer let them go) and
  never lets an (R+1)-th send into any window of the quota's length plus the quarter of the margin
  the network path needs (as the shared grid leaves it), so sends bunched or held back by a loaded
  machine cannot eat into it. Not all of the margin: the rest absorbs the small lag every send has
  between its go and its bytes, which a guard as wide as the grid's period would carry from window
  to window (``Cadence.guard_gap``).
- A send on a shared grid that leaves later than the margin allows after its slot (an event-loop
  stall, a descheduled process) is reported as its bytes leave, before the slot a window later is
  handed out, so it cannot crowd a window with another run's slots: under a quota of up to
  ``CHAIN_MAX`` per window (per-second quotas) the slots a window later move by the lateness, at
  most an interval each (the grid's chain log, :func:`capbatch.quota.lease_slots`; about 1/R of a slot lost),
  above it the grid's coming slots move for every member (:func:`capbatch.quota.late_shift`: at
  most one slot). Slots are handed out at most half a window ahead (``Cadence.lead``), so the report
  of a send up to half a window late (less the report's own time) lands before the slot a window
  after it is handed out; a slot reached later than that is skipped instead.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import random
import time
from collections import deque
from pathlib import Path

from .config import Credentials, Rate
from .departure import Departure, expect
from .quota import (
    CHAIN_MAX,
    HOST,
    MAX_PAUSE,
    MEMBER_TTL,
    Cadence,
    Grant,
    Member,
    MemoryQuotaBackend,
    Peer,
    QuotaBackend,
    QuotaKey,
    QuotaUnavailable,
    credential_fingerprint,
    late_shift,
    live_peers,
    open_backend,
)
from .wording import plural

log = logging.getLogger("capbatch.pacing")
REPORT_TIME_HALF_LIFE = 5.0      # seconds: how soon a slow late report stops narrowing the late limit

DECREASE = 0.7           # the first systematic throttling without --rate sets 70 % of the observed rate


class Pacer:
    """Paces requests to a rate, and slows every worker (and every run on the key) when throttled.

    Every 429 that carries ``Retry-After`` pauses all workers — of every run sharing the quota —
    until it has passed. The rate itself is lowered (to 70 %, at most once a second) only when
    throttling is systematic — at least 20 % of the last 50 answers were 429 — so a stray 429 costs
    one retry, not the run's speed. Each further 2 s without throttling gives back 5 % of the rate
    (AIMD), so a misjudged ``--rate`` settles just under what the server accepts. With no ``--rate``
    at all, the first systematic throttling sets the rate to 70 % of the rate observed just before it
    (this run alone: without a rate there is no quota to share).
    """

    WINDOW = 50
    THRESHOLD = 0.20

    def __init__(self, rate: Rate | None, backend: QuotaBackend | None = None, key: QuotaKey | None = None,
                 priority: int = 1, run: str = "") -> None:
        self.rate = rate
        self.priority = max(1, int(priority))
        self.run = run
        self.key = key or QuotaKey("this process", "", "requests")
        self._backend: QuotaBackend | None = (backend or MemoryQuotaBackend()) if rate else None
        self._member: Member | None = Member.new(rate, self.priority, run) if rate else None
        self.agreed: Rate | None = rate
        self.factor = 1.0
        self.peers: tuple[Peer, ...] = ()
        self.throttle_events = 0
        self.dropped_slots = 0
        self._learned_rate: float | None = None
        self._pause_until = 0.0                      # wall clock
        self._last_decrease = -1e9
        self._answers: deque[bool] = deque(maxlen=self.WINDOW)   # True = throttled
        self._throttled_in_window = 0
        self._sends: deque[float] = deque(maxlen=512)            # for learning a rate
        self._slots: deque[float] = deque()                      # leased, not yet taken by a worker
        self._sleeping: set[float] = set()                       # taken by a worker, not yet reached
        self._turn = asyncio.Lock()
        self._changed = asyncio.Event()
        self._reports: set[asyncio.Task[None]] = set()
        self._unreported: tuple[float | None, bool] | None = None
        self._fallback_warned = False
        self._granted = False
        self._guard_sends: deque[Departure] = deque()
        self._late_debt: dict[float, float] = {}     # slot -> how much later it counts, not reported yet
        self._debt_since = 0.0                       # when the oldest unreported late send left
        self._report_time = 0.0                      # the longest a recent report took to land after its send left
        self._report_time_at = 0.0                   # when that was measured (it counts for less as time passes)
        self.slow_reports = 0                        # late sends whose report landed after the grid could move
        self._late_reporting: asyncio.Task[None] | None = None
        self.late_sends = 0
        # News from other members (a backend with long leases): slots given back, a pause.
        self._earlier = asyncio.Event()              # set when slots earlier than a sleeping one arrive
        self._refreshing: asyncio.Task[None] | None = None
        self._refresh_again = False
        self._watching = False
        self._closed = False
        self._set_cadence(rate)

    # ---- figures -----------------------------------------------------------------------------
    @property
    def current_per_second(self) -> float | None:
        if self.agreed is not None:
            return self.agreed.per_second * Cadence.of(self.agreed).efficiency * self.factor
        return self._learned_rate

    def _set_cadence(self, rate: Rate | None, jitter: float = 0.0) -> None:
        if rate is None:
            self._cadence: Cadence | None = None
            self._block = self._limit = 1
            return
        self._cadence = Cadence.of(rate, jitter)
        interval = self._cadence.interval / max(self.factor, 0.05)
        # At most a tenth of the quota's window: a late send must still be able to move the grid
        # before the slot a window later is handed out (see _judge).
        lease_seconds = min(getattr(self._backend, "lease_seconds", 0.02), 0.1 * self._cadence.window)
        # A lease covers about ``lease_seconds`` of this run's own sends: its share of the grid by
        # weight. It holds at most two leases' worth unreached, so its turns on the grid (and what a
        # killed run leaves unused) stay in proportion to its --priority, however many runs share it.
        weights = self.priority + sum(p.weight for p in self.peers)
        self._block = max(self.priority, round(lease_seconds / interval * self.priority / weights))
        self._limit = 2 * self._block
        # Slots are handed out at most Cadence.lead ahead: where the runs' holds together would reach
        # past it (a low per-second quota), each holds its weight's share of the lead instead, or
        # the turns would go to whoever asks first when the lead moves on, not by --priority.
        share = max(1, round(self._cadence.lead / interval * self.priority / weights))
        if share < self._limit:
            self._limit = share
            self._block = max(1, share // 2)
        self._late_limit = self._cadence.late_allowance
        # A slot reached later than the margin allows is still sent on a shared grid when the grid can
        # be moved for it in time (see _judge): before the slot a window later is handed out — which
        # is at most Cadence.lead before its time. What is left is for the report to land: two
        # leases' time, or more while recent reports were slow (_late_cap).
        self._max_late = max(self._late_limit, self._cadence.window - self._cadence.lead - 2 * lease_seconds)
        self._guard_gap = self._cadence.guard_gap

    # ---- sending -----------------------------------------------------------------------------
    async def acquire(self) -> None:
        """Wait until this request may go out, and count it as sent."""
        while True:
            if self._backend is None or self._member is None:   # no rate, none learned yet
                await self._wait_pause()
                self._sends.append(time.time())
                return
            slot = await self._take_slot()
            try:
                slot = await self._sleep_until(slot)
            finally:
                self._sleeping.discard(slot)
                self._notify()
            now = time.time()
            if now < self._pause_until:
                await self._wait_pause()
                continue
            if self._shared and now - slot > self._late_cap():
                self.dropped_slots += 1          # too late to keep the shared grid's promise
                continue
            await self._guard(now, slot)
            return

    async def _sleep_until(self, slot: float) -> float:
        """Sleep until ``slot``; when slots given back by another member arrive meanwhile, trade it for
        an earlier one. Returns the slot slept for."""
        while True:
            wait = slot - time.time()
            if wait <= 0:
                return slot
            if not self._watching:
                await asyncio.sleep(wait)
                return slot
            try:
                await asyncio.wait_for(self._earlier.wait(), wait)
            except TimeoutError:
                return slot
            if self._slots and self._slots[0] < slot:
                earlier = self._slots.popleft()
                self._sleeping.discard(slot)
                self._sleeping.add(earlier)
                bisect.insort(self._slots, slot)
                slot = earlier

    @property
    def _shared(self) -> bool:
        """Can another run send on this grid (now, or by joining it within the window)?"""
        return bool(self.peers) or not isinstance(self._backend, MemoryQuotaBackend)

    async def _guard(self, now: float, slot: float | None = None) -> None:
        cadence = self._cadence
        assert cadence is not None
        sends = self._guard_sends        # when the last sends left (updated as their bytes go out)
        while sends and now - sends[0].at >= self._guard_gap:
            sends.popleft()
        while len(sends) >= cadence.count:
            await asyncio.sleep(self._guard_gap - (now - sends[0].at))
            now = time.time()
            while sends and now - sends[0].at >= self._guard_gap:
                sends.popleft()
        shared = self._shared and slot is not None
        note = expect(now, slot, self._recheck if shared else None, self._judge if shared else None)
        if shared:
            self._judge(note)            # released late already: the grid moves now, more as its bytes leave
        sends.append(note)
        self._sends.append(now)

    async def _recheck(self, note: Departure) -> None:
        """The request has its connection (a new one may have taken a while on a loaded host): if it
        would now leave so late after its slot on a shared grid that the grid can no longer be moved
        for it in time, it takes the grid's next slot instead."""
        if note.slot is None or time.time() - note.slot <= self._late_cap():
            return
        backend, member = self._backend, self._member
        if backend is None or member is None:
            return
        while True:
            try:
                grant = await backend.lease(self.key, member, 1, time.time())
            except (QuotaUnavailable, OSError):
                return                           # the next regular lease says why
            self._apply(grant)
            if grant.slots:
                break
            # the grid is handed out as far ahead as it may be: ask again when it has moved on
            await asyncio.sleep(min(max(0.0, grant.retry_at - time.time()), MEMBER_TTL / 2))
        self.dropped_slots += 1
        with contextlib.suppress(ValueError):
            self._guard_sends.remove(note)
        slot = grant.slots[0]
        wait = max(slot, self._pause_until) - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        await self._guard(time.time(), slot)

    def _judge(self, note: Departure) -> None:
        """A send on a shared grid left: if later than the margin allows after its slot (a loaded host
        held it between the slot and the socket), the shared state hears by how much
        (:func:`capbatch.quota.late_shift`) at once — before the slot a window later is handed out,
        which could otherwise crowd a window with it: under a quota of up to ``CHAIN_MAX`` per window
        the slots a window later move (the chain log), above it the grid's coming slots move
        for every member (at most one slot)."""
        cadence = self._cadence
        if note.slot is None or cadence is None or self._member is None:
            return
        cap = None if cadence.count <= CHAIN_MAX else cadence.interval
        shift = late_shift(note.at - note.slot, self._late_limit, cap) - note.charged
        if shift <= 0:
            return
        self.late_sends += note.charged == 0
        note.charged += shift
        self._late_debt[note.slot] = self._late_debt.get(note.slot, 0.0) + shift
        self._debt_since = self._debt_since or note.at
        if self._late_reporting is None:
            self._late_reporting = asyncio.get_running_loop().create_task(self._report_late())
            self._reports.add(self._late_reporting)
            self._late_reporting.add_done_callback(self._reports.discard)

    async def _report_late(self) -> None:
        assert self._backend is not None and self._member is not None
        try:
            while self._late_debt:
                shifts, self._late_debt = self._late_debt, {}
                left, self._debt_since = self._debt_since, 0.0
                try:
                    await self._backend.late(self.key, self._member, time.time(), shifts)
                except (QuotaUnavailable, OSError) as exc:
                    log.debug("could not move the shared grid for a late send (%s)", exc)
                    continue
                self._landed(time.time() - left, min(shifts))
        finally:
            self._late_reporting = None

    def _landed(self, took: float, slot: float) -> None:
        """A late report landed ``took`` seconds after its send left (see :meth:`_late_cap`)."""
        cadence = self._cadence
        if cadence is None:
            return
        now = time.time()
        if took >= self._recent_report_time(now):
            self._report_time, self._report_time_at = took, now
        if now > slot + cadence.period - cadence.lead:
            self.slow_reports += 1       # the slots a window after it may have been handed out already
            log.debug("a late send's report landed %.3f s after it left: the slots a window after it may "
                      "have been handed out already", took)

    def _recent_report_time(self, now: float) -> float:
        # halved every REPORT_TIME_HALF_LIFE seconds: a hiccup of the shared state is soon forgotten
        # (once reports are slow, few slots are sent late, so few reports could say they are fast again)
        return self._report_time * 0.5 ** ((now - self._report_time_at) / REPORT_TIME_HALF_LIFE)

    def _late_cap(self) -> float:
        """How late after its slot a send on a shared grid may still leave: its report must land
        before the slots a window after it are handed out (see _set_cadence), so twice the time recent
        reports took to land is kept free for it, on top of what the cadence leaves."""
        report_time = self._recent_report_time(time.time())
        if not report_time or self._cadence is None:
            return self._max_late
        cadence = self._cadence
        return max(self._late_limit, min(self._max_late, cadence.window - cadence.lead - 2 * report_time))

    async def _take_slot(self) -> float:
        # One worker at a time (FIFO) looks for a slot; the others queue on the lock instead of all
        # waking at every change (a herd of wake-ups makes the loop late for everybody's slot).
        async with self._turn:
            while True:
                if self._slots:
                    slot = self._slots.popleft()
                    self._sleeping.add(slot)
                    return slot
                free = self._limit - len(self._sleeping)
                if free >= self._block:
                    grant = await self._lease(self._block)   # a share at a time: the others' turns come between
                    if not grant.slots and grant.retry_at > time.time():
                        # the grid is handed out as far ahead as it may be: until it moves on (asking
                        # meanwhile now and then, or a long pause would let the state forget this run)
                        await self._wait_changed(min(grant.retry_at - time.time(), MEMBER_TTL / 2))
                    continue
                await self._wait_changed()

    async def _lease(self, count: int) -> Grant:
        assert self._backend is not None and self._member is not None
        try:
            if not self._granted and getattr(self._backend, "lease_seconds", 0.02) > 0.1:
                count = 1          # a long lease: first learn who else shares the grid, then lease a share
            try:
                grant = await self._backend.lease(self.key, self._member, count, time.time())
            except (QuotaUnavailable, OSError) as exc:
                self._go_alone(exc)
                grant = await self._backend.lease(self.key, self._member, count, time.time())
            self._granted = True
            self._apply(grant)
            self._add_slots(grant.slots)
            self._watch()
            return grant
        finally:
            self._notify()

    def _add_slots(self, slots: tuple[float, ...]) -> None:
        # Slots already past when the lease comes back (a slow round trip to the shared state) are sent
        # late — each moves the grid by what it costs (_judge) — unless too late for the grid to be
        # moved in time: those are not this run's to catch up on.
        horizon = time.time() - self._late_cap() if self._cadence is not None and slots else None
        if horizon is not None and slots[0] < horizon:
            kept = tuple(s for s in slots if s >= horizon)
            self.dropped_slots += len(slots) - len(kept)
            slots = kept
        if not slots:
            return
        if self._slots and slots[0] < self._slots[-1]:       # given-back slots among them: keep order
            self._slots = deque(sorted([*self._slots, *slots]))
        else:
            self._slots.extend(slots)
        if self._sleeping and slots[0] < max(self._sleeping):
            earlier, self._earlier = self._earlier, asyncio.Event()
            earlier.set()                                      # sleepers trade for the earlier slots

    def _watch(self) -> None:
        watch = getattr(self._backend, "watch", None)
        if watch is not None and not self._watching:
            watch(self.key, self._on_notice)
            self._watching = True

    def _on_notice(self) -> None:
        """Another member gave slots back, or the quota was paused or slowed: lease now (spare only)."""
        if self._member is None or self._backend is None or self._closed:
            return
        if self._refreshing is not None:
            self._refresh_again = True
            return
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        try:
            while True:
                self._refresh_again = False
                backend, member = self._backend, self._member
                if backend is None or member is None:
                    return
                try:
                    grant = await backend.lease(self.key, member, self._block, time.time(), spare_only=True)
                except (QuotaUnavailable, OSError):
                    return                       # the next regular lease says why
                self._apply(grant)
                self._add_slots(grant.slots)
                self._notify()
                if not self._refresh_again:
                    return
        finally:
            self._refreshing = None

    def _go_alone(self, exc: BaseException) -> None:
        if not self._fallback_warned:
            where = self._backend.describe() if self._backend is not None else "the shared quota"
            log.warning("the shared quota state in %s is unusable (%s): this run now paces itself alone",
                        where, exc)
            self._fallback_warned = True
        self._backend = MemoryQuotaBackend()

    def _apply(self, grant: Grant) -> None:
        if self.rate is not None and (grant.rate != self.agreed or len(grant.peers) != len(self.peers)):
            self._say_shared(grant)
        self.factor = grant.factor
        self._pause_until = max(self._pause_until, grant.pause_until)
        self.peers = grant.peers
        self.agreed = grant.rate
        self._set_cadence(self.agreed, grant.jitter)

    def _say_shared(self, grant: Grant) -> None:
        own = self.rate
        if grant.peers:
            who = ", ".join(f"pid {p.pid}" + (f" on {p.host}" if p.host != HOST else "") + f" at {p.rate}"
                            + (f" priority {p.weight}" if p.weight != 1 else "") for p in grant.peers[:5])
            workers = sum(1 for p in grant.peers if self.run and p.run == self.run)
            others = len(grant.peers) - workers
            with_whom = " and ".join(x for x in (
                f"{plural(others, 'other run')} on this API key" if others else "",
                f"{plural(workers, 'other worker')} of this run" if workers else "") if x)
            log.info("quota of %s shared with %s (%s); turns are shared by --priority (this one %d)",
                     self.key.target, with_whom, who, self.priority)
        if own is not None and grant.rate.per_second < own.per_second:
            lowest = min(grant.peers, key=lambda p: p.rate.per_second, default=None)
            who = ("another worker of this job" if lowest is not None and self.run and lowest.run == self.run
                   else "another run on this API key")
            log.warning("%s gave --rate %s: the lower rate holds for every run on the key, this one too "
                        "(asked for %s)", who, grant.rate, own)
        elif own is not None and any(p.rate.per_second > own.per_second for p in grant.peers):
            log.info("this run's --rate %s is lower than another run's on this API key: the lower rate "
                     "holds for all of them", own)
        elif own is not None and self.agreed is not None and grant.rate.per_second > self.agreed.per_second:
            log.info("the run with the lower rate has stopped: back to --rate %s", grant.rate)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait_changed(self, timeout: float | None = None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def _wait_pause(self) -> None:
        while True:
            wait = self._pause_until - time.time()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    # ---- answers -----------------------------------------------------------------------------
    def answered(self, throttled: bool, retry_after: float | None = None) -> None:
        """Every answer passes through here: 429s pause and, when systematic, slow the run."""
        if len(self._answers) == self._answers.maxlen and self._answers[0]:
            self._throttled_in_window -= 1
        self._answers.append(throttled)
        self._throttled_in_window += throttled
        if not throttled:
            return
        now = time.time()
        if retry_after is not None:
            self._pause_until = max(self._pause_until, now + min(retry_after, MAX_PAUSE))
        systematic = self._throttled_in_window >= max(5, self.THRESHOLD * len(self._answers))
        slow_down = systematic and now - self._last_decrease >= max(1.0, retry_after or 0.0)
        if slow_down:
            self._last_decrease = now
        if self._member is None:
            if slow_down:                        # no --rate: learn one from the pace before the 429s
                self.throttle_events += 1
                self._learned_rate = self._observed_rate(now) or 10.0
                self.rate_learned(Rate(self._learned_rate, 1.0))
            return
        # Reports are coalesced: one task at a time carries the longest Retry-After and any slow-down.
        waiting_ra, waiting_slow = self._unreported or (None, False)
        longest = retry_after if waiting_ra is None else max(waiting_ra, retry_after or 0.0)
        self._unreported = (longest, waiting_slow or slow_down)
        if not self._reports:
            task = asyncio.get_running_loop().create_task(self._drain_reports())
            self._reports.add(task)
            task.add_done_callback(self._reports.discard)

    async def _drain_reports(self) -> None:
        while self._unreported is not None:
            retry_after, slow_down = self._unreported
            self._unreported = None
            await self._report(time.time(), retry_after, slow_down)

    def rate_learned(self, rate: Rate) -> None:
        self._backend = MemoryQuotaBackend()
        self._member = Member.new(rate, self.priority, self.run)
        self.agreed = rate
        self._set_cadence(rate)

    async def _report(self, now: float, retry_after: float | None, slow_down: bool) -> None:
        assert self._backend is not None and self._member is not None
        try:
            lowered = await self._backend.throttled(self.key, self._member, now, retry_after, slow_down)
        except (QuotaUnavailable, OSError) as exc:
            self._go_alone(exc)
            lowered = await self._backend.throttled(self.key, self._member, now, retry_after, slow_down)
        if lowered:
            self.throttle_events += 1
            self.factor = max(0.05, self.factor * DECREASE)

    async def settle_reports(self) -> None:
        """Wait until every 429 report has reached the shared state."""
        while self._reports:
            await asyncio.gather(*list(self._reports), return_exceptions=True)

    async def close(self) -> None:
        """Leave the shared quota: unused leased slots go back to the other members."""
        self._closed = True
        if self._refreshing is not None:
            await asyncio.gather(self._refreshing, return_exceptions=True)
        await self.settle_reports()
        if self._backend is None or self._member is None:
            return
        unused = tuple(sorted([*self._slots, *self._sleeping]))
        self._slots.clear()
        try:
            await self._backend.leave(self.key, self._member, unused, time.time())
        except (QuotaUnavailable, OSError) as exc:
            log.debug("could not leave the shared quota cleanly (%s); it forgets this run by itself", exc)

    def _observed_rate(self, now: float) -> float | None:
        recent = [t for t in self._sends if now - t <= 5.0]
        if len(recent) < 2:
            return None
        span = max(now - recent[0], 0.5)
        return len(recent) / span * DECREASE


class Breaker:
    """Stops spending rows' attempts while the API is down.

    Opens when at least ``threshold`` of the last ``window`` calls failed transiently. While open, one
    probe at a time goes out (every 1 s, doubling to 30 s); the first success closes it. Open for
    longer than ``budget`` seconds means the outage outlasted our patience: the run aborts, resumable.
    """

    def __init__(self, budget: float, window: int = 20, threshold: float = 0.8) -> None:
        self.budget = budget
        self.window = window
        self.threshold = threshold
        self._recent: deque[bool] = deque(maxlen=window)
        self._failures = 0
        self.opened_at: float | None = None
        self._probe_interval = 1.0
        self._next_probe = 0.0
        self._probing = False
        self._closed = asyncio.Event()
        self._closed.set()
        self.outages = 0
        self.outage_seconds = 0.0

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def expired(self) -> bool:
        return self.opened_at is not None and time.monotonic() - self.opened_at > self.budget

    async def admit(self) -> bool:
        """Wait until a call may go out. Returns True when this call is the breaker's probe."""
        while self.opened_at is not None:
            if self.expired():
                return False
            now = time.monotonic()
            if not self._probing and now >= self._next_probe:
                self._probing = True
                return True
            timeout = max(0.05, min(self._next_probe - now, 1.0)) if not self._probing else 1.0
            try:
                await asyncio.wait_for(self._closed.wait(), timeout)
            except TimeoutError:
                pass
        return False

    def record(self, transient_failure: bool, probe: bool) -> None:
        if probe:
            self._probing = False
            if transient_failure:
                self._probe_interval = min(self._probe_interval * 2, 30.0)
                self._next_probe = time.monotonic() + self._probe_interval
            else:
                self._close()
            return
        if self.opened_at is not None:
            return
        if len(self._recent) == self._recent.maxlen and self._recent[0]:
            self._failures -= 1
        self._recent.append(transient_failure)
        self._failures += transient_failure
        if len(self._recent) >= self.window and self._failures >= self.threshold * self.window:
            self._open()

    def _open(self) -> None:
        self.opened_at = time.monotonic()
        self.outages += 1
        self._probe_interval = 1.0
        self._next_probe = self.opened_at + self._probe_interval
        self._closed.clear()

    def _close(self) -> None:
        if self.opened_at is not None:
            self.outage_seconds += time.monotonic() - self.opened_at
        self.opened_at = None
        self._recent.clear()
        self._failures = 0
        self._closed.set()


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential back-off with full jitter (AWS architecture blog): uniform in [0, min(cap, base·2^n)]."""
    return random.uniform(0, min(cap, base * (2 ** max(0, attempt - 1))))


def _alone(quota_dir: Path | None) -> bool:
    return quota_dir is not None and str(quota_dir).lower() in ("none", "off")


def open_quota_backend(quota_dir: Path | None, database: str | None = None) -> QuotaBackend:
    """Where a run's quota is shared: the ledger database's ``capbatch.quota`` table when the run's
    ledger is a database (every host), else the state files in ``quota_dir`` (this host);
    ``--quota-dir none`` paces alone either way."""
    if database and not _alone(quota_dir):
        from .ledger.pg_quota import PostgresQuotaBackend   # the driver only when a database is used

        return PostgresQuotaBackend(database)
    return open_backend(quota_dir)


def quota_peers(quota_dir: Path | None, database: str | None, key: QuotaKey, rate: Rate, run: str = "") -> int:
    """How many other runs share ``key`` right now (for the plan; the other workers of ``run`` do not
    count); 0 when that cannot be told. Reads only: nothing is created or changed."""
    if database and not _alone(quota_dir):
        from .ledger.pg_quota import live_members

        return live_members(database, key, rate, run)
    return live_peers(quota_dir, key, rate, time.time(), run)


class SharedQuota:
    """The (PUT, read) pacers of one process, pacing on the quota it shares with every run that
    sends to ``target`` with the same credential (see :func:`open_quota_backend` for where). Reads
    share the PUT pacer unless ``read_rate`` is given: then they have a quota (and a state) of their
    own. :meth:`close` leaves the quota (unused slots go back) and releases the backend."""

    def __init__(self, rate: Rate | None, read_rate: Rate | None, *, target: str, credentials: Credentials,
                 quota_dir: Path | None, priority: int = 1, database: str | None = None, run: str = "") -> None:
        self.backend = open_quota_backend(quota_dir, database)
        fingerprint = credential_fingerprint(credentials)
        self.pacer = Pacer(rate, self.backend, QuotaKey(target, fingerprint, "requests"), priority, run)
        self.read_pacer = (Pacer(read_rate, self.backend, QuotaKey(target, fingerprint, "reads"), priority, run)
                           if read_rate else self.pacer)

    @property
    def pacers(self) -> tuple[Pacer, Pacer]:
        return self.pacer, self.read_pacer

    async def close(self) -> None:
        try:
            for pacer in dict.fromkeys(self.pacers):
                await pacer.close()
        finally:
            await self.backend.close()
