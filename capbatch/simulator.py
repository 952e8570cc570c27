"""A faithful, fast local stand-in for the Capillary card API.

Serves the demo (``capbatch demo`` / ``capbatch simulate``), the test suite and benchmarks.
It implements the parts of the API capbatch talks to (see ``capillary-api.md``):

* ``POST /v3/oauth/token/generate``  - OAuth token for ``{"key", "secret"}``
* ``PUT  /v2/card``                   - set a card's external ID
* ``GET  /v2/card?number=<card>``     - read a card
* ``GET  /v2/cardNumber``             - generate a fresh unique external ID

plus fault injection (latency, 500/503/429, dropped and hung connections, outage switch),
an exact sliding-window (or fixed calendar-window) rate limiter, and admin routes that are
neither authenticated, rate limited nor counted.

The rate limiter counts each request at the time it *arrived* — the kernel's receive timestamp of
its bytes (``SO_TIMESTAMP``, plain HTTP on Linux), as a gateway in front of the real API stamps it —
not when this server's event loop got round to it: on a loaded machine that is tens of
milliseconds later, and varies, which would make a client that keeps the quota exactly look like
it broke it.

By default it behaves as the public documentation describes. Modes make it behave the ways the
documentation leaves open or the real service might (``capillary-api.md``, "What the documentation
leaves open"), so capbatch's checks can be tested: business errors as HTTP 500 (``errors_status``)
or only as the generic code 500 (``business_errors="generic"``); CDN HTML pages for 5xx and 403
(``fault_body="html"``, ``down="502"|"403"``); PUTs answered 200 without being applied
(``p_noop``, ``noop_echo``); answers naming another ID or card (``p_echo_other``); a PUT that
identifies the card by its external ID (``put_identifies_by``); warnings in answers
(``warning_code``); mandatory fields such as statusLabel (``required_fields``).

Admin routes:

* ``GET  /_sim/stats``   - :meth:`Simulator.stats`
* ``POST /_sim/config``  - JSON object of :class:`SimConfig` field changes
* ``GET  /_sim/cards``   - card number -> current external id

This module deliberately imports nothing else from capbatch.
Run it standalone with ``python -m capbatch.simulator --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import bisect
import csv
import dataclasses
import hashlib
import itertools
import json
import random
import re
import secrets
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

# Kernel receive timestamps (Linux: SO_TIMESTAMP = SCM_TIMESTAMP = 29, a struct timeval).
_SO_TIMESTAMP = getattr(socket, "SO_TIMESTAMP", 29 if sys.platform.startswith("linux") else None)
_TIMEVAL = struct.Struct("@ll")


class _ArrivalSocket:
    """The server side of one connection, read with ``recvmsg`` so that each read also yields the
    kernel's arrival time of the bytes (``arrived``, epoch seconds). Everything else is the socket's."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.arrived: float | None = None

    def _stamp(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMP and len(data) >= _TIMEVAL.size:
                sec, usec = _TIMEVAL.unpack_from(data)
                self.arrived = sec + usec / 1e6

    def recv(self, size: int, flags: int = 0) -> bytes:
        data, ancdata, _, _ = self._sock.recvmsg(size, socket.CMSG_SPACE(_TIMEVAL.size), flags)
        self._stamp(ancdata)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer)
        n, ancdata, _, _ = self._sock.recvmsg_into([view[:nbytes] if nbytes else view],
                                                   socket.CMSG_SPACE(_TIMEVAL.size), flags)
        self._stamp(ancdata)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _stamp_arrivals(transport: Any) -> None:
    """Make a plain TCP connection's transport read through :class:`_ArrivalSocket` (where the
    platform has kernel timestamps; TLS connections keep the time the handler runs)."""
    sock = getattr(transport, "_sock", None)
    if _SO_TIMESTAMP is None or not isinstance(sock, socket.socket) or sock.type != socket.SOCK_STREAM:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMP, 1)
    except OSError:
        return
    transport._sock = _ArrivalSocket(sock)


def _arrival(request: web.Request, now: float) -> float:
    """When ``request`` arrived, on the monotonic clock ``now`` was read from (``now`` if unknown)."""
    sock = getattr(request.transport, "_sock", None)
    arrived = getattr(sock, "arrived", None)
    if arrived is None:
        return now
    # The kernel's stamp is wall-clock time: convert it with two readings taken together (a process
    # descheduled between a monotonic and a wall reading would put the request milliseconds early).
    for _ in range(10):
        before = time.monotonic()
        wall = time.time()
        after = time.monotonic()
        if after - before < 0.0001:
            break
    at = arrived - wall + (before + after) / 2
    return at if 0 <= now - at < 5.0 else now


__all__ = ["SimConfig", "Simulator", "SimulatorThread", "serve", "load_cards_csv", "main"]

MAX_LEN = 50  # external IDs: at most 50 characters
MAX_CARD_LEN = 150  # card numbers: at most 150 characters (3024)

ROUTE_PUT_CARD = "PUT /v2/card"
ROUTE_GET_CARD = "GET /v2/card"
ROUTE_GEN_NUMBER = "GET /v2/cardNumber"
ROUTE_OAUTH = "POST /v3/oauth/token/generate"
ROUTES = (ROUTE_PUT_CARD, ROUTE_GET_CARD, ROUTE_GEN_NUMBER, ROUTE_OAUTH)

_DOWN_MODES = (None, "503", "502", "403", "drop", "hang")
_JSON_CT = "application/json"


@dataclass
class SimConfig:
    """Everything that shapes the simulator's behaviour. Change it at runtime with
    :meth:`Simulator.update` (or ``POST /_sim/config``)."""

    username: str = "demo"
    password: str = "demo"  # Basic auth: base64(username:md5hex(password))
    client_key: str = "demo-key"
    client_secret: str = "demo-secret"  # OAuth
    token_ttl: float = 300.0  # seconds an OAuth token lives
    cards: dict[str, str | None] = field(default_factory=dict)  # card number -> external id
    auto_create: bool = False  # any card number exists (created on first touch, no external id)
    rate_per_minute: int | None = None  # at most R accepted API requests in any 60 s window
    rate_per_second: int | None = None  # at most R accepted API requests in any 1 s window
    rate_window: str = "sliding"  # "sliding" (any 60 s / 1 s) or "fixed" (calendar windows)
    retry_after: float | None = None  # when set, 429 answers carry Retry-After: <seconds>
    latency: float = 0.0  # seconds added before answering (accepted requests)
    jitter: float = 0.0  # uniform +- jitter around latency
    p_500: float = 0.0
    p_503: float = 0.0
    p_drop: float = 0.0  # close the connection without answering
    p_hang: float = 0.0  # sleep hang_seconds, then close the connection without answering
    p_429: float = 0.0  # spurious 429, independent of the rate limit
    hang_seconds: float = 30.0
    errors_status: int = 400  # HTTP status of business-error answers (200/201 mimic "2xx + errors")
    reapply_same: str = "ok"  # re-PUT of the ID the card already holds: "ok" or "3045"
    external_id_length: int | None = None  # org's CONF_CARD_NUMBER_LENGTH; other lengths -> 3050
    external_id_length_rule: str = "exact"  # "exact" or "min" (3050's text: "equal or greater")
    down: str | None = None  # outage switch: None, "503", "502", "403", "drop", "hang"
    seed: int | None = None  # RNG seed for fault injection and jitter
    # modes for what the documentation leaves open (all off by default)
    business_errors: str = "coded"  # "coded": errors[0].code is the card code; "generic": code 500 only
    fault_body: str = "json"  # "html": 5xx faults and down=502/503/403 answer a CDN's HTML page
    p_noop: float = 0.0  # share of PUTs answered 200 without being applied
    noop_echo: str = "request"  # what a no-op answer names: "request" (the ID sent), "stored", "omit"
    p_echo_other: float = 0.0  # share of applied PUTs whose answer names another ID / card
    echo_other: str = "cardExternalId"  # which field names something else: "cardExternalId" or "cardNumber"
    put_identifies_by: str = "cardNumber"  # "cardExternalId": the PUT finds the card by its external ID
    warning_code: int | None = None  # when set, PUT answers carry this warning...
    warning_message: str = "No update in status label"
    p_warning: float = 1.0  # ...on this share of them
    required_fields: list[str] = field(default_factory=list)  # PUT without them: 403 "Mandatory field is missing"

    def validate(self) -> None:
        """Raise ValueError when a field holds a value the simulator cannot act on."""
        if self.rate_window not in ("sliding", "fixed"):
            raise ValueError(f"rate_window must be 'sliding' or 'fixed', not {self.rate_window!r}")
        if self.reapply_same not in ("ok", "3045"):
            raise ValueError(f"reapply_same must be 'ok' or '3045', not {self.reapply_same!r}")
        if self.down not in _DOWN_MODES:
            raise ValueError(f"down must be one of None, '503', '502', '403', 'drop', 'hang', not {self.down!r}")
        for name, allowed in (("business_errors", ("coded", "generic")), ("fault_body", ("json", "html")),
                              ("noop_echo", ("request", "stored", "omit")),
                              ("echo_other", ("cardExternalId", "cardNumber")),
                              ("put_identifies_by", ("cardNumber", "cardExternalId")),
                              ("external_id_length_rule", ("exact", "min"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if not isinstance(self.required_fields, list) or not all(isinstance(f, str) for f in self.required_fields):
            raise ValueError("required_fields must be a list of field names")
        if self.warning_code is not None and (isinstance(self.warning_code, bool)
                                              or not isinstance(self.warning_code, int)):
            raise ValueError(f"warning_code must be an integer or None, not {self.warning_code!r}")
        for name in ("p_500", "p_503", "p_drop", "p_hang", "p_429", "p_noop", "p_echo_other", "p_warning"):
            p = getattr(self, name)
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {p!r}")
        for name in ("rate_per_minute", "rate_per_second", "external_id_length"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, not {v!r}")
        for name in ("latency", "jitter", "hang_seconds", "token_ttl"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.retry_after is not None and float(self.retry_after) < 0:
            raise ValueError("retry_after must not be negative")
        if not isinstance(self.errors_status, int) or not 100 <= self.errors_status <= 599:
            raise ValueError(f"errors_status must be an HTTP status, not {self.errors_status!r}")
        if not isinstance(self.cards, dict):
            raise ValueError("cards must be a dict of card number -> external id (or None)")


_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(SimConfig))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error_body(code: int, message: str) -> bytes:
    return _dumps({"warnings": [], "errors": [{"status": False, "code": code, "message": message}]})


_BODY_401 = _dumps({"errors": [{"status": False, "code": 401, "message": "Unauthorized"}]})
_BODY_498 = _dumps({"errors": [{"status": False, "code": 498, "message": "Token expired"}]})
_BODY_429 = _dumps({"errors": [{"status": False, "code": 429, "message": "Too many requests"}]})
_BODY_500 = _error_body(500, "All requests have failed due to errors")
_BODY_503 = _dumps({"errors": [{"status": False, "code": 503, "message": "Service unavailable"}]})
_BODY_OAUTH_BAD = _dumps(
    {"data": None, "errors": [{"code": 320001, "message": "Invalid client key and secret"}]}
)
_BODY_403 = _dumps({"errors": [{"status": False, "code": 403, "message": "Forbidden"}]})
_BODY_502 = _dumps({"errors": [{"status": False, "code": 502, "message": "Bad gateway"}]})
_BODY_MANDATORY = _error_body(403, "Mandatory field is missing")
_HTML_CT = "text/html"
# What a CDN in front of the API answers (the documented samples carry Cloudflare's _cfuvid cookie).
_HTML_PAGES = {
    500: "500 Internal Server Error",
    502: "502 Bad Gateway",
    503: "503 Service Temporarily Unavailable",
    403: "Attention Required! | Cloudflare",
}


def _html_page(status: int) -> web.Response:
    title = _HTML_PAGES.get(status, f"{status} Error")
    body = (f"<!DOCTYPE html>\n<html><head><title>{title}</title></head><body><center><h1>{title}</h1>"
            "</center><hr><center>cloudflare</center></body></html>\n")
    return web.Response(text=body, status=status, content_type=_HTML_CT)


def _json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None
                   ) -> web.Response:
    return web.Response(body=body, status=status, content_type=_JSON_CT, headers=headers)


class _Card:
    __slots__ = ("number", "ext", "card_id", "customer_id")

    def __init__(self, number: str, ext: str | None, card_id: int) -> None:
        self.number = number
        self.ext = ext
        self.card_id = card_id
        self.customer_id = 100000 + card_id


class Simulator:
    """The Capillary card API in one aiohttp application. Single event loop, no locks:
    every state change happens synchronously inside one handler step."""

    def __init__(self, config: SimConfig) -> None:
        config = dataclasses.replace(config, cards=dict(config.cards))
        config.validate()
        self.config = config
        self._rng = random.Random(config.seed)
        self._cards: dict[str, _Card] = {}
        self._owner: dict[str, str] = {}  # external id -> card number holding it
        self._card_seq = itertools.count(1)
        self._gen_seq = itertools.count(1)
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self._seed_cards(config.cards)
        self._derive()
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None  # created in start(), on the serving loop
        self.url: str | None = None
        self.reset_stats()

        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/v3/oauth/token/generate", self._wrap(ROUTE_OAUTH, self._h_oauth))
        app.router.add_put("/v2/card", self._wrap(ROUTE_PUT_CARD, self._h_put_card))
        app.router.add_get(
            "/v2/card", self._wrap(ROUTE_GET_CARD, self._h_get_card), allow_head=False
        )
        app.router.add_get(
            "/v2/cardNumber", self._wrap(ROUTE_GEN_NUMBER, self._h_gen_number), allow_head=False
        )
        app.router.add_get("/_sim/stats", self._admin_stats, allow_head=False)
        app.router.add_get("/_sim/cards", self._admin_cards, allow_head=False)
        app.router.add_post("/_sim/config", self._admin_config)
        self.app = app

    # ------------------------------------------------------------------ state & config
    def _seed_cards(self, cards: dict[str, str | None]) -> None:
        for number, ext in cards.items():
            number = str(number)
            ext = None if ext is None or str(ext) == "" else str(ext)
            card = self._cards.get(number)
            if card is None:
                card = self._cards[number] = _Card(number, None, next(self._card_seq))
            if card.ext is not None and self._owner.get(card.ext) == number:
                del self._owner[card.ext]
            if ext is not None:
                holder = self._owner.get(ext)
                if holder is not None and holder != number:
                    raise ValueError(
                        f"seed cards {holder!r} and {number!r} both hold external id {ext!r}"
                    )
                self._owner[ext] = number
            card.ext = ext

    def _derive(self) -> None:
        """Precompute per-request constants from the config."""
        c = self.config
        pw_hash = hashlib.md5(c.password.encode()).hexdigest()
        self._basic_user = c.username
        self._basic_hash = pw_hash
        self._basic_expected = "Basic " + base64.b64encode(
            f"{c.username}:{pw_hash}".encode()
        ).decode()
        self._faulty = bool(c.p_drop or c.p_hang or c.p_500 or c.p_503 or c.p_429)
        self._limited = bool(c.rate_per_second or c.rate_per_minute)
        self._fixed = c.rate_window == "fixed"
        self._delayed = bool(c.latency or c.jitter)
        if c.retry_after is None:
            self._h429: dict[str, str] | None = None
        else:
            ra = float(c.retry_after)
            self._h429 = {"Retry-After": str(int(ra)) if ra == int(ra) else f"{ra:g}"}

    def update(self, **changes: Any) -> None:
        """Change configuration at runtime (faults, outage switch, rate limits, ...).

        ``cards`` merges into the current card map (adds cards, overwrites their external ids);
        ``seed`` re-seeds the fault RNG. Raises ValueError (nothing applied) on unknown fields
        or invalid values. Call it on the simulator's event loop thread (or use
        :class:`SimulatorThread` / ``POST /_sim/config`` from elsewhere)."""
        unknown = set(changes) - _CONFIG_FIELDS
        if unknown:
            raise ValueError(f"unknown SimConfig field(s): {', '.join(sorted(unknown))}")
        cards = changes.pop("cards", None)
        new = dataclasses.replace(self.config, **changes)
        new.validate()
        if cards is not None:
            if not isinstance(cards, dict):
                raise ValueError("cards must be a dict of card number -> external id (or None)")
            self._seed_cards(cards)
            new.cards = self.card_ids()
        self.config = new
        if "seed" in changes:
            self._rng.seed(new.seed)
        if {"rate_per_minute", "rate_per_second", "rate_window"} & changes.keys():
            self._fixed_sec = self._fixed_min = -1
            self._fixed_sec_n = self._fixed_min_n = 0
        self._derive()

    def card_ids(self) -> dict[str, str | None]:
        """Card number -> current external id (None when the card has none)."""
        return {n: c.ext for n, c in self._cards.items()}

    def reset_stats(self) -> None:
        """Zero every counter (the card state and the rate limiter's memory are kept)."""
        self._requests = 0
        self._by_status: dict[int | str, int] = {}
        self._by_route: dict[str, int] = dict.fromkeys(ROUTES, 0)
        self._puts_per_card: dict[str, int] = {}
        self._applied_per_card: dict[str, int] = {}
        self._put_extra_fields: dict[str, dict[str, int]] = {}
        self._noops = 0
        self._warnings_sent = 0
        self._tokens_issued = 0
        self._auth_failures = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._accepted = 0
        self._rejected_429 = 0
        # accepted timestamps (monotonic) inside the last 1 s / 60 s: serve both the exact
        # sliding-window limiter and the peak counters.
        if not hasattr(self, "_win1"):
            self._win1: deque[float] = deque()
            self._win60: deque[float] = deque()
            self._fixed_sec = self._fixed_min = -1
            self._fixed_sec_n = self._fixed_min_n = 0
        self._peak_1 = 0
        self._first_accepted: float | None = None     # arrival (monotonic) of the first accepted request
        self._wall_offset = time.time() - time.monotonic()   # one offset: the stats read the same twice
        self._peak_60 = 0

    def stats(self) -> dict[str, Any]:
        """JSON-able counters. Keys are stable: tests and benchmarks assert on them."""
        return {
            "requests": self._requests,
            "by_status": {str(k): v for k, v in self._by_status.items()},
            "by_route": dict(self._by_route),
            "puts_per_card": dict(self._puts_per_card),
            "applied_per_card": dict(self._applied_per_card),
            "put_extra_fields": {k: dict(v) for k, v in self._put_extra_fields.items()},
            "noops": self._noops,
            "warnings_sent": self._warnings_sent,
            "tokens_issued": self._tokens_issued,
            "auth_failures": self._auth_failures,
            "accepted": self._accepted,
            "rate_limited": self._rejected_429,
            "peak_per_minute": self._peak_60,
            "peak_per_second": self._peak_1,
            # when accepted requests arrived, wall clock: the first one, and those of the last second
            # (a benchmark counts exactly what arrived within a span from these)
            "first_accepted_at": None if self._first_accepted is None else self._first_accepted + self._wall_offset,
            "last_second_arrivals": [t + self._wall_offset for t in self._win1],
            "max_in_flight": self._max_in_flight,
            "in_flight": self._in_flight,
            "cards": len(self._cards),
        }

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str = "127.0.0.1", port: int = 0, ssl_context: Any = None) -> str:
        """Listen on host:port (0 = any free port), over TLS when given an ssl_context; return the base URL."""
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        self._closing = asyncio.Event()
        runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        manager = runner.server
        made = manager.connection_made

        def connection_made(handler: Any, transport: Any) -> None:
            _stamp_arrivals(transport)      # the rate limiter counts requests when they arrived
            made(handler, transport)

        manager.connection_made = connection_made  # type: ignore[method-assign]
        site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=ssl_context)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server
        assert server is not None and server.sockets  # type: ignore[union-attr]
        real_port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url_host = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if ssl_context else 'http'}://{url_host}:{real_port}"
        return self.url

    async def stop(self) -> None:
        """Stop listening, release hung requests (they get dropped) and close connections."""
        if self._closing is not None:
            self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # ------------------------------------------------------------------ request pipeline
    def _auth(self, headers: Any) -> bytes | None:
        """None when authorised, else the 401 body to answer with."""
        token = headers.get("X-CAP-API-OAUTH-TOKEN") or headers.get("CAP-API-ACCESS-TOKEN")
        expired = False
        if token:
            exp = self._tokens.get(token)
            if exp is not None:
                if time.monotonic() < exp:
                    return None
                expired = True
        basic = headers.get("Authorization")
        if basic:
            if basic == self._basic_expected:
                return None
            scheme, _, cred = basic.partition(" ")
            if scheme.lower() == "basic":
                try:
                    user, sep, pw = base64.b64decode(cred.strip(), validate=True).decode(
                    ).partition(":")
                except (binascii.Error, UnicodeDecodeError, ValueError):
                    sep = ""
                if sep and user == self._basic_user and pw.lower() == self._basic_hash:
                    return None
        return _BODY_498 if expired else _BODY_401

    async def _drop(self, request: web.Request, status_key: str) -> web.Response:
        """Close the connection without an answer. The returned response is never sent:
        aiohttp fails to write it to the closed transport and moves on quietly."""
        self._by_status[status_key] = self._by_status.get(status_key, 0) + 1
        transport = request.transport
        if transport is not None:
            transport.close()
        return web.Response(status=599)

    async def _hang(self, request: web.Request) -> web.Response:
        closing = self._closing
        try:
            if closing is not None:
                await asyncio.wait_for(closing.wait(), self.config.hang_seconds)
            else:  # not started through start(): plain sleep
                await asyncio.sleep(self.config.hang_seconds)
        except asyncio.TimeoutError:
            pass
        return await self._drop(request, "hang")

    def _wrap(
        self, route: str, handler: Callable[[web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        is_oauth = route == ROUTE_OAUTH

        async def endpoint(request: web.Request) -> web.Response:
            self._requests += 1
            self._by_route[route] += 1
            self._in_flight += 1
            if self._in_flight > self._max_in_flight:
                self._max_in_flight = self._in_flight
            try:
                resp = await self._pipeline(request, handler, is_oauth)
                if resp is not None:
                    st = resp.status
                    self._by_status[st] = self._by_status.get(st, 0) + 1
                    return resp
                return web.Response(status=599)  # dropped: never sent
            finally:
                self._in_flight -= 1

        return endpoint

    async def _pipeline(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.Response]],
        is_oauth: bool,
    ) -> web.Response | None:
        cfg = self.config
        if not is_oauth:
            body = self._auth(request.headers)
            if body is not None:
                self._auth_failures += 1
                return _json_response(body, 401)
        # outage switch (applies to the OAuth route too: an outage is an outage)
        down = cfg.down
        if down is not None:
            if down in ("503", "502", "403"):
                return self._fault(int(down))
            if down == "drop":
                await self._drop(request, "drop")
            else:
                await self._hang(request)
            return None
        if is_oauth:  # no random faults and no rate limit on token generation
            return await handler(request)
        if self._faulty:
            rnd = self._rng.random
            if cfg.p_drop and rnd() < cfg.p_drop:
                await self._drop(request, "drop")
                return None
            if cfg.p_hang and rnd() < cfg.p_hang:
                await self._hang(request)
                return None
            if cfg.p_500 and rnd() < cfg.p_500:
                return self._fault(500)
            if cfg.p_503 and rnd() < cfg.p_503:
                return self._fault(503)
            if cfg.p_429 and rnd() < cfg.p_429:
                return _json_response(_BODY_429, 429, self._h429)
        if not self._admit(_arrival(request, time.monotonic())):
            self._rejected_429 += 1
            return _json_response(_BODY_429, 429, self._h429)
        if self._delayed:
            # The whole request is received before the server "works" on it, as a real server does:
            # a client that dies while waiting for the answer does not undo a PUT that arrived.
            await request.read()
            delay = cfg.latency
            if cfg.jitter:
                delay += self._rng.uniform(-cfg.jitter, cfg.jitter)
            if delay > 0:
                await asyncio.sleep(delay)
        return await handler(request)

    def _admit(self, arrived: float) -> bool:
        """Rate limiter + peak accounting of a request that arrived at ``arrived`` (monotonic).
        True = accepted (and recorded)."""
        w1 = self._win1
        w60 = self._win60
        # Judged as a gateway would on its arrival: by what arrived in the window before it (a request
        # handled after one that arrived later goes in its place, not at the end).
        now = arrived
        cut = now - 1.0
        while w1 and w1[0] <= cut:
            w1.popleft()
        cut = now - 60.0
        while w60 and w60[0] <= cut:
            w60.popleft()
        in1 = bisect.bisect_right(w1, now)
        in60 = bisect.bisect_right(w60, now)
        if self._limited:
            cfg = self.config
            rps = cfg.rate_per_second
            rpm = cfg.rate_per_minute
            if self._fixed:
                wall = time.time() - (time.monotonic() - now)
                sec = int(wall)
                if sec != self._fixed_sec:
                    self._fixed_sec, self._fixed_sec_n = sec, 0
                minute = int(wall // 60)
                if minute != self._fixed_min:
                    self._fixed_min, self._fixed_min_n = minute, 0
                if (rps and self._fixed_sec_n >= rps) or (rpm and self._fixed_min_n >= rpm):
                    return False
                self._fixed_sec_n += 1
                self._fixed_min_n += 1
            elif (rps and in1 >= rps) or (rpm and in60 >= rpm):
                return False
        w1.insert(in1, now)
        w60.insert(in60, now)
        self._accepted += 1
        if self._first_accepted is None:
            self._first_accepted = now
        if in1 + 1 > self._peak_1:
            self._peak_1 = in1 + 1
        if in60 + 1 > self._peak_60:
            self._peak_60 = in60 + 1
        return True

    def _fault(self, status: int) -> web.Response:
        """A fault or outage answer: the API's JSON, or a CDN's HTML page (fault_body="html")."""
        if self.config.fault_body == "html":
            return _html_page(status)
        body = {500: _BODY_500, 502: _BODY_502, 503: _BODY_503, 403: _BODY_403}[status]
        return _json_response(body, status)

    # ------------------------------------------------------------------ API handlers
    def _business_error(self, code: int, message: str, put: bool = False) -> web.Response:
        if put and self.config.business_errors == "generic":   # the PUT's only documented failure body
            return _json_response(_BODY_500, self.config.errors_status)
        return _json_response(_error_body(code, message), self.config.errors_status)

    def _put_error(self, code: int, message: str) -> web.Response:
        return self._business_error(code, message, put=True)

    def _lookup(self, number: str) -> _Card | None:
        card = self._cards.get(number)
        if card is None and self.config.auto_create and 0 < len(number) <= MAX_CARD_LEN:
            card = self._cards[number] = _Card(number, None, next(self._card_seq))
        return card

    async def _h_oauth(self, request: web.Request) -> web.Response:
        try:
            data = json.loads(await request.read())
        except ValueError:
            data = None
        cfg = self.config
        if (
            not isinstance(data, dict)
            or data.get("key") != cfg.client_key
            or data.get("secret") != cfg.client_secret
        ):
            return _json_response(_BODY_OAUTH_BAD, 401)
        token = secrets.token_urlsafe(24)
        self._tokens[token] = time.monotonic() + cfg.token_ttl
        self._tokens_issued += 1
        if len(self._tokens) > 10000:  # forget long-expired tokens now and then
            horizon = time.monotonic() - 3600
            self._tokens = {t: e for t, e in self._tokens.items() if e > horizon}
        ttl = cfg.token_ttl
        return _json_response(
            _dumps(
                {"data": {"accessToken": token, "ttlSeconds": int(ttl) if ttl == int(ttl) else ttl},
                 "errors": None}
            )
        )

    async def _h_put_card(self, request: web.Request) -> web.Response:
        try:
            data = json.loads(await request.read())
        except ValueError:
            return _json_response(_error_body(400, "Invalid JSON in request body"), 400)
        if not isinstance(data, dict):
            return _json_response(_error_body(400, "Request body must be a JSON object"), 400)
        number = data.get("cardNumber")
        ext = data.get("cardExternalId")
        if not isinstance(number, str) or not number:
            return _json_response(_error_body(400, "cardNumber is required"), 400)
        if not isinstance(ext, str) or not ext:
            return _json_response(_error_body(400, "cardExternalId is required"), 400)
        self._puts_per_card[number] = self._puts_per_card.get(number, 0) + 1
        cfg = self.config
        if len(data) > 2:
            self._note_extra_fields(data)
        missing = [f for f in cfg.required_fields if data.get(f) in (None, "")]
        if missing:
            return _json_response(_BODY_MANDATORY, 403)
        if len(number) > MAX_CARD_LEN:
            return self._put_error(3024, "total card length should be <= 150")
        if cfg.put_identifies_by == "cardExternalId":
            # The older docs' reading: the external ID identifies the card to update.
            holder = self._owner.get(ext)
            if holder is None:
                return self._put_error(3010, "Card number does not exist")
            card = self._cards[holder]
            return self._card_answer(card, card.number, ext)
        card = self._lookup(number)
        if card is None:
            return self._put_error(3010, "Card number does not exist")
        if len(ext) > MAX_LEN:
            return self._put_error(3051, "Unable to update/generate card external id")
        want = cfg.external_id_length
        if want is not None and (len(ext) < want if cfg.external_id_length_rule == "min" else len(ext) != want):
            return self._put_error(
                3050,
                f"Card external id length {len(ext)} should be equal or greater than "
                f"card id length {want}",
            )
        holder = self._owner.get(ext)
        if holder is not None and holder != number:
            return self._put_error(3045, "Card external id exists")
        if cfg.p_noop and self._rng.random() < cfg.p_noop:
            # Answered as a success, not applied.
            self._noops += 1
            echo = {"request": ext, "stored": card.ext, "omit": None}[cfg.noop_echo]
            return self._card_answer(card, number, echo, omit_ext=cfg.noop_echo == "omit")
        if card.ext == ext:
            if cfg.reapply_same == "3045":
                return self._put_error(3045, "Card external id exists")
        else:
            if card.ext is not None:
                self._owner.pop(card.ext, None)
            card.ext = ext
            self._owner[ext] = number
            self._applied_per_card[number] = self._applied_per_card.get(number, 0) + 1
        if cfg.p_echo_other and self._rng.random() < cfg.p_echo_other:
            if cfg.echo_other == "cardNumber":
                return self._card_answer(card, number + "0", ext)
            return self._card_answer(card, number, ext + "-X")
        return self._card_answer(card, number, ext)

    def _card_answer(self, card: _Card, number: str, ext: str | None, omit_ext: bool = False) -> web.Response:
        cfg = self.config
        warnings: list[dict[str, Any]] = []
        if cfg.warning_code is not None and (cfg.p_warning >= 1.0 or self._rng.random() < cfg.p_warning):
            warnings.append({"status": True, "code": cfg.warning_code, "message": cfg.warning_message})
            self._warnings_sent += 1
        body: dict[str, Any] = {
            "cardId": card.card_id,
            "customerId": card.customer_id,
            "cardExternalId": ext,
            "cardNumber": number,
            "orgId": 0,
            "entityId": card.customer_id,
            "transactionNotAllowed": False,
            "activeAndDigital": True,
            "warnings": warnings,
        }
        if omit_ext:
            del body["cardExternalId"]
        return _json_response(_dumps(body))

    def _note_extra_fields(self, data: dict[str, Any]) -> None:
        for name, value in data.items():
            if name in ("cardNumber", "cardExternalId"):
                continue
            seen = self._put_extra_fields.setdefault(name, {})
            key = json.dumps(value, sort_keys=True)
            seen[key] = seen.get(key, 0) + 1

    async def _h_get_card(self, request: web.Request) -> web.Response:
        query = request.query
        number = query.get("number")
        if number:
            card = self._lookup(number)
        else:
            ext = query.get("externalId")
            if not ext:
                return _json_response(_error_body(400, "number is required"), 400)
            holder = self._owner.get(ext)
            card = self._cards.get(holder) if holder is not None else None
        if card is None:
            return self._business_error(3010, "Card number does not exist")
        record: dict[str, Any] = {
            "cardNumber": card.number,
            "cardId": card.card_id,
            "customerId": card.customer_id,
            "seriesId": 1,
            "statusInfo": {"status": "ACTIVE"},
            "warnings": [],
        }
        if card.ext is not None:  # the documentation's samples omit it when the card has none
            record["cardExternalId"] = card.ext
        return _json_response(_dumps(record))

    async def _h_gen_number(self, request: web.Request) -> web.Response:
        width = self.config.external_id_length
        width = width - 3 if width is not None and width >= 4 else 12
        while True:
            candidate = "GEN" + str(next(self._gen_seq)).zfill(width)
            if len(candidate) > MAX_LEN:  # pragma: no cover - needs 10**47 calls
                raise web.HTTPInternalServerError(text="generator exhausted")
            if candidate not in self._owner:
                break
        return _json_response(_dumps({"entity": candidate, "warnings": []}))

    # ------------------------------------------------------------------ admin routes
    async def _admin_stats(self, request: web.Request) -> web.Response:
        return _json_response(_dumps(self.stats()))

    async def _admin_cards(self, request: web.Request) -> web.Response:
        return _json_response(_dumps(self.card_ids()))

    async def _admin_config(self, request: web.Request) -> web.Response:
        try:
            changes = json.loads(await request.read() or b"{}")
            if not isinstance(changes, dict):
                raise ValueError("body must be a JSON object of SimConfig field changes")
            reset = changes.pop("reset_stats", False)
            self.update(**changes)
            if reset:
                self.reset_stats()
        except (ValueError, TypeError) as exc:
            return _json_response(_dumps({"ok": False, "error": str(exc)}), 400)
        cfg = dataclasses.asdict(self.config)
        cfg.pop("cards", None)
        return _json_response(_dumps({"ok": True, "config": cfg}))


class SimulatorThread:
    """A :class:`Simulator` on its own event loop in a daemon thread (tests, ``capbatch demo``).

    ``with SimulatorThread(SimConfig(cards=...)) as sim: run_client(sim.url)``."""

    def __init__(self, config: SimConfig, host: str = "127.0.0.1", port: int = 0,
                 ssl_context: Any = None) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.url: str = ""
        self.sim = Simulator(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "SimulatorThread":
        if self._thread is not None:
            raise RuntimeError("simulator thread already started")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self.url = loop.run_until_complete(self.sim.start(self.host, self.port, self.ssl_context))
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                try:
                    loop.run_until_complete(self.sim.stop())
                    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                    for task in pending:
                        task.cancel()
                    if pending:
                        loop.run_until_complete(
                            asyncio.gather(*pending, return_exceptions=True)
                        )
                    loop.run_until_complete(loop.shutdown_asyncgens())
                finally:
                    asyncio.set_event_loop(None)

        self._loop = loop
        self._thread = threading.Thread(target=run, name="capbatch-simulator", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            self._loop = None
            loop.close()
            raise failure[0]
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        self._thread = self._loop = None
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=15)
        if not loop.is_running():
            loop.close()

    def __enter__(self) -> "SimulatorThread":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _call(self, fn: Callable[[], Any]) -> Any:
        loop = self._loop
        if loop is None:
            raise RuntimeError("simulator thread is not running")
        if threading.current_thread() is self._thread:
            return fn()

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=10)

    def stats(self) -> dict[str, Any]:
        return self._call(self.sim.stats)

    def card_ids(self) -> dict[str, str | None]:
        return self._call(self.sim.card_ids)

    def update(self, **changes: Any) -> None:
        self._call(lambda: self.sim.update(**changes))

    def reset_stats(self) -> None:
        self._call(self.sim.reset_stats)


def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Run the simulator until Ctrl-C / SIGTERM. Prints the URL and demo credentials once
    listening (first line: ``Capillary simulator listening on <url>``)."""

    async def run() -> None:
        sim = Simulator(config)
        url = await sim.start(host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGTERM, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover - Windows
            pass
        c = sim.config
        print(f"Capillary simulator listening on {url}", flush=True)
        print(
            f"  basic auth: username={c.username} password={c.password}\n"
            f"  oauth:      key={c.client_key} secret={c.client_secret} (ttl {c.token_ttl:g}s)\n"
            f"  cards: {len(c.cards)} seeded{' (+ auto-create)' if c.auto_create else ''}\n"
            f"  admin: {url}/_sim/stats  {url}/_sim/cards  POST {url}/_sim/config\n"
            f"  Ctrl-C to stop",
            flush=True,
        )
        try:
            await stop.wait()
        finally:
            await sim.stop()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


_CARD_COLUMNS = ("cardnumber", "cardno", "cardnum", "card", "number", "cardid")
_EXT_COLUMNS = (
    "currentexternalid", "cardexternalid", "externalid", "currentcardexternalid",
    "existingexternalid", "extid", "external",
)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def load_cards_csv(path: str | Path) -> dict[str, str | None]:
    """Seed helper: a CSV with a header row. The card number column is one named like
    ``cardNumber``/``card_number``/``card`` (else the first column); the optional current
    external id column one named like ``cardExternalId``/``external_id`` (else none).
    Empty external ids mean "no external id"; rows without a card number are skipped."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        sample = fh.read(64 * 1024)
        fh.seek(0)
        try:
            dialect: Any = csv.Sniffer().sniff(sample, delimiters=",;\t|")
        except csv.Error:
            dialect = csv.excel
        reader = csv.reader(fh, dialect)
        header = next(reader, None)
        if header is None:
            return {}
        names = [_norm(h) for h in header]
        card_col = next((names.index(c) for c in _CARD_COLUMNS if c in names), 0)
        ext_col = next(
            (names.index(c) for c in _EXT_COLUMNS if c in names and names.index(c) != card_col),
            None,
        )
        if ext_col is None:
            ext_col = next(
                (i for i, n in enumerate(names) if "external" in n and i != card_col), None
            )
        cards: dict[str, str | None] = {}
        for row in reader:
            if card_col >= len(row):
                continue
            number = row[card_col].strip()
            if not number:
                continue
            ext = row[ext_col].strip() if ext_col is not None and ext_col < len(row) else ""
            cards[number] = ext or None
        return cards


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m capbatch.simulator",
        description="Local stand-in for the Capillary card API (PUT/GET /v2/card, "
        "GET /v2/cardNumber, OAuth) with rate limits and fault injection.",
    )
    d = SimConfig()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port (default 8080)")
    p.add_argument("--username", default=d.username)
    p.add_argument("--password", default=d.password)
    p.add_argument("--client-key", default=d.client_key)
    p.add_argument("--client-secret", default=d.client_secret)
    p.add_argument("--token-ttl", type=float, default=d.token_ttl)
    p.add_argument("--cards", metavar="FILE.csv", help="seed cards from a CSV")
    p.add_argument("--auto-create", action="store_true", help="every card number exists")
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--jitter", type=float, default=0.0)
    p.add_argument("--rate-per-minute", type=int)
    p.add_argument("--rate-per-second", type=int)
    p.add_argument("--rate-window", choices=("sliding", "fixed"), default="sliding")
    p.add_argument("--retry-after", type=float)
    for name in ("500", "503", "drop", "hang", "429"):
        p.add_argument(f"--p-{name}", type=float, default=0.0, metavar="P")
    p.add_argument("--hang-seconds", type=float, default=d.hang_seconds)
    p.add_argument("--errors-status", type=int, default=d.errors_status)
    p.add_argument("--reapply-same", choices=("ok", "3045"), default="ok")
    p.add_argument("--external-id-length", type=int)
    p.add_argument("--external-id-length-rule", choices=("exact", "min"), default="exact")
    p.add_argument("--down", choices=("503", "502", "403", "drop", "hang"))
    p.add_argument("--seed", type=int)
    add_mode_arguments(p)
    return p


def add_mode_arguments(p: argparse.ArgumentParser) -> None:
    """The modes for what the documentation leaves open (shared with ``capbatch simulate``'s help)."""
    d = SimConfig()
    p.add_argument("--business-errors", choices=("coded", "generic"), default=d.business_errors,
                   help="generic: every business error is only code 500 'All requests have failed'")
    p.add_argument("--fault-body", choices=("json", "html"), default=d.fault_body,
                   help="html: 5xx faults and --down 502/503/403 answer a CDN's HTML page")
    p.add_argument("--p-noop", type=float, default=0.0, metavar="P", help="PUTs answered 200 but not applied")
    p.add_argument("--noop-echo", choices=("request", "stored", "omit"), default=d.noop_echo)
    p.add_argument("--p-echo-other", type=float, default=0.0, metavar="P",
                   help="applied PUTs whose answer names another ID (or card, --echo-other cardNumber)")
    p.add_argument("--echo-other", choices=("cardExternalId", "cardNumber"), default=d.echo_other)
    p.add_argument("--put-identifies-by", choices=("cardNumber", "cardExternalId"), default=d.put_identifies_by)
    p.add_argument("--warning-code", type=int, help="PUT answers carry this warning code (e.g. 3039)")
    p.add_argument("--warning-message", default=d.warning_message)
    p.add_argument("--required-field", action="append", default=[], dest="required_fields", metavar="NAME",
                   help="PUTs without this field get 403 'Mandatory field is missing' (repeatable)")


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    cards = load_cards_csv(args.cards) if args.cards else {}
    try:
        config = SimConfig(
            username=args.username, password=args.password,
            client_key=args.client_key, client_secret=args.client_secret,
            token_ttl=args.token_ttl, cards=cards, auto_create=args.auto_create,
            rate_per_minute=args.rate_per_minute, rate_per_second=args.rate_per_second,
            rate_window=args.rate_window, retry_after=args.retry_after,
            latency=args.latency, jitter=args.jitter,
            p_500=args.p_500, p_503=args.p_503, p_drop=args.p_drop, p_hang=args.p_hang,
            p_429=args.p_429, hang_seconds=args.hang_seconds,
            errors_status=args.errors_status, reapply_same=args.reapply_same,
            external_id_length=args.external_id_length, down=args.down, seed=args.seed,
            external_id_length_rule=args.external_id_length_rule,
            business_errors=args.business_errors, fault_body=args.fault_body, p_noop=args.p_noop,
            noop_echo=args.noop_echo, p_echo_other=args.p_echo_other, echo_other=args.echo_other,
            put_identifies_by=args.put_identifies_by, warning_code=args.warning_code,
            warning_message=args.warning_message, required_fields=args.required_fields,
        )
        config.validate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serve(config, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
