"""Reports end to end: a real run through the CLI against the simulator, then every report file.

One run (module fixture) feeds most tests: successes, API failures (3010 unknown card, 3045 external
ID held by another card), rejections, a duplicate, retries (500/503 with a fixed seed) and values a
spreadsheet would execute as formulas. The round trip feeds failures.csv back to ``capbatch run``.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from capbatch.ledger import Ledger, RowResult, State
from capbatch.report import FORMULA_TRIGGERS, build_summary, write_reports
from capbatch.report_html import write_html
from capbatch.simulator import SimConfig, SimulatorThread
from conftest import cli_env, make_cards, read_csv

USER, PASSWORD = "report-user", "Pw-7f3c9e-not-in-any-file"
PW_MD5 = hashlib.md5(PASSWORD.encode()).hexdigest()
SECRETS = [PASSWORD, PW_MD5, base64.b64encode(f"{USER}:{PW_MD5}".encode()).decode(),
           base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(), "Authorization", "Basic "]

CARDS = make_cards(12)                          # seeded in the simulator, no external id yet
HOLDER = ("0077700000000001", "TAKEN-0001")     # a seeded card already holding an external id
UNKNOWN = "0099999999999999"
F_EQ, F_PLUS = "0088800000000001", "0088800000000002"   # not seeded in run 1 (3010); seeded for the round trip
XSS_CARD = "<script>alert(1)</script>"
XSS_NOTE = "<img src=x onerror=alert(2)>"
HYPERLINK = '=HYPERLINK("x")'

HEADER = ["cardNumber", "cardExternalId", "note"]
# (card, external id, note, expected state, expected error/reason code)
ROWS: list[tuple[str, str, str, str, str]] = [
    (CARDS[0][0], CARDS[0][1], "plain", "succeeded", ""),
    (CARDS[1][0], CARDS[1][1], "=1+2", "succeeded", ""),
    (UNKNOWN, "EXT-UNKNOWN", "unknown card", "failed", "3010"),
    (XSS_CARD, "EXT-XSS", XSS_NOTE, "failed", "3010"),
    (CARDS[2][0], HOLDER[1], "held by another card", "failed", "3045"),
    (CARDS[3][0], "", "empty external id", "rejected", "missing_external_id"),
    (CARDS[4][0], "N/A", "placeholder", "rejected", "placeholder"),
    (CARDS[5][0], "X" * 51, "too long", "rejected", "too_long"),
    (CARDS[6][0], CARDS[6][1], "first of a pair", "succeeded", ""),
    (CARDS[6][0], CARDS[6][1], "the same pair again", "duplicate", "duplicate"),
    (F_EQ, HYPERLINK, "formula external id", "failed", "3010"),
    (F_PLUS, "+1", "\tleading tab", "failed", "3010"),
    (CARDS[7][0], "@SUM(A1)", "-minus note", "succeeded", ""),
    ("-123", "EXT-NEG", "+plus note", "failed", "3010"),
    (CARDS[8][0], CARDS[8][1], "\rcarriage return", "succeeded", ""),
    (CARDS[9][0], CARDS[9][1], "", "succeeded", ""),
    (CARDS[10][0], CARDS[10][1], "", "succeeded", ""),
    (CARDS[11][0], CARDS[11][1], "", "succeeded", ""),
]
RESULT_TAIL = ["capbatch_state", "capbatch_attempts", "capbatch_http_status", "capbatch_error_code",
               "capbatch_message", "capbatch_sent_external_id", "capbatch_previous_external_id",
               "capbatch_generated", "capbatch_card_id", "capbatch_customer_id", "capbatch_settled_at",
               "capbatch_warnings"]
FAILURE_TAIL = ["capbatch_row", "capbatch_sheet", "capbatch_state", "capbatch_error_code", "capbatch_reason"]


def neutralised(value: str) -> str:
    return "'" + value if value.startswith(FORMULA_TRIGGERS) else value


def cli(*args: Any, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The conftest ``run_cli`` call, usable from a module-scoped fixture."""
    return subprocess.run([sys.executable, "-m", "capbatch", *map(str, args)], cwd=cwd,
                          env=env or cli_env(CAPILLARY_USERNAME=USER, CAPILLARY_PASSWORD=PASSWORD),
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return list(csv.reader(fh))


@dataclass
class Run:
    work: Path
    input: Path
    run_dir: Path
    proc: subprocess.CompletedProcess[str]
    sim: SimulatorThread
    stats: dict[str, Any]
    card_ids: dict[str, str | None]
    files: dict[str, bytes]            # every file of the run dir right after the run


@pytest.fixture(scope="module")
def run1(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("reports")
    src = work / "cards.csv"
    with open(src, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        w.writerows([r[:3] for r in ROWS])
    cards: dict[str, str | None] = {card: None for card, _ in CARDS}
    cards[HOLDER[0]] = HOLDER[1]
    sim = SimulatorThread(SimConfig(username=USER, password=PASSWORD, cards=cards, p_500=0.15, p_503=0.15,
                                    seed=20240611)).start()
    try:
        run_dir = work / "run1"
        proc = cli("run", src, "--base-url", sim.url, "--rate", "unlimited", "--run-dir", run_dir,
                   "--concurrency", "4", "--progress", "none", cwd=work)
        files = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
        yield Run(work, src, run_dir, proc, sim, sim.stats(), sim.card_ids(), files)
    finally:
        sim.stop()


def by_row(rows: list[dict[str, str]]) -> dict[int, dict[str, str]]:
    return {int(r["capbatch_row"]): r for r in rows}


# ---- the run and its CSV reports ---------------------------------------------------------------
def test_exit_code_and_report_files(run1: Run) -> None:
    assert run1.proc.returncode == 1, run1.proc.stderr
    for name in ("results.csv", "failures.csv", "summary.json", "report.html", "ledger.sqlite",
                 "capbatch.log.jsonl"):
        assert name in run1.files, name
    assert not [n for n in run1.files if n.endswith(".tmp")]


def test_results_csv_one_line_per_input_row(run1: Run) -> None:
    rows = csv_rows(run1.run_dir / "results.csv")
    assert rows[0] == ["capbatch_row", "capbatch_sheet", *HEADER, *RESULT_TAIL]
    body = rows[1:]
    assert len(body) == len(ROWS)
    assert [int(r[0]) for r in body] == list(range(2, len(ROWS) + 2))     # input order, spreadsheet numbers
    results = read_csv(run1.run_dir / "results.csv")
    for (card, ext, note, state, code), res in zip(ROWS, results):
        where = f"row {res['capbatch_row']}"
        assert [res[c] for c in HEADER] == [neutralised(card), neutralised(ext), neutralised(note)], where
        assert res["capbatch_state"] == state, (where, res)
        assert res["capbatch_sheet"] == ""
        if state == "succeeded":
            assert int(res["capbatch_attempts"]) >= 1, where
            assert res["capbatch_http_status"] == "200", where
            assert res["capbatch_error_code"] == "" and res["capbatch_message"] == "", where
            assert res["capbatch_card_id"] and res["capbatch_customer_id"], where
            assert res["capbatch_sent_external_id"] == neutralised(ext), where
            datetime.fromisoformat(res["capbatch_settled_at"])
        elif state == "failed":
            assert int(res["capbatch_attempts"]) >= 1, where
            assert res["capbatch_http_status"] == "400", where
            assert res["capbatch_error_code"] == code, where
            assert res["capbatch_message"], where
            assert res["capbatch_card_id"] == res["capbatch_customer_id"] == "", where
        else:  # rejected / duplicate: never sent
            assert res["capbatch_attempts"] == "0", where
            assert res["capbatch_http_status"] == "", where
            assert res["capbatch_error_code"] == code, where
            assert res["capbatch_message"], where
            assert res["capbatch_card_id"] == "", where
    # retries happened (fixed seed); attempts never exceed the requests the simulator saw
    attempts = sum(int(r["capbatch_attempts"]) for r in results)
    sent = sum(1 for r in ROWS if r[3] in ("succeeded", "failed"))
    assert sent < attempts <= run1.stats["requests"]
    assert any(int(r["capbatch_attempts"]) > 1 for r in results)


def test_failures_csv_holds_failed_and_rejected_rows_only(run1: Run) -> None:
    rows = csv_rows(run1.run_dir / "failures.csv")
    assert rows[0] == [*HEADER, *FAILURE_TAIL]
    expected = [(i + 2, r) for i, r in enumerate(ROWS) if r[3] in ("failed", "rejected")]
    got = read_csv(run1.run_dir / "failures.csv")
    assert [int(g["capbatch_row"]) for g in got] == [n for n, _ in expected]
    for g, (_, (card, ext, note, state, code)) in zip(got, expected):
        assert [g[c] for c in HEADER] == [neutralised(card), neutralised(ext), neutralised(note)]
        assert g["capbatch_state"] == state
        assert g["capbatch_error_code"] == code
        assert g["capbatch_reason"]


def test_every_csv_cell_is_neutralised(run1: Run) -> None:
    checked = 0
    for name in ("results.csv", "failures.csv"):
        for line in csv_rows(run1.run_dir / name):
            for cell in line:
                assert not cell.startswith(FORMULA_TRIGGERS), (name, cell)
                checked += 1
    assert checked > 100
    results = by_row(read_csv(run1.run_dir / "results.csv"))
    assert results[12]["cardExternalId"] == "'" + HYPERLINK
    assert results[13]["cardExternalId"] == "'+1" and results[13]["note"] == "'\tleading tab"
    assert results[14]["cardExternalId"] == "'@SUM(A1)" and results[14]["capbatch_sent_external_id"] == "'@SUM(A1)"
    assert results[15]["cardNumber"] == "'-123" and results[15]["note"] == "'+plus note"
    assert results[16]["note"] == "'\rcarriage return"
    assert results[3]["note"] == "'=1+2"
    # the simulator got the real values (the neutralising is a report-only matter)
    assert run1.card_ids[CARDS[7][0]] == "@SUM(A1)"


def test_summary_json(run1: Run) -> None:
    summary = json.loads(run1.files["summary.json"])
    want_counts = {s.value: 0 for s in State}
    for r in ROWS:
        want_counts[r[3]] += 1
    assert summary["counts"] == want_counts
    assert summary["failed_by_error_code"] == {"3010": 5, "3045": 1}
    assert summary["rejected_by_reason"] == {"missing_external_id": 1, "placeholder": 1, "too_long": 1}
    assert summary["exit_code"] == 1 and summary["stop"] == "done"
    assert summary["input"]["sha256"] == hashlib.sha256(run1.input.read_bytes()).hexdigest()
    assert summary["input"]["name"] == "cards.csv" and summary["input"]["rows"] == len(ROWS)
    assert summary["input"]["columns"] == HEADER
    started = datetime.fromisoformat(summary["started_at"])
    ended = datetime.fromisoformat(summary["ended_at"])
    assert started <= ended
    assert 0 < summary["duration_seconds"] < 60
    assert summary["throughput_rows_per_second"] > 0
    assert set(summary["latency_ms"]) == {"p50", "p90", "p95", "p99", "max"}
    assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"] <= summary["latency_ms"]["max"]
    assert summary["requests"] == run1.stats["requests"]
    faults = sum(run1.stats["by_status"].get(s, 0) for s in ("500", "503", "429"))
    assert summary["retries"] == faults >= 1
    assert summary["throttled_responses"] == 0
    settings = summary["settings"]
    assert settings["auth"] == "basic" and settings["base_url"] == run1.sim.url
    assert not [k for k in settings if any(w in k.lower() for w in ("password", "secret", "credential", "user"))]


def test_no_secret_in_any_file_of_the_run_dir(run1: Run) -> None:
    assert {"ledger.sqlite", "capbatch.log.jsonl", "summary.json"} <= set(run1.files)
    files = dict(run1.files)
    files.update({p.name: p.read_bytes() for p in run1.run_dir.iterdir() if p.is_file()})
    for name, data in files.items():
        for secret in SECRETS:
            assert secret.encode() not in data, (name, secret)
    assert USER.encode() not in b"".join(files.values())
    assert PASSWORD not in run1.proc.stdout + run1.proc.stderr


def test_report_command_rebuilds_identical_csvs(run1: Run) -> None:
    proc = cli("report", run1.run_dir, cwd=run1.work)
    assert proc.returncode == 0, proc.stderr
    for name in ("results.csv", "failures.csv"):
        assert (run1.run_dir / name).read_bytes() == run1.files[name], name
    before, after = json.loads(run1.files["summary.json"]), json.loads((run1.run_dir / "summary.json").read_bytes())
    for key in ("counts", "failed_by_error_code", "rejected_by_reason", "requests", "retries", "exit_code",
                "started_at", "ended_at", "duration_seconds", "latency_ms", "settings", "input"):
        assert after[key] == before[key], key
    assert (run1.run_dir / "report.html").stat().st_size > 0


# ---- report.html -------------------------------------------------------------------------------
class Page(HTMLParser):
    """Collects what the tests look at: tags, attributes, text per section, headline cards, table rows."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.stack: list[tuple[str, dict[str, str]]] = []
        self.section_text: dict[str, list[str]] = {}
        self.section_tags: dict[str, list[str]] = {}
        self.cards: dict[str, str] = {}
        self._card: dict[str, str] | None = None
        self.text: list[str] = []
        self.rows: dict[str, list[list[str]]] = {}   # section id -> table rows (cell texts), nested tables flat
        self._cell: list[str] | None = None
        self._row: list[str] | None = None

    VOID = {"meta", "br", "img", "input", "link", "hr", "col", "wbr", "source"}

    def section(self) -> str | None:
        return next((a.get("id") for t, a in reversed(self.stack) if t == "section"), None)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        sec = self.section()
        if sec:
            self.section_tags.setdefault(sec, []).append(tag)
        if tag == "div" and "card" in a.get("class", "").split():
            self._card = {}
        if tag == "tr":
            self._row = []
            self.rows.setdefault(sec or "", []).append(self._row)
        if tag in ("td", "th"):
            self._cell = []
        if tag not in self.VOID:
            self.stack.append((tag, a))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        sec = self.section()
        if sec:
            self.section_tags.setdefault(sec, []).append(tag)

    def handle_endtag(self, tag: str) -> None:
        while self.stack:
            t, a = self.stack.pop()
            if t == "div" and "card" in a.get("class", "").split() and self._card is not None:
                self.cards[self._card.get("l", "")] = self._card.get("v", "")
                self._card = None
            if t in ("td", "th") and self._cell is not None and self._row is not None:
                self._row.append("".join(self._cell).strip())
                self._cell = None
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        sec = self.section()
        if sec:
            self.section_text.setdefault(sec, []).append(data)
        if self._card is not None and self.stack:
            cls = self.stack[-1][1].get("class", "")
            if cls in ("l", "v"):
                self._card[cls] = self._card.get(cls, "") + data
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> tuple[str, Page]:
    raw = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(raw)
    page.close()
    return raw, page


def assert_self_contained(raw: str, page: Page) -> None:
    low = raw.lower()
    assert low.startswith("<!doctype html>")
    assert "<script" not in low                       # no script at all, let alone <script src=
    assert not [t for t, _ in page.tags if t in ("script", "link", "img", "iframe", "object", "embed")]
    for tag, attrs in page.tags:
        for name, value in attrs.items():
            assert "http://" not in value and "https://" not in value, (tag, name, value)
            assert "url(" not in value.lower(), (tag, name, value)
            assert not name.startswith("on"), (tag, name)
    assert "@import" not in low and "url(" not in low


def test_report_html(run1: Run) -> None:
    raw, page = parse(run1.run_dir / "report.html")
    assert_self_contained(raw, page)
    summary = json.loads((run1.run_dir / "summary.json").read_bytes())
    c = summary["counts"]
    cards = page.cards
    assert cards["Rows"] == str(len(ROWS))
    assert cards["Succeeded"] == str(c["succeeded"]) and cards["Failed"] == str(c["failed"])
    assert cards["Rejected"] == str(c["rejected"]) and cards["Duplicates"] == str(c["duplicate"])
    assert cards["Unchanged"] == "0" and cards["Pending"] == "0"
    assert cards["Requests"] == f"{summary['requests']:,}" and cards["Retries"] == str(summary["retries"])
    assert cards["429s"] == "0" and cards["Exit code"] == "1"
    assert cards["Duration"].endswith("s") and cards["Throughput"]
    text = "".join(page.text)
    assert summary["input"]["sha256"] in text and "cards.csv" in text and str(run1.run_dir) in text
    # charts: one SVG each, with bars
    for sec in ("timeline", "latency"):
        tags = page.section_tags[sec]
        assert tags.count("svg") == 1 and "rect" in tags and "text" in tags, sec
    # error breakdown: codes, messages and example rows (row number, card, external id, message)
    failed = page.rows["failed"]
    failed_text = "".join(page.section_text["failed"])
    assert any(r[:2] == ["3010", "5"] for r in failed) and any(r[:2] == ["3045", "1"] for r in failed)
    assert "Card number does not exist" in failed_text and "Card external id exists" in failed_text
    assert ["4", UNKNOWN, "EXT-UNKNOWN", "Card number does not exist"] in failed
    assert ["5", XSS_CARD, "EXT-XSS", "Card number does not exist"] in failed
    assert ["6", CARDS[2][0], HOLDER[1], "Card external id exists"] in failed
    assert ["12", F_EQ, HYPERLINK, "Card number does not exist"] in failed
    assert not any(r[0] in ("13", "15") for r in failed)    # only the first 3 examples of 3010
    rejected = page.rows["rejected"]
    for code in ("missing_external_id", "placeholder", "too_long"):
        assert any(r[:2] == [code, "1"] for r in rejected), code
    assert any(r[:3] == ["8", CARDS[4][0], "N/A"] for r in rejected)
    # settings and invocations
    settings_text = "".join(page.section_text["settings"])
    assert "base_url" in settings_text and "concurrency" in settings_text
    invocations = page.rows["invocations"]
    assert len(invocations) == 2 and invocations[1][5] == "done" and invocations[1][6] == "1"
    # user values are escaped: shown as text, never markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw and XSS_CARD in text
    assert "<img" not in raw.lower() and "onerror" not in raw


# ---- the round trip ----------------------------------------------------------------------------
def test_failures_csv_round_trip_sends_original_values(run1: Run) -> None:
    """failures.csv fed back to ``capbatch run`` must send the values the user typed, not the
    neutralised ones: the reader undoes the leading ' for files carrying the capbatch_row column."""
    sim = run1.sim
    sim.update(cards={F_EQ: None, F_PLUS: None, "-123": None}, p_500=0.0, p_503=0.0)
    sim.reset_stats()
    failures = run1.work / "fixed.csv"
    failures.write_bytes((run1.run_dir / "failures.csv").read_bytes())
    proc = cli("run", failures, "--base-url", sim.url, "--rate", "unlimited", "--run-dir", run1.work / "run2",
               "--progress", "none", cwd=run1.work)
    assert proc.returncode == 1, proc.stderr                 # the 3045 row and the rejections remain
    ids = sim.card_ids()
    puts = sim.stats()["puts_per_card"]
    assert "'-123" not in puts and "-123" in puts, puts
    assert ids[F_EQ] == HYPERLINK, ids[F_EQ]
    assert ids[F_PLUS] == "+1", ids[F_PLUS]
    assert ids["-123"] == "EXT-NEG"
    assert not any(v and v.startswith("'") for v in ids.values())
    results = read_csv(run1.work / "run2" / "results.csv")
    states = {r["cardNumber"]: r["capbatch_state"] for r in results}
    assert states[F_EQ] == states[F_PLUS] == "succeeded"
    assert states[CARDS[2][0]] == "failed"


# ---- rendering edge cases, in process ---------------------------------------------------------
def test_html_for_an_empty_ledger(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        summary = build_summary(ledger, tmp_path)
        path = write_html(ledger, tmp_path, summary)
    raw, page = parse(path)
    assert path == tmp_path / "report.html" and not list(tmp_path.glob("*.tmp"))
    assert_self_contained(raw, page)
    text = "".join(page.text)
    assert "No requests have been recorded yet" in text and "No failed rows" in text
    assert page.cards["Rows"] == "0"


def test_html_for_a_run_in_progress(tmp_path: Path) -> None:
    now = time.time()
    with Ledger.open(tmp_path) as ledger:
        ledger.import_rows([(None, i + 2, json.dumps([f"c{i}", f"<b>e{i}</b>"]), f"c{i}", f"<b>e{i}</b>",
                             "pending", None, None, None) for i in range(50)])
        ledger.set_meta("columns", json.dumps(["card", "ext"]))
        ledger.set_meta("settings", json.dumps({"base_url": "https://user:pw@example.test", "note": "</table>"}))
        ledger.start_invocation()
        ledger.record([RowResult(i, State.SUCCEEDED, 1, 200, latency_ms=3.0 + i * 7, settled_at=now - 300 + i * 6)
                       for i in range(1, 31)] +
                      [RowResult(31, State.FAILED, 8, 503, None, "service unavailable", latency_ms=1500.0,
                                 settled_at=now)],
                      {int(now) - 300 + k: [1, 0, k % 3, int(k % 5 == 0)] for k in range(0, 300, 2)})
        summary = write_reports(ledger, tmp_path)
        raw, page = parse(tmp_path / "report.html")
    assert_self_contained(raw, page)
    assert summary["stop"] == "in progress"
    text = "".join(page.text)
    assert "in progress" in text and page.cards["Pending"] == "19"
    assert "user:pw" not in raw and "</table>" in text            # URL userinfo redacted, values escaped
    assert "&lt;b&gt;e30&lt;/b&gt;" in raw and "<b>" not in raw
    bins = page.section_tags["timeline"].count("g")               # one <g> (bars + tooltip) per time bin
    assert 100 <= bins <= 120                                     # 300 s of timeline -> at most 120 bins
    assert page.section_tags["timeline"].count("polyline") == 2   # retries and 429s (no failed rows there)
    assert "unknown" in "".join(page.section_text["failed"])       # failed row without an error code


@pytest.mark.slow
def test_html_for_a_million_rows(tmp_path: Path) -> None:
    n = 1_000_000
    now = time.time()
    with Ledger.open(tmp_path) as ledger:
        ledger.import_rows((None, i + 2, '["c","e"]', f"c{i}", f"e{i}", "pending", None, None, None)
                           for i in range(n))
        ledger.conn.execute("UPDATE rows SET state='succeeded', latency_ms=(id % 997) * 1.3, settled_at=? "
                            "WHERE id % 50 <> 0", (now,))
        ledger.conn.execute("UPDATE rows SET state='failed', error_code=CAST(3000 + id % 7 AS TEXT), "
                            "error_message='boom', latency_ms=20 WHERE id % 50 = 0")
        ledger.record([], {int(now) - 10000 + k: [100, 2, 1, 0] for k in range(10000)})
        ledger.start_invocation()
        summary = build_summary(ledger, tmp_path)
        started = time.perf_counter()
        path = write_html(ledger, tmp_path, summary)
        took = time.perf_counter() - started
    raw, page = parse(path)
    assert_self_contained(raw, page)
    assert page.cards["Rows"] == "1,000,000"
    assert took < 20, took
    assert len(raw) < 500_000
