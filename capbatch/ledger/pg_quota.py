"""The shared quota's PostgreSQL backend: capbatch.quota's state in the ledger database, so every
worker of every job on that database, on any host, that sends with one credential to one API paces
on one grid — with the same rules as runs sharing a state file on one host (fair turns by
``--priority``, the lower ``--rate`` holds, the margin learned from 429s, shared pause and back-off).

The state of a quota key is one row of ``capbatch.quota`` (a JSON document: the grid's next free
slot, the shared back-off, the learned margin, the members). Every change is one transaction on that
row, in two round trips (pipeline mode): ``SELECT ... FOR UPDATE`` together with the database's
``clock_timestamp()``, then the rule of :mod:`capbatch.quota` applied to it in Python — the rules
exist once, there — and the ``UPDATE`` with the ``COMMIT``. Concurrent workers queue on the row lock,
so the change is atomic.

Time is the database's: the rules run on its clock, so hosts whose clocks disagree still share one
grid. Each worker measures the offset between its clock and the database's (the sample with the
shortest round trip of the last minute; its error is at most half that round trip, so an offset
within that bound counts as none) and converts the slots it is given to its own clock. A lease covers about
a second of the worker's share of the grid (``lease_seconds``), and at most a tenth of the quota's
window (0.1 s of a per-second quota; at least one slot): the grid is handed out only that far ahead,
so a worker that stalls or dies strands few slots, a worker that (re)starts gets its turn at once,
and a send that left late can still move the slots a window later (see
:func:`capbatch.quota.late_shift`). So a worker touches the database about once a second under a
per-minute quota, and up to ten times a second (one transaction per slot at most) under a per-second one.

News travels at once: a change the other workers should act on before their next lease — slots
given back by a worker that stopped, a Retry-After pause, a lowered rate factor — is announced with
``NOTIFY capbatch_quota`` in the same transaction, and every worker LISTENs on a second connection
(``watch``): it takes the spare slots, or the pause, right away. A worker that dies cannot say so,
but its connection closes with it: while listening, each worker looks a few times a second whether
the connections of the others are still in ``pg_stat_activity`` (no lock, one round trip), and when
one is gone it leases at once — the lease drops the dead member and hands out the slots it held.

This backend has its own connections (autocommit, the ledger's connection options), apart from the
ledger's: a lease never waits for a ledger transaction, and a read-only ledger (``verify``) can still
share the quota. A database that cannot be used raises :class:`~capbatch.quota.QuotaUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from typing import Any, Callable, Mapping

import psycopg
from psycopg.types.json import Jsonb

from ..config import Rate
from ..quota import (
    Grant,
    Member,
    QuotaKey,
    QuotaState,
    QuotaUnavailable,
    STALE_STATE_DAYS,
    lease_slots,
    leave,
    other_runs,
    report_lates,
    report_throttle,
)
from .base import redact_password
from .postgres import _redact, check_url, connect_options, ensure_schema

log = logging.getLogger("capbatch.quota")

LEASE_SECONDS = 1.0        # a lease covers about this much of the grid (and at most a tenth of the window)
PROBE_EVERY = 0.3          # seconds between looks whether the other members' connections are open
OFFSET_FRESH = 30.0        # seconds a clock-offset sample is trusted before another is taken
OFFSET_KEEP = 60.0         # seconds samples are kept to pick the shortest round trip from
PEEK_TIMEOUT = 3           # seconds the plan waits for the database to say who else shares the quota

# The state, and which of its members' connections are still open (a killed worker's closes at once).
_SELECT = ("SELECT q.state, ARRAY(SELECT a.pid FROM pg_stat_activity a WHERE a.pid IN "
           "(SELECT (m.value->>'session')::int FROM jsonb_each(q.state->'members') m)) "
           "FROM capbatch.quota q WHERE q.key = %s FOR UPDATE")
_NOW = "SELECT extract(epoch FROM clock_timestamp())::float8"
_UPDATE = "UPDATE capbatch.quota SET state = %s, updated_at = now() WHERE key = %s"
_CREATE = ("INSERT INTO capbatch.quota (key, target, lane) VALUES (%s, %s, %s) "
           "ON CONFLICT (key) DO NOTHING")
CHANNEL = "capbatch_quota"
_NOTIFY = f"SELECT pg_notify('{CHANNEL}', %s)"
_SWEEP = f"DELETE FROM capbatch.quota WHERE updated_at < now() - interval '{STALE_STATE_DAYS} days'"
_HAS_QUOTA_STATE = ("SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = 'capbatch' "
                    "AND table_name = 'quota' AND column_name = 'state')")


class PostgresQuotaBackend:
    """A :class:`capbatch.quota.QuotaBackend` on the ``capbatch.quota`` table of ``url``."""

    lease_seconds = LEASE_SECONDS

    def __init__(self, url: str) -> None:
        check_url(url)
        self.url = url
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()            # one transaction at a time on this connection
        self._keys: set[str] = set()           # rows known to exist
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=256)   # (taken, rtt, offset)
        self._watchers: dict[str, list[Callable[[], None]]] = {}
        self._peer_sessions: dict[str, frozenset[int]] = {}   # key -> the other members' connections
        self._listener: asyncio.Task[None] | None = None
        self._listen_conn: psycopg.AsyncConnection[Any] | None = None
        self.round_trips = 0
        self.notices = 0

    def describe(self) -> str:
        return f"the ledger database {redact_password(self.url)}"

    # ---- the connection and the clock ------------------------------------------------------------
    def _unavailable(self, exc: BaseException) -> QuotaUnavailable:
        return QuotaUnavailable(_redact(str(exc), self.url) or type(exc).__name__)

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        try:
            conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True,
                                                         **connect_options(self.url, "capbatch quota"))
            # the quota table of this design (schema 3); an older database is migrated first
            cur = await conn.execute(_HAS_QUOTA_STATE)
            row = await cur.fetchone()
            if not (row and row[0]):
                # A database no run has set up yet (a --check-remote before the first run): the
                # ledger's own migration creates the schema, quota table included.
                await asyncio.to_thread(ensure_schema, self.url)
            await conn.execute(_SWEEP)
        except psycopg.Error as exc:
            raise self._unavailable(exc) from exc
        except Exception as exc:   # noqa: BLE001 - ensure_schema's LedgerError: say why, pace alone
            raise QuotaUnavailable(str(getattr(exc, "message", exc))) from exc
        self._conn = conn
        return conn

    def _sample(self, sent: float, received: float, db_now: float) -> None:
        self._samples.append((received, received - sent, db_now - (sent + received) / 2))

    @property
    def offset(self) -> float:
        """The database's clock minus this host's, from the shortest recent round trip."""
        horizon = time.time() - OFFSET_KEEP
        recent = [s for s in self._samples if s[0] >= horizon] or list(self._samples)
        if not recent:
            return 0.0
        _, rtt, offset = min(recent, key=lambda s: s[1])
        # Within half the round trip the offset cannot be told from none (the same clock, or hosts
        # kept in step by NTP): then none is exact, where the noisy estimate would eat into the margin.
        return 0.0 if abs(offset) <= rtt / 2 else offset

    async def _calibrate(self, conn: psycopg.AsyncConnection[Any], samples: int) -> None:
        for _ in range(samples):
            sent = time.time()
            cur = await conn.execute(_NOW)
            row = await cur.fetchone()
            self._sample(sent, time.time(), float(row[0]))      # type: ignore[index]
            self.round_trips += 1

    # ---- one atomic change of a key's state ------------------------------------------------------
    async def _apply(self, key: QuotaKey, change: Callable[[QuotaState, float, frozenset[int]], Any]) -> Any:
        """Run ``change(state, database_now, live_sessions)`` on ``key``'s row under its row lock;
        return its result."""
        async with self._lock:
            conn = await self._connection()
            try:
                if key.name not in self._keys:
                    await conn.execute(_CREATE, (key.name, key.target.rstrip("/"), key.lane))
                    self._keys.add(key.name)
                    self.round_trips += 1
                fresh = any(s[0] >= time.time() - OFFSET_FRESH for s in self._samples)
                if not fresh:
                    await self._calibrate(conn, 1 if self._samples else 3)
                sent = time.time()
                async with conn.pipeline(), conn.transaction():
                    selected = await conn.execute(_SELECT, (key.name,))
                    clock = await conn.execute(_NOW)            # after the row lock is ours
                    row = await selected.fetchone()
                    db_now = float((await clock.fetchone())[0])  # type: ignore[index]
                    self._sample(sent, time.time(), db_now)
                    state = QuotaState.from_json(row[0] if row and row[0] else {})
                    live = frozenset([*(row[1] or ()), conn.info.backend_pid] if row else [conn.info.backend_pid])
                    before = (set(state.spare), state.pause_until, state.factor)
                    result = change(state, db_now, live)
                    await conn.execute(_UPDATE, (Jsonb(state.to_json()), key.name))
                    if _news(before, state):
                        await conn.execute(_NOTIFY, (key.name,))    # delivered at COMMIT
                self.round_trips += 2
                return result
            except psycopg.Error as exc:
                if self._conn is not None and self._conn.broken:
                    self._conn = None
                raise self._unavailable(exc) from exc

    # ---- the backend interface (see capbatch.quota) ----------------------------------------------
    def _me(self, member: Member) -> Member:
        """The member as this connection: if its connection closes (the process died), it is gone."""
        pid = self._conn.info.backend_pid if self._conn is not None else 0
        return member if member.session == pid else dataclasses.replace(member, session=pid)

    async def lease(self, key: QuotaKey, member: Member, count: int, now: float,
                    spare_only: bool = False) -> Grant:
        grant = await self._apply(key, lambda s, db_now, live: lease_slots(s, self._me(member), count, db_now, live,
                                                                           spare_only))
        self._peer_sessions[key.name] = frozenset(p.session for p in grant.peers if p.session)
        offset = self.offset          # database slots -> this host's clock
        return Grant(tuple(s - offset for s in grant.slots), grant.rate, grant.jitter, grant.factor,
                     grant.pause_until - offset if grant.pause_until else 0.0, grant.peers,
                     grant.retry_at - offset if grant.retry_at else 0.0)

    async def throttled(self, key: QuotaKey, member: Member, now: float, retry_after: float | None,
                        slow_down: bool) -> bool:
        return bool(await self._apply(
            key, lambda s, db_now, live: report_throttle(s, self._me(member), db_now, retry_after, slow_down)))

    async def late(self, key: QuotaKey, member: Member, now: float, shifts: Mapping[float, float]) -> None:
        offset = self.offset          # this host's slots -> the database's clock
        mine = {slot + offset: shift for slot, shift in shifts.items()}
        await self._apply(key, lambda s, db_now, live: report_lates(s, self._me(member), db_now, mine))

    async def leave(self, key: QuotaKey, member: Member, unused: tuple[float, ...], now: float) -> None:
        offset = self.offset          # this host's slots -> the database's clock
        await self._apply(key, lambda s, db_now, live: leave(s, member, tuple(u + offset for u in unused), db_now))

    async def read(self, key: QuotaKey) -> QuotaState:
        """The state as stored (status and tests); no lock, no change."""
        conn = await self._connection()
        try:
            cur = await conn.execute("SELECT state FROM capbatch.quota WHERE key = %s", (key.name,))
            row = await cur.fetchone()
        except psycopg.Error as exc:
            raise self._unavailable(exc) from exc
        return QuotaState.from_json(row[0] if row and row[0] else {})

    # ---- news from the other workers -------------------------------------------------------------
    def watch(self, key: QuotaKey, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on this event loop) whenever another worker announces news on ``key``."""
        self._watchers.setdefault(key.name, []).append(callback)
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        try:
            conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True,
                                                         **connect_options(self.url, "capbatch quota"))
            self._listen_conn = conn
            await conn.execute(f"LISTEN {CHANNEL}")
            while True:
                async for notice in conn.notifies(timeout=PROBE_EVERY):
                    own = self._conn.info.backend_pid if self._conn is not None and not self._conn.closed else 0
                    if notice.pid != own:
                        self.notices += 1
                        self._tell(notice.payload)
                await self._probe(conn)
        except psycopg.Error as exc:
            # Without news the workers still learn everything at their next lease (about a second).
            log.debug("stopped listening for quota news in %s: %s", redact_password(self.url),
                      _redact(str(exc), self.url))

    def _tell(self, key_name: str) -> None:
        for callback in self._watchers.get(key_name, ()):
            callback()

    async def _probe(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Tell the watchers of a key when a member's connection has closed (the member died)."""
        sessions = {key: s for key, s in self._peer_sessions.items() if s}
        if not sessions:
            return
        every = sorted(set().union(*sessions.values()))
        cur = await conn.execute("SELECT coalesce(array_agg(pid), '{}') FROM pg_stat_activity WHERE pid = ANY(%s)",
                                 (every,))
        row = await cur.fetchone()
        alive = set(row[0]) if row else set()
        for key, peers in sessions.items():
            if peers - alive:
                self._peer_sessions[key] = frozenset(peers & alive)
                self._tell(key)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        conns, self._listen_conn, self._conn = (self._listen_conn, self._conn), None, None
        for conn in conns:
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    await conn.close()


def _news(before: tuple[set[float], float, float], state: QuotaState) -> bool:
    """Did this change give slots back, set a longer pause or lower the rate factor?"""
    spare, pause_until, factor = before
    return bool(set(state.spare) - spare) or state.pause_until > pause_until or state.factor < factor


def live_members(url: str, key: QuotaKey, rate: Rate, run: str = "") -> int:
    """How many runs other than ``run`` share ``key`` in ``url``'s quota table right now (0 if that
    cannot be told within a few seconds). Reads only."""
    try:
        options = {**connect_options(url, "capbatch quota"), "connect_timeout": PEEK_TIMEOUT}
        with psycopg.connect(url, autocommit=True, **options) as conn:
            if not conn.execute(_HAS_QUOTA_STATE).fetchone()[0]:  # type: ignore[index]
                return 0
            row = conn.execute(f"SELECT state, ({_NOW}) FROM capbatch.quota WHERE key = %s",
                               (key.name,)).fetchone()
    except psycopg.Error as exc:
        log.debug("could not read the shared quota in %s: %s", redact_password(url), _redact(str(exc), url))
        return 0
    if not row or not row[0]:
        return 0
    return other_runs(QuotaState.from_json(row[0]), float(row[1]), rate, run)
