"""Defects the acceptance run and the code review found, each through the real parts: the CLI in a
subprocess, the simulator on loopback, real ledgers, a real SIGKILL, the library in this process."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from capbatch.config import Rate
from capbatch.plan import PlanSettings, make_plan
from capbatch.window import Schedule

from conftest import ledger_query, make_cards, popen_cli, write_csv


def _job_args(src: Path, url: str, *extra: str) -> list[str]:
    return ["run", str(src), "--base-url", url, "--job", "nightly", "--progress", "none", "--rate", "unlimited",
            "--no-tripwire", *extra]


# ---- 1. history lists an invocation killed with SIGKILL -----------------------------------------
def test_history_lists_an_invocation_killed_with_sigkill_with_its_start_and_rows(tmp_path, sim, run_cli):
    pairs = make_cards(300)
    src = write_csv(tmp_path / "cards.csv", pairs)
    s = sim(cards={card: None for card, _ in pairs}, latency=0.03)
    proc = popen_cli(*_job_args(src, s.url, "--concurrency", "2"), cwd=tmp_path)
    run_dir = tmp_path / "reports" / "nightly"
    deadline = time.monotonic() + 60
    settled = 0
    while time.monotonic() < deadline and proc.poll() is None:
        dirs = [d for d in run_dir.glob("cards-*") if (d / "ledger.sqlite").exists()]
        try:
            settled = ledger_query(dirs[0], "SELECT count(*) FROM rows WHERE state='succeeded'")[0][0] if dirs else 0
        except sqlite3.OperationalError:
            settled = 0
        if settled >= 20:
            break
        time.sleep(0.02)
    assert proc.poll() is None and settled >= 20, "the run ended (or never progressed) before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    killed_at = time.time()
    [ledger_dir] = [d for d in run_dir.glob("cards-*")]
    in_ledger = ledger_query(ledger_dir, "SELECT count(*) FROM rows WHERE settled_at IS NOT NULL")[0][0]
    started = ledger_query(ledger_dir, "SELECT started_at FROM runs")[0][0]

    p = run_cli("history", "--job", "nightly", "--json")
    assert p.returncode == 0, p.stderr
    [line] = json.loads(p.stdout)
    assert (line["recorded"], line["outcome"], line["exit_code"], line["ended_at"]) == (False, "killed", None, None)
    assert line["settled"] == {"succeeded": in_ledger} and line["requests"] >= in_ledger
    assert line["started_at"] == time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(int(started)))
    assert started <= killed_at and line["input_name"] == "cards.csv"

    # the rerun resumes and writes its summary: both invocations are listed, the killed one first
    assert run_cli(*_job_args(src, s.url)).returncode == 0
    p = run_cli("history", "--job", "nightly")
    assert p.returncode == 0, p.stderr
    lines = [x for x in p.stdout.splitlines() if "cards.csv" in x]
    assert len(lines) == 2, p.stdout
    assert "ended without a summary: interrupted (killed)" in lines[0]
    assert f"settled {in_ledger} rows (succeeded={in_ledger})" in lines[0]
    assert "exit 0" in lines[1] and "succeeded=300" in lines[1]


def test_history_of_a_database_job_lists_a_worker_killed_with_sigkill(tmp_path, sim, run_cli, pg_url):
    from test_workers import pg_counts, pg_fetch, worker_args

    pairs = make_cards(300)
    src = write_csv(tmp_path / "cards.csv", pairs)
    s = sim(cards={card: None for card, _ in pairs}, latency=0.03)
    proc = popen_cli(*worker_args(src, s.url, pg_url, "db-nightly", "--rate", "unlimited", "--concurrency", "2"),
                     cwd=tmp_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and pg_counts(pg_url, "db-nightly").get("succeeded", 0) < 20:
        time.sleep(0.05)
    assert proc.poll() is None, "the worker ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    settled = pg_counts(pg_url, "db-nightly")["succeeded"]
    [(started,)] = pg_fetch(pg_url, "SELECT started_at FROM capbatch.invocations")

    p = run_cli("history", "--job", "db-nightly", "--ledger", pg_url, "--json")
    assert p.returncode == 0, p.stderr
    [line] = json.loads(p.stdout)
    assert (line["recorded"], line["outcome"], line["exit_code"]) == (False, "killed", None)
    assert line["settled"] == {"succeeded": settled} and line["input_name"] == "cards.csv"
    assert line["started_at"] == time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(int(started)))
    p = run_cli("history", "--job", "db-nightly", "--ledger", pg_url)
    assert "ended without a summary: interrupted (killed)" in p.stdout and f"settled {settled} rows" in p.stdout


# ---- 2. validate --json prints its verdict for a refusal too ------------------------------------
def test_validate_json_prints_the_refusal_of_a_multi_sheet_workbook_and_other_exit_2s(tmp_path, run_cli):
    import xlsxwriter

    book = xlsxwriter.Workbook(str(tmp_path / "two.xlsx"))
    for name, n in (("EU", 3), ("US", 2)):
        ws = book.add_worksheet(name)
        ws.write_row(0, 0, ["cardNumber", "cardExternalId"])
        for i in range(n):
            ws.write_row(i + 1, 0, [f"{name}{i:06d}", f"X{name}{i}"])
    book.add_worksheet("Notes").write_row(0, 0, ["remarks"])
    book.close()

    p = run_cli("validate", "two.xlsx", "--json")
    assert p.returncode == 2, p.stderr
    verdict = json.loads(p.stdout)
    assert verdict["exit_code"] == 2 and verdict["refused"] is True and verdict["input"] == "two.xlsx"
    assert verdict["error"].startswith("two.xlsx: 2 sheets hold the cardNumber and cardExternalId columns")
    assert "--sheet all" in verdict["fix"]
    assert [(c["name"], c["has_columns"], c["rows"], c["hidden"]) for c in verdict["sheet_census"]] == \
        [("EU", True, 3, False), ("US", True, 2, False), ("Notes", False, None, False)]
    assert verdict["sheet_census"][2]["header"] == ["remarks"]
    assert "2 sheets hold" in p.stderr          # the message for people still goes to stderr

    missing = run_cli("validate", "nope.csv", "--json")
    assert missing.returncode == 2
    assert json.loads(missing.stdout)["error"] == "input file nope.csv does not exist"
    both = run_cli("validate", "two.xlsx", "--json", "-o", "-")
    assert both.returncode == 2 and json.loads(both.stdout)["error"] == "--json and -o - would both write to stdout"
    assert run_cli("validate", "two.xlsx").stdout == ""    # without --json stdout stays empty


# ---- 3. an abort's closing advice ---------------------------------------------------------------
def test_a_canary_abort_says_what_it_means_not_fix_failures_csv(tmp_path, sim, run_cli):
    pairs = make_cards(40)
    src = write_csv(tmp_path / "cards.csv", pairs)
    s = sim(cards={card: None for card, _ in pairs}, p_noop=1.0, noop_echo="request")
    p = run_cli("run", str(src), "--base-url", s.url, "--run-dir", str(tmp_path / "run"), "--progress", "none",
                "--rate", "unlimited", "--canary", "3")
    assert p.returncode == 3, p.stderr
    assert "fix the rows in" not in p.stderr and "editing in Excel" not in p.stderr
    assert ("the run stopped early (exit 3) to spare the 39 rows not sent yet; the failed row shows why, "
            "not input to fix") in p.stderr
    assert "the credentials, the target; then rerun the same command to resume (add --retry-failed" in p.stderr
    assert "check the API contract, the credentials or the failure named above, then rerun the same command " \
           "to resume (39 rows left)" in p.stderr
    html = (tmp_path / "run" / "report.html").read_text()
    # report.html's banner: the reason, then the same advice as the log (one wording, capbatch.wording)
    banner = html[html.index('<p class="banner warn">'):]
    banner = banner[:banner.index("</p>")]
    assert "canary stopped the run" in banner
    assert ("The run stopped early (exit 3) to spare the 39 rows not sent yet; the failed row shows why, "
            "not input to fix. Check what the reason above names") in banner
    assert "fix them in" not in html


# ---- 4. --retry-failed in a job: what the audit log says is what is counted ---------------------
def test_retry_failed_in_a_job_logs_and_counts_the_audit_reads_it_really_makes(tmp_path, sim, run_cli):
    pairs = make_cards(50)
    src = write_csv(tmp_path / "cards.csv", pairs)
    s = sim(cards={card: None for i, (card, _) in enumerate(pairs) if i % 10})   # 5 cards do not exist
    assert run_cli(*_job_args(src, s.url, "--skip-confirmed")).returncode == 1
    before = s.stats()["by_route"]["GET /v2/card"]
    audited = run_cli(*_job_args(src, s.url, "--skip-confirmed", "--audit-fraction", "0.2"))
    assert audited.returncode == 1, audited.stderr
    reads = s.stats()["by_route"]["GET /v2/card"] - before
    assert reads == 9        # ceil(0.2 x 45 confirmed pairs)
    [second] = sorted((tmp_path / "reports" / "nightly").glob("cards-*-2"))
    summary = json.loads((second / "summary.json").read_text())
    assert summary["this_invocation"]["audit_reads"] == 9 and summary["audit"]["rows"] == 9
    assert "audit: 9 re-read, 0 drifted and put back" in audited.stderr

    before = s.stats()["by_route"]["GET /v2/card"]
    retry = run_cli(*_job_args(src, s.url, "--skip-confirmed", "--audit-fraction", "0.2", "--retry-failed"))
    assert retry.returncode == 1, retry.stderr
    assert s.stats()["by_route"]["GET /v2/card"] == before       # the slice was read by the run before
    assert "re-reads 9 confirmed pairs this run" not in retry.stderr
    assert ("this run's slice of 9 confirmed pairs was picked by an earlier invocation, 9 already re-read; "
            "0 to re-read now") in retry.stderr
    assert "audit: 9 re-read (0 by this invocation)" in retry.stderr
    summary = json.loads((second / "summary.json").read_text())
    assert summary["this_invocation"]["audit_reads"] == 0 and summary["this_invocation"]["requests"] == 5
    html = (second / "report.html").read_text()
    assert '<div class="l">Audit</div><div class="v">9</div>' in html


# ---- 5 and 8. the plan's time and plurals --------------------------------------------------------
def test_a_tiny_plan_says_under_a_second_and_counts_agree_with_their_nouns(tmp_path, run_cli):
    src = write_csv(tmp_path / "cards.csv", make_cards(20))
    p = run_cli("validate", str(src), "--rate", "1000/s")
    assert "plan: 20 rows → 20 requests at 1,000/s: under a second" in p.stderr, p.stderr
    assert "about 0 s" not in p.stderr
    p = run_cli("validate", str(src), "--rate", "10/s")
    assert "20 rows → 20 requests at 10/s: about 2 s" in p.stderr

    one = make_plan({"pending": 5}, 0, PlanSettings(rate=Rate(1, 1.0)), Schedule(), 0.0, shared_with=1)
    assert "shared with 1 other run right now" in one.line()
    two = make_plan({"pending": 5}, 0, PlanSettings(rate=Rate(1, 1.0)), Schedule(), 0.0, shared_with=2)
    assert "shared with 2 other runs right now" in two.line()


def test_report_html_says_invocation_in_the_singular_for_one(tmp_path, sim, run_cli):
    pairs = make_cards(5)
    src = write_csv(tmp_path / "cards.csv", pairs)
    s = sim(cards={card: None for card, _ in pairs})
    run_dir = tmp_path / "run"
    assert run_cli("run", str(src), "--base-url", s.url, "--run-dir", str(run_dir), "--progress", "none",
                   "--rate", "unlimited").returncode == 0
    html = (run_dir / "report.html").read_text()
    assert ">1 invocation<" in html and "invocation(s)" not in html


# ---- 6 and 7. the library: one timestamp dtype, no -wal/-shm left behind -----------------------
def test_library_frames_share_one_utc_timestamp_dtype_and_leave_no_wal_files(tmp_path, sim):
    pd = pytest.importorskip("pandas")
    import capbatch

    pairs = make_cards(30)
    env = {"CAPILLARY_USERNAME": "demo", "CAPILLARY_PASSWORD": "demo"}
    s = sim(cards={card: None for card, _ in pairs[:25]})     # the last five cards do not exist
    frame = pd.DataFrame(pairs, columns=["cardNumber", "cardExternalId"])
    summary = capbatch.run_backfill(frame, base_url=s.url, rate="unlimited", reports_dir=tmp_path / "reports",
                                    progress="none", tripwire=False, env=env)
    assert summary["exit_code"] == 1
    run_dir = Path(summary["run_dir"])
    results, failures = capbatch.load_results(summary), capbatch.load_failures(summary)
    assert len(results) == 30 and len(failures) == 5
    wanted = pd.DatetimeTZDtype(unit="us", tz="UTC")
    assert results["capbatch_settled_at"].dtype == wanted
    assert failures["capbatch_settled_at"].dtype == wanted
    assert results["capbatch_settled_at"].notna().all()
    # a run with nothing failed: the empty frame has the same dtype
    ok = capbatch.run_backfill(frame.head(10), base_url=s.url, rate="unlimited", reports_dir=tmp_path / "reports",
                               progress="none", env=env)
    assert ok["exit_code"] == 0
    empty = capbatch.load_failures(ok)
    assert len(empty) == 0 and empty["capbatch_settled_at"].dtype == wanted
    assert capbatch.load_results(ok)["capbatch_settled_at"].dtype == wanted
    for folder in (run_dir, Path(ok["run_dir"])):
        left = sorted(p.name for p in folder.iterdir() if p.name.endswith(("-wal", "-shm")))
        assert left == [], left
