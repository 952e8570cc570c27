"""The async pool: a feeder pages rows out of the ledger, workers settle them through the API, a writer
records outcomes in batches. Retries, back-off, the breaker, aborts and graceful shutdown live here.

Journal first: a chunk of rows is marked ``in_flight`` before any of them is sent, in the same commit
that records the outcomes finished since the previous chunk. A process killed at any instant leaves
about three chunks (``3 × concurrency`` rows) whose outcome is unknown: one queued, one being sent,
one finished but not yet recorded. On the next run
those rows are settled first — by reading the card (default) or by resending the idempotent PUT.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from .api import (
    CARD_NOT_FOUND,
    EXTERNAL_ID_EXISTS,
    NOT_APPLIED,
    UNCONFIRMED,
    UNREACHABLE_CODES,
    CapillaryClient,
    Kind,
    Outcome,
)
from .canary import run_canary
from .config import Rate
from .ledger import Ledger, RowResult, State, WorkRow
from .pacing import Breaker, Pacer, backoff_delay
from .window import Schedule, WindowGate
from .tripwire import Tripwire
from .wording import plural

log = logging.getLogger("capbatch.engine")

FLUSH_EVERY = 0.25     # seconds between ledger flushes
FLUSH_SIZE = 1000      # or as soon as this many outcomes wait
CLAIM_RETRY = 0.5      # seconds between claims while other workers hold the last rows
MAX_RETRY_AFTER = 300.0  # a Retry-After of an hour (or a date far ahead) is capped at five minutes
BARE_500_ATTEMPTS = 3    # a PUT answered HTTP 500 without a card code: tries before the card is read
FAIL_FAST_AFTER = 3      # unreachable-host errors before any answer in this run: then it is the target
FAIL_FAST_DELAY = 0.5
_CALL_LABELS = {"put_card": "PUT /v2/card", "get_card": "GET /v2/card",
                "generate_external_id": "GET /v2/cardNumber"}
CHANGED_SINCE = "changed_since"  # compare-and-set found another ID than expected: the row is left alone


class AbortRow(Exception):
    """Raised inside a worker when the run is stopping: the row is left for the next run.

    ``sent`` says whether any request for the row went out in this process; a row with none goes
    back to ``pending`` rather than staying ``in_flight`` (which would cost a read on resume)."""

    def __init__(self, sent: bool = True) -> None:
        super().__init__()
        self.sent = sent


@dataclass
class Counters:
    """Live figures for progress display and the summary (this process only)."""

    total: int = 0
    done_before: int = 0
    settled: int = 0
    ok: int = 0
    failed: int = 0
    unchanged: int = 0
    retrying: int = 0
    retries: int = 0
    throttled: int = 0
    requests: int = 0
    by_status: dict[str, int] = field(default_factory=dict)   # requests by status class: 2xx, 4xx, 5xx, none
    started: float = field(default_factory=time.monotonic)


@dataclass
class EngineResult:
    stop: str                      # "done" | "aborted" | "interrupted"
    message: str | None = None
    counters: Counters = field(default_factory=Counters)
    throttle_events: int = 0
    outages: int = 0
    outage_seconds: float = 0.0
    waiting_seconds: float = 0.0   # spent outside the sending windows (--window)


class _RowContext:
    __slots__ = ("row_id", "attempts", "ambiguous", "latency_ms", "http_status", "warnings", "put", "read",
                 "bare_500", "sent_id")

    def __init__(self, row_id: int) -> None:
        self.row_id = row_id
        self.attempts = 0
        self.ambiguous = False     # a PUT may have been applied without our seeing the answer
        self.latency_ms: float | None = None
        self.http_status: int | None = None
        self.warnings: list[tuple[str, str]] | None = None   # from any answer about the row
        self.put: Outcome | None = None    # the PUT's final answer
        self.read: Outcome | None = None   # the read that checked it, if any
        self.bare_500 = 0          # bare HTTP 500s the PUT got; -1 once the card has been read for them
        self.sent_id: str | None = None   # the external ID the PUT carried (generated ones included)

    def add_warnings(self, warnings: tuple[tuple[str, str], ...]) -> None:
        if self.warnings is None:
            self.warnings = []
        self.warnings.extend(w for w in warnings if w not in self.warnings)


class Writer:
    """Buffers outcomes and writes them to the ledger in batches (one transaction each).

    Writes run on the event loop's thread. A dedicated ledger thread was measured too (A/B, 50k rows,
    same machine): it cost more CPU per row in GIL hand-offs than the loop stalls it removed
    (latency-bound 0.79x vs 0.84x the bare loop; CPU-bound 0.72x vs 0.75x), so it was dropped.
    """

    def __init__(self, ledger: Ledger, counters: Counters | None = None) -> None:
        self.ledger = ledger
        self.counters = counters     # its request figures are recorded with every batch
        self.buffer: list[RowResult] = []
        self.timeline: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self.full = asyncio.Event()

    def add(self, result: RowResult) -> None:
        self.buffer.append(result)
        bucket = self.timeline[int(result.settled_at)]
        if result.state in (State.SUCCEEDED, State.UNCHANGED):
            bucket[0] += 1
        elif result.state is State.FAILED:
            bucket[1] += 1
        if len(self.buffer) >= FLUSH_SIZE:
            self.full.set()

    def note_retry(self, throttled: bool) -> None:
        bucket = self.timeline[int(time.time())]
        bucket[2] += 1
        if throttled:
            bucket[3] += 1

    def flush(self, journal: list[int] | None = None) -> None:
        """Write buffered outcomes; with ``journal``, mark those rows in flight in the same commit.
        If the write fails, the batch is put back so a later flush (or the next run) still has it."""
        if not self.buffer and not self.timeline and not journal:
            self.ledger.heartbeat()
            return
        batch, timeline = self._take()
        try:
            self.ledger.record(batch, timeline, journal or (),
                               self.counters.by_status if self.counters is not None else None)
        except BaseException:
            self.buffer[:0] = batch
            raise
        self.ledger.heartbeat()

    def claim(self, limit: int) -> list[WorkRow]:
        """Write buffered outcomes and claim the next chunk of rows, in one commit."""
        batch, timeline = self._take()
        try:
            return self.ledger.claim(limit, batch, timeline,
                                     self.counters.by_status if self.counters is not None else None)
        except BaseException:
            self.buffer[:0] = batch
            raise

    def _take(self) -> tuple[list[RowResult], dict[int, list[int]]]:
        batch, self.buffer = self.buffer, []
        timeline, self.timeline = dict(self.timeline), defaultdict(lambda: [0, 0, 0, 0])
        self.full.clear()
        return batch, timeline


@dataclass(frozen=True)
class EngineSettings:
    """What the engine uses of a run's settings (runner.engine_settings builds it)."""

    rate: Rate | None = None
    read_rate: Rate | None = None
    concurrency: int = 16
    max_attempts: int = 8
    outage_budget: float = 300.0
    grace_period: float = 10.0
    mode: str = "backfill"
    resume_check: str = "read"
    record_previous: bool = False
    read_back: bool = False
    canary: int = 0                  # rows the canary proves before the pool opens (resolved for the target)
    tripwire: bool = True
    tripwire_rate: float = 0.9
    tripwire_rows: int = 50
    verbose: int = 0


class Engine:
    def __init__(self, settings: EngineSettings, ledger: Ledger, client: CapillaryClient, *,
                 pacers: tuple[Pacer, Pacer] | None = None, window: WindowGate | None = None) -> None:
        self.s = settings
        self.ledger = ledger
        self.client = client
        if pacers is not None:      # (PUT pacer, read pacer) on the quota shared with other runs (pacing.SharedQuota)
            self.pacer, self.read_pacer = pacers
        else:                       # this process paces alone
            self.pacer = Pacer(settings.rate)
            self.read_pacer = Pacer(settings.read_rate) if settings.read_rate else self.pacer
        self.window = window or WindowGate(Schedule())   # sending windows (--window); always open by default
        self.pause_message: str | None = None
        self.breaker = Breaker(settings.outage_budget)
        self.counters = Counters()
        self.writer = Writer(ledger, self.counters)
        self.queue: asyncio.Queue[WorkRow | None] = asyncio.Queue(maxsize=settings.concurrency)
        self.stopping = asyncio.Event()
        self.abort_message: str | None = None
        self.interrupted = False
        self._journalled: set[int] = set()   # rows marked in_flight by this process and not yet settled
        self._started: set[int] = set()      # of those, rows a worker has begun
        self._ambiguous: set[int] = set()    # rows whose PUT may have landed unseen
        self.tripwire = Tripwire(settings.tripwire_rate, settings.tripwire_rows, settings.tripwire)
        self._answered = False               # any HTTP answer in this run: the target exists
        self._unreached = 0
        self._debug = settings.verbose > 0
        self._breaker_open = False
        self._outage_began = 0.0
        self._throttle_logged: dict[int, int] = {}   # id(pacer) -> throttle events already logged
        self._rate_lowered: set[int] = set()         # pacers running below their configured rate
        self._answers_429 = 0
        counts = ledger.counts()
        self.counters.total = sum(counts.values())
        self.counters.done_before = self.counters.total - counts["pending"] - counts["in_flight"]

    # ---- control -------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """First Ctrl-C / SIGTERM: stop feeding, let in-flight requests finish within the grace period."""
        self.interrupted = True
        self.stopping.set()

    def request_pause(self, message: str) -> None:
        """The sending window closed and the run should end there (--window-exit): stop feeding,
        let in-flight requests finish, and report the stop as 'paused' (resumable)."""
        if self.pause_message is None:
            self.pause_message = message
            log.info("%s", message)
        self.stopping.set()

    def _abort(self, message: str) -> None:
        if self.abort_message is None:
            self.abort_message = message
            log.error("aborting the run: %s", message)
        self.stopping.set()

    abort = _abort   # for the canary

    # ---- main ----------------------------------------------------------------------------------
    async def run(self) -> EngineResult:
        first = self.ledger.peek_work()
        if first is None:
            return self._result()
        try:
            # Before the pool opens: prove the contract on a few rows (canary), or settle the first
            # row alone, so wrong credentials or a wrong host stop the run after one request.
            k = self.s.canary
            if not (k and await run_canary(self, k)):
                alone = self.writer.claim(1)    # claimed: no other worker on the job is handed it
                if alone:
                    await self.settle_alone(alone[0], self.s.read_back)
        except BaseException:
            await asyncio.shield(self._finish())
            raise
        if self.abort_message or self.stopping.is_set():
            await asyncio.shield(self._finish())
            return self._result()

        feeder = asyncio.create_task(self._feed(), name="feeder")
        workers = [asyncio.create_task(self._work(), name=f"worker-{i}") for i in range(self.s.concurrency)]
        flusher = asyncio.create_task(self._flush_periodically(), name="flusher")
        all_workers = asyncio.gather(*workers)
        stop_wait = asyncio.create_task(self.stopping.wait())
        try:
            watch: set[asyncio.Future[Any]] = {all_workers, stop_wait, feeder, flusher}
            while True:
                done, _ = await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
                # A helper task that died (e.g. the ledger's disk filled up) ends the run with its error
                # instead of leaving the workers waiting for rows that will never come.
                for task in done:
                    if not task.cancelled() and task.exception():
                        raise task.exception()  # type: ignore[misc]
                if all_workers in done or stop_wait in done:
                    break
                watch -= done
            stop_wait.cancel()
            if not all_workers.done():
                # Stopping: queued rows go back; in-flight requests get the grace period, then they
                # are cut off (their rows stay in_flight and are settled by the next run).
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
                while not self.queue.empty():
                    self.queue.get_nowait()
                for _ in workers:
                    self.queue.put_nowait(None)
                try:
                    await asyncio.wait_for(asyncio.shield(all_workers), self.s.grace_period)
                except asyncio.TimeoutError:
                    log.warning("grace period over: %s cut off; they are settled on the next run",
                                plural(len(self._started), "request"))
                    for w in workers:
                        w.cancel()
                    await asyncio.gather(*workers, return_exceptions=True)
        finally:
            feeder.cancel()
            flusher.cancel()
            stop_wait.cancel()
            pending_workers = [w for w in workers if not w.done()]
            for w in pending_workers:
                w.cancel()
            await asyncio.gather(feeder, flusher, stop_wait, all_workers, *workers, return_exceptions=True)
            await asyncio.shield(self._finish())
        return self._result()

    async def _finish(self) -> None:
        self.writer.flush()
        # Journalled rows no request went out for return to pending; ambiguous ones stay in_flight.
        never_sent = sorted(self._journalled - self._started - self._ambiguous)
        self.ledger.release(never_sent)
        started_unknown = sorted((self._started & self._journalled) - self._ambiguous)
        if self.abort_message and started_unknown:
            # Aborted before their outcome: the API refused them (401/403/outage), so not applied.
            self.ledger.release(started_unknown)

    def _result(self) -> EngineResult:
        if self.abort_message:
            stop = "aborted"
        elif self.pause_message and not self.interrupted:
            stop = "paused"
        elif self.interrupted:
            stop = "interrupted"
        else:
            stop = "done"
        return EngineResult(stop, self.abort_message or (self.pause_message if stop == "paused" else None),
                            self.counters, self.pacer.throttle_events,
                            self.breaker.outages, self.breaker.outage_seconds)

    async def settle_alone(self, row: WorkRow, confirm: bool = False) -> tuple[RowResult | None, _RowContext]:
        """Settle one row outside the pool (the canary, the first row): journalled, settled, recorded.
        ``confirm`` reads the card back after a successful PUT. None when the run is stopping."""
        if not row.unknown:
            self.writer.flush(journal=[row.id])
        else:
            self._ambiguous.add(row.id)
        self._journalled.add(row.id)
        ctx = _RowContext(row.id)
        result = await self._process(row, ctx, confirm)
        self.writer.flush()
        return result, ctx

    async def read_card(self, card: str) -> Outcome:
        """One read with the run's retry rules (the canary shows what a card holds)."""
        return await self._call(_RowContext(-1), self.read_pacer, self.client.get_card, card)

    async def _flush_periodically(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.writer.full.wait(), FLUSH_EVERY)
            except asyncio.TimeoutError:
                pass
            self.writer.flush()
            self._watch_rates()

    # ---- feeder --------------------------------------------------------------------------------
    async def _feed(self) -> None:
        """Claims chunks of rows (unknown ones first) and queues them; each chunk is claimed —
        journalled in flight — before any of its rows is sent."""
        try:
            chunk = self.s.concurrency
            while not self.stopping.is_set():
                # One commit settles what finished since the last chunk and claims this one,
                # so a kill leaves about three chunks in flight, not a flush interval's worth.
                part = self.writer.claim(chunk)
                if not part:
                    if not self.ledger.held_elsewhere():
                        break
                    # Other workers hold the rest; wait in case one dies and its rows come back.
                    await asyncio.sleep(CLAIM_RETRY)
                    continue
                self._journalled.update(r.id for r in part)
                # already unknown: never release blindly
                self._ambiguous.update(r.id for r in part if r.unknown)
                for row in part:
                    await self.queue.put(row)
        except asyncio.CancelledError:
            return
        for _ in range(self.s.concurrency):
            await self.queue.put(None)

    # ---- workers -------------------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            if self.stopping.is_set():
                return
            row = await self.queue.get()
            if row is None:
                return
            if self.stopping.is_set():
                return
            await self._process(row, _RowContext(row.id), self.s.read_back)

    async def _process(self, row: WorkRow, ctx: _RowContext, confirm: bool = False) -> RowResult | None:
        """Settle one row and hand its outcome to the writer; None when the run stopped first."""
        self._started.add(row.id)
        try:
            result = await self._settle(row, ctx, confirm)
        except AbortRow as stop:
            if not stop.sent:
                self._started.discard(row.id)
            return None
        self._journalled.discard(row.id)
        self._started.discard(row.id)
        self._ambiguous.discard(row.id)
        self.counters.settled += 1
        if result.state is State.SUCCEEDED:
            self.counters.ok += 1
        elif result.state is State.UNCHANGED:
            self.counters.unchanged += 1
        else:
            self.counters.failed += 1
        self.writer.add(result)
        if self.tripwire.armed:
            tripped = self.tripwire.observe(result)
            if tripped:
                self._abort(tripped)
        return result

    async def _settle(self, row: WorkRow, ctx: _RowContext, confirm: bool = False) -> RowResult:
        if row.expect is not None:
            return await self._settle_expecting(row, ctx, confirm)
        previous: str | None = None
        read_first = (self.s.mode == "reconcile" or self.s.record_previous or row.audit
                      or (row.unknown and self.s.resume_check == "read"))
        if read_first:
            got = await self._call(ctx, self.read_pacer, self.client.get_card, row.card)
            if got.ok:
                if row.external_id and got.external_id == row.external_id:
                    state = (State.SUCCEEDED if row.unknown and self.s.mode != "reconcile" and not row.audit
                             else State.UNCHANGED)
                    note = ("confirmed by reading the card after an interrupted run" if state is State.SUCCEEDED
                            else "audit: the card still holds the confirmed external ID" if row.audit
                            else "card already held the target external ID")
                    return self._result_row(row, ctx, state, got, note=note)
                previous = got.external_id or ""   # '' = the card had no external ID
            elif got.kind is Kind.REJECTED and got.error_code == str(CARD_NOT_FOUND):
                return self._result_row(row, ctx, State.FAILED, got)
            # any other read problem: the PUT below decides

        external_id = row.external_id
        generated_note = None
        if not external_id:
            gen = await self._call(ctx, self.read_pacer, self.client.generate_external_id)
            if not gen.ok or not gen.external_id:
                return self._result_row(row, ctx, State.FAILED, gen)
            external_id = gen.external_id
            self.ledger.store_generated(row.id, external_id)
            generated_note = "external ID generated by GET /v2/cardNumber"

        if row.audit and previous is not None:
            generated_note = f"audit: drift, the card held {_id_or_none(previous)}; the confirmed ID was put back"
        ctx.sent_id = external_id
        put = await self._call(ctx, self.pacer, self.client.put_card, row.card, external_id, is_put=True)
        ctx.put = put
        if put.kind is Kind.RETRY and put.bare_500 and ctx.bare_500 >= BARE_500_ATTEMPTS:
            after = await self._after_bare_500s(row, ctx, external_id, put, previous)
            if isinstance(after, RowResult):
                return after
            put = ctx.put = after
        if put.ok and not confirm:
            return self._result_row(row, ctx, State.SUCCEEDED, put, previous=previous, note=generated_note)
        if put.ok or put.kind is Kind.UNCONFIRMED:
            # The answer alone is no proof here: it contradicts the request (or a read-back is asked).
            why = put.error_message or "confirming the PUT's answer"
            return await self._confirm_by_read(row, ctx, external_id, put, previous, why)
        if put.kind is Kind.RETRY and (ctx.ambiguous or put.bare_500):
            # Retries ran out on answers that were lost or hide the row's fate: the card says.
            why = (f"HTTP 500 without a card error code ({put.error_message})" if put.bare_500
                   else f"the PUT's answers were lost ({put.error_message})")
            return await self._confirm_by_read(row, ctx, external_id, put, previous, why)
        if put.kind is Kind.REJECTED and put.error_code == str(EXTERNAL_ID_EXISTS):
            # 3045 is a success when the card itself already holds that ID (e.g. a resent PUT).
            check = await self._call(ctx, self.read_pacer, self.client.get_card, row.card)
            ctx.read = check
            if check.ok and check.external_id == external_id:
                return self._result_row(row, ctx, State.SUCCEEDED, check, previous=previous,
                                        note="card already held this external ID (3045 on resend)")
        return self._result_row(row, ctx, State.FAILED, put, previous=previous)

    async def _after_bare_500s(self, row: WorkRow, ctx: _RowContext, external_id: str, put: Outcome,
                               previous: str | None) -> RowResult | Outcome:
        """A few bare HTTP 500s: the documented answer for a failed row, or a server hiccup. The card
        tells: it holds the ID, or does not exist (3010); otherwise the PUT gets its remaining tries
        (their final answer is returned)."""
        got = await self._call(ctx, self.read_pacer, self.client.get_card, row.card)
        ctx.read = got
        if got.ok and got.external_id == external_id:
            return self._result_row(row, ctx, State.SUCCEEDED, got, previous=previous,
                                    note=f"HTTP 500 without a card error code {ctx.bare_500} times; "
                                         "the card read back holds the ID")
        if got.kind is Kind.REJECTED:
            return self._result_row(row, ctx, State.FAILED, got, previous=previous)
        left = self.s.max_attempts - ctx.bare_500
        ctx.bare_500 = -1      # no second early stop
        if left <= 0:
            holds = (f"holds {got.external_id!r}" if got.external_id else "holds no external ID") if got.ok \
                else f"could not be read ({got.error_code})"
            return self._result_row(row, ctx, State.FAILED, put, previous=previous,
                                    message=f"{put.error_message}; the card read back {holds}")
        return await self._call(ctx, self.pacer, self.client.put_card, row.card, external_id, is_put=True,
                                attempts=left)

    async def _confirm_by_read(self, row: WorkRow, ctx: _RowContext, external_id: str, answer: Outcome,
                               previous: str | None, why: str) -> RowResult:
        """Settle a row whose PUT answer does not prove its outcome by reading the card."""
        got = await self._call(ctx, self.read_pacer, self.client.get_card, row.card)
        ctx.read = got
        if got.ok and (got.external_id or "") == external_id:
            note = f"{why}; the card read back holds the ID" if answer.kind is not Kind.SUCCESS else None
            return self._result_row(row, ctx, State.SUCCEEDED, got, previous=previous, note=note)
        if got.ok:
            holds = f"holds {got.external_id!r}" if got.external_id else "holds no external ID"
            if answer.kind is Kind.RETRY:
                return self._result_row(row, ctx, State.FAILED, answer, previous=previous,
                                        message=f"{answer.error_message}; the card read back {holds}")
            return self._result_row(row, ctx, State.FAILED, answer, previous=previous, code=NOT_APPLIED,
                                    message=f"the API answered HTTP {answer.http_status} ({why}), but the "
                                            f"card read back {holds}, not {external_id!r}")
        if answer.kind is Kind.RETRY and got.kind is Kind.REJECTED:
            return self._result_row(row, ctx, State.FAILED, got, previous=previous)   # e.g. 3010
        if answer.kind is not Kind.RETRY and got.kind is Kind.REJECTED:
            return self._result_row(row, ctx, State.FAILED, answer, previous=previous, code=NOT_APPLIED,
                                    message=f"the API answered HTTP {answer.http_status} ({why}), but reading "
                                            f"the card answered {got.error_code}: {got.error_message}")
        return self._result_row(row, ctx, State.FAILED, answer, previous=previous, code=UNCONFIRMED,
                                message=f"{why}; reading the card to check failed too "
                                        f"({got.error_code}: {got.error_message})")

    async def _settle_expecting(self, row: WorkRow, ctx: _RowContext, confirm: bool = False) -> RowResult:
        """Compare-and-set (``capbatch revert``): read the card; PUT ``row.external_id`` only while the
        card still holds ``row.expect``. A card changed since by someone else is left alone."""
        got = await self._call(ctx, self.read_pacer, self.client.get_card, row.card)
        if not got.ok:
            return self._result_row(row, ctx, State.FAILED, got)   # never written blind
        current = got.external_id or ""
        if current == row.external_id:
            state = State.SUCCEEDED if row.unknown else State.UNCHANGED
            return self._result_row(row, ctx, state, got, note="the card already holds this external ID")
        if current != row.expect:
            return RowResult(id=row.id, state=State.FAILED, attempts=ctx.attempts, http_status=got.http_status,
                             error_code=CHANGED_SINCE, card_id=got.card_id, customer_id=got.customer_id,
                             error_message=f"the card now holds {_id_or_none(current)}, not "
                                           f"{row.expect!r}: changed by someone else since; left alone",
                             previous_external_id=current, latency_ms=ctx.latency_ms, settled_at=time.time(),
                             warnings=ctx.warnings or ())
        put = await self._call(ctx, self.pacer, self.client.put_card, row.card, row.external_id, is_put=True)
        ctx.put = put
        if put.kind is Kind.UNCONFIRMED or (confirm and put.ok):
            why = put.error_message or "confirming the PUT's answer"
            return await self._confirm_by_read(row, ctx, row.external_id, put, current, why)
        if not put.ok and put.kind is Kind.REJECTED and put.error_code == str(EXTERNAL_ID_EXISTS):
            check = await self._call(ctx, self.read_pacer, self.client.get_card, row.card)
            if check.ok and check.external_id == row.external_id:
                put = check
        state = State.SUCCEEDED if put.ok else State.FAILED
        return self._result_row(row, ctx, state, put, previous=current)

    def _result_row(self, row: WorkRow, ctx: _RowContext, state: State, outcome: Outcome,
                    previous: str | None = None, note: str | None = None, code: str | None = None,
                    message: str | None = None) -> RowResult:
        failed = state is State.FAILED
        return RowResult(
            id=row.id, state=state, attempts=ctx.attempts, http_status=outcome.http_status,
            error_code=(code or outcome.error_code) if failed else None,
            error_message=(message or outcome.error_message) if failed else None,
            card_id=outcome.card_id, customer_id=outcome.customer_id,
            previous_external_id=previous, latency_ms=ctx.latency_ms, note=note,
            settled_at=time.time(), warnings=ctx.warnings or (),
        )

    async def _call(self, ctx: _RowContext, pacer: Pacer, fn: Callable[..., Awaitable[Outcome]], *args: str,
                    is_put: bool = False, attempts: int | None = None) -> Outcome:
        """One logical call with retries: transient failures back off and retry up to --max-attempts."""
        tries = 0
        while True:
            if self.abort_message or (self.stopping.is_set() and ctx.attempts == 0):
                raise AbortRow(sent=ctx.attempts > 0)
            await self.window.wait_open(self.stopping)     # outside the sending windows: nothing goes out
            if self.abort_message or (self.stopping.is_set() and (ctx.attempts == 0 or not self.window.is_open())):
                raise AbortRow(sent=ctx.attempts > 0)
            probe = await self.breaker.admit()
            if self.breaker.expired():
                self._abort(f"the API has been unavailable for over {self.s.outage_budget:g} s "
                            f"(last error: {ctx.http_status or 'no answer'}); rerun the same command "
                            "later to resume")
                raise AbortRow(sent=ctx.attempts > 0)
            await pacer.acquire()
            if self.abort_message or (self.stopping.is_set() and ctx.attempts == 0):
                raise AbortRow(sent=ctx.attempts > 0)
            outcome = await fn(*args)
            ctx.attempts += 1
            self.counters.requests += 1
            status_class = f"{outcome.http_status // 100}xx" if outcome.http_status else "none"
            self.counters.by_status[status_class] = self.counters.by_status.get(status_class, 0) + 1
            ctx.latency_ms = outcome.latency_ms
            ctx.http_status = outcome.http_status
            if self._debug:
                log.debug("%s -> %s in %.0f ms (row %s, attempt %d)", _CALL_LABELS.get(fn.__name__, fn.__name__),
                          outcome.http_status or outcome.error_code, outcome.latency_ms, ctx.row_id, ctx.attempts)
            if outcome.http_status is not None:
                self._answered = True
            if outcome.warnings:
                ctx.add_warnings(outcome.warnings)
            if outcome.kind is Kind.FATAL:
                self._abort(outcome.error_message or "fatal API error")
                raise AbortRow
            pacer.answered(outcome.throttled, outcome.retry_after)
            transient = outcome.kind is Kind.RETRY
            if probe or not outcome.bare_500 or not is_put:
                # A PUT's bare 500 is the API's documented answer for a failed row, not a sign of an
                # outage; the read that settles the row tells the breaker whether the API is up.
                self.breaker.record(transient and not outcome.throttled, probe)
            if self.breaker.is_open is not self._breaker_open:
                self._breaker_changed(outcome)
            if not transient:
                return outcome
            delay_cap = MAX_RETRY_AFTER
            if not self._answered and outcome.error_code in UNREACHABLE_CODES:
                self._unreached += 1
                if self._unreached >= FAIL_FAST_AFTER:
                    self._abort(f"cannot reach {self.client.base_url}: {outcome.error_message}. No request "
                                "has been answered in this run, so this is the target (or DNS, a proxy, a "
                                "firewall), not an outage: check --cluster/--base-url, then rerun the same "
                                "command")
                    raise AbortRow(sent=ctx.ambiguous)
                delay_cap = FAIL_FAST_DELAY
            elif is_put and outcome.http_status is None and outcome.error_code not in UNREACHABLE_CODES:
                ctx.ambiguous = True  # timeout or dropped connection: the PUT may have landed
                self._ambiguous.add(ctx.row_id)
            if outcome.throttled:
                self.counters.throttled += 1
                self._note_throttling(pacer)
            if not (probe or self.breaker.is_open):
                tries += 1
            if tries >= (attempts or self.s.max_attempts):
                return outcome
            if is_put and outcome.bare_500 and ctx.bare_500 >= 0:
                ctx.bare_500 += 1
                if ctx.bare_500 >= BARE_500_ATTEMPTS:
                    return outcome   # the card is read before any further try
            self.counters.retries += 1
            self.writer.note_retry(outcome.throttled)
            delay = min(delay_cap, max(backoff_delay(tries), min(outcome.retry_after or 0.0, MAX_RETRY_AFTER)))
            log.debug("row %d: %s (%s); retry %d in %.1f s", ctx.row_id, outcome.http_status or "no answer",
                      outcome.error_message or "transient", tries, delay)
            self.counters.retrying += 1
            try:
                await asyncio.sleep(delay)
            finally:
                self.counters.retrying -= 1

    # ---- saying what is happening --------------------------------------------------------------
    def _breaker_changed(self, outcome: Outcome) -> None:
        self._breaker_open = self.breaker.is_open
        if self._breaker_open:
            self._outage_began = time.monotonic()
            log.warning("the API looks unavailable (most of the last %d calls failed; last: %s): pausing and "
                        "probing; the run stops if this lasts over %g s (--outage-budget)", self.breaker.window,
                        " ".join(str(x) for x in (outcome.http_status, outcome.error_message) if x),
                        self.s.outage_budget)
        else:
            log.warning("the API answers again after %.1f s: outage over, resuming",
                        time.monotonic() - self._outage_began)

    def _note_throttling(self, pacer: Pacer) -> None:
        self._answers_429 += 1
        if pacer.throttle_events > self._throttle_logged.get(id(pacer), 0):
            self._throttle_logged[id(pacer)] = pacer.throttle_events
            rate = pacer.current_per_second
            if pacer.rate is not None:
                self._rate_lowered.add(id(pacer))
            share = 100.0 * self._answers_429 / max(1, self.counters.requests)
            log.warning("systematic throttling (%.0f %% of this run's answers were 429): %s", share,
                        f"rate lowered to {rate:.2f}/s" if rate else "pausing as the server asks")

    def _watch_rates(self) -> None:
        """From the flusher, a few times a second: say when a lowered rate has recovered."""
        if not self._rate_lowered:
            return
        for pacer in (self.pacer, self.read_pacer):
            if id(pacer) in self._rate_lowered and pacer.factor >= 1.0:
                self._rate_lowered.discard(id(pacer))
                log.warning("throttling over: rate back to %.2f/s", pacer.current_per_second or 0.0)


def _id_or_none(external_id: str | None) -> str:
    """An external ID as a note quotes it (repr, so spaces and odd characters show), or "no external ID"."""
    return repr(external_id) if external_id else "no external ID"
