"""One quota shared by every run on a key: fair turns, the lower rate holds, 429s slow everyone,
a killed run leaves nothing that blocks the others — in-process pacers on one state file, and real
CLI processes against the simulator's strict per-second limit."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_env, ledger_query, make_cards, popen_cli, write_csv
from test_pacing import max_in_window

from capbatch.config import Credentials, Rate
from capbatch.pacing import Pacer
from capbatch.quota import FileQuotaBackend, QuotaKey, credential_fingerprint

KEY = QuotaKey("http://api.example", "f" * 16)


async def _send(pacer: Pacer, n: int, out: list[tuple[float, str]], tag: str, workers: int = 8) -> None:
    left = [n]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await pacer.acquire()
            out.append((time.time(), tag))

    await asyncio.gather(*(worker() for _ in range(workers)))


def test_the_fingerprint_names_the_account_never_the_secret():
    a = credential_fingerprint(Credentials(username="till", password="secret-1"))
    assert a == credential_fingerprint(Credentials(username="till", password="another"))   # same account
    assert a != credential_fingerprint(Credentials(username="other", password="secret-1"))
    assert "secret" not in a and "till" not in a and len(a) == 16
    assert QuotaKey("https://eu.api", a).name != QuotaKey("https://us.api", a).name


async def test_runs_on_one_key_take_turns_by_priority_and_never_exceed_the_quota(tmp_path):
    rate = Rate(100, 1.0)
    a = Pacer(rate, FileQuotaBackend(tmp_path), KEY)
    b = Pacer(rate, FileQuotaBackend(tmp_path), KEY, priority=2)
    sends: list[tuple[float, str]] = []
    await asyncio.gather(_send(a, 80, sends, "a"), _send(b, 160, sends, "b"))
    times = sorted(t for t, _ in sends)
    assert max_in_window(times, 1.0) <= 100                   # both together, any 1 s window
    assert (len(times) - 1) / (times[-1] - times[0]) >= 0.9 * 100
    first = [tag for _, tag in sorted(sends)][:150]             # while both were sending: 1 : 2
    assert 38 <= first.count("a") <= 62, first.count("a")
    await a.close()
    await b.close()
    assert FileQuotaBackend(tmp_path).read(KEY).members == {}  # both left cleanly


async def test_the_lower_rate_holds_for_every_run_on_the_key_and_each_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="capbatch")
    fast = Pacer(Rate(100, 1.0), FileQuotaBackend(tmp_path), KEY)
    slow = Pacer(Rate(20, 1.0), FileQuotaBackend(tmp_path), KEY)
    await slow.acquire()
    sends: list[tuple[float, str]] = []
    await _send(fast, 25, sends, "fast")
    times = sorted(t for t, _ in sends)
    assert max_in_window(times, 1.0) <= 20                     # the fast run paces at the slow run's 20/s
    assert fast.agreed == Rate(20, 1.0)
    assert "another run on this API key gave --rate 20/s: the lower rate holds" in caplog.text
    await slow.close()                                           # the slow run ends: back to 100/s
    start = time.time()
    for _ in range(30):
        await fast.acquire()
    assert time.time() - start < 0.6 and fast.agreed == Rate(100, 1.0)
    await fast.close()


async def test_one_runs_429s_pause_and_slow_every_run_on_the_key(tmp_path):
    a = Pacer(Rate(100, 1.0), FileQuotaBackend(tmp_path), KEY)
    b = Pacer(Rate(100, 1.0), FileQuotaBackend(tmp_path), KEY)
    await a.acquire()
    await b.acquire()
    for _ in range(20):
        a.answered(True, 0.4)                                   # systematic throttling, Retry-After 0.4 s
    await a.settle_reports()
    start = time.time()
    for _ in range(len(b._slots) + 1):                           # past the slots b had leased already
        await b.acquire()
    assert time.time() - start >= 0.3                            # b waited out a's Retry-After ...
    assert b.factor == pytest.approx(0.7) and a.throttle_events == 1   # ... and slowed down with it
    state = FileQuotaBackend(tmp_path).read(KEY)
    assert state.factor == pytest.approx(0.7) and state.throttle_events == 1


async def test_a_lock_held_by_a_killed_process_and_its_entry_expire(tmp_path):
    backend = FileQuotaBackend(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n"),
        str(backend.path(KEY))], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    probe = os.open(backend.path(KEY), os.O_RDWR)
    with pytest.raises(BlockingIOError):
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(probe)
    holder.kill()                                                # kill -9 while holding the lock
    holder.wait()
    holder.stdout.close()
    pacer = Pacer(Rate(50, 1.0), backend, KEY)
    start = time.monotonic()
    await pacer.acquire()
    assert time.monotonic() - start < 1.0                        # the kernel released it
    # a member whose process is gone is dropped at the next lease, its share returns to the living
    state = backend.read(KEY)
    ghost = dict(vars(next(iter(state.members.values()))))
    ghost["pid"] = holder.pid
    raw = json.loads(backend.path(KEY).read_text())
    raw["state"]["members"]["ghost"] = ghost
    backend.path(KEY).write_text(json.dumps(raw))
    await pacer.acquire()
    await pacer.acquire()
    assert "ghost" not in backend.read(KEY).members and pacer.peers == ()


async def test_an_unreadable_state_file_is_started_afresh(tmp_path, caplog):
    backend = FileQuotaBackend(tmp_path)
    backend.path(KEY).write_text('{"key": "trunc')              # a process killed mid-write
    pacer = Pacer(Rate(50, 1.0), backend, KEY)
    await pacer.acquire()
    assert "was unreadable" in caplog.text and len(backend.read(KEY).members) == 1


# ---- real processes ---------------------------------------------------------------------------
def _run_args(src: Path, url: str, run_dir: Path, quota_dir: Path, rate: str) -> list[str]:
    return ["run", str(src), "--base-url", url, "--rate", rate, "--concurrency", "16", "--run-dir", str(run_dir),
            "--quota-dir", str(quota_dir), "--progress", "none"]


def _settled_times(run_dir: Path) -> list[float]:
    return sorted(r[0] for r in ledger_query(run_dir, "SELECT settled_at FROM rows WHERE settled_at IS NOT NULL"))


def test_two_processes_on_one_key_share_a_strict_per_second_quota_without_429s(tmp_path, sim):
    # Each run is told 38 of the server's 40/s: 5 % (50 ms a second) absorbs the scheduling jitter of
    # this shared test machine; the pacer's own precision (0.99 R) is measured in tests/perf/bench.py.
    # Without sharing, the two runs would send 2 x 38/s into a 40/s limit.
    s = sim(auto_create=True, latency=0.01, rate_per_second=40)
    quota_dir = tmp_path / "quota"
    procs = []
    for k in range(2):
        src = write_csv(tmp_path / f"cards{k}.csv", make_cards(80, start=k * 1000))
        procs.append(popen_cli(*_run_args(src, s.url, tmp_path / f"run{k}", quota_dir, "38/s"), cwd=tmp_path))
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    st = s.stats()
    assert st["rate_limited"] == 0 and st["peak_per_second"] <= 40
    assert st["by_route"]["PUT /v2/card"] == 160
    first, last = (_settled_times(tmp_path / "run0"), _settled_times(tmp_path / "run1"))
    both = sorted(first + last)
    assert (len(both) - 1) / (both[-1] - both[0]) >= 0.9 * 40, "together they use at least 0.9 of the quota"
    overlap = (max(first[0], last[0]), min(first[-1], last[-1]))
    in_overlap = [sum(overlap[0] <= t <= overlap[1] for t in run) for run in (first, last)]
    assert overlap[1] - overlap[0] > 1.5 and min(in_overlap) >= 0.35 * sum(in_overlap), in_overlap   # fair turns
    assert any("shared with 1 other run" in out for out in outs), outs


def test_a_killed_run_leaves_the_shared_quota_usable(tmp_path, sim):
    s = sim(auto_create=True, latency=0.01, rate_per_second=40)
    quota_dir = tmp_path / "quota"
    src = write_csv(tmp_path / "a.csv", make_cards(400))
    victim = popen_cli(*_run_args(src, s.url, tmp_path / "a", quota_dir, "38/s"), cwd=tmp_path)
    end = time.monotonic() + 20
    while s.stats()["by_route"]["PUT /v2/card"] < 20 and time.monotonic() < end:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=10)
    (state_file,) = quota_dir.glob("*.json")
    members = json.loads(state_file.read_text())["state"]["members"]
    assert [m["pid"] for m in members.values()] == [victim.pid]       # the dead run's entry is still there

    src = write_csv(tmp_path / "b.csv", make_cards(80, start=5000))
    p = subprocess.run([sys.executable, "-m", "capbatch", *_run_args(src, s.url, tmp_path / "b", quota_dir, "38/s")],
                       cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    times = _settled_times(tmp_path / "b")
    assert (len(times) - 1) / (times[-1] - times[0]) >= 0.9 * 40       # the whole quota, no dead share
    assert "shared with" not in p.stderr
    assert s.stats()["rate_limited"] == 0
    assert json.loads(state_file.read_text())["state"]["members"] == {}   # dead entry gone, b left cleanly


def test_a_remote_check_beside_a_run_on_the_key_reads_on_the_same_quota(tmp_path, sim):
    """`run --dry-run --check-remote` (like `verify`) takes its reads' turns on the quota the run on
    that key paces on: together they keep the server's strict per-second limit."""
    # 19 of the server's 20/s, as above: across processes the margin must cover this machine's jitter.
    # Without sharing: 2 x 19/s into 20/s.
    s = sim(auto_create=True, latency=0.01, rate_per_second=20)
    quota_dir = tmp_path / "quota"
    src = write_csv(tmp_path / "cards.csv", make_cards(70))
    run = popen_cli(*_run_args(src, s.url, tmp_path / "run", quota_dir, "19/s"), cwd=tmp_path)
    time.sleep(0.5)
    other = write_csv(tmp_path / "other.csv", make_cards(50, start=5000))
    check = popen_cli("run", other, "--dry-run", "--check-remote", "--base-url", s.url, "--rate", "19/s",
                      "--quota-dir", quota_dir, "--reports-dir", tmp_path / "reports", cwd=tmp_path)
    outs = [p.communicate(timeout=60)[0] for p in (run, check)]
    assert [run.returncode, check.returncode] == [0, 0], outs
    st = s.stats()
    assert st["by_route"]["GET /v2/card"] == 50 and st["by_route"]["PUT /v2/card"] == 70, st
    assert st["rate_limited"] == 0 and st["peak_per_second"] <= 20, st
    assert "shared with 1 other run" in outs[1], outs[1]


# ---- sends that leave late -------------------------------------------------------------------------
def lease_ahead(state: Any, member: Any, count: int, now: float) -> tuple[float, ...]:
    """``count`` slots of the grid, leased as time passes: no slot is handed out more than half a
    window ahead (``Cadence.lead``), so a lease asks again at the time it is told to."""
    from capbatch.quota import lease_slots

    slots: tuple[float, ...] = ()
    while len(slots) < count:
        grant = lease_slots(state, member, count - len(slots), now)
        assert grant.slots or grant.retry_at > now
        slots += grant.slots
        now = max(now, grant.retry_at)
    return slots


def test_a_late_send_moves_the_grid_by_what_it_costs_and_a_lone_members_debt_is_called_in():
    from capbatch.quota import Cadence, Member, QuotaState, lease_slots, late_shift, report_late

    rate = Rate(10, 1.0)
    cadence = Cadence.of(rate)                      # 10 in any 1 s: slots 100.8 ms apart, 8 ms margin
    a, i = cadence.late_allowance, cadence.interval
    assert late_shift(a, a, i) == 0.0                                   # within the margin: free
    assert late_shift(a + 0.02, a, i) == pytest.approx(0.0205)          # beyond it: what it is beyond
    assert late_shift(0.25, a, i) == pytest.approx(i + 0.0005)          # past another slot: one slot

    alone, other = Member("alone", rate), Member("other", rate)
    state = QuotaState()
    first = lease_slots(state, alone, 2, 100.0).slots
    assert first == pytest.approx((100.0, 100.0 + i))
    report_late(state, alone, 100.05, 0.02)         # alone: its own guard covers it, the grid stays ...
    assert state.tat == pytest.approx(100.0 + 2 * i) and len(state.late) == 1
    assert lease_slots(state, alone, 1, 100.1).slots == pytest.approx((100.0 + 2 * i,))
    # ... until another member leases within two windows: then the grid moves before its slot
    assert lease_slots(state, other, 1, 100.2).slots == pytest.approx((100.0 + 3 * i + 0.02,))
    assert state.late == []
    report_late(state, other, 100.3, 0.03)          # two members: at once
    assert lease_slots(state, alone, 1, 100.35).slots == pytest.approx((100.0 + 4 * i + 0.05,))
    # a lone member's note older than two windows is forgotten, not charged to a newcomer
    state = QuotaState()
    lease_slots(state, alone, 1, 200.0)
    report_late(state, alone, 200.01, 0.02)
    assert lease_slots(state, other, 1, 203.0).slots == pytest.approx((203.0,))


def test_a_late_send_moves_only_its_own_chain_under_a_small_quota():
    """Under a quota of up to CHAIN_MAX per window the grid keeps a log of its recent slots and the
    time each counts at: a late send makes only the slot a window after it later (and that one's
    successor a window on), by all of its lateness; the grid's other slots stay where they were."""
    from capbatch.quota import Cadence, Member, QuotaState, lease_slots, report_late

    rate = Rate(10, 1.0)
    i = Cadence.of(rate).interval                   # 100.8 ms; a window plus the margin: 1.008 s
    a, b = Member("a", rate), Member("b", rate)
    state = QuotaState()
    first = lease_ahead(state, a, 10, 100.0)
    assert first == pytest.approx(tuple(100.0 + k * i for k in range(10)))
    report_late(state, a, 100.03, 0.02, slot=first[0])           # the first slot counts 20 ms later
    assert state.chains[0][:2] == pytest.approx([100.0, 100.02]) and state.chains[0][2] == "a"
    assert state.tat == pytest.approx(100.0 + 10 * i)            # the grid did not move
    assert lease_slots(state, b, 1, 100.9).slots == pytest.approx((101.028,))      # its chain did
    assert lease_slots(state, b, 1, 100.95).slots == pytest.approx((100.0 + 11 * i,))   # the next did not
    later = lease_ahead(state, b, 10, 101.0)
    assert later[:8] == pytest.approx(tuple(100.0 + k * i for k in range(12, 20)))
    assert later[8:] == pytest.approx((102.036, 100.0 + 21 * i))  # a window on: the chain, again
    # a slot the log does not hold (none given, or forgotten) moves the grid instead, as above
    report_late(state, b, 101.5, 0.02)
    assert lease_ahead(state, a, 1, 101.6) == pytest.approx((100.0 + 22 * i + 0.02,))
    # a member alone gets the grid's slots as they are (its guard holds its own sends apart); the
    # log still hears of its late sends, for a member that joins
    state = QuotaState()
    mine = lease_ahead(state, a, 10, 300.0)
    report_late(state, a, 300.03, 0.02, slot=mine[0])
    assert lease_slots(state, a, 1, 300.9).slots == pytest.approx((300.0 + 10 * i,))
    assert state.chains[0][:2] == pytest.approx([300.0, 300.02]) and state.late == []


@pytest.mark.parametrize("chained", [True, False], ids=["chain-log", "grid"])
@pytest.mark.parametrize("seed", range(3))
def test_with_late_sends_no_window_ever_holds_more_than_the_quota(seed, chained):
    """The grid's rules as three members use them, at 1 ms steps: each holds two slots, sends each
    at its slot plus a lateness drawn from a harsh spread (a fifth beyond the margin, some up to
    0.3 s), never more than R of its own in its guard's gap, and reports what its late sends cost as
    their bytes leave — with the slot (the chain log of a small quota) or without (the grid moves).
    Counted the way the simulator counts (any 1 s): never more than R — and without the move it
    is more."""
    import bisect
    import random

    from capbatch import quota as rules

    def busiest(members: int, join_at: tuple[float, ...], shift: Any = rules.late_shift) -> int:
        cap = None if chained else 1.0
        rng = random.Random(seed)
        rate = Rate(30, 1.0)
        cadence = rules.Cadence.of(rate)
        a, i = cadence.late_allowance, cadence.interval
        state = rules.QuotaState()
        ms = [rules.Member(f"m{k}", rate) for k in range(members)]
        held: dict[str, list[float]] = {m.id: [] for m in ms}
        own: dict[str, list[float]] = {m.id: [] for m in ms}
        reports: list[tuple[float, Any, float]] = []
        arrivals: list[float] = []
        for step in range(1, 8000):
            t = step / 1000
            for due, m, d, slot in [r for r in reports if r[0] <= t]:
                rules.report_late(state, m, t, d, slot if chained else None)
            reports = [r for r in reports if r[0] > t]
            for k, m in enumerate(ms):
                held[m.id] = [s for s in held[m.id] if s > t]
                if t < join_at[k] or len(held[m.id]) >= 2:
                    continue
                for s in rules.lease_slots(state, m, 1, t).slots:
                    held[m.id].append(s)
                    x = rng.random()
                    late = rng.uniform(0, a) if x < 0.7 else rng.uniform(a, 3 * i) if x < 0.92 else rng.uniform(0, 0.3)
                    left = s + late
                    mine = own[m.id]
                    if len(mine) >= 30 and left - mine[-30] < cadence.guard_gap:
                        left = mine[-30] + cadence.guard_gap
                    mine.append(left)
                    arrivals.append(left)
                    if shift(left - s, a, i if cap else None) > 0:
                        reports.append((left + 0.002, m, shift(left - s, a, i if cap else None), s))
        arrivals.sort()
        return max(bisect.bisect_right(arrivals, x + 1.0 - 1e-9) - j for j, x in enumerate(arrivals))

    assert busiest(3, (0.0, 2.0, 2.5)) == 30
    assert busiest(2, (0.0, 3.3)) == 30             # alone for 3.3 s, then joined
    assert busiest(3, (0.0, 2.0, 2.5), shift=lambda *_: 0.0) > 30


def test_a_member_left_alone_still_respects_the_late_sends_of_one_that_just_left():
    """A member alone gets the grid's slots as they are only while the log's recent slots are all its
    own: another member's late send (that member has left, its guard gone) still binds it."""
    from capbatch.quota import Cadence, Member, QuotaState, late_shift, lease_slots, leave, report_lates

    rate = Rate(10, 1.0)
    cad = Cadence.of(rate)
    period = cad.window + cad.margin
    state, a, b = QuotaState(), Member("a", rate), Member("b", rate)
    t, mine, theirs = 1000.0, [], []
    for k in range(10):                                   # a and b alternate single slots
        m = a if k % 2 == 0 else b
        slot = lease_slots(state, m, 1, t).slots[0]
        (mine if m is a else theirs).append(slot)
        t = slot
    report_lates(state, b, theirs[0] + 0.4, {theirs[0]: late_shift(0.4, cad.late_allowance, None)})
    counts = mine + theirs[1:] + [theirs[0] + 0.4 - cad.late_allowance]
    leave(state, b, (), theirs[-1] + 0.01)                # b is done: a is alone
    t = theirs[-1] + 0.01
    for _ in range(6):
        slot = lease_slots(state, a, 1, t).slots[0]
        counts.append(slot)
        t = slot
    counts.sort()
    assert max(sum(1 for c in counts if x <= c < x + period - 1e-9) for x in counts) == 10


def test_a_clock_stepped_back_does_not_leave_shared_runs_waiting_for_the_chain_log():
    from capbatch.quota import Member, QuotaState, lease_slots

    rate = Rate(10, 1.0)
    state, a, b = QuotaState(), Member("a", rate), Member("b", rate)
    for k in range(12):
        lease_slots(state, a if k % 2 else b, 1, 5000.0 + k * 0.1)
    after_step = 5000.0 - 3600.0                         # an NTP step, a VM resumed
    assert lease_slots(state, a, 1, after_step).slots[0] == pytest.approx(after_step)


def test_a_member_leaving_takes_only_its_own_slots_out_of_the_chain_log():
    """The grid's tail rewinds to where the leaving member's last lease began; a slot of another member
    leased in between (after one of the leaver's chain-moved slots) is still going out and must stay in
    the log, or the next slots are placed as if it were not sent."""
    from capbatch.quota import Member, QuotaState, leave

    rate = Rate(10, 1.0)
    a, b = Member("a", rate), Member("b", rate)
    state = QuotaState(tat=1002.0, last_member="a", last_start=1001.0,
                       chains=[[1000.9, 1000.9, "b"], [1001.2, 1001.2, "a"], [1001.25, 1001.25, "b"],
                               [1001.3, 1001.3, "a"]])
    leave(state, a, (1001.2, 1001.3), 1000.95)
    assert state.tat == 1001.2
    assert state.chains == [[1000.9, 1000.9, "b"], [1001.25, 1001.25, "b"]]
    assert b.id not in state.members


def test_no_slot_is_handed_out_more_than_half_a_window_ahead():
    """A late send is heard of as it leaves; the slots a window after it must not be out by then. So
    a lease hands out slots up to half a window ahead and says when to ask for the next — a pause
    (Retry-After) too: its first slots come when the pause is half a window from its end."""
    from capbatch.quota import Cadence, Member, QuotaState, lease_slots

    rate = Rate(10, 1.0)
    i = Cadence.of(rate).interval
    a, b = Member("a", rate), Member("b", rate)
    state = QuotaState()
    grant = lease_slots(state, a, 8, 100.0)
    assert grant.slots == pytest.approx(tuple(100.0 + k * i for k in range(5)))   # 100.0 .. 100.403
    assert grant.retry_at == pytest.approx(100.0 + 5 * i - 0.5)
    assert lease_slots(state, b, 1, 100.0).slots == ()
    assert lease_slots(state, b, 1, 100.01).slots == pytest.approx((100.0 + 5 * i,))
    state.pause_until = 110.0
    grant = lease_slots(state, b, 1, 101.0)
    assert grant.slots == () and grant.retry_at == pytest.approx(109.5)
    assert lease_slots(state, b, 1, 109.5).slots == pytest.approx((110.0,))


def test_a_late_report_reaches_the_slot_it_was_for_when_two_hold_one_time():
    """Two sends that left together count at one time, so the slots a window on are chained to one
    time too — possibly both to one member. A late report for that time cannot tell which it was
    for: both count later (safe: a count believed later only moves later slots later). A spare slot
    (given back by a run that left) is the taker's own once taken, so its late report reaches it and
    not the taker's own slot nearby."""
    from capbatch.quota import Member, QuotaState, lease_slots, report_late

    rate = Rate(10, 1.0)
    a, c = Member("a", rate), Member("c", rate)
    state = QuotaState(chains=[[100.5, 100.5, "a"], [100.5, 100.5, "a"], [100.5, 100.5, "b"]])
    report_late(state, a, 100.6, 0.03, slot=100.5)
    assert state.chains == [[100.5, pytest.approx(100.53), "a"], [100.5, pytest.approx(100.53), "a"],
                            [100.5, 100.5, "b"]]
    # "gone" left 100.50 unused; c holds 100.54 (a chain-moved slot), then takes the spare
    state = QuotaState(tat=101.0, spare=[100.5], chains=[[100.5, 100.5, "gone"], [100.54, 100.54, "c"]])
    assert lease_slots(state, c, 1, 100.2).slots == (100.5,)
    report_late(state, c, 100.6, 0.03, slot=100.5)
    assert state.chains[:2] == [[100.5, pytest.approx(100.53), "c"], [100.54, 100.54, "c"]]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("requests,members,step", [(10, 2, 0.01), (10, 4, 0.01), (2, 2, 0.02)],
                         ids=["10-per-s-2-runs", "10-per-s-4-runs", "2-per-s-2-runs"])
def test_runs_that_come_and_go_and_send_late_never_crowd_a_window(seed, requests, members, step):
    """The grid's rules as the pacer uses them, with churn: runs leave mid-turn (their slots given
    back, taken by newcomers as spares), hold two slots each (so that together they would lease far
    ahead), send a fifth of their slots late — up to the pacer's limit — and each keeps its own guard;
    a late send's report lands 20 ms after its bytes left, in time order with the others' leases.
    Counted at the server, the strict way: no R+1 sends leave within the guard's gap (a window plus
    the path's part of the margin), so no window holds R+1 arrivals whatever the path adds."""
    assert _crowded_windows(seed, requests, members, step) == 0


def _crowded_windows(seed: int, requests: int, members: int, step: float) -> int:
    import bisect
    import random

    from capbatch import quota as rules

    rng = random.Random(seed)
    rate = Rate(requests, 1.0)
    cadence = rules.Cadence.of(rate)
    allowance, gap = cadence.late_allowance, cadence.guard_gap
    max_late = 0.5 * cadence.window - 2 * 0.02       # the pacer's: half a window less two leases' time
    state = rules.QuotaState()
    runs: dict[str, tuple[Any, list[float], list[float]]] = {}
    names = iter(range(10**6))

    def join() -> None:
        m = rules.Member(f"m{next(names)}", rate)
        runs[m.id] = (m, [], [])

    for _ in range(members):
        join()
    reports: list[tuple[float, Any, float, float]] = []     # (lands at, member, slot, shift)
    left: list[float] = []
    worst = 0
    now = 1000.0
    for _ in range(3000):
        now += step
        due = [r for r in reports if r[0] <= now]
        reports = [r for r in reports if r[0] > now]
        for lands, m, slot, shift in sorted(due, key=lambda r: r[0]):
            rules.report_lates(state, m, lands, {slot: shift})
        for mid in list(runs):
            m, held, own = runs[mid]
            if rng.random() < 0.003:
                rules.leave(state, m, tuple(s for s in held if s >= now), now)
                del runs[mid]
                join()
                continue
            if len(held) < 2:
                held += rules.lease_slots(state, m, 1, now).slots
                held.sort()
            while held and held[0] <= now:
                slot = held.pop(0)
                late = rng.uniform(allowance, max_late) if rng.random() < 0.2 else rng.uniform(0, allowance)
                sent = max(now, slot + late)
                if len(own) >= cadence.count:
                    sent = max(sent, own[-cadence.count] + gap)      # its own guard
                if sent - slot > max_late:
                    continue                                         # skipped, as the pacer does
                own.append(sent)
                shift = rules.late_shift(sent - slot, allowance, None)
                if shift > 0:
                    reports.append((sent + 0.02, m, slot, shift))
                bisect.insort(left, sent)
                at = bisect.bisect_left(left, sent)
                for j in range(max(0, at - cadence.count), min(at + 1, len(left) - cadence.count)):
                    if left[j + cadence.count] - left[j] < gap - 1e-9:
                        worst += 1
    return worst


def test_the_randomised_churn_check_finds_a_lead_of_seven_tenths_of_a_window(monkeypatch):
    """The check above has teeth: with slots handed out 0.7 of a window ahead, a send up to 0.46 s
    late is heard of after the slots a window after it are out, and windows are crowded."""
    from capbatch import quota as rules

    monkeypatch.setattr(rules.Cadence, "lead", property(lambda self: 0.7 * self.window))
    assert sum(_crowded_windows(seed, 10, 4, 0.01) > 0 for seed in range(3)) >= 2


def test_a_run_waiting_out_a_long_pause_is_not_taken_for_gone():
    """A Retry-After pause longer than a member's time to live: a run waiting it out (its workers
    asleep until the pause ends, none leasing) is still a member when another leases at the pause's
    end, so the lower --rate it gave still holds and its turns are kept."""
    from capbatch.quota import Member, QuotaState, lease_slots, report_throttle

    slow, fast = Member("slow", Rate(5, 1.0), pid=os.getpid()), Member("fast", Rate(10, 1.0), pid=os.getpid())
    state = QuotaState()
    lease_slots(state, slow, 1, 1000.0)
    lease_slots(state, fast, 1, 1000.0)
    report_throttle(state, slow, 1000.1, 60.0, False)          # Retry-After: 60
    grant = lease_slots(state, fast, 1, 1059.6)                 # half a window before the pause ends
    assert [p.rate for p in grant.peers] == [Rate(5, 1.0)] and grant.rate == Rate(5, 1.0)
    assert lease_slots(state, fast, 1, 1075.0).peers == ()       # silent well past the pause: gone
