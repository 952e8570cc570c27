"""One API quota across hosts: a GCRA grid of send slots kept in one PostgreSQL row.

Every worker that sends with the same credential to the same API (the quota key: the API's base URL
and a hash of the account's identity, never a secret) leases its next slots from the row
``capbatch.quota(key)`` in one atomic ``UPDATE ... RETURNING``: the row's ``tat`` (theoretical
arrival time, on the database's clock, so hosts' clocks do not matter) is the next free slot; a
lease of ``n`` slots moves it ``n`` intervals on. Slots are spaced ``1 / (0.98 R)`` apart, so no
window of the quota's length ever holds more than R of them, whoever sends them; a slot a worker
misses by more than a small tolerance is dropped, never sent late into the next worker's slots.

A lease covers what the worker can use soon: the sends waiting for a slot right now (at most its
concurrency), up to a second's worth. A worker that dies leaves at most that many slots unused.

Shared back-off: a 429's ``Retry-After`` moves the row's ``pause_until`` (every later lease starts
after it), and systematic throttling seen by any worker lowers the row's ``factor`` (x0.7, at most
once a second), which recovers by 5 % every 2 s without throttling.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import deque
from typing import Any, Callable

from ..config import Credentials, Rate

log = logging.getLogger("capbatch.quota")

RATE_SAFETY = 0.98       # fraction of the quota the grid hands out
LEASE_SECONDS = 1.0      # a lease covers at most this much sending time
MIN_FACTOR, DECREASE, INCREASE_EVERY, INCREASE_STEP = 0.05, 0.7, 2.0, 0.05
ANSWERS, THRESHOLD = 50, 0.20   # systematic throttling: >= 20 % of the last 50 answers were 429
MAX_PAUSE = 300.0


def quota_key(base_url: str, credentials: Credentials) -> str:
    """The quota's name: the API and the account's identity (user name or client key), hashed."""
    kind = credentials.kind
    identity = credentials.client_key if kind == "oauth" else credentials.username if kind == "basic" else ""
    return hashlib.sha256(f"capbatch-quota\n{base_url.rstrip('/')}\n{kind}\n{identity or ''}".encode()).hexdigest()[:32]


_LEASE_SQL = """
UPDATE capbatch.quota q SET
    factor = CASE WHEN q.factor < 1 AND c.now - q.changed_at >= %(every)s
                  THEN least(1.0, q.factor + %(step)s) ELSE q.factor END,
    changed_at = CASE WHEN q.factor < 1 AND c.now - q.changed_at >= %(every)s THEN c.now ELSE q.changed_at END,
    tat = greatest(q.tat, c.now, q.pause_until) + %(n)s * %(interval)s
          / (CASE WHEN q.factor < 1 AND c.now - q.changed_at >= %(every)s
                  THEN least(1.0, q.factor + %(step)s) ELSE q.factor END),
    leases = q.leases + 1
FROM (SELECT extract(epoch FROM clock_timestamp())::float8 AS now) c
WHERE q.key = %(key)s
RETURNING q.tat, q.factor, c.now
"""


class SharedPacer:
    """The engine's pacer (``acquire`` / ``answered`` / ``throttle_events``) over the shared grid."""

    def __init__(self, execute: Callable[..., Any], key: str, rate: Rate) -> None:
        self.execute = execute     # runs one statement on the worker's database connection
        self.key = key
        self.rate = rate
        self.interval = 1.0 / (rate.per_second * RATE_SAFETY)
        # A slot may be used this late at most: half the margin the safety factor leaves in a window.
        self.tolerance = min(self.interval / 2, rate.period * (1 - RATE_SAFETY) / 2)
        self.throttle_events = 0
        self.factor = 1.0
        self._slots: deque[float] = deque()      # leased slots, on this process's monotonic clock
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._pause_until = 0.0
        self._answers: deque[bool] = deque(maxlen=ANSWERS)
        self._last_decrease = -1e9
        self.leases = 0
        self.dropped = 0
        execute("INSERT INTO capbatch.quota(key) VALUES (%s) ON CONFLICT (key) DO NOTHING", (key,))

    @property
    def current_per_second(self) -> float:
        return self.rate.per_second * RATE_SAFETY * self.factor

    async def acquire(self) -> None:
        self._waiting += 1
        try:
            async with self._lock:       # one send at a time takes the next slot, in order
                while True:
                    now = time.monotonic()
                    while self._slots and (self._slots[0] < now - self.tolerance or self._slots[0] < self._pause_until):
                        self._slots.popleft()     # missed (or inside a pause): never send late
                        self.dropped += 1
                    if not self._slots:
                        self._lease(self._waiting)
                        continue
                    wait = self._slots[0] - now
                    if wait > 0:
                        await asyncio.sleep(wait)
                        continue
                    self._slots.popleft()
                    return
        finally:
            self._waiting -= 1

    def _lease(self, wanted: int) -> None:
        n = max(1, min(wanted, math.ceil(LEASE_SECONDS * self.current_per_second)))
        sent = time.monotonic()
        tat, factor, db_now = self.execute(_LEASE_SQL, {
            "key": self.key, "n": n, "interval": self.interval, "every": INCREASE_EVERY,
            "step": INCREASE_STEP}).fetchone()
        received = time.monotonic()
        offset = (sent + received) / 2 - db_now          # database clock -> our monotonic clock
        spacing = self.interval / factor
        start = tat - n * spacing
        self._slots.extend(start + i * spacing + offset for i in range(n))
        self.factor = factor
        self.leases += 1

    def answered(self, throttled: bool, retry_after: float | None = None) -> None:
        self._answers.append(throttled)
        if not throttled:
            return
        now = time.monotonic()
        pause = min(retry_after, MAX_PAUSE) if retry_after else 0.0
        if pause:
            self._pause_until = max(self._pause_until, now + pause)
        throttled_n = sum(self._answers)
        systematic = throttled_n >= max(5, THRESHOLD * len(self._answers))
        decrease = systematic and now - self._last_decrease >= max(1.0, pause)
        if not pause and not decrease:
            return
        if decrease:
            self._last_decrease = now
            self.throttle_events += 1
        # Every worker's next lease starts after the pause, at the lowered rate.
        self.execute(
            "UPDATE capbatch.quota q SET pause_until = greatest(q.pause_until, c.now + %(pause)s), "
            "factor = CASE WHEN %(decrease)s AND c.now - q.changed_at >= 1 "
            "              THEN greatest(%(min)s, q.factor * %(down)s) ELSE q.factor END, "
            "throttle_events = q.throttle_events + (CASE WHEN %(decrease)s THEN 1 ELSE 0 END), "
            "changed_at = CASE WHEN %(decrease)s AND c.now - q.changed_at >= 1 THEN c.now ELSE q.changed_at END "
            "FROM (SELECT extract(epoch FROM clock_timestamp())::float8 AS now) c WHERE q.key = %(key)s",
            {"pause": pause, "decrease": decrease, "min": MIN_FACTOR, "down": DECREASE, "key": self.key})
        if decrease:
            log.warning("the API is throttling (%d of the last %d answers were 429): every worker on this "
                        "quota slows down", throttled_n, len(self._answers))
