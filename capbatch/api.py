"""Talking to Capillary: the aiohttp session, authentication, the three card calls, response → Outcome.

One call gives one :class:`Outcome`. Retrying, pacing and bookkeeping belong to the engine.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import json
from json.encoder import encode_basestring_ascii as _json_string
import re
import socket
import ssl
import time
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Mapping

import aiohttp

from .config import Credentials
from . import departure
from .errors import ConfigError

USER_AGENT = "capbatch/0.1"
OAUTH_HEADER = "X-CAP-API-OAUTH-TOKEN"

# Card error codes that are about the row itself: retrying cannot help, whatever the HTTP status.
PERMANENT_CODES = frozenset({3010, 3024, 3029, 3035, 3042, 3044, 3045, 3046, 3050, 3051,
                             701, 702, 703, 704, 705})
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504, 521, 522, 524})
TOKEN_EXPIRED_CODE = 498
CARD_NOT_FOUND = 3010
EXTERNAL_ID_EXISTS = 3045
GENERIC_FAILURE_CODE = 500   # the only documented failure body: HTTP 500, code 500 "All requests have failed"
# Statuses the public documentation lists for the card API; anything else is an answer of a kind
# capbatch has no documented meaning for (the canary stops on it).
DOCUMENTED_STATUS = frozenset({200, 201, 400, 401, 403, 404, 405, 415, 429, 500, 521})

# error_code values capbatch gives outcomes of its own (not the API's codes)
NOT_APPLIED = "not_applied"        # the answer said success, the card read back does not hold the ID
UNCONFIRMED = "unconfirmed"        # the row's outcome could not be established by reading the card
CONTRADICTS = "contradicts"        # a 2xx naming another external ID or another card
NO_ECHO = "no_echo"                # a 2xx that does not name the external ID it set
UNREACHABLE_CODES = frozenset({"refused", "dns", "connect_timeout"})
_TRANSIENT_OWN_CODES = frozenset({"timeout", "connection", "oauth", UNCONFIRMED}) | UNREACHABLE_CODES


class Kind(str, Enum):
    SUCCESS = "success"
    RETRY = "retry"        # transient: try again later
    REJECTED = "rejected"  # permanent for this row
    FATAL = "fatal"        # stop the run: credentials, permissions, wrong host
    UNCONFIRMED = "unconfirmed"  # a 2xx that contradicts (or does not confirm) the request: read the card


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    http_status: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    retry_after: float | None = None
    throttled: bool = False
    card_id: str | None = None
    customer_id: str | None = None
    external_id: str | None = None     # GET: the card's current external ID; generate: the new ID
    latency_ms: float = 0.0
    auth_problem: bool = False         # 401/498: a fresh token may help
    card_number: str | None = None     # the card the answer names (PUT echo, GET record)
    warnings: tuple[tuple[str, str], ...] = ()   # (code, message) of the answer's ``warnings``
    raw: bytes = b""                   # the answer's body, as received (shown by the canary)
    content_type: str = ""
    bare_500: bool = False             # HTTP 500 without a card error code: may hide a row failure

    @property
    def ok(self) -> bool:
        return self.kind is Kind.SUCCESS


def is_permanent_code(code: str | None) -> bool:
    """Whether a failed row's error code is about the row itself (not a transient condition)."""
    if not code or code in _TRANSIENT_OWN_CODES:
        return False
    if code.isdigit():
        number = int(code)
        return not (number == 429 or 500 <= number < 600)
    return True


def is_known_code(code: str | None) -> bool:
    """Card error codes the documentation describes (and capbatch's own outcome codes)."""
    if code is None:
        return False
    if code.isdigit():
        return int(code) in PERMANENT_CODES
    return code in (NOT_APPLIED, UNCONFIRMED, CONTRADICTS, NO_ECHO)


def contradiction(outcome: Outcome, card: str, external_id: str) -> tuple[str, str] | None:
    """(code, description) when a 2xx PUT answer does not confirm the request, else None."""
    if outcome.card_number is not None and outcome.card_number != card:
        return CONTRADICTS, (f"the answer names card {outcome.card_number!r}, not the card sent ({card!r})")
    if outcome.external_id is None:
        return NO_ECHO, "the answer does not name the cardExternalId it set"
    if outcome.external_id != external_id:
        return CONTRADICTS, (f"the answer names cardExternalId {outcome.external_id!r}, "
                             f"not the one sent ({external_id!r})")
    return None


class TokenSource:
    """OAuth token shared by all workers: fetched once, refreshed before expiry or on demand, one refresh at a time."""

    REFRESH_MARGIN = 0.2  # refresh when 80 % of the lifetime has passed

    def __init__(self, base_url: str, key: str, secret: str) -> None:
        self._url = base_url + "/v3/oauth/token/generate"
        self._key = key
        self._secret = secret
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()
        self.generation = 0

    async def token(self, session: aiohttp.ClientSession) -> tuple[str, int]:
        if self._token is None or time.monotonic() >= self._refresh_at:
            await self.refresh(session, self.generation)
        assert self._token is not None
        return self._token, self.generation

    async def refresh(self, session: aiohttp.ClientSession, seen_generation: int) -> None:
        """Fetch a new token unless another worker already replaced the one ``seen_generation`` names."""
        async with self._lock:
            if self.generation != seen_generation and self._token and time.monotonic() < self._refresh_at:
                return
            body = json.dumps({"key": self._key, "secret": self._secret})
            try:
                async with session.post(self._url, data=body, allow_redirects=False,
                                        headers={"Content-Type": "application/json"}) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise TokenError(f"could not reach the OAuth endpoint: {exc.__class__.__name__}", transient=True) from exc
            data = _loads(raw) or {}
            token = ((data.get("data") or {}) if isinstance(data, dict) else {}).get("accessToken")
            if status >= 500 or status == 429:
                raise TokenError(f"the OAuth endpoint answered HTTP {status}", transient=True)
            if not token:
                errors = data.get("errors") if isinstance(data, dict) else None
                detail = _first_error(errors)[1] or f"HTTP {status}"
                raise TokenError(f"OAuth token request refused: {detail}", transient=False)
            try:
                ttl = float((data.get("data") or {}).get("ttlSeconds") or 300)
            except (TypeError, ValueError):
                ttl = 300.0
            self._token = token
            self._refresh_at = time.monotonic() + ttl * (1 - self.REFRESH_MARGIN)
            self.generation += 1


class TokenError(Exception):
    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def basic_header(username: str, password: str) -> str:
    digest = hashlib.md5(password.encode("utf-8")).hexdigest()
    return "Basic " + base64.b64encode(f"{username}:{digest}".encode("utf-8")).decode("ascii")


class CapillaryClient:
    """Async client for the card API. Use as ``async with CapillaryClient(...) as client``."""

    def __init__(self, base_url: str, credentials: Credentials, *, timeout: float = 30.0,
                 verify_tls: bool = True, max_connections: int = 64,
                 extra_fields: Mapping[str, Any] | None = None, paced: bool = True) -> None:
        if credentials.kind == "none":
            raise ConfigError(
                "no Capillary credentials in the environment",
                "export CAPILLARY_USERNAME and CAPILLARY_PASSWORD (Basic) or "
                "CAPILLARY_CLIENT_KEY and CAPILLARY_CLIENT_SECRET (OAuth)",
            )
        self.base_url = base_url.rstrip("/")
        self._credentials = credentials
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 10.0))
        self._verify_tls = verify_tls
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._basic = (basic_header(credentials.username or "", credentials.password or "")
                       if credentials.kind == "basic" else None)
        self._tokens = (TokenSource(self.base_url, credentials.client_key or "", credentials.client_secret or "")
                        if credentials.kind == "oauth" else None)
        self._put_url = self.base_url + "/v2/card?format=json"
        self._get_url = self.base_url + "/v2/card"
        self._gen_url = self.base_url + "/v2/cardNumber"
        # Constant fields every PUT carries (--extra-field); the row's own two fields always win.
        self._extra = dict(extra_fields or {})
        self._extra.pop("cardNumber", None)
        self._extra.pop("cardExternalId", None)
        self.requests_sent = 0
        # The departure stamps (trace hooks, stamping connections) serve the pacer's guard; an unpaced
        # run (--rate unlimited) skips their cost on every request.
        self._paced = paced

    async def __aenter__(self) -> "CapillaryClient":
        ssl_arg: Any = None if self._verify_tls else False
        options: dict[str, Any] = {"limit": self._max_connections, "ssl": ssl_arg, "ttl_dns_cache": 300}
        connector = departure.connector(**options) if self._paced else aiohttp.TCPConnector(**options)
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json", "Content-Type": "application/json"}
        if self._basic is not None:
            headers["Authorization"] = self._basic   # set once: aiohttp merges per-call headers each time
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, headers=headers, json_serialize=json.dumps,
            trace_configs=[departure.trace_config()] if self._paced else None,   # when each paced request left (capbatch.departure)
        )
        # aiohttp silently sends an idempotent request (PUT, GET) a second time when a reused
        # keep-alive connection turns out closed: unpaced and uncounted. capbatch's own retry (paced,
        # counted, in the ledger) handles the dropped connection instead. No public switch exists yet.
        if hasattr(self._session, "_retry_connection"):
            self._session._retry_connection = False
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- the calls ----------------------------------------------------------------------------
    def put_body(self, card: str, external_id: str) -> bytes:
        """The exact body ``put_card`` sends for this pair."""
        if not self._extra:
            # json.dumps of the two-field dict, byte for byte, without building the dict and encoder
            return (f'{{"cardNumber": {_json_string(card)}, '
                    f'"cardExternalId": {_json_string(external_id)}}}').encode()
        return json.dumps({**self._extra, "cardNumber": card, "cardExternalId": external_id}).encode()

    async def put_card(self, card: str, external_id: str) -> Outcome:
        """Set the card's external ID. A 2xx whose body names another ID or card (or no ID) comes back
        as ``Kind.UNCONFIRMED``: the answer alone does not prove the card holds the ID."""
        outcome = await self._call("PUT", self._put_url, None, self.put_body(card, external_id))
        if outcome.kind is Kind.SUCCESS:
            problem = contradiction(outcome, card, external_id)
            if problem is not None:
                return replace(outcome, kind=Kind.UNCONFIRMED, error_code=problem[0], error_message=problem[1])
        return outcome

    async def get_card(self, card: str) -> Outcome:
        return await self._call("GET", self._get_url, {"number": card}, None)

    async def generate_external_id(self) -> Outcome:
        return await self._call("GET", self._gen_url, None, None)

    # ---- plumbing -----------------------------------------------------------------------------
    async def _headers(self) -> tuple[dict[str, str] | None, int]:
        if self._basic is not None:
            return None, 0
        assert self._tokens is not None and self._session is not None
        token, generation = await self._tokens.token(self._session)
        return {OAUTH_HEADER: token}, generation

    async def _call(self, method: str, url: str, params: dict[str, str] | None, body: bytes | None) -> Outcome:
        outcome, generation = await self._once(method, url, params, body)
        if outcome.auth_problem and self._tokens is not None:
            # One shared refresh (skipped if another worker already replaced the token this request
            # used), then one more try; a 401 that survives a fresh token is fatal.
            try:
                assert self._session is not None
                await self._tokens.refresh(self._session, generation)
            except TokenError as exc:
                return _token_outcome(exc)
            outcome, _ = await self._once(method, url, params, body)
        if outcome.auth_problem:
            return Outcome(Kind.FATAL, outcome.http_status, outcome.error_code,
                           "the API refused the credentials (HTTP 401): check CAPILLARY_* credentials "
                           "and that the till/key may use the v2 card API", latency_ms=outcome.latency_ms)
        return outcome

    async def _once(self, method: str, url: str, params: dict[str, str] | None,
                    body: bytes | None) -> tuple[Outcome, int]:
        """One request; also returns the token generation it was sent with."""
        assert self._session is not None, "use CapillaryClient as an async context manager"
        try:
            headers, generation = await self._headers()
        except TokenError as exc:
            return _token_outcome(exc), 0
        return await self._send(method, url, params, body, headers), generation

    async def _send(self, method: str, url: str, params: dict[str, str] | None, body: bytes | None,
                    headers: dict[str, str] | None) -> Outcome:
        assert self._session is not None
        started = time.perf_counter()
        self.requests_sent += 1
        try:
            # No redirects: a redirected request would carry the OAuth token header to another host.
            async with self._session.request(method, url, params=params, data=body, headers=headers,
                                             allow_redirects=False) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                content_type = resp.headers.get("Content-Type", "")
        except aiohttp.ClientConnectorDNSError as exc:
            return Outcome(Kind.RETRY, None, "dns", f"the host name {_host(url)} does not resolve "
                           f"({_os_reason(exc)})", latency_ms=_ms(started))
        except aiohttp.ConnectionTimeoutError:
            return Outcome(Kind.RETRY, None, "connect_timeout", f"no connection to {_host(url)} could be "
                           "opened within the connect timeout", latency_ms=_ms(started))
        except asyncio.TimeoutError:
            return Outcome(Kind.RETRY, None, "timeout", "no answer within the timeout",
                           latency_ms=_ms(started))
        except aiohttp.ClientConnectorCertificateError as exc:
            return Outcome(Kind.FATAL, None, "tls", f"TLS certificate verification failed for {self.base_url}: "
                           f"{exc.certificate_error}. Fix the host name or the CA bundle; "
                           "--no-verify-tls only for a trusted test host", latency_ms=_ms(started))
        except aiohttp.ClientSSLError as exc:
            return Outcome(Kind.FATAL, None, "tls", f"TLS handshake with {self.base_url} failed: {exc}",
                           latency_ms=_ms(started))
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ConnectionRefusedError):
                return Outcome(Kind.RETRY, None, "refused", f"connection refused by {_host(url)}: nothing "
                               "accepts connections there", latency_ms=_ms(started))
            if isinstance(exc.os_error, socket.gaierror):
                return Outcome(Kind.RETRY, None, "dns", f"the host name {_host(url)} does not resolve "
                               f"({_os_reason(exc)})", latency_ms=_ms(started))
            return Outcome(Kind.RETRY, None, "connection", f"{exc.__class__.__name__}: {exc}".strip(": "),
                           latency_ms=_ms(started))
        except (aiohttp.ClientError, ssl.SSLError, OSError) as exc:
            return Outcome(Kind.RETRY, None, "connection", f"{exc.__class__.__name__}: {exc}".strip(": "),
                           latency_ms=_ms(started))
        return classify(status, raw, retry_after, _ms(started), content_type)


def classify(status: int, raw: bytes, retry_after: float | None, latency_ms: float,
             content_type: str = "") -> Outcome:
    """Turn one HTTP answer into an Outcome. A 2xx is not proof of success: the ``errors`` array decides.

    A specific card error code decides under any HTTP status (the API reports row failures as HTTP 500
    too); a body that is not JSON was written by something in front of the API (a CDN, a proxy)."""
    data = _loads(raw)
    if data is None and raw and not 300 <= status < 400:
        return _not_json(status, raw, retry_after, latency_ms, content_type)
    errors = data.get("errors") if isinstance(data, dict) else None
    code, message = _first_error(errors)
    warnings = _warnings(data.get("warnings")) if isinstance(data, dict) else ()
    if 300 <= status < 400:
        return Outcome(Kind.FATAL, status, str(status),
                       f"the API answered a redirect (HTTP {status}): point --base-url at the final host "
                       "(redirects are not followed, so credentials never travel to another host)",
                       latency_ms=latency_ms)
    if status in (401, TOKEN_EXPIRED_CODE) or code == TOKEN_EXPIRED_CODE:
        return Outcome(Kind.FATAL, status, _s(code or status), message or "unauthorized",
                       latency_ms=latency_ms, auth_problem=True)
    if code is not None and code in PERMANENT_CODES:
        # A card error code is about the row, whatever the status (HTTP 500 included): not retried.
        return Outcome(Kind.REJECTED, status, str(code), message, latency_ms=latency_ms, warnings=warnings,
                       raw=raw, content_type=content_type)
    if status == 429:
        return Outcome(Kind.RETRY, status, "429", message or "too many requests", retry_after=retry_after,
                       throttled=True, latency_ms=latency_ms)
    if code is not None and code >= 600 and status != 403:
        # Any other specific (non-HTTP) code is that code's outcome too; retrying would repeat it.
        return Outcome(Kind.REJECTED, status, str(code), message, latency_ms=latency_ms, warnings=warnings,
                       raw=raw, content_type=content_type)
    if status in TRANSIENT_STATUS:
        return Outcome(Kind.RETRY, status, _s(code or status), message or f"HTTP {status}",
                       retry_after=retry_after, latency_ms=latency_ms, warnings=warnings, raw=raw,
                       content_type=content_type,
                       bare_500=status == 500 and code in (None, GENERIC_FAILURE_CODE))
    if status == 403:
        if message and "mandatory" in message.lower():
            why = (f"the API answered 403 Forbidden ({message}): this org requires more fields in the "
                   "card update than cardNumber and cardExternalId (older docs name statusLabel and "
                   "seriesId). Add them with --extra-field NAME=VALUE, e.g. --extra-field statusLabel=Active")
        else:
            why = (f"the API answered 403 Forbidden ({message or 'no detail'}): the till or key lacks "
                   "access to the v2 card API, or a mandatory field is missing (then add it with "
                   "--extra-field NAME=VALUE); fix the org/till setup")
        return Outcome(Kind.FATAL, status, _s(code or 403), why, latency_ms=latency_ms, raw=raw,
                       content_type=content_type)
    if status in (404, 405, 415) and code is None:
        return Outcome(Kind.FATAL, status, str(status),
                       f"the API answered HTTP {status} for the card endpoint: --base-url/--cluster probably "
                       "points at the wrong host or path", latency_ms=latency_ms)
    if 200 <= status < 300:
        if data is None:
            return Outcome(Kind.FATAL, status, "not_json",
                           "the server answered 2xx with a body that is not JSON: --base-url probably points "
                           "at something other than the Capillary API", latency_ms=latency_ms)
        if errors:
            return Outcome(Kind.REJECTED, status, _s(code), message or "the API reported an error",
                           latency_ms=latency_ms)
        entity = data.get("entity", data) if isinstance(data, dict) else data
        if isinstance(entity, list):
            entity = entity[0] if entity else {}
        if isinstance(entity, str):
            return Outcome(Kind.SUCCESS, status, external_id=entity, latency_ms=latency_ms, warnings=warnings,
                           raw=raw, content_type=content_type)
        if not isinstance(entity, dict):
            entity = {}
        ext = entity.get("cardExternalId")
        number = entity.get("cardNumber")
        if not warnings and entity is not data:
            warnings = _warnings(entity.get("warnings"))
        return Outcome(Kind.SUCCESS, status, card_id=_s(entity.get("cardId")),
                       customer_id=_s(entity.get("customerId")),
                       external_id=None if ext is None else str(ext), latency_ms=latency_ms,
                       card_number=None if number is None else str(number), warnings=warnings, raw=raw,
                       content_type=content_type)
    if 400 <= status < 500:
        return Outcome(Kind.REJECTED, status, _s(code or status), message or f"HTTP {status}",
                       latency_ms=latency_ms, warnings=warnings, raw=raw, content_type=content_type)
    return Outcome(Kind.RETRY, status, _s(code or status), message or f"HTTP {status}", latency_ms=latency_ms,
                   warnings=warnings, raw=raw, content_type=content_type)


_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def describe_page(status: int, raw: bytes, content_type: str) -> str:
    """'HTTP 403, text/html, page title "Attention Required! | Cloudflare"' for a non-JSON answer."""
    parts = [f"HTTP {status}", content_type.split(";")[0].strip() or "no content type"]
    m = _TITLE.search(raw[:65536])
    if m:
        title = " ".join(html.unescape(m.group(1).decode("utf-8", "replace")).split())
        if title:
            parts.append(f"page title {title[:120]!r}")
    else:
        text = " ".join(raw[:80].decode("utf-8", "replace").split())
        if text:
            parts.append(f"body starts {text!r}")
    return ", ".join(parts)


def _not_json(status: int, raw: bytes, retry_after: float | None, latency_ms: float,
              content_type: str) -> Outcome:
    """An answer whose body is not JSON: written by a CDN, proxy or web server, not the card API."""
    page = describe_page(status, raw, content_type)
    if status == 429:
        return Outcome(Kind.RETRY, status, "429", f"too many requests ({page})", retry_after=retry_after,
                       throttled=True, latency_ms=latency_ms, raw=raw, content_type=content_type)
    if status >= 500:
        return Outcome(Kind.RETRY, status, str(status), f"not the card API answering ({page})",
                       retry_after=retry_after, latency_ms=latency_ms, raw=raw, content_type=content_type)
    if status in (401, 403, 404, 405, 415) or 200 <= status < 300:
        fix = ("a CDN, firewall or proxy in front of the API refused the request (blocked IP or missing "
               "allow-listing?), or --base-url/--cluster points at another web server"
               if status in (401, 403) else "--base-url/--cluster probably points at another web server")
        code = "not_capillary" if status in (401, 403) else "not_json" if status < 300 else str(status)
        return Outcome(Kind.FATAL, status, code,
                       f"something other than the Capillary API answered ({page}): {fix}",
                       latency_ms=latency_ms, raw=raw, content_type=content_type)
    return Outcome(Kind.REJECTED, status, str(status), f"not the card API answering ({page})",
                   latency_ms=latency_ms, raw=raw, content_type=content_type)


def _warnings(value: Any) -> tuple[tuple[str, str], ...]:
    """The answer's ``warnings`` as (code, message) pairs; strings and odd shapes kept as messages."""
    if not value or not isinstance(value, list):
        return ()
    out = []
    for w in value:
        if isinstance(w, dict):
            code = w.get("code")
            text = w.get("message")
            out.append(("" if code is None else str(code), "" if text is None else str(text)))
        elif w is not None:
            out.append(("", str(w)))
    return tuple(out)


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.netloc or url


def _os_reason(exc: aiohttp.ClientConnectorError) -> str:
    os_error = exc.os_error
    return getattr(os_error, "strerror", None) or str(os_error) or exc.__class__.__name__


def _token_outcome(exc: TokenError) -> Outcome:
    if exc.transient:
        return Outcome(Kind.RETRY, None, "oauth", str(exc))
    return Outcome(Kind.FATAL, None, "oauth",
                   f"{exc}: check CAPILLARY_CLIENT_KEY and CAPILLARY_CLIENT_SECRET")


def _loads(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw.decode())     # the API answers UTF-8 (the fast path)
    except ValueError:
        pass
    try:    # a BOM, UTF-16/32: json's own encoding detection
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _first_error(errors: Any) -> tuple[int | None, str | None]:
    if not errors or not isinstance(errors, list):
        return None, None
    first = errors[0] if isinstance(errors[0], dict) else {}
    raw_code = first.get("code")
    try:
        code = int(raw_code) if raw_code is not None else None
    except (TypeError, ValueError):
        code = None
    message = first.get("message")
    return code, None if message is None else str(message)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _s(value: Any) -> str | None:
    return None if value is None else str(value)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
