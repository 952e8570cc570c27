"""How fast to send: the rate pacer (aiolimiter plus a sliding-window guard), 429 back-off shared by
all workers, and the breaker.

Why not ``AsyncLimiter(R, 60)``: a leaky bucket as large as the quota lets a full bucket (R) go out
at once and then R more within the minute, so a server counting "R in any 60 s" sees nearly 2R.

The configuration used, measured against fixed, sliding and per-second server windows:
- aiolimiter paces: a bucket of ``b = max(2, 0.5 % of R)`` draining at 98 % of R. A bucket of at
  least 2 matters: with 1, every late timer wake-up (~1 ms) is throughput lost for good (measured
  46/s of a 49/s target); with 2, lateness up to one interval is absorbed.
- a thin guard on top keeps the exact promise: it remembers the last R send times and never lets
  an (R+1)-th send into any window of the quota's length, so the bucket's after-idle burst can
  never push a small quota (say 10/s) over.
Long-run rate: 98 % of R; the 2 % left over absorbs network jitter between our clock and the
server's (1.2 s per minute-window, 20 ms per second-window).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque

from aiolimiter import AsyncLimiter

from .config import Rate

RATE_SAFETY = 0.98      # fraction of the quota any window may hold (before the one-request slack)
BURST_FRACTION = 0.005  # bucket size as a fraction of the quota (at least two requests)
GUARD_MAX = 1_000_000   # the sliding-window guard remembers at most this many send times
MIN_FACTOR = 0.05       # the 429 back-off never goes below 5 % of the configured rate
DECREASE = 0.7          # multiplicative decrease per throttling episode
INCREASE_EVERY = 2.0    # seconds of 429-free sending between additive increases
INCREASE_STEP = 0.05    # fraction of the configured rate regained per step


class Pacer:
    """Paces requests to a rate, and slows every worker when the server throttles.

    Every 429 that carries ``Retry-After`` pauses all workers until it has passed. The rate itself
    is lowered (to 70 %, at most once a second) only when throttling is systematic — at least 20 % of
    the last 50 answers were 429 — so a stray 429 costs one retry, not the run's speed. Each further
    2 s without that condition gives back 5 % of the configured rate (AIMD), so a misjudged ``--rate``
    settles just under what the server accepts. With no ``--rate`` at all, the first systematic
    throttling sets the rate to 70 % of the rate observed just before it.
    """

    WINDOW = 50
    THRESHOLD = 0.20

    def __init__(self, rate: Rate | None) -> None:
        self.rate = rate
        self.factor = 1.0
        self._pause_until = 0.0
        self._last_decrease = -1e9
        self._last_increase = 0.0
        self._limiter: AsyncLimiter | None = None
        self._sends: deque[float] = deque(maxlen=512)
        self._answers: deque[bool] = deque(maxlen=self.WINDOW)   # True = throttled
        self._throttled_in_window = 0
        self._learned_rate: float | None = None
        self.throttle_events = 0
        # The guard: the last R send times, R being the configured quota per period.
        # A fractional or huge quota is rescaled to an equivalent whole count over a scaled window
        # (0.5/s -> 1 per 2 s; 2,000,000/h -> 1,000,000 per 30 min) so the guard stays exact.
        if rate:
            self._window_max = min(GUARD_MAX, max(1, math.floor(rate.requests)))
            self._window = rate.period * self._window_max / rate.requests
        else:
            self._window_max, self._window = 0, 0.0
        self._window_sends: deque[float] = deque()
        self._build()

    @property
    def current_per_second(self) -> float | None:
        base = self.rate.per_second if self.rate else self._learned_rate
        return None if base is None else base * RATE_SAFETY * self.factor

    def _build(self) -> None:
        target = self.current_per_second
        if target is None:
            self._limiter = None
            return
        period = self.rate.period if self.rate else 1.0
        burst = max(2.0, math.floor(target * period / RATE_SAFETY * BURST_FRACTION))
        self._limiter = AsyncLimiter(burst, burst / target)

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wait = self._pause_until - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            limiter = self._limiter
            if limiter is not None:
                await limiter.acquire()
                if limiter is not self._limiter or loop.time() < self._pause_until:
                    continue  # the rate changed or a pause began while we waited: queue again
            now = loop.time()
            if self._window_max:
                sends = self._window_sends
                while sends and now - sends[0] >= self._window:
                    sends.popleft()
                if len(sends) >= self._window_max:
                    await asyncio.sleep(self._window - (now - sends[0]))
                    continue
                sends.append(now)
            self._sends.append(now)
            self._maybe_increase(now)
            return

    def answered(self, throttled: bool, retry_after: float | None = None) -> None:
        """Every answer passes through here: 429s pause and, when systematic, slow the run."""
        if len(self._answers) == self._answers.maxlen and self._answers[0]:
            self._throttled_in_window -= 1
        self._answers.append(throttled)
        self._throttled_in_window += throttled
        if not throttled:
            return
        now = asyncio.get_running_loop().time()
        if retry_after is not None:
            self._pause_until = max(self._pause_until, now + min(retry_after, 300.0))
        systematic = self._throttled_in_window >= max(5, self.THRESHOLD * len(self._answers))
        if not systematic or now - self._last_decrease < max(1.0, retry_after or 0.0):
            return
        self.throttle_events += 1
        self._last_decrease = now
        self._last_increase = now
        if self.rate is None and self._learned_rate is None:
            self._learned_rate = self._observed_rate(now) or 10.0
        else:
            self.factor = max(MIN_FACTOR, self.factor * DECREASE)
        self._build()

    def _maybe_increase(self, now: float) -> None:
        if self.factor >= 1.0 or now - self._last_increase < INCREASE_EVERY:
            return
        if self._throttled_in_window >= max(5, self.THRESHOLD * len(self._answers)):
            return
        self._last_increase = now
        self.factor = min(1.0, self.factor + INCREASE_STEP)
        self._build()

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
            except asyncio.TimeoutError:
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
