"""Time windows: the schedule's arithmetic, and a real run that a closing window stops and an opening
window resumes — on a clock the test moves (no sleeping for hours)."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from capbatch import config, runner
from capbatch.errors import Paused, UsageError
from capbatch.window import Schedule, parse_deadline, parse_window, schedule_for

from conftest import cli_env, ledger_query, make_cards, write_csv

UTC = timezone.utc


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


class MovableClock:
    """Wall time that runs at real speed from wherever the test last put it."""

    def __init__(self, start: float) -> None:
        self.offset = start - time.time()

    def now(self) -> float:
        return time.time() + self.offset

    def set(self, ts: float) -> None:
        self.offset = ts - time.time()


def test_a_window_crossing_midnight_and_the_time_it_leaves():
    night = schedule_for(["22:00-06:00"], "UTC")
    assert night.is_open(at("2026-03-02T23:30")) and night.is_open(at("2026-03-03T05:59"))
    assert not night.is_open(at("2026-03-03T06:00")) and not night.is_open(at("2026-03-02T21:59"))
    assert night.next_open(at("2026-03-02T20:00")) == at("2026-03-02T22:00")
    assert night.next_close(at("2026-03-02T23:00")) == at("2026-03-03T06:00")
    # 10 h of sending from 20:00: wait 2 h, send 8 h, wait 16 h, send 2 h -> done at 00:00 two days on
    assert night.finish_time(at("2026-03-02T20:00"), 10 * 3600) == at("2026-03-04T00:00")
    assert night.open_seconds(at("2026-03-02T00:00"), at("2026-03-03T00:00")) == 8 * 3600
    two = schedule_for(["12:00-13:00", "12:30-14:00", "23:00-24:00"], "UTC")     # overlaps merge
    assert two.intervals(at("2026-03-02T00:00"), at("2026-03-03T00:00")) == [
        (at("2026-03-02T12:00"), at("2026-03-02T14:00")), (at("2026-03-02T23:00"), at("2026-03-03T00:00"))]
    assert Schedule().is_open(0.0) and Schedule().finish_time(100.0, 50.0) == 150.0


def test_windows_follow_the_time_zone_across_a_daylight_saving_change():
    berlin = schedule_for(["01:00-05:00"], "Europe/Berlin")
    # the night the clocks go forward (2026-03-29, 02:00 -> 03:00) the window holds 3 real hours
    assert berlin.open_seconds(at("2026-03-28T12:00"), at("2026-03-29T12:00")) == 3 * 3600


@pytest.mark.parametrize("bad", ["22-06", "25:00-06:00", "22:00", "10:00-10:00", "22:00-06:00-07:00"])
def test_a_bad_window_is_a_usage_error_naming_the_format(bad):
    with pytest.raises(UsageError) as exc:
        parse_window(bad)
    assert "HH:MM" in str(exc.value) or "same time" in str(exc.value)


def test_deadlines_by_clock_time_date_or_duration():
    now = at("2026-03-02T20:00")
    assert parse_deadline("06:00", now, schedule_for([], "UTC").tz) == at("2026-03-03T06:00")
    assert parse_deadline("21:00", now, schedule_for([], "UTC").tz) == at("2026-03-02T21:00")
    assert parse_deadline("8h", now) == now + 8 * 3600
    assert parse_deadline("1d12h", now) == now + 36 * 3600
    assert parse_deadline("2026-03-05T06:00+00:00", now) == at("2026-03-05T06:00")
    with pytest.raises(UsageError):
        parse_deadline("soon", now)


def _settings(tmp_path: Path, url: str, *extra: tuple[str, Any]) -> config.Settings:
    pairs = make_cards(120)
    src = write_csv(tmp_path / "cards.csv", pairs)
    flags: dict[str, Any] = {"input": src, "base_url": url, "run_dir": tmp_path / "run", "rate": "60/s",
                             "concurrency": "8", "windows": ("22:00-06:00",), "timezone": "UTC",
                             "progress": "lines", "progress_interval": "0.2", "quota_dir": tmp_path / "quota"}
    flags.update(dict(extra))
    return config.resolve(flags, cli_env(), None)


def _start(settings: config.Settings, clock: MovableClock) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def go() -> None:
        try:
            outcome["summary"] = runner.run(settings, clock=clock)
        except BaseException as exc:    # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, outcome


def _wait(predicate: Any, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_a_window_closing_mid_run_stops_sending_and_its_reopening_resumes(tmp_path, sim, caplog):
    caplog.set_level(logging.INFO, logger="capbatch")
    s = sim(auto_create=True, latency=0.01)
    clock = MovableClock(at("2026-03-03T05:59:00"))             # inside 22:00-06:00
    thread, outcome = _start(_settings(tmp_path, s.url), clock)
    assert _wait(lambda: s.stats()["by_route"]["PUT /v2/card"] >= 30, 15), outcome

    clock.set(at("2026-03-03T06:00:00"))                         # the window closes
    assert _wait(lambda: "waiting for window (opens 22:00, in 16 h)" in caplog.text, 5), caplog.text
    time.sleep(0.3)                                              # requests in flight finish
    sent_at_close = s.stats()["by_route"]["PUT /v2/card"]
    time.sleep(1.2)
    assert s.stats()["by_route"]["PUT /v2/card"] == sent_at_close      # nothing goes out while closed
    assert 30 <= sent_at_close < 120
    recorded = ledger_query(tmp_path / "run", "SELECT count(*) FROM rows WHERE state='succeeded'")[0][0]
    assert recorded == sent_at_close                                    # ... and the ledger holds them all
    assert thread.is_alive()

    clock.set(at("2026-03-03T21:59:59.5"))                       # half a second before it opens again
    thread.join(30)
    assert not thread.is_alive() and "error" not in outcome, outcome
    summary = outcome["summary"]
    assert summary["exit_code"] == 0 and summary["counts"]["succeeded"] == 120
    assert s.stats()["by_route"]["PUT /v2/card"] == 120                # each row sent once
    assert len([v for v in s.card_ids().values() if v]) == 120
    assert summary["actual"]["waiting_for_window_seconds"] >= 1.4
    assert "window open: sending resumes" in caplog.text


def test_window_exit_stops_a_run_when_its_window_closes(tmp_path, sim):
    s = sim(auto_create=True, latency=0.01)
    clock = MovableClock(at("2026-03-03T05:59:00"))
    thread, outcome = _start(_settings(tmp_path, s.url, ("window_exit", True)), clock)
    assert _wait(lambda: s.stats()["by_route"]["PUT /v2/card"] >= 20, 15), outcome
    clock.set(at("2026-03-03T06:00:00"))
    thread.join(15)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), Paused) and outcome["error"].exit_code == 3, outcome
    left = ledger_query(tmp_path / "run", "SELECT count(*) FROM rows WHERE state IN ('pending', 'in_flight')")[0][0]
    done = ledger_query(tmp_path / "run", "SELECT count(*) FROM rows WHERE state='succeeded'")[0][0]
    assert left > 0 and done == s.stats()["by_route"]["PUT /v2/card"] and left + done == 120


def test_window_exit_outside_the_windows_exits_0_without_a_request(tmp_path, sim, run_cli):
    s = sim(auto_create=True)
    src = write_csv(tmp_path / "cards.csv", make_cards(5))
    hour = (datetime.now().hour + 2) % 24                                   # a window that is closed now
    p = run_cli("run", src, "--base-url", s.url, "--window", f"{hour:02d}:00-{hour:02d}:30", "--window-exit",
                "--quota-dir", tmp_path / "quota", timeout=60)
    assert p.returncode == 0, p.stderr
    assert "--window-exit, nothing sent" in p.stderr
    assert s.stats()["requests"] == 0
