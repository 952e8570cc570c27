"""Outcome truth: what capbatch calls `succeeded` is a card that holds its ID, whatever the API answers.

The real CLI in a subprocess against the simulator, switched into the modes the documentation leaves
open (capillary-api.md): PUTs answered 200 without being applied, answers naming another ID, business
errors as HTTP 500, CDN HTML pages, warnings, a mandatory statusLabel, wrong targets.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

from conftest import ledger_query, ledger_rows, make_cards, popen_cli, read_csv, write_csv


def args(src: Path, url: str, run_dir: Path, *extra: str) -> list[str]:
    return ["run", str(src), "--base-url", url, "--run-dir", str(run_dir), "--progress", "none",
            "--rate", "unlimited", *extra]


def states(run_dir: Path) -> dict[str, int]:
    return {s: n for s, n in ledger_query(run_dir, "SELECT state, count(*) FROM rows GROUP BY state")}


def setup(tmp_path: Path, n: int) -> tuple[list[tuple[str, str]], Path, Path]:
    pairs = make_cards(n)
    return pairs, write_csv(tmp_path / "cards.csv", pairs), tmp_path / "run"


def fresh(pairs: list[tuple[str, str]]) -> dict[str, str | None]:
    return {card: None for card, _ in pairs}


def assert_succeeded_means_held(run_dir: Path, held: dict[str, str | None]) -> None:
    for r in ledger_rows(run_dir):
        if r["state"] == "succeeded":
            assert held[r["card"]] == r["external_id"], dict(r)


# ---- 1. each answer checked ------------------------------------------------------------------------
def test_noops_whose_answer_names_the_stored_id_fail_not_applied(tmp_path, sim, run_cli):
    pairs, src, run_dir = setup(tmp_path, 200)
    s = sim(cards=fresh(pairs), p_noop=0.3, noop_echo="stored", seed=7)
    p = run_cli(*args(src, s.url, run_dir))
    assert p.returncode == 1, p.stderr
    held = s.card_ids()
    not_held = {card for card, ext in pairs if held[card] != ext}
    assert len(not_held) == s.stats()["noops"] > 0
    rows = ledger_rows(run_dir)
    assert {r["card"] for r in rows if r["state"] == "failed"} == not_held
    assert {r["error_code"] for r in rows if r["state"] == "failed"} == {"not_applied"}
    assert_succeeded_means_held(run_dir, held)
    st = s.stats()
    assert st["by_route"]["GET /v2/card"] == len(not_held)   # a read only where the answer contradicted
    failed = next(r for r in rows if r["state"] == "failed")
    assert "holds no external ID" in failed["error_message"], failed["error_message"]


def test_silent_noops_are_caught_by_read_back(tmp_path, sim, run_cli):
    pairs, src, run_dir = setup(tmp_path, 120)
    s = sim(cards=fresh(pairs), p_noop=0.25, noop_echo="request", seed=3)   # answers look applied
    p = run_cli(*args(src, s.url, run_dir, "--read-back"))
    assert p.returncode == 1, p.stderr
    held = s.card_ids()
    assert_succeeded_means_held(run_dir, held)
    assert states(run_dir) == {"succeeded": 120 - s.stats()["noops"], "failed": s.stats()["noops"]}
    assert s.stats()["by_route"]["GET /v2/card"] == 120


def test_an_answer_naming_another_id_is_settled_by_the_card(tmp_path, sim, run_cli):
    pairs, src, run_dir = setup(tmp_path, 60)
    s = sim(cards=fresh(pairs), p_echo_other=1.0, echo_other="cardNumber")   # applied, answer names another card
    p = run_cli(*args(src, s.url, run_dir))
    assert p.returncode == 0, p.stderr
    assert s.card_ids() == dict(pairs)
    assert states(run_dir) == {"succeeded": 60}
    assert s.stats()["by_route"]["GET /v2/card"] == 60
    assert all("the card read back holds the ID" in (r["note"] or "") for r in ledger_rows(run_dir))


def test_card_codes_under_http_500_are_not_retried_and_bare_500s_are_settled_by_a_read(tmp_path, sim, run_cli):
    pairs, src, run_dir = setup(tmp_path, 30)
    cards = fresh(pairs[:20])                        # the last 10 cards do not exist
    s = sim(cards=cards, errors_status=500)          # "Failures arrive as HTTP 500" with their code
    p = run_cli(*args(src, s.url, run_dir, "--no-tripwire"))
    assert p.returncode == 1, p.stderr
    missing = {c for c, _ in pairs[20:]}
    assert all(s.stats()["puts_per_card"][c] == 1 for c in missing)     # permanent: one PUT each
    assert {r["card"]: r["error_code"] for r in ledger_rows(run_dir) if r["state"] == "failed"} == \
        dict.fromkeys(missing, "3010")

    # The documented failure body only: HTTP 500, code 500 "All requests have failed due to errors".
    run2 = tmp_path / "run2"
    s2 = sim(cards=cards, errors_status=500, business_errors="generic")
    p = run_cli(*args(src, s2.url, run2, "--no-tripwire"))
    assert p.returncode == 1, p.stderr
    st = s2.stats()
    assert all(st["puts_per_card"][c] == 3 for c in missing)           # bounded retries ...
    assert st["by_route"]["GET /v2/card"] == len(missing)               # ... then one read settles it
    assert {r["card"]: r["error_code"] for r in ledger_rows(run2) if r["state"] == "failed"} == \
        dict.fromkeys(missing, "3010")
    assert states(run2)["succeeded"] == 20


def test_cdn_html_pages_5xx_are_retried_and_403_names_what_answered(tmp_path, sim, run_cli):
    pairs, src, run_dir = setup(tmp_path, 80)
    s = sim(cards=fresh(pairs), p_503=0.2, fault_body="html", seed=5)
    p = run_cli(*args(src, s.url, run_dir))
    assert p.returncode == 0, p.stderr
    assert s.card_ids() == dict(pairs) and s.stats()["by_status"]["503"] > 0

    run2 = tmp_path / "run2"
    s2 = sim(cards=fresh(pairs), down="403", fault_body="html")
    p = run_cli(*args(src, s2.url, run2))
    assert p.returncode == 3, p.stderr
    assert ("something other than the Capillary API answered (HTTP 403, text/html, page title "
            "'Attention Required! | Cloudflare')") in p.stderr, p.stderr
    assert states(run2) == {"pending": 80}
    assert s2.stats()["requests"] == 1


def test_warnings_are_recorded_in_results_summary_and_report(tmp_path, sim, run_cli):
    pairs, src, run_dir = setup(tmp_path, 100)
    s = sim(cards=fresh(pairs), warning_code=3039, p_warning=0.4, seed=11)
    p = run_cli(*args(src, s.url, run_dir))
    assert p.returncode == 0, p.stderr
    sent = s.stats()["warnings_sent"]
    assert 0 < sent < 100
    results = read_csv(run_dir / "results.csv")
    flagged = [r for r in results if r["capbatch_warnings"]]
    assert len(flagged) == sent
    assert {r["capbatch_warnings"] for r in flagged} == {"3039: No update in status label"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["warnings_by_code"] == {"3039": {"rows": sent, "message": "No update in status label"}}
    assert summary["rows_with_warnings"] == sent
    assert "No update in status label" in (run_dir / "report.html").read_text()
    assert "3039 'No update in status label' on" in p.stderr


def test_extra_fields_are_sent_and_never_override_the_row(tmp_path, sim, run_cli):
    pairs, src, run_dir = setup(tmp_path, 40)
    s = sim(cards=fresh(pairs), required_fields=["statusLabel"])
    p = run_cli(*args(src, s.url, run_dir))
    assert p.returncode == 3, p.stderr
    assert "Mandatory field is missing" in p.stderr and "--extra-field statusLabel=" in p.stderr
    assert states(run_dir) == {"pending": 40}

    p = run_cli(*args(src, s.url, run_dir, "--extra-field", "statusLabel=Active", "--extra-field", "seriesId:=3"))
    assert p.returncode == 0, p.stderr
    assert s.card_ids() == dict(pairs)
    assert s.stats()["put_extra_fields"] == {"statusLabel": {'"Active"': 40}, "seriesId": {"3": 40}}

    before = s.stats()["requests"]
    p = run_cli(*args(src, s.url, tmp_path / "run3", "--extra-field", "cardExternalId=X"))
    assert p.returncode == 2 and "would override" in p.stderr, p.stderr
    assert s.stats()["requests"] == before


# ---- 2. canary --------------------------------------------------------------------------------------
def test_canary_stops_an_org_that_never_applies_within_k_plus_a_few_requests(tmp_path, sim, run_cli):
    pairs, src, run_dir = setup(tmp_path, 300)
    s = sim(cards=fresh(pairs), p_noop=1.0, noop_echo="request")   # every answer looks like success
    p = run_cli(*args(src, s.url, run_dir, "--canary", "5"))
    assert p.returncode == 3, p.stderr
    st = s.stats()
    assert st["requests"] <= 5 + 2, st["by_route"]
    assert st["by_route"]["PUT /v2/card"] == 1
    first_card, first_ext = pairs[0]
    assert "canary stopped the run at input row 2" in p.stderr
    assert f'sent:       PUT {s.url}/v2/card?format=json  {{"cardNumber": "{first_card}", ' \
           f'"cardExternalId": "{first_ext}"}}' in p.stderr
    assert f'"cardExternalId":"{first_ext}"' in p.stderr                    # what came back
    assert "card holds: GET" in p.stderr and "no cardExternalId" in p.stderr
    assert states(run_dir) == {"failed": 1, "pending": 299}                 # nothing left in_flight
    assert ledger_rows(run_dir)[0]["error_code"] == "not_applied"
    assert not [r for r in ledger_rows(run_dir) if r["state"] == "succeeded"]


def test_canary_stops_on_an_answer_that_contradicts_the_request(tmp_path, sim, run_cli):
    pairs, src, run_dir = setup(tmp_path, 50)
    s = sim(cards=fresh(pairs), p_echo_other=1.0)    # applied, but the answer names another ID
    p = run_cli(*args(src, s.url, run_dir, "--canary", "3"))
    assert p.returncode == 3, p.stderr
    assert "the answer contradicts the request" in p.stderr and f"'{pairs[0][1]}-X'" in p.stderr
    assert states(run_dir) == {"succeeded": 1, "pending": 49}    # the card holds it: settled as such


def test_canary_passes_with_k_reads_spread_across_the_file(tmp_path, sim, run_cli):
    pairs, src, run_dir = setup(tmp_path, 1000)
    s = sim(cards=fresh(pairs))
    p = run_cli(*args(src, s.url, run_dir, "--canary", "5"))
    assert p.returncode == 0, p.stderr
    assert "canary passed: 5 applied as answered" in p.stderr
    st = s.stats()
    assert st["by_route"] == {"PUT /v2/card": 1000, "GET /v2/card": 5, "GET /v2/cardNumber": 0,
                              "POST /v3/oauth/token/generate": 0}
    first = ledger_query(run_dir, "SELECT id FROM rows ORDER BY settled_at LIMIT 5")
    assert sorted(r["id"] for r in first) == [1, 251, 501, 750, 1000]
    # a clean run without the canary: not one request beyond the rows' own PUTs
    s2 = sim(cards=fresh(pairs))
    p = run_cli(*args(src, s2.url, tmp_path / "run2"))
    assert p.returncode == 0, p.stderr
    assert s2.stats()["requests"] == 1000


# ---- 3. tripwire -----------------------------------------------------------------------------------
def test_tripwire_stops_a_wrong_cluster_run_within_its_sample(tmp_path, sim, run_cli):
    _, src, run_dir = setup(tmp_path, 400)
    s = sim(cards={})                                 # none of these cards exists here: a wrong cluster
    p = run_cli(*args(src, s.url, run_dir, "--concurrency", "4"))
    assert p.returncode == 3, p.stderr
    assert "tripwire: 45 of the first" in p.stderr and "failed with 3010" in p.stderr
    assert "wrong --cluster/--base-url" in p.stderr
    c = states(run_dir)
    assert set(c) == {"failed", "pending"} and 45 <= c["failed"] <= 50, c
    assert s.stats()["requests"] <= 50 + 4, s.stats()["requests"]
    assert f'"failed": {c["failed"]}' in (run_dir / "summary.json").read_text()

    s2 = sim(cards={})
    p = run_cli(*args(src, s2.url, tmp_path / "run2", "--no-tripwire"))
    assert p.returncode == 1 and states(tmp_path / "run2") == {"failed": 400}


# ---- 4. fail fast on a wrong target -----------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_refused_and_unresolvable_targets_exit_3_within_seconds(tmp_path, run_cli):
    _, src, run_dir = setup(tmp_path, 50)
    for url, cause in ((f"http://127.0.0.1:{_closed_port()}", "connection refused by 127.0.0.1"),
                       ("https://nonexistent.invalid", "the host name nonexistent.invalid does not resolve")):
        started = time.monotonic()
        p = run_cli(*args(src, url, run_dir), timeout=30)
        took = time.monotonic() - started
        assert p.returncode == 3, p.stderr
        assert cause in p.stderr and "No request has been answered" in p.stderr, p.stderr
        assert took < 10, took
        assert states(run_dir) == {"pending": 50}
        assert "50 rows left" in p.stderr


# ---- 5. saying what is happening ---------------------------------------------------------------------
def test_outage_and_throttling_are_logged_and_v_logs_each_request(tmp_path, sim, run_cli):
    pairs, src, run_dir = setup(tmp_path, 150)
    s = sim(cards=fresh(pairs))
    proc = popen_cli(*args(src, s.url, run_dir, "--rate", "200/s", "--outage-budget", "20"), cwd=tmp_path)
    lines: list[str] = []
    paused = threading.Event()

    def read() -> None:            # the run's output as it comes: the outage ends once the run has paused
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "the API looks unavailable" in line:
                paused.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and s.stats()["accepted"] < 40:
            time.sleep(0.01)
        s.update(down="503")
        assert paused.wait(20), "".join(lines)
        s.update(down=None)
        proc.wait(timeout=60)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(10)
        assert proc.stdout is not None
        proc.stdout.close()
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert "the API looks unavailable" in out and "the API answers again after" in out, out

    s2 = sim(cards=fresh(pairs[:60]), p_429=0.3, seed=2)
    p = run_cli(*args(write_csv(tmp_path / "sixty.csv", pairs[:60]), s2.url, tmp_path / "run2", "--rate", "100/s",
                      "--concurrency", "8"))
    assert p.returncode == 0, p.stderr
    assert "systematic throttling (" in p.stderr and "rate lowered to" in p.stderr, p.stderr

    few = write_csv(tmp_path / "few.csv", make_cards(3, 5000))
    p = run_cli(*args(few, s.url, tmp_path / "run3", "-v"))
    assert p.returncode == 1, p.stderr       # those cards do not exist: 3010
    lines = [line for line in p.stderr.splitlines() if "PUT /v2/card -> " in line]
    assert len(lines) == 3 and all("(row " in line and "attempt 1)" in line for line in lines), p.stderr
    assert "Basic " not in p.stderr and "Authorization" not in p.stderr


# ---- settings, ledger, canary verdicts ----------------------------------------------------------------
def test_clusters_and_extra_fields_settings(tmp_path, run_cli):
    import pytest

    from capbatch.config import resolve, target_url
    from capbatch.errors import UsageError

    assert target_url(resolve({"cluster": "india"}, {})) == "https://apac.api.capillarytech.com"
    assert target_url(resolve({"cluster": "intouch-ushc"}, {})) == "https://ushc.intouch.capillarytech.com"
    assert target_url(resolve({"cluster": "INTOUCH-SEA"}, {})) == "https://sea.intouch.capillarytech.com"
    env = {"CAPBATCH_EXTRA_FIELDS": "statusLabel=Active;seriesId:=3"}
    assert resolve({}, env).extra_fields == (("statusLabel", "Active"), ("seriesId", 3))
    toml = tmp_path / "c.toml"
    toml.write_text('[capbatch]\nextra_fields = {statusLabel = "Active", seriesId = 3}\n')
    assert resolve({}, {}, toml).extra_fields == (("statusLabel", "Active"), ("seriesId", 3))
    assert resolve({"extra_fields": ("statusLabel=A=B",)}, env).extra_fields == (("statusLabel", "A=B"),)
    for bad in (("cardnumber=1",), ("statusLabel",), ("a=1", "a=2"), ("x:={",)):
        with pytest.raises(Exception) as err:
            resolve({"extra_fields": bad}, {})
        assert err.value.exit_code == 2
    with pytest.raises(UsageError):
        resolve({"tripwire_rate": 0.0}, {})
    help_text = run_cli("run", "--help").stdout
    assert "india (= apac)" in help_text and "intouch-sea" in help_text and "--extra-field" in help_text


def test_a_ledger_from_before_the_warnings_column_is_read_and_upgraded(tmp_path):
    import sqlite3

    from capbatch.ledger import SCHEMA_VERSION, Ledger
    from capbatch.report import write_reports

    with Ledger.open(tmp_path) as ledger:
        ledger.import_rows([(None, 2, '["1","A"]', "1", "A", "pending", None, None, None)])
        ledger.set_meta("columns", '["cardNumber", "cardExternalId"]')
    conn = sqlite3.connect(tmp_path / "ledger.sqlite")
    conn.executescript("ALTER TABLE rows DROP COLUMN warnings; "
                       "UPDATE meta SET value='3' WHERE key='schema_version';")   # 3 -> 4 added warnings
    conn.close()
    with Ledger.open_readonly(tmp_path) as old:          # reports still work on the old file, read-only
        assert old.warning_counts() == {} and old.rows_with_warnings() == 0
        write_reports(old, tmp_path)
    assert read_csv(tmp_path / "results.csv")[0]["capbatch_warnings"] == ""
    with Ledger.open(tmp_path) as ledger:
        assert ledger.get_meta("schema_version") == str(SCHEMA_VERSION)
        assert ledger.has_column("warnings") and ledger.warning_counts() == {}


def test_canary_verdicts():
    from capbatch.api import Kind, Outcome
    from capbatch.canary import _problem
    from capbatch.ledger import RowResult, State

    ok = RowResult(1, State.SUCCEEDED)
    assert _problem(ok, Outcome(Kind.SUCCESS, 200, external_id="E", card_number="C")) is None
    assert _problem(ok, Outcome(Kind.UNCONFIRMED, 200, "no_echo", "x")) is None      # the read proved it
    assert "contradicts" in _problem(ok, Outcome(Kind.UNCONFIRMED, 200, "contradicts", "names 'X'"))
    assert "does not hold" in _problem(RowResult(1, State.FAILED, error_code="not_applied"),
                                       Outcome(Kind.SUCCESS, 200))
    failed = RowResult(1, State.FAILED, error_code="3010")
    assert _problem(failed, Outcome(Kind.REJECTED, 400, "3010", "Card number does not exist")) is None
    assert "does not know" in _problem(RowResult(1, State.FAILED, error_code="8015"),
                                       Outcome(Kind.REJECTED, 500, "8015", "odd"))
    assert "does not know" in _problem(ok, Outcome(Kind.SUCCESS, 202, external_id="E"))


def test_extra_fields_from_code(tmp_path, sim, monkeypatch):
    from capbatch import run_backfill

    pairs, src, run_dir = setup(tmp_path, 5)
    s = sim(cards=fresh(pairs), required_fields=["statusLabel"])
    monkeypatch.setenv("CAPILLARY_USERNAME", "demo")
    monkeypatch.setenv("CAPILLARY_PASSWORD", "demo")
    summary = run_backfill(src, base_url=s.url, run_dir=run_dir, rate="unlimited", progress="none",
                           extra_fields={"statusLabel": "Active"})
    assert summary["exit_code"] == 0
    assert s.stats()["put_extra_fields"] == {"statusLabel": {'"Active"': 5}}
