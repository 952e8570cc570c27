"""One API quota, shared by every run that sends with the same credential to the same API.

Capillary counts a quota per API account. Two runs on one key (a nightly job beside an ad-hoc
backfill) must together stay under it, so the pace is not kept per process but in a small shared
state per quota key: a GCRA ("generic cell rate algorithm") grid of send slots. The state holds
the grid's next free slot (``tat``, theoretical arrival time); a member *leases* the next few
slots (advancing ``tat``) and sends at those times. Slots are spaced so that no window of the
quota's length ever holds more than the quota (see :class:`Cadence`), whoever sends them.

The key is (API base URL, credential fingerprint): the fingerprint hashes the account's *identity*
(Basic user name or OAuth client key) — never a password or secret — and the state file is named
after a hash of both, so neither appears in a file name.

Fair share: a member may hold only a few unreached slots at a time (``2 × block × priority``) and
leases again only as it uses them, so members that all want to send take turns on the grid in
proportion to their ``--priority``; none can starve another. A member that is idle (waiting for
its time window, or latency-bound) leases nothing and leaves its share to the others.

Late sends: a send that leaves later than the margin allows after its slot would crowd the window
that ends at the slot a window after it. It is reported as it leaves, and no slot is handed out
more than half a window ahead (:attr:`Cadence.lead`), so a send up to half a window late (the pacer
skips a slot reached later) is heard of before the slots a window after it are handed out. Under
quotas of up to ``CHAIN_MAX`` per window the state keeps a log of the grid's recent slots and the
time each counts at (its slot, or later once its send reported leaving late), and no slot is handed
out before the R-th latest of those plus a window and the margin: only the slots a window after it
move (one for a send a little late, the few after it for one later than an interval; and their
successors a window on — a chain), which costs about 1/R of a slot. Above ``CHAIN_MAX`` (per-minute
quotas, whose margin is 0.12 s and rarely exceeded) the log would be too large to rewrite at every
lease: the grid's coming slots move instead, by at most one slot per late send
(:func:`late_shift`).

Rate agreement: every member states the rate it was given (``--rate``, the key's quota); the grid
runs at the lowest rate among live members, and each member says so when its own is higher.

Shared back-off: a 429 with Retry-After pauses the whole grid (``pause_until``); systematic
throttling seen by any member lowers the shared ``factor`` (x0.7, at most once a second), which
recovers by 5 % of the rate every 2 s without throttling — so one run's 429s slow all of them.
Any 429 also widens the grid's margin by a step (``jitter``: 2 ms, or 0.1 % of the window), because
at a correct rate a 429 means the path to the server jitters more than the margin allows; 30 s
without 429s narrow it again by a step.

Crash safety: members carry a ``seen`` time and their pid; a member whose process is gone (same
host) or that has not leased for ``MEMBER_TTL`` is dropped, so a killed run leaves nothing that
blocks the others (its unused leased slots, at most a few, pass unused).

The backend interface
---------------------
A backend stores one :class:`QuotaState` per :class:`QuotaKey` and applies the pure rules below
(:func:`lease_slots`, :func:`report_throttle`, :func:`leave`) to it atomically — the rules exist
once, here, whatever keeps the state::

    class QuotaBackend(Protocol):
        lease_seconds: float        # how much sending time one lease should cover (batching)
        async def lease(self, key, member, count, now, spare_only=False) -> Grant
        async def throttled(self, key, member, now, retry_after, slow_down) -> bool
        async def late(self, key, member, now, shifts) -> None   # sends left late: {slot: shift}
        async def leave(self, key, member, unused_slots, now) -> None
        def describe(self) -> str   # where the state lives, for messages
        async def close(self) -> None   # release files / connections

``now`` and every slot are wall-clock epoch seconds of this host (``time.time()``). A backend that
cannot be used raises :class:`QuotaUnavailable` (the pacer then paces alone and says so). A backend
whose leases are long may also offer ``watch(key, callback)``: it calls ``callback()`` when another
member changed something the others should act on at once (slots given back, a pause, a lower rate
factor), and the pacer leases again — spare slots only — instead of waiting for its next lease.

- :class:`FileQuotaBackend` keeps the state as a small JSON file per key in a user-level state
  directory, read-modify-written under ``fcntl.flock`` (released by the kernel when a process dies,
  so a lock can never go stale): every run on this host shares it.
- :class:`MemoryQuotaBackend` keeps it in the process (one run alone, and tests).
- ``capbatch.ledger.pg_quota.PostgresQuotaBackend`` keeps it in one row per key of the ledger
  database (``capbatch.quota``), changed in one transaction (``SELECT ... FOR UPDATE``, the rule,
  ``UPDATE``) on the *database's* clock, which it converts to this host's for the slots it returns;
  its ``lease_seconds`` is a second, so a worker touches the database about once a second. Every
  worker of every job on that database, on any host, shares it. Members on other hosts are not
  pid-checked: they expire by ``MEMBER_TTL`` alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

from .config import Credentials, Rate

log = logging.getLogger("capbatch.quota")
HOST = socket.gethostname()

# ---- the cadence: how far apart slots are ---------------------------------------------------
GUARD_MAX = 1_000_000    # quotas above this many per window are rescaled to an equivalent window
MIN_MARGIN = 0.008       # seconds every quota window is stretched by, at least (network jitter)
MARGIN_FRACTION = 0.002  # ... or this fraction of the window, if larger (0.12 s of a minute)
LATE_ALLOWANCE = 0.75    # a send may leave this much of the margin after its slot; the rest is the path's
JITTER_STEP = 0.002      # each 429 widens the margin by this (or 0.1 % of the window, if larger) ...
JITTER_MAX = 0.05        # ... up to this fraction of the window
JITTER_DECAY = 30.0      # and every this many seconds without a 429 narrows it by one step again
MIN_FACTOR = 0.05        # the 429 back-off never goes below 5 % of the rate
DECREASE = 0.7           # multiplicative decrease per throttling episode
INCREASE_EVERY = 2.0     # seconds without throttling between additive increases
INCREASE_STEP = 0.05     # fraction of the rate regained per step
MAX_PAUSE = 300.0        # a Retry-After is honoured up to five minutes
CHAIN_MAX = 256          # quotas of at most this many per window keep the chain log (see :func:`lease_slots`)
SAME_SLOT = 0.0001       # slots closer than this in the chain log cannot be told apart by a late report
MEMBER_TTL = 10.0        # a member that has not leased for this long (and longer than 3 slots) is gone
MAX_SPARE = 4096         # given-back slots kept at most (a few seconds' worth at any real quota)
STALE_STATE_DAYS = 30    # state files untouched this long are removed when the directory is opened
LOCK_PATIENCE = 5.0      # seconds to wait for the state lock before pacing alone (a stopped process)


@dataclass(frozen=True)
class Cadence:
    """Slot spacing for a quota of ``count`` requests in any ``window`` seconds.

    A grid of ``interval = (window + margin) / count`` puts at most ``count`` slots into any window
    of the quota's length, with ``margin`` seconds to spare against jitter between our clock and the
    server's (a send that leaves up to ``margin`` late still cannot crowd a window). The margin is
    absolute (8 ms, or 0.2 % of the window if larger), so the sustained rate is 99.2 % of a per-second
    quota and 99.8 % of a per-minute one. A fractional or huge quota is rescaled to a whole count over
    a scaled window (0.5/s -> 1 per 2 s; 2,000,000/h -> 1,000,000 per 30 min).
    """

    count: int
    window: float
    margin: float
    jitter: float = 0.0             # the part of the margin learned from 429s (all of it the path's)

    @classmethod
    def of(cls, rate: Rate, jitter: float = 0.0) -> Cadence:
        """``jitter``: extra margin learned from 429s (the path to the server jitters more than assumed)."""
        count = min(GUARD_MAX, max(1, math.floor(rate.requests)))
        window = rate.period * count / rate.requests
        learned = min(jitter, JITTER_MAX * window)
        return cls(count, window, max(MIN_MARGIN, MARGIN_FRACTION * window) + learned, learned)

    @property
    def jitter_step(self) -> float:
        return max(JITTER_STEP, 0.001 * self.window)

    @property
    def period(self) -> float:
        """The window plus the margin: no span this long holds more than ``count`` of the grid's slots."""
        return self.window + self.margin

    @property
    def interval(self) -> float:
        return self.period / self.count

    @property
    def late_allowance(self) -> float:
        """How late after its slot a send may leave and still count as on time: three quarters of the
        margin. The last quarter (2 ms of a per-second quota's 8) is left for the path between this
        host's stamp of a send (its bytes handed to the kernel) and the server's clock — and all of
        what 429s added to the margin (they mean the path jitters more than that)."""
        return LATE_ALLOWANCE * (self.margin - self.jitter)

    @property
    def guard_gap(self) -> float:
        """The least time a process's own sends keep between one and the R-th after it, by when their
        bytes really left (the pacer's guard): the window plus the path's quarter of the margin, as
        the shared grid leaves it (``margin - late_allowance``). Less than the grid's period (window +
        margin) on purpose: a send always leaves a little after the guard lets it go, and with a gap
        equal to the period that lag would be carried to the send a window later, and on, window
        after window — every slot drifting later, a few per mille of the quota lost (measured at
        50/s: 0.986-0.989 of the quota). The other three quarters absorb it."""
        return self.period - self.late_allowance

    @property
    def lead(self) -> float:
        """How far ahead of its time a slot may be handed out: half the window. A send that leaves
        late reports it as it leaves, and the slots a window after it move — if they have not been
        handed out yet. With slots leased at most half a window ahead, and sends later than half a
        window less the report's time skipped (the pacer's ``_max_late``), they have not."""
        return 0.5 * self.window

    @property
    def efficiency(self) -> float:
        """Sustained fraction of the quota the grid uses."""
        return self.window / self.period


# ---- the key and the members ---------------------------------------------------------------
def credential_fingerprint(credentials: Credentials) -> str:
    """A hash of the account's identity (user name or client key): never the password or secret."""
    kind = credentials.kind
    identity = credentials.client_key if kind == "oauth" else credentials.username if kind == "basic" else ""
    return hashlib.sha256(f"capbatch-quota\n{kind}\n{identity or ''}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class QuotaKey:
    target: str                 # the API base URL
    fingerprint: str            # credential_fingerprint(...)
    lane: str = "requests"      # "reads" when --read-rate gives reads a quota of their own

    @property
    def name(self) -> str:
        return hashlib.sha256(f"{self.target.rstrip('/')}\n{self.fingerprint}\n{self.lane}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Member:
    """One run taking part in a quota."""

    id: str
    rate: Rate
    weight: int = 1
    pid: int = field(default_factory=os.getpid)
    host: str = HOST
    run: str = ""               # which run (job and input) it works on: workers of one job share it
    session: int = 0            # the backend's handle on its connection, if it can tell that is alive

    @classmethod
    def new(cls, rate: Rate, weight: int = 1, run: str = "") -> Member:
        return cls(f"{HOST}:{os.getpid()}:{os.urandom(4).hex()}", rate, max(1, int(weight)), run=run)


@dataclass
class MemberState:
    pid: int
    host: str
    weight: int
    requests: float
    period: float
    seen: float
    joined: float
    run: str = ""
    session: int = 0
    held: list[float] = field(default_factory=list)   # slots leased to it and not yet reached

    @property
    def rate(self) -> Rate:
        return Rate(self.requests, self.period)


_MEMBER_FIELDS = dataclasses.fields(MemberState)


@dataclass
class QuotaState:
    tat: float = 0.0                # the next free slot of the shared grid
    factor: float = 1.0             # shared 429 back-off, 1.0 = full rate
    changed_at: float = 0.0         # when the factor last changed (recovery counts from here)
    pause_until: float = 0.0        # shared Retry-After pause
    jitter: float = 0.0             # extra slot margin learned from 429s (seconds)
    jitter_at: float = 0.0          # when it last changed
    throttle_events: int = 0
    last_member: str = ""           # who leased the grid's last slots (only they can give them back)
    last_start: float = 0.0         # where that last lease began on the grid
    spare: list[float] = field(default_factory=list)   # slots given back (a run that left or died mid-turn)
    late: list[list[Any]] = field(default_factory=list)  # [member, when, shift]: late sends of a member alone
    chains: list[list[Any]] = field(default_factory=list)  # [slot, counts at, member]: the grid's recent slots
    members: dict[str, MemberState] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies every list of the state, and the state is rewritten
        # at every lease (tens of times a second under a per-second quota).
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["members"] = {k: {f.name: getattr(m, f.name) for f in _MEMBER_FIELDS} for k, m in self.members.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuotaState:
        members = {k: MemberState(**v) for k, v in (data.get("members") or {}).items()}
        return cls(tat=float(data.get("tat", 0.0)), factor=float(data.get("factor", 1.0)),
                   changed_at=float(data.get("changed_at", 0.0)), pause_until=float(data.get("pause_until", 0.0)),
                   jitter=float(data.get("jitter", 0.0)), jitter_at=float(data.get("jitter_at", 0.0)),
                   throttle_events=int(data.get("throttle_events", 0)),
                   last_member=str(data.get("last_member", "")), last_start=float(data.get("last_start", 0.0)),
                   spare=[float(x) for x in data.get("spare") or ()], members=members,
                   late=[[str(m), float(t), float(d)] for m, t, d in data.get("late") or ()],
                   chains=[[float(c[0]), float(c[1]), str(c[2]) if len(c) > 2 else ""]
                           for c in data.get("chains") or ()])


@dataclass(frozen=True)
class Peer:
    pid: int
    host: str
    rate: Rate
    weight: int
    run: str = ""
    session: int = 0


@dataclass(frozen=True)
class Grant:
    """What a lease returns: the member's slots and the quota's shared condition."""

    slots: tuple[float, ...]
    rate: Rate                      # the rate in force: the lowest any live member gave
    jitter: float                   # extra margin in force (learned from 429s)
    factor: float
    pause_until: float
    peers: tuple[Peer, ...]         # the other live members
    retry_at: float = 0.0           # fewer slots than asked: when the next could be handed out (0: now)


# ---- the rules (pure: every backend applies these to its stored state) -------------------------
def agreed_rate(state: QuotaState, fallback: Rate) -> Rate:
    """The lowest rate any member gave (ties: the shorter window, the stricter of the two)."""
    rates = [m.rate for m in state.members.values()] or [fallback]
    return min(rates, key=lambda r: (r.per_second, r.period))


def _alive(m: MemberState, now: float, cadence_interval: float, sessions: frozenset[int] | None,
           pause_until: float = 0.0) -> bool:
    # Silence counts from its last lease, or from the last slot it holds, or from the end of the
    # shared pause it is waiting out (a run waits a Retry-After out without leasing).
    if now - max(m.seen, max(m.held, default=0.0), pause_until) > max(MEMBER_TTL, 3 * cadence_interval):
        return False
    if sessions is not None and m.session and m.session not in sessions:
        return False                # its connection to the shared state is gone: it died, on whatever host
    if m.host == HOST and m.pid != os.getpid():
        try:
            os.kill(m.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:     # another user's process: alive
            pass
    return True


def prune(state: QuotaState, now: float, fallback: Rate, sessions: frozenset[int] | None = None) -> None:
    """Drop members that are gone; the slots they held and had not reached go to the next lease.
    ``sessions``: the backend's live connection handles, where it can tell (a database)."""
    interval = Cadence.of(agreed_rate(state, fallback)).interval
    for member_id in [k for k, m in state.members.items()
                      if not _alive(m, now, interval, sessions, state.pause_until)]:
        gone = state.members.pop(member_id)
        _give_back(state, member_id, gone.held, now)


def _give_back(state: QuotaState, member_id: str, slots: Iterable[float], now: float) -> None:
    """Slots a member will not use: the tail of the grid rewinds if it leased last, the rest are spare."""
    unused = sorted(s for s in slots if s >= now)
    if state.last_member == member_id:
        tail = [s for s in unused if s >= state.last_start]
        if tail:
            state.tat = max(now, tail[0])
            unused = unused[: len(unused) - len(tail)]
            # only its own entries: another member's slot leased after a chain-moved one of its own
            # sits past the tail's start too, and is still going out
            state.chains = [c for c in state.chains if c[0] < tail[0] or c[2] != member_id]
        state.last_member = ""
    if unused:
        state.spare = sorted([*state.spare, *unused])[-MAX_SPARE:]


def _recover(state: QuotaState, now: float) -> None:
    if state.factor < 1.0 and now - state.changed_at >= INCREASE_EVERY:
        steps = math.floor((now - state.changed_at) / INCREASE_EVERY)
        state.factor = min(1.0, state.factor + steps * INCREASE_STEP)
        state.changed_at += steps * INCREASE_EVERY


def _relax(state: QuotaState, now: float, cadence: Cadence) -> None:
    if state.jitter > 0 and now - state.jitter_at >= JITTER_DECAY:
        steps = math.floor((now - state.jitter_at) / JITTER_DECAY)
        state.jitter = max(0.0, state.jitter - steps * cadence.jitter_step)
        state.jitter_at += steps * JITTER_DECAY


def _touch(state: QuotaState, member: Member, now: float) -> MemberState:
    known = state.members.get(member.id)
    if known is None:
        known = state.members[member.id] = MemberState(member.pid, member.host, member.weight, member.rate.requests,
                                                       member.rate.period, now, now, member.run, member.session)
    known.seen = now
    known.session = member.session
    return known


def lease_slots(state: QuotaState, member: Member, count: int, now: float,
                sessions: frozenset[int] | None = None, spare_only: bool = False) -> Grant:
    """Give ``member`` the next ``count`` slots (never in the past, never in a pause): spare slots
    first — given back by a run that left or died holding them — then the grid's next ones (not
    with ``spare_only``: a member told that slots were given back takes just those)."""
    me = _touch(state, member, now)
    prune(state, now, member.rate, sessions)
    _recover(state, now)
    rate = agreed_rate(state, member.rate)
    _relax(state, now, Cadence.of(rate))
    _call_in_late(state, member, now, Cadence.of(rate))
    cadence = Cadence.of(rate, state.jitter)
    interval = cadence.interval / max(state.factor, MIN_FACTOR)
    if state.tat > now + MAX_PAUSE + 60 + count * interval:
        state.tat = now                 # a clock stepped backwards: do not wait for it
        state.spare = []
        state.chains = []
    state.pause_until = min(state.pause_until, now + MAX_PAUSE)
    floor = max(now, state.pause_until)
    spare = [s for s in state.spare if s >= floor]           # sorted: the ones within the lead first
    taken = [s for s in spare[: max(0, count)] if s <= now + cadence.lead]
    state.spare = spare[len(taken):]
    _take_over(state, member.id, taken)
    start = max(state.tat, floor)
    grid = [] if spare_only else [start + i * interval for i in range(max(0, count) - len(taken))]
    fresh, retry_at = _chained(state, cadence, grid, member.id, now, alone=len(state.members) == 1)
    if fresh:
        state.tat = start + len(fresh) * interval
        state.last_member = member.id
        state.last_start = start
    slots = tuple(taken + fresh)
    me.held = [h for h in me.held if h >= now][-MAX_SPARE:] + list(slots)
    peers = tuple(Peer(m.pid, m.host, m.rate, m.weight, m.run, m.session)
                  for k, m in state.members.items() if k != member.id)
    return Grant(slots, rate, state.jitter, state.factor, state.pause_until, peers, retry_at)


def _chained(state: QuotaState, cadence: Cadence, grid: list[float], member_id: str, now: float,
             alone: bool = False) -> tuple[list[float], float]:
    """The grid's next slots, each moved (if need be) to a window plus the margin after the R-th
    latest time the grid's recent slots count at — and entered in the chain log.

    The chain log (quotas of up to ``CHAIN_MAX`` per window) holds the grid's last slots and the time
    each counts at: its slot, or later once its send reported leaving late (:func:`report_late`). A
    slot never goes out before the R-th latest of those plus ``window + margin``, so no window holds
    more than R of them whoever sent them. On a grid where nothing was late that is the grid itself;
    a late send moves only the slots a window after it (one, or the few after it for a send later
    than an interval; and their successors a window later — its chain), not the whole grid: it
    costs its lateness once per window-long chain, about 1/R of a slot, where moving the grid costs
    the lateness in slots' worth for every member. A member
    ``alone`` on the grid gets the grid's slots as they are while the log's recent slots are all its
    own: its own guard keeps its sends apart by when they really left (the log still hears of its
    late sends, for whoever joins). A slot another member sent — one that left or died a moment ago,
    possibly late — still binds it until the log forgets it: that member's guard is gone.

    No slot is handed out more than :attr:`Cadence.lead` ahead of ``now``: returns the slots up to
    the first that would be, and when that one could be handed out (0.0 if all fit)."""
    horizon = now + cadence.lead
    if cadence.count > CHAIN_MAX:
        state.chains = []
        fit = [slot for slot in grid if slot <= horizon]
        return fit, (grid[len(fit)] - cadence.lead if len(fit) < len(grid) else 0.0)
    chains = state.chains[-2 * cadence.count:]
    free = alone and all(c[2] == member_id for c in chains)
    slots: list[float] = []
    retry_at = 0.0
    for slot in grid:
        counts = sorted(c[1] for c in chains)
        if len(counts) >= cadence.count and not free:
            slot = max(slot, counts[-cadence.count] + cadence.period)
        if slot > horizon:
            retry_at = slot - cadence.lead
            break
        chains.append([slot, slot, member_id])
        slots.append(slot)
    state.chains = chains[-2 * cadence.count:]
    return slots, retry_at


def report_throttle(state: QuotaState, member: Member, now: float, retry_after: float | None,
                    slow_down: bool) -> bool:
    """A member saw a 429: widen the slot margin a step (at most one step a second: the quota was
    crowded, so the path jitters more than the margin allows), share the pause, and (``slow_down``,
    systematic throttling) lower the shared rate. Returns True when this report lowered the rate."""
    _touch(state, member, now)
    cadence = Cadence.of(agreed_rate(state, member.rate))
    if now - state.jitter_at >= 1.0 and state.jitter < JITTER_MAX * cadence.window:
        state.jitter = min(JITTER_MAX * cadence.window, state.jitter + cadence.jitter_step)
        state.jitter_at = now
    if retry_after is not None and retry_after > 0:
        state.pause_until = max(state.pause_until, now + min(retry_after, MAX_PAUSE))
    if not slow_down:
        return False
    _recover(state, now)
    if now - state.changed_at < max(1.0, retry_after or 0.0):
        state.changed_at = max(state.changed_at, now - INCREASE_EVERY + 1.0)  # still throttled: hold recovery
        return False
    state.factor = max(MIN_FACTOR, state.factor * DECREASE)
    state.changed_at = now
    state.throttle_events += 1
    return True


def report_late(state: QuotaState, member: Member, now: float, shift: float, slot: float | None = None) -> None:
    """A member's send left later than the margin allows after its slot (a loaded host held it).

    With the chain log (``slot`` given and found there): that slot counts ``shift`` later, so the
    slots a window after it are moved when they are handed out (:func:`_chained`); nothing else
    moves. Without the log, :func:`_late_grid`."""
    _touch(state, member, now)
    if shift <= 0:
        return
    entries = _chain_entries(state, member, slot)
    for entry in entries:
        entry[1] += shift
    if entries:
        return
    shift = min(shift, Cadence.of(agreed_rate(state, member.rate)).interval + 0.0005)
    _late_grid(state, member, now, shift)


def report_lates(state: QuotaState, member: Member, now: float, shifts: Mapping[float, float]) -> None:
    """:func:`report_late` for each ``slot: shift`` of ``shifts`` (a member's late sends, reported at once)."""
    for slot, shift in shifts.items():
        report_late(state, member, now, shift, slot)


def _chain_entries(state: QuotaState, member: Member, slot: float | None) -> list[list[Any]]:
    """The chain log's entry for the member's ``slot`` — or entries: a member can hold two slots at
    one time (two sends that left together are chained to one time a window on), and which of them
    this send was cannot be told. Both then count later, which is safe: a count believed later than
    it was only ever moves the slots a window after it later."""
    if slot is None or not state.chains:
        return []
    half = Cadence.of(agreed_rate(state, member.rate), state.jitter).interval / 2
    near = [c for c in state.chains if abs(c[0] - slot) <= half]
    near = [c for c in near if c[2] == member.id] or near
    if not near:
        return []
    nearest = min(abs(c[0] - slot) for c in near)
    return [c for c in near if abs(c[0] - slot) <= nearest + SAME_SLOT]


def _take_over(state: QuotaState, member_id: str, slots: Iterable[float]) -> None:
    """Spare slots taken by ``member_id``: their chain log entries are its own now (see
    :func:`_chain_entries`). A spare's first owner is always gone: only those give slots back."""
    for slot in slots:
        for entry in state.chains:
            if abs(entry[0] - slot) <= SAME_SLOT and entry[2] not in state.members:
                entry[2] = member_id
                break


def _late_grid(state: QuotaState, member: Member, now: float, shift: float) -> None:
    """A late send without a chain log:
    the grid's slots not handed out yet move ``shift`` seconds later (see :func:`late_shift`), so
    that the slot a window after the late send cannot crowd a window together with it — a one-off
    cost of at most one slot per late send, where widening the margin would cost every slot of the
    next minutes. A member alone on the grid only notes the shift: its own guard already keeps its
    sends apart by their real departures, and the grid moves only if another member leases within
    a window of the late send (:func:`_call_in_late`)."""
    if len(state.members) > 1:
        _shift(state, now, shift)
    elif state.late and state.late[-1][0] == member.id and now - state.late[-1][1] < 0.05 * _window(state, member):
        state.late[-1][1:] = [now, state.late[-1][2] + shift]     # one note per 5 % of the window: kept small
    else:
        state.late.append([member.id, now, shift])


def _window(state: QuotaState, member: Member) -> float:
    return Cadence.of(agreed_rate(state, member.rate)).window


def _shift(state: QuotaState, now: float, shift: float) -> None:
    state.tat = max(state.tat, now) + shift
    state.spare = [s + shift if s >= now else s for s in state.spare]


def _call_in_late(state: QuotaState, member: Member, now: float, cadence: Cadence) -> None:
    """Late sends noted while their member was alone, within the last two windows: when another
    member leases, the grid moves for them before it hands out a slot that could crowd them."""
    horizon = now - 2 * cadence.period
    state.late = [mark for mark in state.late if mark[1] >= horizon]      # a dead member's too
    if any(mark[0] != member.id for mark in state.late):
        _shift(state, now, sum(mark[2] for mark in state.late))
        state.late = []


def late_shift(lateness: float, allowance: float, interval: float | None) -> float:
    """How far the grid must move for one send that left ``lateness`` seconds after its slot, when
    every send may leave up to ``allowance`` late (the margin covers that). Moved by ``d``, the send
    counts as one at ``slot + lateness - allowance``: the window it opens holds the grid's next R
    slots only if those move by ``lateness - allowance``; and once it has passed another slot (the
    order changed), a window that opens at that slot holds one slot more than the grid's R, which
    one interval covers. So ``min(lateness - allowance, interval)``, and 0 within the allowance.
    (It must reach the shared state before the slot a window after the late send is handed out:
    the pacer sends a slot late only when it still can, see ``Pacer``.)
    ``interval`` None: uncapped (a chain log moves only the late send's own chain, by all of it)."""
    if lateness <= allowance:
        return 0.0
    return (lateness - allowance if interval is None else min(lateness - allowance, interval)) + 0.0005


def leave(state: QuotaState, member: Member, unused: tuple[float, ...], now: float) -> None:
    """The member stops: forget it, and give back the slots it will not use."""
    state.members.pop(member.id, None)
    _give_back(state, member.id, unused, now)


# ---- backends ----------------------------------------------------------------------------------
class QuotaBackend(Protocol):
    lease_seconds: float

    async def lease(self, key: QuotaKey, member: Member, count: int, now: float,
                    spare_only: bool = False) -> Grant: ...

    async def throttled(self, key: QuotaKey, member: Member, now: float, retry_after: float | None,
                        slow_down: bool) -> bool: ...

    async def late(self, key: QuotaKey, member: Member, now: float, shifts: Mapping[float, float]) -> None: ...

    async def leave(self, key: QuotaKey, member: Member, unused: tuple[float, ...], now: float) -> None: ...

    def describe(self) -> str: ...

    async def close(self) -> None: ...


class MemoryQuotaBackend:
    """The quota state in this process only: one run pacing itself (and the tests)."""

    lease_seconds = 0.02

    def __init__(self) -> None:
        self.states: dict[QuotaKey, QuotaState] = {}

    def _state(self, key: QuotaKey) -> QuotaState:
        return self.states.setdefault(key, QuotaState())

    async def lease(self, key: QuotaKey, member: Member, count: int, now: float,
                    spare_only: bool = False) -> Grant:
        return lease_slots(self._state(key), member, count, now, spare_only=spare_only)

    async def throttled(self, key: QuotaKey, member: Member, now: float, retry_after: float | None,
                        slow_down: bool) -> bool:
        return report_throttle(self._state(key), member, now, retry_after, slow_down)

    async def late(self, key: QuotaKey, member: Member, now: float, shifts: Mapping[float, float]) -> None:
        report_lates(self._state(key), member, now, shifts)

    async def leave(self, key: QuotaKey, member: Member, unused: tuple[float, ...], now: float) -> None:
        leave(self._state(key), member, unused, now)

    def describe(self) -> str:
        return "this process only"

    async def close(self) -> None:
        self.states.clear()


class QuotaUnavailable(Exception):
    """The shared state cannot be used (locked too long, unreachable, refused): pace alone."""


class QuotaLockTimeout(QuotaUnavailable):
    """The state file stayed locked (a process stopped while holding it, e.g. with Ctrl-Z)."""


class FileQuotaBackend:
    """One small JSON file per quota key in ``directory``, changed only under an exclusive flock.

    The file is rewritten in place (pwrite + ftruncate); one that cannot be read (a process killed
    mid-write, or a stranger's file) is started afresh, which costs at most one lease of overlap.
    """

    lease_seconds = 0.02

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._fds: dict[QuotaKey, int] = {}
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._sweep()

    def path(self, key: QuotaKey) -> Path:
        return self.directory / f"{key.name}.json"

    def describe(self) -> str:
        return str(self.directory)

    def _sweep(self) -> None:
        horizon = time.time() - STALE_STATE_DAYS * 86400
        try:
            for p in self.directory.glob("*.json"):
                try:
                    if p.stat().st_mtime < horizon:
                        p.unlink()
                except OSError:
                    pass
        except OSError:
            pass

    def _fd(self, key: QuotaKey) -> int:
        fd = self._fds.get(key)
        if fd is None:
            fd = os.open(self.path(key), os.O_RDWR | os.O_CREAT, 0o600)
            self._fds[key] = fd
        return fd

    async def _lock(self, fd: int) -> None:
        deadline = time.monotonic() + LOCK_PATIENCE
        delay = 0.0002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            if time.monotonic() > deadline:
                raise QuotaLockTimeout(f"the quota state {self.directory} stayed locked for {LOCK_PATIENCE:g} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.01)

    def _load(self, key: QuotaKey, fd: int) -> QuotaState:
        size = os.fstat(fd).st_size
        raw = os.pread(fd, size, 0) if size else b""
        if not raw:
            return QuotaState()
        try:
            data = json.loads(raw)
            if data.get("key") != key.name:
                raise ValueError("state of another key")
            return QuotaState.from_json(data["state"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("quota state %s was unreadable (%s); starting it afresh", self.path(key), exc)
            return QuotaState()

    def _store(self, key: QuotaKey, fd: int, state: QuotaState) -> None:
        data = json.dumps({"key": key.name, "target": key.target, "lane": key.lane,
                           "updated": time.time(), "state": state.to_json()},
                          separators=(",", ":")).encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))

    async def _apply(self, key: QuotaKey, change: Any) -> Any:
        fd = self._fd(key)
        await self._lock(fd)
        try:
            state = self._load(key, fd)
            result = change(state)
            self._store(key, fd, state)
            return result
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    async def lease(self, key: QuotaKey, member: Member, count: int, now: float,
                    spare_only: bool = False) -> Grant:
        return await self._apply(key, lambda s: lease_slots(s, member, count, now, spare_only=spare_only))

    async def throttled(self, key: QuotaKey, member: Member, now: float, retry_after: float | None,
                        slow_down: bool) -> bool:
        return await self._apply(key, lambda s: report_throttle(s, member, now, retry_after, slow_down))

    async def late(self, key: QuotaKey, member: Member, now: float, shifts: Mapping[float, float]) -> None:
        await self._apply(key, lambda s: report_lates(s, member, now, shifts))

    async def leave(self, key: QuotaKey, member: Member, unused: tuple[float, ...], now: float) -> None:
        await self._apply(key, lambda s: leave(s, member, unused, now))

    def read(self, key: QuotaKey) -> QuotaState:
        """The state as stored (for status and tests); no lock, no change."""
        return self._load(key, self._fd(key))

    async def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()


def default_quota_dir() -> Path:
    """The platform's user state directory (platformdirs), e.g. ~/.local/state/capbatch/quota."""
    from platformdirs import user_state_dir

    return Path(user_state_dir("capbatch", appauthor=False)) / "quota"


def open_backend(directory: Path | None) -> QuotaBackend:
    """The shared file backend in ``directory`` (default: the user state dir); if that cannot be
    used, this run paces alone and says so."""
    if directory is not None and str(directory).lower() in ("none", "off"):
        return MemoryQuotaBackend()
    where = Path(directory) if directory is not None else default_quota_dir()
    try:
        return FileQuotaBackend(where)
    except OSError as exc:
        log.warning("cannot use the quota directory %s (%s): this run paces itself alone and cannot "
                    "share its quota with other runs; set --quota-dir to a writable directory", where,
                    exc.strerror or exc)
        return MemoryQuotaBackend()


def other_runs(state: QuotaState, now: float, rate: Rate, run: str = "") -> int:
    """Live runs in ``state`` other than ``run`` (the workers of one job count as one run)."""
    prune(state, now, rate)
    return len({m.run or member_id for member_id, m in state.members.items() if not run or m.run != run})


def live_peers(directory: Path | None, key: QuotaKey, rate: Rate, now: float, run: str = "") -> int:
    """How many other runs share ``key`` right now, read from its state file (nothing is created or changed)."""
    if directory is not None and str(directory).lower() in ("none", "off"):
        return 0
    path = (Path(directory) if directory is not None else default_quota_dir()) / f"{key.name}.json"
    try:
        data = json.loads(path.read_bytes())
        state = QuotaState.from_json(data["state"]) if data.get("key") == key.name else QuotaState()
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return other_runs(state, now, rate, run)
