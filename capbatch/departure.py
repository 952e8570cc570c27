"""When a paced request actually left: the pacer's guard counts sends at their departure.

A request counts against the server's quota when it arrives there, and it leaves this process
some time after the pacer let it go: a loaded machine can hold a task for tens of milliseconds
between the pacer's "go" and the socket write. The pacer hands each send a note (:func:`expect`,
in the sending task's context) and the HTTP client's trace hooks (:func:`trace_config`) write the
time the request's bytes went out into it, so the guard never lets an (R+1)-th request out within
the quota's window of the time the first of them really left.

The client's hooks run just *before* their bytes are handed to the socket (aiohttp 3.10+ even
holds the headers back to send them with the body), and a loaded host can deschedule the process
between the hook and the write: a stamp taken there can be milliseconds early, which lets the
R-th next send out too soon (measured: a request that arrived 8 ms after its stamp, and a 429).
So each hook also stamps the note again from the event loop after the current step — once the
write the hook announced has been made — and the later time counts: never early, at worst a
loop turn late, which only makes the pacer more careful.
"""

from __future__ import annotations

import asyncio
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Awaitable, Callable

if TYPE_CHECKING:
    import aiohttp


class Departure:
    """One send: when the pacer let it go, then when its bytes were written; ``slot``: the grid
    slot it was given (None without one); ``recheck``: what to await once the request has its
    connection, just before its bytes go out (the pacer's last look at how late it is); ``judge``:
    what to call each time more of its bytes have left (the headers, then the body: a server may
    count the request when its last bytes arrive), so that the pacer accounts for a late departure;
    ``charged``: what the pacer has accounted for it so far."""

    __slots__ = ("at", "released", "slot", "recheck", "judge", "charged")

    def __init__(self, at: float, slot: float | None = None,
                 recheck: Callable[[Departure], Awaitable[None]] | None = None,
                 judge: Callable[[Departure], None] | None = None) -> None:
        self.at = self.released = at
        self.slot = slot
        self.recheck = recheck
        self.judge = judge
        self.charged = 0.0

    def left(self, at: float) -> None:
        if at > self.at:
            self.at = at
        if self.judge is not None:
            self.judge(self)


_CURRENT: ContextVar[Departure | None] = ContextVar("capbatch_departure", default=None)


def expect(at: float, slot: float | None = None,
           recheck: Callable[[Departure], Awaitable[None]] | None = None,
           judge: Callable[[Departure], None] | None = None) -> Departure:
    """A note for the request this task is about to send (released by the pacer at ``at``)."""
    note = Departure(at, slot, recheck, judge)
    _CURRENT.set(note)
    return note


async def _written(session: Any, context: Any, params: Any) -> None:
    note = _CURRENT.get()
    if note is not None:
        note.left(time.time())
        # Two loop turns: the body may go out in a task the request starts after this hook.
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, _stamp, note)


def _stamp(note: Departure) -> None:
    note.left(time.time())


async def _connected(session: Any, context: Any, params: Any) -> None:
    note = _CURRENT.get()
    if note is not None and note.recheck is not None:
        recheck, note.recheck = note.recheck, None
        await recheck(note)


def trace_config() -> aiohttp.TraceConfig:
    """Hooks for an ``aiohttp.ClientSession``: the pacer's last look once the request has its
    connection; stamp the current task's note when its request's headers and body are written."""
    import aiohttp      # here: importing the pacer (the CLI does) must not load the HTTP client

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(_connected)
    trace.on_connection_reuseconn.append(_connected)
    trace.on_request_headers_sent.append(_written)
    trace.on_request_chunk_sent.append(_written)
    return trace
