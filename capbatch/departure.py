"""When a paced request actually left: the pacer's guard counts sends at their departure.

A request counts against the server's quota when it arrives there, and it leaves this process
some time after the pacer let it go: a loaded machine can hold a task for tens of milliseconds
between the pacer's "go" and the socket write. The pacer hands each send a note (:func:`expect`,
in the sending task's context) and the HTTP client's trace hooks (:func:`trace_config`) write the
time the request's bytes went out into it, so the guard never lets an (R+1)-th request out within
the quota's window of the time the first of them really left.

The client's trace hooks run just *before* their bytes are handed to the socket (aiohttp 3.10+
even holds the headers back to send them with the body), and a loaded host can deschedule the
process between the hook and the write: a stamp taken there can be milliseconds early, which lets
the R-th next send out too soon (measured on a loaded 2-core host: 2.6 % of requests arrived over
1 ms after their hook's stamp, up to 17 ms; one such gave a 429). So the connections the client
opens (:func:`connector`) stamp the note right after each write returns: never early. A stamp
taken a loop turn later instead would be safe too, but milliseconds late on a busy loop, and a
late stamp costs pace (the guard waits for it, and a shared grid moves for it).
"""

from __future__ import annotations

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


def _stamping(write: Callable[[Any], None]) -> Callable[[Any], None]:
    def stamped(data: Any) -> None:
        write(data)
        note = _CURRENT.get()
        if note is not None:
            note.left(time.time())
    return stamped


def connector(**options: Any) -> aiohttp.TCPConnector:
    """An ``aiohttp.TCPConnector`` whose connections stamp the sending task's note as each write to
    the transport returns (the bytes are in the kernel's hands: on loopback, arrived). aiohttp has no
    public hook there; where its private connection factory differs, the trace hooks' stamps
    (taken just before the write) are what remains."""
    import aiohttp

    class StampingConnector(aiohttp.TCPConnector):
        async def _wrap_create_connection(self, *args: Any, **kwargs: Any) -> Any:
            made = await super()._wrap_create_connection(*args, **kwargs)   # type: ignore[misc]
            transport = made[0] if isinstance(made, tuple) else None
            if transport is not None:
                try:
                    transport.write = _stamping(transport.write)
                    transport.writelines = _stamping(transport.writelines)
                except AttributeError:
                    pass
            return made

    return StampingConnector(**options)


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
