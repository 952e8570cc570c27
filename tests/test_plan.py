"""The plan: rows, requests, rate and time before the first request; in summary.json for a dry run
and beside the actual figures after a run; --deadline warns, --deadline-strict refuses (exit 2)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from capbatch.config import Rate
from capbatch.errors import PlanError
from capbatch.plan import PlanSettings, check_deadline, make_plan
from capbatch.progress import Pace, Progress
from capbatch.window import Schedule, WindowGate, schedule_for

from conftest import make_cards, write_csv


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


COUNTS = {"pending": 1_234_000, "in_flight": 567, "succeeded": 10, "rejected": 3}


def test_the_issues_example_one_request_per_row_plus_the_reads():
    plan = make_plan(COUNTS, 0, PlanSettings(rate=Rate(1000, 60)), Schedule(), at("2026-03-02T08:00"))
    assert plan.rows_to_send == 1_234_567
    assert plan.read_detail == {"reconcile": 0, "record_previous": 0, "audit": 0, "resume": 567, "generate_missing": 0,
                                "read_back": 0, "canary": 0}
    assert plan.requests_expected == 1_234_567 + 567
    assert plan.rate_per_second == pytest.approx(1000 / 60)
    assert plan.eta_seconds == pytest.approx(plan.requests_expected / (1000 / 60))
    assert plan.line() == "1,234,567 rows → ~1,240,000 requests at 1,000/min: about 20 h 35 min"


def test_reads_for_reconcile_generate_missing_and_the_canary_and_a_separate_read_rate():
    ps = PlanSettings(mode="reconcile", generate_missing=True, canary_reads=5, read_back=True, rate=Rate(100, 1.0),
                      read_rate=Rate(50, 1.0))
    plan = make_plan({"pending": 1000, "in_flight": 0}, 40, ps, Schedule(), 0.0)
    assert plan.read_detail == {"reconcile": 1000, "record_previous": 0, "audit": 0, "resume": 0,
                                "generate_missing": 40, "read_back": 1000, "canary": 5}
    assert plan.puts == 1000 and plan.requests_expected == 3045
    assert plan.send_seconds == pytest.approx(2045 / 50)          # the read quota is the slower one
    resend = make_plan({"pending": 10, "in_flight": 4}, 0, PlanSettings(resume_check="resend", rate=Rate(1, 1.0)),
                       Schedule(), 0.0)
    assert resend.requests_expected == 14 and resend.read_detail["resume"] == 0


def test_reads_for_the_audit_record_previous_and_the_rows_retry_failed_sends_again():
    counts = {"pending": 100, "in_flight": 4, "failed": 7, "rejected": 2, "unchanged": 900}
    audit = make_plan(counts, 0, PlanSettings(rate=Rate(10, 1.0)), Schedule(), 0.0, audit=25)
    assert (audit.rows_to_send, audit.puts, audit.reads) == (104, 104, 29)         # 25 audit + 4 resume reads
    assert audit.read_detail["audit"] == 25 and audit.line().startswith("104 rows → ~133 requests")
    retry = make_plan(counts, 0, PlanSettings(rate=Rate(10, 1.0), retry_failed=True, record_previous=True),
                      Schedule(), 0.0, audit=25)
    assert (retry.rows_to_send, retry.puts, retry.reads) == (111, 111, 111)        # one read before each PUT
    assert retry.read_detail["record_previous"] == 111 and retry.read_detail["audit"] == retry.read_detail["resume"] == 0


def test_the_eta_counts_only_window_time_and_the_deadline_is_judged_on_it():
    night = schedule_for(["22:00-06:00"], "UTC")
    ps = PlanSettings(rate=Rate(3600, 3600), deadline=at("2026-03-03T06:00"), deadline_text="06:00")
    plan = make_plan({"pending": 9 * 3600}, 0, ps, night, at("2026-03-02T20:00"))   # 9 h of sending
    assert plan.send_seconds == 9 * 3600
    assert plan.finishes_at == at("2026-03-03T23:00")             # 8 h tonight, 1 h tomorrow night
    assert plan.eta_seconds == 27 * 3600
    assert plan.deadline_met is False and plan.rows_by_deadline == 8 * 3600
    check_deadline(plan, strict=False)                            # a warning only
    with pytest.raises(PlanError) as exc:
        check_deadline(plan, strict=True)
    assert exc.value.exit_code == 2 and "cannot finish by the deadline 06:00" in str(exc.value)


def test_progress_eta_uses_the_pace_achieved_and_window_time_only():
    pace = Pace(horizon=60)
    for sending_seconds, settled in [(0, 0), (10, 100), (10, 100), (20, 200)]:   # 10 rows/s, a wait between
        pace.add(sending_seconds, settled)
    assert pace.per_second() == pytest.approx(10.0)

    class Frozen:
        def now(self) -> float:
            return at("2026-03-02T05:00")

    progress = Progress("none", window=WindowGate(schedule_for(["22:00-06:00"], "UTC"), Frozen()))
    progress.pace = pace
    # 72,000 rows at 10/s = 2 h of sending: 05:00-06:00 now, then 22:00-23:00 -> 18 h from now
    assert progress.eta_seconds(72_000) == pytest.approx(18 * 3600)
    assert progress.eta_seconds(36_000) == pytest.approx(3600)


def test_a_dry_run_writes_the_plan_to_summary_json(tmp_path, run_cli):
    src = write_csv(tmp_path / "cards.csv", make_cards(1200), extra_rows=[["", "X1"]])
    p = run_cli("run", src, "--dry-run", "--base-url", "https://api.example", "--rate", "600/min",
                "--run-dir", tmp_path / "run", "--window", "01:00-02:00", "--timezone", "UTC")
    assert p.returncode == 1, p.stderr                             # one row rejected
    # a real API gets the canary's 5 reads (its default off loopback)
    assert "plan: 1,200 rows → 1,205 requests at 600/min: about 2 min of sending" in p.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dry_run"] is True and not (tmp_path / "run" / "ledger.sqlite").exists()
    plan = summary["plan"]
    assert {k: plan[k] for k in ("rows_to_send", "requests_expected", "rate_per_second")} == {
        "rows_to_send": 1200, "requests_expected": 1205, "rate_per_second": 10.0}
    assert plan["read_detail"]["canary"] == 5
    assert plan["send_seconds"] == 120.5 and plan["eta_seconds"] >= 120.5   # plus any wait for 01:00 UTC
    assert plan["windows"] == "01:00-02:00 (UTC)"


def test_the_plan_counts_what_skip_confirmed_leaves_and_the_audits_reads(tmp_path, sim, run_cli):
    pairs, new = make_cards(20), make_cards(3, start=500)
    s = sim(cards={c: None for c, _ in pairs + new})
    src = write_csv(tmp_path / "export.csv", pairs)
    job = ("--base-url", s.url, "--rate", "100/s", "--job", "j", "--reports-dir", tmp_path / "r",
           "--quota-dir", tmp_path / "quota")
    assert run_cli("run", src, *job).returncode == 0
    more = write_csv(tmp_path / "export2.csv", pairs + new)             # 3 new pairs since
    dry = run_cli("run", more, *job, "--skip-confirmed", "--audit-fraction", "0.25", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "plan: 8 rows → ~13 requests at 100/s" in dry.stderr      # 3 new + 5 audited (+5 reads)
    p = run_cli("run", more, *job, "--skip-confirmed", "--audit-fraction", "0.25")
    assert p.returncode == 0, p.stderr
    assert "plan: 8 rows → ~13 requests at 100/s" in p.stderr
    assert s.stats()["requests"] == 20 + 3 + 5                        # 3 PUTs and the audit's 5 reads


def test_a_run_records_its_plan_beside_the_actual_figures(tmp_path, sim, run_cli):
    s = sim(auto_create=True)
    src = write_csv(tmp_path / "cards.csv", make_cards(30))
    p = run_cli("run", src, "--base-url", s.url, "--rate", "100/s", "--run-dir", tmp_path / "run",
                "--quota-dir", tmp_path / "quota", "--deadline", "8h")
    assert p.returncode == 0, p.stderr
    assert "plan: 30 rows → 30 requests at 100/s: under a second" in p.stderr
    assert "plan: finishes before the deadline 8h" in p.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["plan"]["rows_to_send"] == 30 and summary["plan"]["requests_expected"] == 30
    assert summary["actual"]["rows_settled"] == 30 and summary["actual"]["requests"] == s.stats()["requests"] == 30
    assert summary["actual"]["rate_per_second"] > 0
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Plan and actual" in html and "<td class=\"n\">30</td><td class=\"n\">30</td>" in html


def test_deadline_strict_refuses_to_start_and_sends_nothing(tmp_path, sim, run_cli):
    s = sim(auto_create=True)
    src = write_csv(tmp_path / "cards.csv", make_cards(100))
    p = run_cli("run", src, "--base-url", s.url, "--rate", "1/min", "--deadline", "1h", "--deadline-strict",
                "--run-dir", tmp_path / "run", "--quota-dir", tmp_path / "quota")
    assert p.returncode == 2
    assert "cannot finish by the deadline 1h" in p.stderr and "about 60 of 100 rows" in p.stderr
    assert s.stats()["requests"] == 0
