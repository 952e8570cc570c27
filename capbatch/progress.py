"""Progress: a tqdm bar on a terminal, a concise log line every N seconds elsewhere, nothing when quiet."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:
    from .engine import Counters

log = logging.getLogger("capbatch.progress")


def choose_mode(requested: str, quiet: bool, stream: object = None) -> str:
    if quiet:
        return "none"
    if requested != "auto":
        return requested
    stream = stream or sys.stderr
    return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"


class Progress:
    """Watches the engine's counters; owns no state of the run."""

    def __init__(self, mode: str, interval: float = 10.0) -> None:
        self.mode = mode
        self.interval = interval
        self._bar: tqdm | None = None
        self._task: asyncio.Task[None] | None = None
        self._counters: Counters | None = None
        self._last_line = 0.0

    def start(self, counters: Counters) -> None:
        self._counters = counters
        remaining = counters.total - counters.done_before
        if self.mode == "bar":
            self._bar = tqdm(total=counters.total, initial=counters.done_before, unit="row",
                             dynamic_ncols=True, smoothing=0.1, file=sys.stderr, desc="capbatch")
        elif self.mode == "lines":
            log.info("sending %d rows (%d already settled)", remaining, counters.done_before)
        self._last_line = time.monotonic()
        if self.mode != "none":
            self._task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        period = 0.5 if self.mode == "bar" else self.interval
        while True:
            await asyncio.sleep(period)
            self.update()

    def update(self) -> None:
        c = self._counters
        if c is None:
            return
        done = c.done_before + c.settled
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str(
                f"ok={c.ok + c.unchanged} failed={c.failed} retrying={c.retrying}", refresh=False)
            self._bar.refresh()
        elif self.mode == "lines":
            elapsed = max(time.monotonic() - c.started, 1e-6)
            rate = c.settled / elapsed
            left = c.total - done
            eta = f"{left / rate:.0f}s" if rate > 0 else "?"
            log.info("progress %d/%d (%.1f%%) ok=%d failed=%d retrying=%d %.1f rows/s eta %s",
                     done, c.total, 100.0 * done / max(c.total, 1), c.ok + c.unchanged, c.failed,
                     c.retrying, rate, eta)

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
