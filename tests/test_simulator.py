"""The Capillary simulator, exercised over real HTTP on 127.0.0.1 with a real aiohttp client."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[1]
try:
    from capbatch.simulator import SimConfig, Simulator, SimulatorThread, load_cards_csv
except ModuleNotFoundError:  # package not installed: run from the source tree
    sys.path.insert(0, str(ROOT))
    from capbatch.simulator import SimConfig, Simulator, SimulatorThread, load_cards_csv


def basic(username: str = "demo", password: str = "demo") -> dict[str, str]:
    raw = f"{username}:{hashlib.md5(password.encode()).hexdigest()}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


AUTH = basic()


@pytest.fixture
async def start():
    """start(SimConfig) -> (Simulator, url, ClientSession); everything closed at teardown."""
    sims: list[Simulator] = []
    sessions: list[aiohttp.ClientSession] = []

    async def _start(cfg: SimConfig, **session_kw):
        sim = Simulator(cfg)
        url = await sim.start()
        sims.append(sim)
        session = aiohttp.ClientSession(base_url=url, **session_kw)
        sessions.append(session)
        return sim, url, session

    yield _start
    for session in sessions:
        await session.close()
    for sim in sims:
        await sim.stop()


async def put(session, card, ext, headers=AUTH):
    async with session.put(
        "/v2/card", params={"format": "json"}, json={"cardNumber": card, "cardExternalId": ext},
        headers=headers,
    ) as resp:
        return resp.status, await resp.json(), resp.headers


async def get(session, card, headers=AUTH):
    async with session.get("/v2/card", params={"number": card}, headers=headers) as resp:
        return resp.status, await resp.json()


def codes(body) -> list[int]:
    return [e["code"] for e in body.get("errors") or []]


# ---------------------------------------------------------------- authentication
async def test_basic_auth_ok_and_bad(start):
    sim, _, s = await start(SimConfig(cards={"C1": None}, username="till", password="pw"))
    assert (await get(s, "C1", basic("till", "pw")))[0] == 200
    bad_headers = (basic("till", "wrong"), basic("other", "pw"), {},
                   {"Authorization": "Basic %%%"}, {"Authorization": "Bearer x"})
    for headers in bad_headers:
        status, body = await get(s, "C1", headers)
        assert status == 401
        assert body == {"errors": [{"status": False, "code": 401, "message": "Unauthorized"}]}
    # username:MD5 hex in upper case is accepted too (decoded comparison)
    raw = b"till:" + hashlib.md5(b"pw").hexdigest().upper().encode()
    upper = {"Authorization": "basic " + base64.b64encode(raw).decode()}
    assert (await get(s, "C1", upper))[0] == 200
    st = sim.stats()
    assert st["auth_failures"] == 5 and st["by_status"]["401"] == 5 and st["by_status"]["200"] == 2
    assert st["accepted"] == 2  # auth failures do not consume the rate limit


async def test_oauth_issue_use_and_expiry(start):
    sim, _, s = await start(SimConfig(cards={"C1": None}, token_ttl=0.5))
    async with s.post("/v3/oauth/token/generate", json={"key": "demo-key", "secret": "nope"}) as r:
        assert r.status == 401
        assert await r.json() == {
            "data": None, "errors": [{"code": 320001, "message": "Invalid client key and secret"}]}
    async with s.post("/v3/oauth/token/generate",
                      json={"key": "demo-key", "secret": "demo-secret"}) as r:
        assert r.status == 200
        body = await r.json()
    assert body["errors"] is None and body["data"]["ttlSeconds"] == 0.5
    token = body["data"]["accessToken"]
    assert (await put(s, "C1", "E1", {"X-CAP-API-OAUTH-TOKEN": token}))[0] == 200
    assert (await get(s, "C1", {"CAP-API-ACCESS-TOKEN": token}))[0] == 200
    status, body = await get(s, "C1", {"X-CAP-API-OAUTH-TOKEN": "forged"})
    assert status == 401 and codes(body) == [401]
    await asyncio.sleep(0.55)
    status, body = await get(s, "C1", {"X-CAP-API-OAUTH-TOKEN": token})
    assert status == 401 and codes(body) == [498]
    assert body["errors"][0]["message"] == "Token expired"
    st = sim.stats()
    assert st["tokens_issued"] == 1 and st["auth_failures"] == 2
    assert st["by_route"]["POST /v3/oauth/token/generate"] == 2


# ---------------------------------------------------------------- PUT / GET semantics
async def test_put_success_get_reflects_and_old_id_released(start):
    sim, _, s = await start(SimConfig(cards={"C1": "OLD1", "C2": None}))
    status, body, _ = await put(s, "C1", "NEW1")
    assert status == 200
    assert body["cardNumber"] == "C1" and body["cardExternalId"] == "NEW1"
    assert body["orgId"] == 0 and body["warnings"] == [] and body["activeAndDigital"] is True
    assert body["transactionNotAllowed"] is False
    assert isinstance(body["cardId"], int) and isinstance(body["customerId"], int)
    assert isinstance(body["entityId"], int)
    status, card = await get(s, "C1")
    assert status == 200 and card["cardExternalId"] == "NEW1" and card["seriesId"] == 1
    assert card["statusInfo"] == {"status": "ACTIVE"} and card["cardId"] == body["cardId"]
    assert "cardExternalId" not in (await get(s, "C2"))[1]   # omitted when the card has none, as documented
    # C1's previous ID was released: C2 may take it now
    assert (await put(s, "C2", "OLD1"))[0] == 200
    assert sim.card_ids() == {"C1": "NEW1", "C2": "OLD1"}
    async with s.get("/v2/card", params={"externalId": "OLD1"}, headers=AUTH) as r:
        assert (await r.json())["cardNumber"] == "C2"


async def test_unknown_card_3010_and_auto_create(start):
    _, _, s = await start(SimConfig(cards={"C1": None}))
    status, body, _ = await put(s, "NOPE", "E1")
    assert status == 400
    assert body == {"warnings": [], "errors": [
        {"status": False, "code": 3010, "message": "Card number does not exist"}]}
    status, body = await get(s, "NOPE")
    assert status == 400 and codes(body) == [3010]

    sim2, _, s2 = await start(SimConfig(auto_create=True))
    assert "cardExternalId" not in (await get(s2, "ANY"))[1]
    assert (await put(s2, "ANY2", "E1"))[0] == 200
    assert sim2.card_ids() == {"ANY": None, "ANY2": "E1"}


async def test_3045_when_another_card_holds_the_id(start):
    sim, _, s = await start(SimConfig(cards={"C1": "E1", "C2": None}))
    status, body, _ = await put(s, "C2", "E1")
    assert status == 400 and codes(body) == [3045]
    assert body["errors"][0]["message"] == "Card external id exists"
    assert sim.card_ids() == {"C1": "E1", "C2": None}


@pytest.mark.parametrize("mode", ["ok", "3045"])
async def test_reapply_same_id(start, mode):
    sim, _, s = await start(SimConfig(cards={"C1": "E1"}, reapply_same=mode))
    status, body, _ = await put(s, "C1", "E1")
    if mode == "ok":
        assert status == 200 and body["cardExternalId"] == "E1"
    else:
        assert status == 400 and codes(body) == [3045]
    st = sim.stats()
    assert st["puts_per_card"] == {"C1": 1} and st["applied_per_card"] == {}


async def test_errors_status_201_means_2xx_with_errors(start):
    _, _, s = await start(SimConfig(cards={"C1": "E1", "C2": None}, errors_status=201))
    status, body, _ = await put(s, "C2", "E1")
    assert status == 201 and codes(body) == [3045]
    status, body, _ = await put(s, "C2", "E2")
    assert status == 200 and "errors" not in body


async def test_length_rules_and_malformed_requests(start):
    _, _, s = await start(SimConfig(cards={"C1": None}, external_id_length=8))
    status, body, _ = await put(s, "C1", "123")
    assert status == 400 and codes(body) == [3050]
    assert body["errors"][0]["message"] == (
        "Card external id length 3 should be equal or greater than card id length 8")
    assert (await put(s, "C1", "X" * 51))[1]["errors"][0]["code"] == 3051
    assert codes((await put(s, "C" * 151, "12345678"))[1]) == [3024]   # card numbers: up to 150
    assert (await put(s, "C1", "12345678"))[0] == 200
    for raw in (b"{not json", b"[]", b'{"cardNumber": "C1"}', b'{"cardExternalId": "E"}'):
        async with s.put("/v2/card", data=raw, headers=AUTH) as r:
            assert r.status == 400 and codes(await r.json()) == [400]


# ---------------------------------------------------------------- rate limiting
async def test_sliding_rate_limit_is_exact(start):
    sim, _, s = await start(SimConfig(cards={"C1": None}, rate_per_second=5))
    statuses = [(await get(s, "C1"))[0] for _ in range(7)]
    assert statuses == [200] * 5 + [429] * 2
    status, body = await get(s, "C1")
    assert status == 429
    assert body == {"errors": [{"status": False, "code": 429, "message": "Too many requests"}]}
    await asyncio.sleep(0.5)  # still inside the 1 s window of the first five
    assert (await get(s, "C1"))[0] == 429
    await asyncio.sleep(0.55)  # the first five have left the window
    assert [(await get(s, "C1"))[0] for _ in range(6)] == [200] * 5 + [429]
    st = sim.stats()
    assert st["peak_per_second"] == 5 and st["accepted"] == 10 and st["rate_limited"] == 5
    assert st["peak_per_minute"] == 10


async def test_rate_per_minute_and_429_not_counted_as_accepted(start):
    sim, _, s = await start(SimConfig(cards={"C1": None}, rate_per_minute=3))
    assert [(await get(s, "C1"))[0] for _ in range(5)] == [200, 200, 200, 429, 429]
    # the OAuth route is not rate limited
    async with s.post("/v3/oauth/token/generate",
                      json={"key": "demo-key", "secret": "demo-secret"}) as r:
        assert r.status == 200
    sim.update(rate_per_minute=4)
    assert (await get(s, "C1"))[0] == 200  # 429s did not use up a slot
    assert (await get(s, "C1"))[0] == 429
    assert sim.stats()["peak_per_minute"] == 4


async def _at_fraction(frac: float) -> None:
    """Sleep until the wall clock's fractional second is ~frac."""
    now = time.time()
    await asyncio.sleep((frac - (now % 1.0)) % 1.0)


async def test_fixed_window_resets_at_the_calendar_second_sliding_does_not(start):
    fixed, _, sf = await start(SimConfig(cards={"C1": None}, rate_per_second=3,
                                         rate_window="fixed"))
    sliding, _, ss = await start(SimConfig(cards={"C1": None}, rate_per_second=3))
    await _at_fraction(0.6)
    burst1 = [(await get(x, "C1"))[0] for x in (sf, ss) for _ in range(4)]
    await _at_fraction(0.05)  # next calendar second, ~0.45 s later
    burst2 = [(await get(x, "C1"))[0] for x in (sf, ss) for _ in range(4)]
    assert burst1 == [200, 200, 200, 429] * 2
    assert burst2[:4] == [200, 200, 200, 429]  # fixed: fresh window
    assert burst2[4:] == [429] * 4  # sliding: the last second still holds 3
    # the peak counter always measures the true sliding window
    assert fixed.stats()["peak_per_second"] == 6


@pytest.mark.parametrize("retry_after, header", [(2, "2"), (0.5, "0.5"), (None, None)])
async def test_retry_after_header(start, retry_after, header):
    _, _, s = await start(SimConfig(cards={"C1": None}, rate_per_second=1,
                                    retry_after=retry_after))
    assert (await put(s, "C1", "E1"))[0] == 200
    status, _, headers = await put(s, "C1", "E2")
    assert status == 429 and headers.get("Retry-After") == header


# ---------------------------------------------------------------- fault injection
async def test_drop_closes_connection_without_answer(start):
    sim, _, s = await start(SimConfig(cards={"C1": None}, p_drop=1.0))
    with pytest.raises(aiohttp.ClientConnectionError):
        await put(s, "C1", "E1")
    st = sim.stats()
    # aiohttp's client silently re-sends an idempotent request (PUT) once after a
    # ServerDisconnected, so the simulator usually sees two drops here.
    assert st["by_status"].get("drop", 0) >= 1 and "200" not in st["by_status"]
    assert sim.card_ids() == {"C1": None} and st["puts_per_card"] == {}


async def test_hang_then_drop_and_stop_releases_hung_requests(start):
    sim, _, s = await start(SimConfig(cards={"C1": None}, p_hang=1.0, hang_seconds=0.2))
    t0 = time.monotonic()
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(s, "C1")
    assert time.monotonic() - t0 >= 0.2
    assert sim.stats()["by_status"]["hang"] >= 1

    sim2, _, s2 = await start(SimConfig(cards={"C1": None}, down="hang", hang_seconds=30))
    pending = asyncio.ensure_future(get(s2, "C1"))
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    await sim2.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await pending
    assert time.monotonic() - t0 < 3


@pytest.mark.parametrize("fault, status", [("p_500", 500), ("p_503", 503), ("p_429", 429)])
async def test_server_faults_leave_card_unchanged(start, fault, status):
    sim, _, s = await start(SimConfig(cards={"C1": "E0"}, **{fault: 1.0}))
    got, body, _ = await put(s, "C1", "E1")
    assert got == status and body["errors"]
    assert sim.card_ids() == {"C1": "E0"}
    st = sim.stats()
    assert st["puts_per_card"] == {} and st["applied_per_card"] == {}
    assert st["by_status"] == {str(status): 1} and st["accepted"] == 0


async def test_fault_rng_is_seeded(start):
    async def run_once():
        _, _, s = await start(SimConfig(cards={"C1": None}, p_500=0.5, seed=7))
        return [(await get(s, "C1"))[0] for _ in range(20)]

    first = await run_once()
    assert first == await run_once() and {200, 500} == set(first)


async def test_latency_is_applied(start):
    _, _, s = await start(SimConfig(cards={"C1": None}, latency=0.15))
    t0 = time.monotonic()
    assert (await get(s, "C1"))[0] == 200
    assert time.monotonic() - t0 >= 0.15


async def test_down_switch_via_admin_config(start):
    sim, _, s = await start(SimConfig(cards={"C1": None}))
    async with s.post("/_sim/config", json={"down": "503"}) as r:
        assert r.status == 200 and (await r.json())["config"]["down"] == "503"
    status, _, _ = await put(s, "C1", "E1")
    assert status == 503
    async with s.post("/v3/oauth/token/generate",
                      json={"key": "demo-key", "secret": "demo-secret"}) as r:
        assert r.status == 503  # an outage takes the token endpoint down too
    async with s.post("/_sim/config", json={"down": "drop"}) as r:
        assert r.status == 200
    with pytest.raises(aiohttp.ClientConnectionError):
        await put(s, "C1", "E1")
    async with s.post("/_sim/config", json={"down": None}) as r:
        assert r.status == 200
    assert (await put(s, "C1", "E1"))[0] == 200
    assert sim.card_ids() == {"C1": "E1"}
    for bad in ({"down": "sometimes"}, {"no_such_field": 1}, {"p_500": 2}, [1]):
        async with s.post("/_sim/config", json=bad) as r:
            assert r.status == 400 and (await r.json())["ok"] is False
    assert sim.config.down is None and sim.config.p_500 == 0.0


# ---------------------------------------------------------------- stats & admin
async def test_stats_counters(start):
    sim, _, s = await start(SimConfig(cards={"A": None, "B": None}, latency=0.1))
    results = await asyncio.gather(
        *(put(s, card, f"{card}-{i}") for i, card in enumerate("AABAB")),
        get(s, "A"), get(s, "A", headers={}),
    )
    assert [r[0] for r in results] == [200] * 6 + [401]
    async with s.get("/_sim/stats") as r:
        st = await r.json()
    assert st == sim.stats()
    assert st["requests"] == 7
    assert st["by_status"] == {"200": 6, "401": 1}
    assert st["by_route"] == {"PUT /v2/card": 5, "GET /v2/card": 2, "GET /v2/cardNumber": 0,
                              "POST /v3/oauth/token/generate": 0}
    assert st["puts_per_card"] == {"A": 3, "B": 2}
    assert st["applied_per_card"] == {"A": 3, "B": 2}
    assert st["peak_per_second"] == 6 and st["peak_per_minute"] == 6
    assert st["max_in_flight"] >= 6 and st["in_flight"] == 0  # the 401 answers at once
    assert st["auth_failures"] == 1 and st["tokens_issued"] == 0
    async with s.get("/_sim/cards") as r:
        assert await r.json() == sim.card_ids()
    async with s.post("/_sim/config", json={"reset_stats": True}) as r:
        assert r.status == 200
    assert sim.stats()["requests"] == 0 and sim.stats()["puts_per_card"] == {}


async def test_generated_ids_are_unique_and_never_in_use(start):
    _, _, s = await start(SimConfig(cards={"C1": "GEN000000000002"}))

    async def gen():
        async with s.get("/v2/cardNumber", headers=AUTH) as r:
            assert r.status == 200
            body = await r.json()
            assert body["warnings"] == []
            return body["entity"]

    ids = await asyncio.gather(*(gen() for _ in range(50)))
    assert len(set(ids)) == 50 and "GEN000000000002" not in ids
    assert all(len(i) <= 50 for i in ids)

    _, _, s = await start(SimConfig(external_id_length=10))
    assert len(await gen()) == 10


# ---------------------------------------------------------------- thread, CSV, CLI
def _http_json(method, url, body=None, headers=AUTH):
    req = urllib.request.Request(url, method=method, headers={**headers,
                                                              "Content-Type": "application/json"},
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_simulator_thread():
    with SimulatorThread(SimConfig(cards={"C1": None})) as st:
        assert st.url.startswith("http://127.0.0.1:")
        body = {"cardNumber": "C1", "cardExternalId": "E"}
        assert _http_json("PUT", st.url + "/v2/card", body)[0] == 200
        assert st.card_ids() == {"C1": "E"} and st.stats()["puts_per_card"] == {"C1": 1}
        st.update(down="503")
        assert _http_json("GET", st.url + "/v2/card?number=C1")[0] == 503
        st.update(down=None, cards={"C2": "X"})
        assert _http_json("GET", st.url + "/v2/card?number=C2")[1]["cardExternalId"] == "X"
        with pytest.raises(ValueError):
            st.update(rate_window="weekly")
    with pytest.raises(RuntimeError):
        st.stats()


def test_load_cards_csv(tmp_path):
    f = tmp_path / "cards.csv"
    f.write_text("\ufeffName,Card Number,Current External ID\nx, C1 ,E1\ny,C2,\nz,,E9\n",
                 encoding="utf-8")
    assert load_cards_csv(f) == {"C1": "E1", "C2": None}
    g = tmp_path / "plain.csv"
    g.write_text("something\nA\nB\n")
    assert load_cards_csv(g) == {"A": None, "B": None}


def test_module_entry_point_serves_until_sigterm(tmp_path):
    cards = tmp_path / "cards.csv"
    cards.write_text("cardNumber,cardExternalId\nC1,\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "capbatch.simulator", "--port", "0", "--cards", str(cards),
         "--rate-per-second", "100", "--reapply-same", "3045"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split()[-1]
        req = {"cardNumber": "C1", "cardExternalId": "E"}
        assert _http_json("PUT", url + "/v2/card", req)[0] == 200
        status, body = _http_json("PUT", url + "/v2/card", req)
        assert status == 400 and codes(body) == [3045]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0, err
    assert "demo-key" in out


async def test_the_rate_limit_counts_a_request_when_it_arrived_not_when_the_server_got_to_it():
    """A gateway stamps a request on arrival. The simulator's loop can be late (a loaded machine):
    a request it handles late still counts at its arrival (kernel receive time), so the next one,
    a full window after it, is accepted — stamped when handled, it would look 0.6 s apart: a 429."""
    card = "0012345678"
    with SimulatorThread(SimConfig(cards={card: None}, rate_per_second=1)) as thread:
        async with aiohttp.ClientSession(base_url=thread.url) as session:
            assert (await put(session, card, "WARM"))[0] == 200          # the connection is open
            await asyncio.sleep(1.1)
            assert thread._loop is not None
            thread._loop.call_soon_threadsafe(time.sleep, 0.4)            # the server stalls ...
            await asyncio.sleep(0.05)
            sent = time.monotonic()
            first = await put(session, card, "A")                         # ... while A arrives
            assert first[0] == 200 and time.monotonic() - sent >= 0.3     # A was handled late
            await asyncio.sleep(max(0.0, sent + 1.05 - time.monotonic()))
            assert (await put(session, card, "B"))[0] == 200              # B: 1.05 s after A arrived
            assert (await put(session, card, "C"))[0] == 429              # the limit still holds
            assert thread.sim.stats()["peak_per_second"] == 1
