"""Progress: a tqdm bar on a terminal, a concise log line every N seconds elsewhere, nothing when quiet.

The ETA comes from the pace actually achieved over the last minute of sending (time spent waiting
for a sending window does not count), laid over the sending windows: "eta 3 h 10 min" outside a
window includes the wait for the next one. While outside its windows the run says
"waiting for window (opens 22:00, in 3 h 10 min)".
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque
from typing import TYPE_CHECKING

from .window import WindowGate, human_duration
from .wording import plural

if TYPE_CHECKING:
    from tqdm import tqdm

    from .engine import Counters

log = logging.getLogger("capbatch.progress")

PACE_HORIZON = 60.0   # seconds of sending the pace (and so the ETA) is measured over
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def choose_mode(requested: str, quiet: bool, stream: object = None) -> str:
    if quiet:
        return "none"
    if requested != "auto":
        return requested
    stream = stream or sys.stderr
    return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"


class Pace:
    """Rows per second of *sending* time over the recent past (window waits excluded)."""

    def __init__(self, horizon: float = PACE_HORIZON) -> None:
        self.horizon = horizon
        self._samples: deque[tuple[float, int]] = deque()   # (sending seconds so far, rows settled)

    def add(self, sending_seconds: float, settled: int) -> None:
        samples = self._samples
        if samples and sending_seconds <= samples[-1][0]:
            samples[-1] = (samples[-1][0], settled)          # no sending time passed (waiting)
        else:
            samples.append((sending_seconds, settled))
        while len(samples) > 2 and sending_seconds - samples[1][0] >= self.horizon:
            samples.popleft()

    def per_second(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 and n1 > n0 else 0.0


class Progress:
    """Watches the engine's counters (and the sending windows); owns no state of the run."""

    def __init__(self, mode: str, interval: float = 10.0, window: WindowGate | None = None) -> None:
        self.mode = mode
        self.interval = interval
        self.window = window
        self.pace = Pace()
        self._bar: tqdm | None = None
        self._task: asyncio.Task[None] | None = None
        self._counters: Counters | None = None
        self._last_line = 0.0

    def start(self, counters: Counters) -> None:
        self._counters = counters
        remaining = counters.total - counters.done_before
        if self.mode == "bar":
            from tqdm import tqdm   # here: a run off a terminal (cron, -q) never draws a bar

            self._bar = tqdm(total=counters.total, initial=counters.done_before, unit="row",
                             dynamic_ncols=True, file=sys.stderr, desc="capbatch", bar_format=BAR_FORMAT)
        elif self.mode == "lines":
            log.info("sending %s (%d already settled)", plural(remaining, "row"), counters.done_before)
        self._last_line = time.monotonic()
        self.pace.add(0.0, 0)
        if self.mode != "none":
            self._task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        period = 0.5 if self.mode == "bar" else self.interval
        while True:
            await asyncio.sleep(period)
            self.update()

    def _sending_seconds(self, c: Counters) -> float:
        elapsed = time.monotonic() - c.started
        return max(0.0, elapsed - (self.window.waited() if self.window is not None else 0.0))

    def eta_seconds(self, left: int) -> float | None:
        """Wall-clock seconds until ``left`` rows are settled at the achieved pace, window time only."""
        rate = self.pace.per_second()
        if left <= 0:
            return 0.0
        if rate <= 0:
            return None
        work = left / rate
        gate = self.window
        if gate is None or gate.schedule.always_open:
            return work
        now = gate.clock.now()
        return gate.schedule.finish_time(now, work) - now

    def update(self) -> None:
        c = self._counters
        if c is None:
            return
        done = c.done_before + c.settled
        self.pace.add(self._sending_seconds(c), c.settled)
        left = c.total - done
        eta = self.eta_seconds(left)
        eta_text = human_duration(eta) if eta is not None else "?"
        waiting = self.window.status() if self.window is not None else None
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_description_str(waiting or "capbatch", refresh=False)
            self._bar.set_postfix_str(
                f"{self.pace.per_second():.1f} rows/s eta {eta_text} ok={c.ok + c.unchanged} failed={c.failed} "
                f"retrying={c.retrying}", refresh=False)
            self._bar.refresh()
        elif self.mode == "lines":
            state = f"{waiting}; " if waiting else ""
            log.info("%sprogress %d/%d (%.1f%%) ok=%d failed=%d retrying=%d %.1f rows/s eta %s",
                     state, done, c.total, 100.0 * done / max(c.total, 1), c.ok + c.unchanged, c.failed,
                     c.retrying, self.pace.per_second(), eta_text)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.update()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
