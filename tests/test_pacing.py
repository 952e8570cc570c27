"""The pacer against spies: the rate bound holds for any window, 429s slow everyone, the breaker opens."""

from __future__ import annotations

import asyncio
import time

import pytest

from capbatch.config import Rate
from capbatch.pacing import Breaker, Pacer, backoff_delay


async def _send_times(pacer: Pacer, n: int, workers: int = 16) -> list[float]:
    times: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            queue.get_nowait()
            await pacer.acquire()
            times.append(time.monotonic())

    await asyncio.gather(*(worker() for _ in range(workers)))
    return sorted(times)


def max_in_window(times: list[float], window: float) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


async def test_no_window_of_the_period_ever_holds_more_than_the_quota():
    rate = Rate(50, 1.0)                       # 50 per any 1 s window
    times = await _send_times(Pacer(rate), 150)
    assert max_in_window(times, 1.0) <= 50
    achieved = (len(times) - 1) / (times[-1] - times[0])
    assert achieved >= 0.95 * 50               # sits at the limit, not below it


async def test_a_large_quota_is_not_sent_as_one_burst():
    rate = Rate(3000, 60.0)                    # a plain AsyncLimiter(3000, 60) would send 3000 at once
    times = await _send_times(Pacer(rate), 200)
    assert max_in_window(times, 1.0) <= 3000 / 60 + 15   # at most the 0.5 % bucket above the steady rate


async def test_systematic_429s_pause_everyone_and_lower_the_rate_then_recover():
    pacer = Pacer(Rate(100, 1.0))
    await pacer.acquire()
    for _ in range(20):
        pacer.answered(True, 0.2)
    await pacer.settle_reports()
    assert pacer.factor < 1.0 and pacer.throttle_events == 1
    start = time.monotonic()
    await pacer.acquire()                      # waits out the Retry-After
    assert time.monotonic() - start >= 0.15
    lowered = pacer.factor
    for _ in range(60):
        pacer.answered(False)
    await asyncio.sleep(2.1)                   # 2 s without throttling give back 5 % of the rate
    for _ in range(3):
        await pacer.acquire()
    assert pacer.factor == pytest.approx(lowered + 0.05)


async def test_a_stray_429_does_not_lower_the_rate():
    pacer = Pacer(Rate(100, 1.0))
    for i in range(100):
        pacer.answered(i % 25 == 0)            # 4 % spurious 429s
    assert pacer.factor == 1.0 and pacer.throttle_events == 0


async def test_breaker_opens_on_mostly_transient_failures_and_probes():
    breaker = Breaker(budget=5.0, window=10, threshold=0.8)
    for _ in range(10):
        breaker.record(True, probe=False)
    assert breaker.is_open
    probe = await asyncio.wait_for(breaker.admit(), 3)
    assert probe is True
    waiter = asyncio.create_task(breaker.admit())   # others wait while the probe is out
    await asyncio.sleep(0.05)
    assert not waiter.done()
    breaker.record(False, probe=True)              # the probe succeeded: closed
    assert await asyncio.wait_for(waiter, 2) is False
    assert not breaker.is_open and breaker.outages == 1


def test_backoff_is_full_jitter_and_capped():
    delays = [backoff_delay(10) for _ in range(200)]
    assert all(0 <= d <= 30 for d in delays) and max(delays) > 10
    assert all(0 <= backoff_delay(1) <= 0.5 for _ in range(50))


async def test_a_fractional_quota_is_respected():
    times = await _send_times(Pacer(Rate(3, 2.0)), 5, workers=4)     # 1.5/s: 3 in any 2 s window
    assert max_in_window(times, 2.0) <= 3


async def test_the_guard_counts_a_send_when_it_left_not_when_the_pacer_let_it_go(sim):
    """A loaded host can hold a request between the pacer's go and the socket: the guard spaces the
    (R+1)-th send a window after the first one *left*. The client's trace hooks write that time."""
    from capbatch.api import CapillaryClient
    from capbatch.config import Credentials
    from capbatch.departure import _CURRENT

    s = sim(cards={"0011": None}, rate_per_second=3)
    pacer = Pacer(Rate(3, 1.0))
    async with CapillaryClient(s.url, Credentials(username="demo", password="demo")) as client:
        await pacer.acquire()
        note = _CURRENT.get()
        assert note is not None and note.at == note.released
        assert (await client.get_card("0011")).ok
        assert note.at > note.released                       # the hook stamped when the bytes left
        note.left(note.released + 0.3)                        # as if the host held it 0.3 s first
        start = note.released
        for _ in range(3):
            await pacer.acquire()
        assert time.time() - start >= 0.3 + 1.0               # a window after it left, not after its go


def test_the_guard_leaves_the_path_the_quarter_of_the_margin_the_shared_grid_leaves_it():
    from capbatch.quota import Cadence

    per_second = Cadence.of(Rate(50, 1.0))            # 8 ms margin: the grid's period is 1.008 s
    assert per_second.window + per_second.margin == pytest.approx(1.008)
    assert per_second.late_allowance == pytest.approx(0.006)
    assert per_second.guard_gap == pytest.approx(1.002)
    per_minute = Cadence.of(Rate(600, 60.0))          # 0.2 % of a minute: 0.12 s margin
    assert per_minute.guard_gap == pytest.approx(60.03)
    widened = Cadence.of(Rate(50, 1.0), jitter=0.004)   # two 429s: the path jitters more than assumed
    assert widened.margin == pytest.approx(0.012) and widened.late_allowance == pytest.approx(0.006)
    assert widened.guard_gap == pytest.approx(1.006)    # all of the learned part goes to the path


async def test_a_send_leaving_a_little_after_its_go_is_not_carried_to_the_send_a_window_later():
    """Every send leaves a little after the pacer lets it go. With the guard's gap equal to the grid's
    period that lag was carried to the R-th send after it, and from there on, window after window
    (the sends drifting behind their slots: a few per mille of the quota lost). Sends leaving 3 ms
    after their go: the R-th after one is let go by its slot (1.008 s - 3 ms after), never before
    the guard's 1.002 s."""
    from capbatch.departure import _CURRENT

    pacer = Pacer(Rate(50, 1.0))
    notes = []

    async def send() -> None:
        await pacer.acquire()
        note = _CURRENT.get()
        assert note is not None
        note.left(note.released + 0.003)
        notes.append(note)

    for _ in range(151):                              # one at a time: releases in slot order
        await asyncio.create_task(send())
    gaps = sorted(notes[k + 50].released - notes[k].at for k in range(len(notes) - 50))
    assert gaps[0] >= 1.002 - 1e-6                    # the guard: a window plus the path's 2 ms
    assert gaps[len(gaps) // 2] <= 1.007              # but not the 1.008 s a carried lag would make


async def test_a_send_is_stamped_once_its_bytes_are_in_the_kernel_never_before(sim):
    """The client's trace hooks run just before the bytes go to the socket; a host that deschedules
    the process there made a stamp early, and the R-th next send went out too soon (a 429). The
    client's connections stamp as the write returns: never before the simulator's kernel receive
    time of the request (SO_TIMESTAMP, as it counts quotas)."""
    from capbatch.api import CapillaryClient
    from capbatch.config import Credentials
    from capbatch.departure import _CURRENT

    def wall_minus_monotonic() -> float:     # read closely together (the simulator's thread shares the GIL)
        reads = []
        for _ in range(50):
            before = time.monotonic()
            wall = time.time()
            after = time.monotonic()
            reads.append((after - before, wall - (before + after) / 2))
        return min(reads)[1]

    s = sim(cards={"0011": None})
    pacer = Pacer(Rate(50, 1.0))
    async with CapillaryClient(s.url, Credentials(username="demo", password="demo")) as client:
        # (a new connection's first request may arrive before the simulator turns its timestamps on)
        assert (await client.put_card("0011", "EXT0")).ok
        early = []
        for _ in range(20):
            await pacer.acquire()
            note = _CURRENT.get()
            assert note is not None
            assert (await client.put_card("0011", "EXT1")).ok
            arrived = s.sim._win1[-1] + wall_minus_monotonic()       # its kernel arrival time, wall clock
            if note.at < arrived - 0.00002:
                early.append(arrived - note.at)
    # (stamped before the write, nearly all are early by 0.03-3 ms; a loaded host may rarely open a
    # new connection, whose first request the simulator can only time when it handles it)
    assert len(early) <= 2, early


async def test_a_run_waits_for_a_grid_handed_out_far_ahead_without_asking_again_and_again():
    """Slots are handed out at most half a window ahead (capbatch.quota.Cadence.lead). When the grid
    is already out further (many runs on the key, or a Retry-After pause), a lease gives nothing and
    says when to ask again: the run waits until then — it does not ask in a loop — and sends at the
    grid's next slot."""
    from capbatch.quota import Member, MemoryQuotaBackend, QuotaKey, lease_slots

    rate = Rate(10, 1.0)
    backend = MemoryQuotaBackend()
    key = QuotaKey("http://api", "fp")
    leases = 0
    lease = backend.lease

    async def counted(*args, **kwargs):
        nonlocal leases
        leases += 1
        return await lease(*args, **kwargs)

    backend.lease = counted  # type: ignore[method-assign]
    state = backend._state(key)
    lease_slots(state, Member.new(rate), 1, time.time())      # another run on the key ...
    state.tat = time.time() + 1.2                              # ... and the grid out 1.2 s ahead
    pacer = Pacer(rate, backend, key)
    start = time.time()
    await pacer.acquire()
    assert time.time() - start == pytest.approx(1.2, abs=0.05)
    assert leases == 2                   # nothing (come back 0.7 s on), then the slot 0.5 s ahead
    await pacer.close()


async def test_runs_on_a_small_per_second_quota_still_take_turns_by_priority():
    """At 10/s half a window holds five slots, fewer than two runs' usual holds: each holds its
    weight's share of them instead, so --priority 3 beside 1 still gets three turns in four."""
    from capbatch.quota import MemoryQuotaBackend, QuotaKey

    rate = Rate(10, 1.0)
    backend, key = MemoryQuotaBackend(), QuotaKey("http://api", "fp")
    pacers = [Pacer(rate, backend, key, priority=3), Pacer(rate, backend, key, priority=1)]
    sent = [0, 0]
    end = time.time() + 4.0

    async def worker(k: int) -> None:
        while time.time() < end:
            await pacers[k].acquire()
            if time.time() < end:
                sent[k] += 1

    await asyncio.gather(*(worker(k) for k in (0, 1) for _ in range(8)))
    for pacer in pacers:
        await pacer.close()
    assert sum(sent) >= 36
    assert 0.72 <= sent[0] / sum(sent) <= 0.8          # without the shares: 28 of 40


async def test_runs_waiting_out_a_long_pause_are_not_forgotten_by_the_shared_state(monkeypatch):
    """During a Retry-After pause a lease gives no slot (they come half a window before its end).
    A run waiting it out asks again now and then, so the state does not take it for gone: after a
    pause longer than a member's time to live, the lower --rate of the run beside it still holds."""
    from capbatch import pacing, quota
    from capbatch.quota import MemoryQuotaBackend, QuotaKey

    monkeypatch.setattr(quota, "MEMBER_TTL", 1.0)
    monkeypatch.setattr(pacing, "MEMBER_TTL", 1.0)
    backend, key = MemoryQuotaBackend(), QuotaKey("http://api", "fp")
    slow, fast = Pacer(Rate(5, 1.0), backend, key), Pacer(Rate(10, 1.0), backend, key)
    await slow.acquire()
    await fast.acquire()
    backend._state(key).pause_until = time.time() + 2.5      # a shared Retry-After
    await asyncio.gather(slow.acquire(), fast.acquire())
    assert fast.agreed == Rate(5, 1.0) and len(fast.peers) == 1
    for pacer in (slow, fast):
        await pacer.close()


async def test_a_send_reached_too_late_takes_the_next_slot_even_when_the_grid_is_out_ahead():
    """A request whose connection came too late for its slot on a shared grid leases the next slot
    instead. When the grid is out a lead ahead, that lease first gives nothing — and may still give
    nothing once the next slot's time has come during its own round trip: it asks until it has one,
    never sending the late request as it is."""
    from capbatch.departure import expect
    from capbatch.quota import Member, MemoryQuotaBackend, QuotaKey, lease_slots

    class Slow(MemoryQuotaBackend):
        async def lease(self, *args, **kwargs):
            grant = await super().lease(*args, **kwargs)
            await asyncio.sleep(0.03)                          # a round trip to the shared state
            return grant

    rate = Rate(10, 1.0)
    backend, key = Slow(), QuotaKey("http://api", "fp")
    state = backend._state(key)
    lease_slots(state, Member.new(rate), 1, time.time())      # another run on the key
    pacer = Pacer(rate, backend, key)
    await pacer._lease(1)
    now = time.time()
    state.tat = now + 0.5 + 0.01                               # free 10 ms from now: within the round trip
    note = expect(now, now - pacer._max_late - 0.1, pacer._recheck, pacer._judge)
    pacer._guard_sends.append(note)
    await pacer._recheck(note)
    assert pacer.dropped_slots == 1 and note not in pacer._guard_sends
    await pacer.close()


async def test_slow_late_reports_narrow_how_late_a_slot_may_still_be_sent():
    """A late send's report must land before the slots a window after it are handed out (half a window
    ahead). On a host loaded enough that reports take long to land, the pacer leaves them that
    time: a slot may be sent late by at most half a window less twice the slowest recent report —
    recent: a slow report is halved every few seconds, or one hiccup would stop late sends for good
    (few slots are sent late once the limit is narrow, so few reports could say they are fast)."""
    from capbatch.departure import expect
    from capbatch.quota import Member, MemoryQuotaBackend, QuotaKey, lease_slots

    class SlowReports(MemoryQuotaBackend):
        async def late(self, *args, **kwargs):
            await asyncio.sleep(0.15)
            await super().late(*args, **kwargs)

    rate = Rate(10, 1.0)
    backend, key = SlowReports(), QuotaKey("http://api", "fp")
    lease_slots(backend._state(key), Member.new(rate), 1, time.time())   # another run on the key
    pacer = Pacer(rate, backend, key)
    await pacer._lease(1)
    assert pacer._late_cap() == pytest.approx(0.46)
    now = time.time()
    pacer._judge(expect(now, now - 0.3, None, None))          # a send 0.3 s late, reported as it leaves
    await pacer.settle_reports()
    assert pacer._late_cap() == pytest.approx(0.5 - 2 * 0.15, abs=0.02)
    assert pacer.slow_reports == 0                             # 0.45 s after its slot: still in time
    now = time.time()
    pacer._judge(expect(now, now - 0.4, None, None))          # 0.55 s after its slot: too late, counted
    await pacer.settle_reports()
    assert pacer.slow_reports == 1
    pacer._report_time_at -= 5.0                               # five seconds on: half as slow
    assert pacer._late_cap() == pytest.approx(0.5 - 0.15, abs=0.02)
    pacer._report_time_at -= 15.0                              # twenty: back to two leases' time
    assert pacer._late_cap() == pytest.approx(0.46)
    await pacer.close()
