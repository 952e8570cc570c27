"""Time windows: when a run may send (``--window 22:00-06:00``, repeatable, ``--timezone``).

A window is a daily span of local wall-clock time in one time zone (zoneinfo); it may cross midnight
(22:00-06:00 is open from 22:00 until 06:00 the next morning) and ``24:00`` ends a window at
midnight. With no window a run is always open. Outside its windows a run sends nothing: in-flight
requests finish, and the engine waits (``WindowGate``) until the next window opens.

Everything here takes the current time from a ``Clock`` (epoch seconds), so tests drive a run
through a closing and an opening window on a clock they control instead of sleeping for hours.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from datetime import time as dtime
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import UsageError

log = logging.getLogger("capbatch.window")

POLL_SECONDS = 0.25   # how often a waiting run re-reads the clock (a clock step is noticed this fast)


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (like time.time())."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()


SYSTEM_CLOCK = SystemClock()


@dataclass(frozen=True)
class Window:
    start: dtime
    end: dtime            # end <= start: the window ends the next day; end == 00:00 means midnight
    text: str

    def __str__(self) -> str:
        return self.text


_HHMM = re.compile(r"(\d{1,2}):(\d{2})")


def _clock_time(text: str, whole: str, allow_24: bool) -> dtime:
    m = _HHMM.fullmatch(text.strip())
    hour, minute = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
    if allow_24 and (hour, minute) == (24, 0):
        return dtime(0, 0)
    if not (0 <= hour <= 23 and 0 <= minute <= 59):
        raise UsageError(f"--window {whole!r}: {text.strip()!r} is not a time of day",
                         "write windows as HH:MM-HH:MM in 24-hour time, e.g. --window 22:00-06:00")
    return dtime(hour, minute)


def parse_window(text: str) -> Window:
    """``'22:00-06:00'`` -> Window. Equal start and end is refused (use no --window for always)."""
    raw = str(text).strip()
    if raw.count("-") != 1:
        raise UsageError(f"--window {text!r} is not a window",
                         "write it as HH:MM-HH:MM, e.g. --window 22:00-06:00 (repeat the flag for more)")
    first, second = raw.split("-")
    start = _clock_time(first, raw, allow_24=False)
    end = _clock_time(second, raw, allow_24=True)
    if start == end:
        raise UsageError(f"--window {text!r} opens and closes at the same time",
                         "give a real span such as 22:00-06:00, or no --window to send at any time")
    return Window(start, end, f"{start:%H:%M}-{'24:00' if end == dtime(0) else f'{end:%H:%M}'}")


def parse_timezone(name: str | None) -> ZoneInfo | None:
    """An IANA zone name (``Europe/Berlin``); None means the machine's local time."""
    if not name:
        return None
    try:
        return ZoneInfo(str(name).strip())
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise UsageError(f"--timezone {name!r} is not a known time zone",
                         "use an IANA name such as Europe/Berlin, Asia/Kolkata or UTC") from exc


class Schedule:
    """The open spans of a set of daily windows, as epoch-second intervals."""

    def __init__(self, windows: Sequence[Window] = (), tz: ZoneInfo | None = None) -> None:
        self.windows = tuple(windows)
        self.tz = tz

    @property
    def always_open(self) -> bool:
        return not self.windows

    def describe(self) -> str:
        if self.always_open:
            return "any time"
        zone = self.tz.key if self.tz is not None else "local time"
        return f"{', '.join(w.text for w in self.windows)} ({zone})"

    def _local(self, ts: float) -> datetime:
        return datetime.fromtimestamp(ts, self.tz) if self.tz is not None else datetime.fromtimestamp(ts)

    def _epoch(self, day: date, at: dtime) -> float:
        moment = datetime.combine(day, at)
        if self.tz is not None:
            moment = moment.replace(tzinfo=self.tz)
        return moment.timestamp()

    def intervals(self, start: float, end: float) -> list[tuple[float, float]]:
        """Merged open intervals overlapping [start, end), in order."""
        if self.always_open:
            return [(start, end)]
        first = self._local(start).date() - timedelta(days=1)
        last = self._local(end).date()
        spans: list[tuple[float, float]] = []
        day = first
        while day <= last:
            for w in self.windows:
                opens = self._epoch(day, w.start)
                closes_day = day + timedelta(days=1) if w.end <= w.start else day
                closes = self._epoch(closes_day, w.end)
                if closes > start and opens < end and closes > opens:
                    spans.append((max(opens, start), min(closes, end)))
            day += timedelta(days=1)
        spans.sort()
        merged: list[tuple[float, float]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        return merged

    def is_open(self, ts: float) -> bool:
        return self.always_open or any(a <= ts < b for a, b in self.intervals(ts, ts + 1e-6))

    def next_open(self, ts: float) -> float:
        """When sending may next happen: ``ts`` itself if open now."""
        if self.is_open(ts):
            return ts
        spans = self.intervals(ts, ts + 8 * 86400)
        return spans[0][0] if spans else ts

    def next_close(self, ts: float) -> float | None:
        """When the window open at ``ts`` closes (None: never, or not open now)."""
        if self.always_open or not self.is_open(ts):
            return None
        horizon = ts + 8 * 86400
        spans = self.intervals(ts, horizon)
        return spans[0][1] if spans and spans[0][1] < horizon else None

    def open_seconds(self, start: float, end: float) -> float:
        """Seconds of open time in [start, end)."""
        if end <= start:
            return 0.0
        return sum(b - a for a, b in self.intervals(start, end))

    def finish_time(self, start: float, work_seconds: float) -> float:
        """The wall-clock moment when ``work_seconds`` of open time have passed since ``start``."""
        if self.always_open or work_seconds <= 0:
            return start + max(work_seconds, 0.0)
        left = work_seconds
        cursor = start
        while True:
            horizon = cursor + 8 * 86400
            for a, b in self.intervals(cursor, horizon):
                if b - a >= left:
                    return a + left
                left -= b - a
            cursor = horizon

    def local_hhmm(self, ts: float, now: float) -> str:
        """'22:00' within the next 20 hours, else 'Sat 22:00'."""
        moment = self._local(ts)
        if moment - self._local(now) < timedelta(hours=20):
            return f"{moment:%H:%M}"
        return f"{moment:%a %H:%M}"


def human_duration(seconds: float) -> str:
    """'3 h 10 min', '45 s', '2 d 4 h' — the precision a person plans with."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    minutes = (s + 30) // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


class WindowGate:
    """Holds requests back while the run is outside its windows.

    ``wait_open`` returns at once inside a window; outside, it waits (re-reading the clock every
    ``poll`` seconds, so a clock the test moves is noticed) until a window opens or ``stop`` is set.
    ``waiting`` and ``opens_at`` feed the progress line; ``closed_seconds`` is time spent waiting.
    """

    def __init__(self, schedule: Schedule, clock: Clock = SYSTEM_CLOCK, poll: float = POLL_SECONDS,
                 on_close: Callable[[], None] | None = None) -> None:
        self.schedule = schedule
        self.clock = clock
        self.poll = poll
        self.on_close = on_close
        self.waiting = False
        self.opens_at: float | None = None
        self.closed_seconds = 0.0
        self._wait_started: float | None = None

    def status(self) -> str | None:
        """'waiting for window (opens 22:00, in 3 h 10 min)' while waiting, else None."""
        if not self.waiting:
            return None
        now = self.clock.now()
        opens = self.schedule.next_open(now)
        return (f"waiting for window (opens {self.schedule.local_hhmm(opens, now)}, "
                f"in {human_duration(opens - now)})")

    def is_open(self) -> bool:
        return self.schedule.is_open(self.clock.now())

    def waited(self) -> float:
        """Seconds spent waiting for a window so far, the current wait included."""
        current = time.monotonic() - self._wait_started if self.waiting and self._wait_started else 0.0
        return self.closed_seconds + current

    async def wait_open(self, stop: asyncio.Event | None = None) -> None:
        if self.schedule.always_open:
            return
        while True:
            now = self.clock.now()
            if self.schedule.is_open(now):
                if self.waiting:
                    self._end_wait()
                return
            if stop is not None and stop.is_set():
                return
            if not self.waiting:
                self._begin_wait(now)
            left = self.schedule.next_open(now) - now
            if stop is None:
                await asyncio.sleep(max(0.0, min(left, self.poll)))
            else:
                try:
                    await asyncio.wait_for(stop.wait(), max(0.001, min(left, self.poll)))
                except TimeoutError:
                    pass

    def _begin_wait(self, now: float) -> None:
        self.waiting = True
        self.opens_at = self.schedule.next_open(now)
        self._wait_started = time.monotonic()
        log.info("outside the sending windows (%s): %s", self.schedule.describe(), self.status())
        if self.on_close is not None:
            self.on_close()

    def _end_wait(self) -> None:
        self.waiting = False
        if self._wait_started is not None:
            self.closed_seconds += time.monotonic() - self._wait_started
            self._wait_started = None
        log.info("window open: sending resumes")
        self.opens_at = None


_DURATION = re.compile(r"\+?\s*(?:(\d+(?:\.\d+)?)\s*d)?\s*(?:(\d+(?:\.\d+)?)\s*h)?"
                       r"\s*(?:(\d+(?:\.\d+)?)\s*m(?:in)?)?\s*")


def parse_deadline(text: str, now: float, tz: ZoneInfo | None = None) -> float:
    """``--deadline``: '06:00' (the next 06:00), '2026-12-01 06:00' / ISO 8601 (an offset is honoured,
    else the --timezone or local time), or a duration from now: '8h', '1d12h', '90min'. Epoch seconds."""
    raw = str(text).strip()
    hint = "e.g. --deadline 06:00, --deadline '2026-12-01 06:00' or --deadline 8h"
    if _HHMM.fullmatch(raw):
        at = _clock_time(raw, raw, allow_24=False)
        local = datetime.fromtimestamp(now, tz) if tz is not None else datetime.fromtimestamp(now)
        moment = datetime.combine(local.date(), at)
        moment = moment.replace(tzinfo=tz) if tz is not None else moment
        if moment.timestamp() <= now:
            moment = datetime.combine(local.date() + timedelta(days=1), at)
            moment = moment.replace(tzinfo=tz) if tz is not None else moment
        return moment.timestamp()
    m = _DURATION.fullmatch(raw.lower())
    if m and any(m.groups()):
        days, hours, minutes = (float(g) if g else 0.0 for g in m.groups())
        return now + days * 86400 + hours * 3600 + minutes * 60
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise UsageError(f"--deadline {text!r} is not a time", hint) from None
    if moment.tzinfo is None and tz is not None:
        moment = moment.replace(tzinfo=tz)
    return moment.timestamp()


def schedule_for(windows: Sequence[str], timezone: str | None) -> Schedule:
    """The Schedule for --window values (none: always open) in --timezone (none: local time)."""
    return Schedule([parse_window(w) for w in windows], parse_timezone(timezone))
