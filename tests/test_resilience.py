"""Resilience: nothing lost, nothing doubled.

The real CLI (``python -m capbatch run``) in a subprocess against the simulator in this process.
The simulator's ``stats()`` and ``card_ids()`` are the ground truth for what reached the API; the
ledger (read-only, through a ``mode=ro`` URI) is the ground truth for what the tool believes.
Processes are killed (SIGKILL), stopped (SIGTERM, SIGINT twice), starved of credentials, hit with
faults, outages and throttling; every run must end with every card holding exactly its intended ID.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import cli_env, ledger_query, ledger_rows, make_cards, popen_cli, write_csv

# ---- helpers -----------------------------------------------------------------------------------
def counts(run_dir: Path) -> dict[str, int] | None:
    """State -> rows, read-only; None while the ledger does not exist (or is not imported) yet."""
    if not (run_dir / "ledger.sqlite").exists():
        return None
    try:
        if not ledger_query(run_dir, "SELECT value FROM meta WHERE key='input_sha256'"):
            return None
        return {state: n for state, n in ledger_query(run_dir, "SELECT state, count(*) FROM rows GROUP BY state")}
    except sqlite3.Error:
        return None


def invocations(run_dir: Path) -> list[sqlite3.Row]:
    return ledger_query(run_dir, "SELECT * FROM runs ORDER BY id")


def run_args(src: Path, url: str, run_dir: Path, *extra: str) -> list[str]:
    return ["run", str(src), "--base-url", url, "--run-dir", str(run_dir), "--progress", "none",
            "--grace-period", "2", *extra]


def wait_until(pred: Callable[[], bool], proc: subprocess.Popen[str] | None = None, timeout: float = 30.0,
               step: float = 0.01) -> bool:
    """Poll pred until it holds (True) or proc exits / the timeout passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return pred()
        time.sleep(step)
    return False


def finish(proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    """Wait for the process, returning its (merged) output; kill it if it overstays."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"capbatch did not exit within {timeout} s; output:\n{out}") from None
    return out or ""


def setup_input(tmp_path: Path, n: int) -> tuple[list[tuple[str, str]], Path]:
    pairs = make_cards(n)
    return pairs, write_csv(tmp_path / "cards.csv", pairs)


def fresh_cards(pairs: list[tuple[str, str]]) -> dict[str, str | None]:
    return {card: None for card, _ in pairs}


def oauth_env(**extra: str) -> dict[str, str]:
    env = cli_env(**{"CAPILLARY_CLIENT_KEY": "demo-key", "CAPILLARY_CLIENT_SECRET": "demo-secret", **extra})
    env.pop("CAPILLARY_USERNAME", None)
    env.pop("CAPILLARY_PASSWORD", None)
    return env


def assert_all_settled_once(run_dir: Path, sim: Any, pairs: list[tuple[str, str]]) -> None:
    """Every row succeeded in the ledger and every card holds exactly its intended ID."""
    c = counts(run_dir)
    assert c == {"succeeded": len(pairs)}, c
    assert sim.card_ids() == dict(pairs)


def summary_json(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def kill_after_dispatch(proc: subprocess.Popen[str], run_dir: Path, total: int, at_least: int,
                        timeout: float = 30.0) -> bool:
    """SIGKILL proc once at_least more rows left ``pending`` than when it started. False if it ended first."""
    start = counts(run_dir)
    before = start.get("pending", total) if start else total

    def dispatched() -> bool:
        c = counts(run_dir)
        return c is not None and before - c.get("pending", 0) >= at_least

    reached = wait_until(dispatched, proc, timeout=timeout, step=0.005)
    if proc.poll() is not None:
        return False
    assert reached, f"no progress within {timeout} s"
    proc.send_signal(signal.SIGKILL)
    return True


# ---- 1. kill -9 at random points ----------------------------------------------------------------
def test_sigkill_at_random_points_loses_and_doubles_nothing(tmp_path, sim, run_cli):
    n, concurrency, planned_kills = 1500, 16, 3
    pairs, src = setup_input(tmp_path, n)
    s = sim(cards=fresh_cards(pairs), latency=0.005)
    run_dir = tmp_path / "run"
    args = run_args(src, s.url, run_dir, "--rate", "unlimited", "--concurrency", str(concurrency))
    seed = int(os.environ.get("CAPBATCH_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"\nkill test seed {seed} (set CAPBATCH_TEST_SEED to replay)")

    kills = 0
    for k in range(planned_kills):
        in_flight_before = (counts(run_dir) or {}).get("in_flight", 0)
        at_least = rng.randint(40, 350)
        proc = popen_cli(*args, cwd=tmp_path)
        killed = kill_after_dispatch(proc, run_dir, n, at_least)
        out = finish(proc, timeout=30)
        assert killed, f"run {k + 1} finished before it could be killed:\n{out}"
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        c = counts(run_dir)
        assert c is not None and sum(c.values()) == n, c
        assert set(c) <= {"pending", "in_flight", "succeeded"}, c
        # the journal leaves about three chunks unknown: queued, being sent, finished but unrecorded
        assert c.get("in_flight", 0) <= 3 * concurrency, c
        print(f"kill {kills}: after {at_least}+ rows dispatched; ledger {c} "
              f"(in flight at start of this run: {in_flight_before})")

    p = run_cli(*args, timeout=60)
    assert p.returncode == 0, p.stderr

    assert_all_settled_once(run_dir, s, pairs)
    st = s.stats()
    puts = st["puts_per_card"]
    assert set(puts) == {card for card, _ in pairs}            # every card got its PUT ...
    assert max(puts.values()) <= 1 + kills, max(puts.values())  # ... and at most one more per kill
    assert all(v == 1 for v in st["applied_per_card"].values())  # the ID changed once per card
    total_puts = sum(puts.values())
    extra = total_puts - n
    assert extra <= kills * 3 * concurrency, f"{extra} extra PUTs after {kills} kills"
    runs = invocations(run_dir)
    assert len(runs) == kills + 1
    assert [r["ended_at"] is None for r in runs] == [True] * kills + [False]
    gets = st["by_route"]["GET /v2/card"]
    confirmed = sum(1 for r in ledger_rows(run_dir) if (r["note"] or "").startswith("confirmed by reading"))
    print(f"kills {kills}: total PUTs {total_puts} for {n} rows, extra PUTs {extra}, "
          f"max PUTs per card {max(puts.values())}, cards with >1 PUT {sum(v > 1 for v in puts.values())}; "
          f"GETs {gets} (resume checks: no read beyond them); "
          f"rows confirmed by reading {confirmed}; total requests {st['requests']}")


# ---- 2. resume check: read (default) or resend ----------------------------------------------------
@pytest.mark.parametrize("resume_check, reapply_same", [("read", "ok"), ("resend", "ok"), ("resend", "3045")])
def test_rows_in_flight_at_a_kill_are_settled_by_the_resume_check(tmp_path, sim, run_cli, resume_check,
                                                                  reapply_same):
    n = 500
    pairs, src = setup_input(tmp_path, n)
    intended = dict(pairs)
    s = sim(cards=fresh_cards(pairs), latency=0.005, reapply_same=reapply_same)
    run_dir = tmp_path / "run"
    args = run_args(src, s.url, run_dir, "--rate", "unlimited", "--concurrency", "16")

    proc = popen_cli(*args, cwd=tmp_path)
    killed = kill_after_dispatch(proc, run_dir, n, at_least=200)
    out = finish(proc, timeout=30)
    assert killed, f"the run finished before it could be killed:\n{out}"
    # requests the dead process had sent may still be inside the simulator (its latency): let them land
    assert wait_until(lambda: s.stats()["in_flight"] == 0, timeout=5)

    unknown = [r for r in ledger_rows(run_dir) if r["state"] == "in_flight"]
    assert len(unknown) <= 3 * 16, len(unknown)
    held_now = s.card_ids()
    landed = {r["card"] for r in unknown if held_now[r["card"]] == intended[r["card"]]}
    not_landed = {r["card"] for r in unknown} - landed
    assert landed, f"the kill left no in-flight row whose PUT had landed ({len(unknown)} in flight)"
    s.reset_stats()

    extra = [] if resume_check == "read" else ["--resume-check", resume_check]
    p = run_cli(*args, *extra, timeout=60)
    assert p.returncode == 0, p.stderr
    assert_all_settled_once(run_dir, s, pairs)

    st = s.stats()
    puts, gets = st["puts_per_card"], st["by_route"]["GET /v2/card"]
    notes = {r["card"]: r["note"] for r in ledger_rows(run_dir)}
    if resume_check == "read":
        assert gets == len(unknown)                          # one read per in-flight row, nothing more
        assert not any(puts.get(card) for card in landed)    # cards that hold their ID are not re-PUT
        assert all(puts.get(card) == 1 for card in not_landed)
        assert all((notes[card] or "").startswith("confirmed by reading") for card in landed)
    else:
        assert all(puts.get(card) == 1 for card in landed)   # resent once each ...
        assert not any(st["applied_per_card"].get(card) for card in landed)  # ... changing nothing
        if reapply_same == "ok":
            assert gets == 0                                 # nothing is read
        else:
            assert st["by_status"].get("400", 0) >= len(landed)   # 3045 for the card's own ID ...
            assert gets >= len(landed)                            # ... read back, and a success
            assert all("3045" in (notes[card] or "") for card in landed)
    assert max(puts.values()) == 1
    print(f"\nresume-check {resume_check} (reapply_same={reapply_same}): {len(unknown)} rows in flight at "
          f"the kill, {len(landed)} had landed; rerun sent {sum(puts.values())} PUTs and {gets} GETs "
          f"(max {max(puts.values())} per card)")


# ---- 3. transient faults ---------------------------------------------------------------------------
def test_transient_faults_of_every_kind_end_with_every_row_succeeded(tmp_path, sim, run_cli):
    n = 200  # the seeded faults give every kind (>= 1 hang, 2 drops) among its ~240 requests
    pairs, src = setup_input(tmp_path, n)
    s = sim(cards=fresh_cards(pairs), p_500=0.05, p_503=0.05, p_drop=0.02, p_hang=0.01, hang_seconds=2,
            p_429=0.05, retry_after=0.2, seed=20261125)
    run_dir = tmp_path / "run"
    started = time.monotonic()
    p = run_cli(*run_args(src, s.url, run_dir, "--rate", "unlimited", "--timeout", "1"), timeout=90)
    elapsed = time.monotonic() - started
    assert p.returncode == 0, p.stderr
    assert_all_settled_once(run_dir, s, pairs)
    # a hung request is counted when the simulator gives up on it (hang_seconds), maybe after the run ended
    wait_until(lambda: s.stats()["in_flight"] == 0, timeout=3)
    st = s.stats()
    by_status = st["by_status"]
    for kind in ("500", "503", "drop", "hang", "429"):
        assert by_status.get(kind, 0) > 0, f"the simulator injected no {kind}: {by_status}"
    assert all(v == 1 for v in st["applied_per_card"].values())
    assert sum(r["attempts"] for r in ledger_rows(run_dir)) > n      # retries are counted per row ...
    assert summary_json(run_dir)["retries"] > 0                       # ... and in the summary
    print(f"\nfaults: {by_status}, {st['requests']} requests for {n} rows in {elapsed:.1f} s")


def test_every_request_on_a_dropped_keep_alive_connection_is_paced_and_counted(tmp_path, sim, run_cli):
    """aiohttp would resend an idempotent request on a closed keep-alive connection by itself:
    unpaced and uncounted. Every request the server sees must be one capbatch sent and counted."""
    n = 120  # ~30 dropped connections; more rows only lengthen the longest back-off chain
    pairs, src = setup_input(tmp_path, n)
    s = sim(cards=fresh_cards(pairs), p_drop=0.2, seed=20261203)
    run_dir = tmp_path / "run"
    p = run_cli(*run_args(src, s.url, run_dir, "--rate", "unlimited", "--timeout", "2"), timeout=90)
    assert p.returncode == 0, p.stderr
    assert_all_settled_once(run_dir, s, pairs)
    st = s.stats()
    assert st["by_status"].get("drop", 0) > 0, st["by_status"]
    assert sum(r["attempts"] for r in ledger_rows(run_dir)) == st["requests"], (st["by_status"], st["requests"])


# ---- 4. credentials -----------------------------------------------------------------------------------
def test_wrong_password_aborts_at_once_with_nothing_failed(tmp_path, sim, run_cli):
    n, concurrency = 200, 16
    pairs, src = setup_input(tmp_path, n)
    s = sim(cards=fresh_cards(pairs))
    run_dir = tmp_path / "run"
    p = run_cli(*run_args(src, s.url, run_dir, "--rate", "unlimited", "--concurrency", str(concurrency)),
                env=cli_env(CAPILLARY_PASSWORD="wrong"), timeout=30)
    assert p.returncode == 3, p.stderr
    assert "credentials" in p.stderr.lower(), p.stderr
    assert counts(run_dir) == {"pending": n}
    st = s.stats()
    assert st["requests"] <= concurrency, st["requests"]
    assert not any(s.card_ids().values())
    print(f"\nwrong password: {st['requests']} request(s) sent, {st['auth_failures']} refused")


def test_oauth_tokens_expiring_mid_run_are_refreshed_without_failures(tmp_path, sim, run_cli):
    n = 400  # ~4 s at 100/s: four lifetimes of a 1 s token (refreshed at 80 % of its life)
    pairs, src = setup_input(tmp_path, n)
    s = sim(cards=fresh_cards(pairs), token_ttl=1.0)
    run_dir = tmp_path / "run"
    started = time.monotonic()
    p = run_cli(*run_args(src, s.url, run_dir, "--rate", "100/s"), env=oauth_env(), timeout=60)
    elapsed = time.monotonic() - started
    assert p.returncode == 0, p.stderr
    assert "auth oauth" in p.stderr
    assert_all_settled_once(run_dir, s, pairs)
    st = s.stats()
    assert st["tokens_issued"] >= 3, st["tokens_issued"]
    print(f"\noauth ttl 1 s: {st['tokens_issued']} tokens over {elapsed:.1f} s, "
          f"{st['auth_failures']} requests refused (expired token) and retried")


def test_wrong_oauth_secret_aborts_with_nothing_failed(tmp_path, sim, run_cli):
    n = 100
    pairs, src = setup_input(tmp_path, n)
    s = sim(cards=fresh_cards(pairs))
    run_dir = tmp_path / "run"
    p = run_cli(*run_args(src, s.url, run_dir, "--rate", "unlimited"),
                env=oauth_env(CAPILLARY_CLIENT_SECRET="wrong-secret"), timeout=30)
    assert p.returncode == 3, p.stderr
    assert "CAPILLARY_CLIENT" in p.stderr, p.stderr
    assert counts(run_dir) == {"pending": n}
    st = s.stats()
    assert st["tokens_issued"] == 0
    assert st["by_route"]["PUT /v2/card"] == 0
    assert st["requests"] <= 16, st["requests"]


# ---- 5. outages ---------------------------------------------------------------------------------------
def test_short_outage_is_ridden_out_without_failures(tmp_path, sim):
    n = 200  # the outage starts after 50 rows: 150 (1.5 s at 100/s) are still to send when it ends
    pairs, src = setup_input(tmp_path, n)
    s = sim(cards=fresh_cards(pairs))
    run_dir = tmp_path / "run"
    proc = popen_cli(*run_args(src, s.url, run_dir, "--rate", "100/s", "--outage-budget", "6"), cwd=tmp_path)
    try:
        assert wait_until(lambda: (counts(run_dir) or {}).get("succeeded", 0) >= 50, proc, timeout=20)
        s.update(down="503")
        time.sleep(3.0)
        s.update(down=None)
    finally:
        out = finish(proc, timeout=60)
    assert proc.returncode == 0, out
    assert_all_settled_once(run_dir, s, pairs)
    st = s.stats()
    spent = st["by_status"].get("503", 0)
    inv = summary_json(run_dir)["this_invocation"]
    print(f"\noutage of 3 s: {spent} requests answered 503 during it; breaker: {inv['outages']} outage(s), "
          f"{inv['outage_seconds']} s open; {st['requests']} requests for {n} rows")


# "503": the rows sent during the outage are released to pending. "drop": their PUTs are ambiguous,
# so they stay in_flight and the rerun settles them by reading the cards.
@pytest.mark.parametrize("down", ["503", "drop"])
def test_outage_outlasting_the_budget_aborts_resumably(tmp_path, sim, run_cli, down):
    n = 80
    pairs, src = setup_input(tmp_path, n)
    s = sim(cards=fresh_cards(pairs))
    run_dir = tmp_path / "run"
    args = run_args(src, s.url, run_dir, "--rate", "100/s", "--outage-budget", "2")  # one failed probe, then out
    proc = popen_cli(*args, cwd=tmp_path)
    try:
        assert wait_until(lambda: (counts(run_dir) or {}).get("succeeded", 0) >= 15, proc, timeout=20)
        s.update(down=down)
        flipped = time.monotonic()
    finally:
        out = finish(proc, timeout=40)
    took = time.monotonic() - flipped
    assert proc.returncode == 3, out
    assert "unavailable" in out.lower() or "outage" in out.lower(), out
    c = counts(run_dir)
    assert c is not None and set(c) <= {"pending", "in_flight", "succeeded"}, c
    assert c.get("pending", 0) + c.get("in_flight", 0) > 0, c
    spent = s.stats()["by_status"].get(down, 0)
    print(f"\nlasting outage ({down}): aborted {took:.1f} s after it began with {c}; "
          f"{spent} requests spent during it")

    s.update(down=None)
    p = run_cli(*args, timeout=60)
    assert p.returncode == 0, p.stderr
    assert_all_settled_once(run_dir, s, pairs)
    assert max(s.stats()["puts_per_card"].values()) <= 2


# ---- 6. signals ---------------------------------------------------------------------------------------
def test_sigterm_stops_within_grace_and_the_rerun_completes(tmp_path, sim, run_cli):
    n = 200
    pairs, src = setup_input(tmp_path, n)
    s = sim(cards=fresh_cards(pairs), latency=0.01)
    run_dir = tmp_path / "run"
    args = run_args(src, s.url, run_dir, "--rate", "100/s")
    proc = popen_cli(*args, cwd=tmp_path)
    try:
        assert wait_until(lambda: (counts(run_dir) or {}).get("succeeded", 0) >= 50, proc, timeout=20)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
    finally:
        out = finish(proc, timeout=30)
    took = time.monotonic() - sent
    assert proc.returncode == 130, out
    assert took <= 2 + 3, f"took {took:.1f} s to stop"
    c = counts(run_dir)
    assert c is not None
    assert c.get("succeeded", 0) + c.get("pending", 0) + c.get("in_flight", 0) == n, c
    assert 0 < c.get("succeeded", 0) < n, c
    assert "interrupted: " in out and "capbatch: run interrupted" in out, out
    assert summary_json(run_dir)["stop"] == "interrupted"
    print(f"\nSIGTERM: exited 130 after {took:.2f} s with {c}")

    p = run_cli(*args, timeout=60)
    assert p.returncode == 0, p.stderr
    assert_all_settled_once(run_dir, s, pairs)
    assert max(s.stats()["puts_per_card"].values()) <= 2


def test_second_sigint_exits_at_once_and_the_rerun_completes(tmp_path, sim, run_cli):
    n = 200
    pairs, src = setup_input(tmp_path, n)
    s = sim(cards=fresh_cards(pairs), latency=0.01)
    run_dir = tmp_path / "run"
    args = run_args(src, s.url, run_dir, "--rate", "100/s")
    proc = popen_cli(*args, cwd=tmp_path)
    try:
        assert wait_until(lambda: (counts(run_dir) or {}).get("succeeded", 0) >= 50, proc, timeout=20)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
    finally:
        out = finish(proc, timeout=30)
    took = time.monotonic() - sent
    assert proc.returncode == 130, out
    assert took < 1.5, f"took {took:.1f} s to exit after the second Ctrl-C"
    c = counts(run_dir)
    assert c is not None and set(c) <= {"pending", "in_flight", "succeeded"}, c
    assert sum(c.values()) == n
    print(f"\nSIGINT x2: exited 130 after {took:.2f} s with {c}")

    p = run_cli(*args, timeout=60)
    assert p.returncode == 0, p.stderr
    assert_all_settled_once(run_dir, s, pairs)
    assert max(s.stats()["puts_per_card"].values()) <= 2


# ---- 7. rate and concurrency caps --------------------------------------------------------------------------
def test_rate_cap_matches_a_sliding_per_second_quota(tmp_path, sim, run_cli):
    n = 80  # ~4 s of work at 20/s
    pairs, src = setup_input(tmp_path, n)
    s = sim(cards=fresh_cards(pairs), rate_per_second=20, rate_window="sliding")
    run_dir = tmp_path / "run"
    p = run_cli(*run_args(src, s.url, run_dir, "--rate", "20/s"), timeout=60)
    assert p.returncode == 0, p.stderr
    assert_all_settled_once(run_dir, s, pairs)
    st = s.stats()
    settled = sorted(r["settled_at"] for r in ledger_rows(run_dir))
    achieved = (len(settled) - 1) / (settled[-1] - settled[0])
    print(f"\nrate 20/s vs quota 20/s: {st['by_status'].get('429', 0)} 429s, peak {st['peak_per_second']}/s, "
          f"achieved {achieved:.2f} rows/s")
    assert st["by_status"].get("429", 0) == 0 and st["rate_limited"] == 0, st["by_status"]
    assert st["peak_per_second"] <= 20
    assert achieved >= 0.9 * 20, achieved


def test_concurrency_cap_bounds_requests_in_flight(tmp_path, sim, run_cli):
    n = 100
    pairs, src = setup_input(tmp_path, n)
    s = sim(cards=fresh_cards(pairs), latency=0.05)
    run_dir = tmp_path / "run"
    p = run_cli(*run_args(src, s.url, run_dir, "--rate", "unlimited", "--concurrency", "4"), timeout=60)
    assert p.returncode == 0, p.stderr
    assert_all_settled_once(run_dir, s, pairs)
    st = s.stats()
    print(f"\nconcurrency 4: simulator saw at most {st['max_in_flight']} requests in flight")
    assert st["max_in_flight"] <= 4


# ---- 8. throttling ---------------------------------------------------------------------------------------
def test_rate_set_too_high_is_absorbed_by_throttling_back_off(tmp_path, sim, run_cli):
    n = 40  # at 60/s against 20/s, half of the first second's sends are answered 429
    pairs, src = setup_input(tmp_path, n)
    s = sim(cards=fresh_cards(pairs), rate_per_second=20)
    run_dir = tmp_path / "run"
    started = time.monotonic()
    p = run_cli(*run_args(src, s.url, run_dir, "--rate", "60/s"), timeout=60)
    elapsed = time.monotonic() - started
    assert p.returncode == 0, p.stderr
    assert_all_settled_once(run_dir, s, pairs)
    st = s.stats()
    inv = summary_json(run_dir)["this_invocation"]
    print(f"\n--rate 60/s vs quota 20/s: {st['by_status'].get('429', 0)} 429s, {st['requests']} requests for "
          f"{n} rows in {elapsed:.1f} s, {inv['throttle_events']} rate decreases")
    assert st["by_status"].get("429", 0) > 0
