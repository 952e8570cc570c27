"""Findings of the code review, each through the real parts: the CLI in a subprocess, the simulator on
loopback, real SQLite files, a real PostgreSQL server."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

from conftest import cli_env, make_cards, write_csv
from test_resilience import fresh_cards
from test_workers import pg_fetch, worker_args


def _run_with_file_limit(args: list[str], cwd: Path, limit: int) -> subprocess.CompletedProcess[str]:
    """The CLI with every file it writes capped at ``limit`` bytes: past it a write fails (EFBIG) as it
    would on a full disk (Python ignores SIGXFSZ)."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "capbatch", *args], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, preexec_fn=cap, check=False)


# ---- 1: a database job's target is bound in the database ---------------------------------------------
def test_a_database_jobs_target_binding_is_seen_by_a_second_host(tmp_path, sim, run_cli, pg_url):
    pairs = make_cards(20)
    first, second = sim(cards=fresh_cards(pairs)), sim(cards=fresh_cards(pairs))
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"      # two hosts: no reports dir in common
    for host in (host_a, host_b):
        host.mkdir()
    src_a, src_b = write_csv(host_a / "cards.csv", pairs), write_csv(host_b / "cards.csv", pairs)
    p = run_cli(*worker_args(src_a, first.url, pg_url, "nightly", "--rate", "unlimited"), cwd=host_a)
    assert p.returncode == 0, p.stderr
    assert pg_fetch(pg_url, "SELECT job, target FROM capbatch.jobs") == [("nightly", first.url)]

    p = run_cli(*worker_args(src_b, second.url, pg_url, "nightly", "--rate", "unlimited"), cwd=host_b)
    assert p.returncode == 2, p.stderr
    assert f"job nightly writes to {first.url}, not {second.url}" in p.stderr
    assert second.stats()["requests"] == 0 and not any(second.card_ids().values())

    p = run_cli("forget", "--job", "nightly", "--ledger", pg_url, cwd=host_b)   # forgetting frees it, for every host
    assert p.returncode == 0, p.stderr
    assert pg_fetch(pg_url, "SELECT count(*) FROM capbatch.jobs") == [(0,)]


# ---- 2: a SQLite ledger's disk fills up mid-run ----------------------------------------------------
def test_a_full_disk_mid_run_stops_resumably_and_the_rerun_finishes(tmp_path, sim):
    pairs = make_cards(3000)
    src = write_csv(tmp_path / "cards.csv", pairs)
    s = sim(cards=fresh_cards(pairs))
    args = ["run", str(src), "--base-url", s.url, "--rate", "unlimited", "--progress", "none"]

    p = _run_with_file_limit(args, tmp_path, 2_000_000)   # the import fits; the run's commits do not
    sent = s.stats()["requests"]
    assert p.returncode == 3, p.stderr
    assert 0 < sent < len(pairs), "the disk should fill up mid-run"
    run_dir = next((tmp_path / "reports").glob("cards-*"))
    assert f"{Path('reports') / run_dir.name / 'ledger.sqlite'} could not be written" in p.stderr
    assert "free space on that disk" in p.stderr and "rerun the same command to resume" in p.stderr
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr

    p = subprocess.run([sys.executable, "-m", "capbatch", *args], cwd=tmp_path, env=cli_env(), capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert p.returncode == 0, p.stderr
    assert s.card_ids() == dict(pairs)
    assert max(s.stats()["puts_per_card"].values()) == 1   # rows in flight were read back, not sent twice
    assert json.loads((run_dir / "summary.json").read_text())["counts"]["pending"] == 0


# ---- 4: the canary's claimed rows that it never sent go back --------------------------------------
def test_rows_the_canary_claimed_but_never_sent_are_released(tmp_path, sim, run_cli, pg_url):
    pairs = make_cards(30)
    src = write_csv(tmp_path / "cards.csv", pairs)
    s = sim(cards=fresh_cards(pairs), p_noop=1.0)         # every PUT answered 200, none applied
    p = run_cli(*worker_args(src, s.url, pg_url, "canary", "--canary", "5"))
    assert p.returncode == 3, p.stderr
    assert "canary stopped the run" in p.stderr
    assert s.stats()["puts_per_card"] == {pairs[0][0]: 1}    # it stopped at its first row
    rows = dict(pg_fetch(pg_url, "SELECT state, count(*) FROM capbatch.rows GROUP BY state"))
    assert rows == {"failed": 1, "pending": 29}, rows      # none left in flight under a dead lease
    assert pg_fetch(pg_url, "SELECT count(*) FROM capbatch.rows WHERE owner IS NOT NULL") == [(0,)]


# ---- 5: --window-exit outside the windows: announced, and a Summary for code ----------------------
def _closed_window() -> str:
    from datetime import datetime

    hour = (datetime.now().hour + 2) % 24
    return f"{hour:02d}:00-{hour:02d}:30"


def test_window_exit_outside_the_windows_is_announced_and_returns_a_summary(tmp_path, sim, run_cli):
    import capbatch

    s = sim(auto_create=True)
    src = write_csv(tmp_path / "cards.csv", make_cards(5))
    metrics_file = tmp_path / "capbatch.prom"
    p = run_cli("run", src, "--base-url", s.url, "--window", _closed_window(), "--window-exit", "-q",
                "--quota-dir", tmp_path / "quota", "--job", "nightly", "--metrics-file", metrics_file, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "outside the sending windows" in p.stderr and "--window-exit, nothing sent" in p.stderr   # even with -q
    prom = metrics_file.read_text()
    assert 'capbatch_exit_code{input="cards.csv",job="nightly"} 0.0' in prom, prom
    assert s.stats()["requests"] == 0

    summary = capbatch.run_backfill(src, base_url=s.url, windows=[_closed_window()], window_exit=True,
                                    quota_dir="none", env={"CAPILLARY_USERNAME": "demo", "CAPILLARY_PASSWORD": "demo"},
                                    reports_dir=tmp_path / "lib")
    assert isinstance(summary, capbatch.Summary)
    assert summary.exit_code == 0 and summary.ok and summary["stop"] == "outside window"
    assert summary.counts == {} and summary.run_dir is None and summary["next_window_opens_at"]
    assert s.stats()["requests"] == 0


# ---- 6: the simulator command's errors are usage errors ------------------------------------------
def test_simulate_refuses_a_bad_port_a_busy_port_and_a_bad_option_with_exit_2(tmp_path, run_cli):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = run_cli("simulate", "--port", str(port), timeout=30)
    assert p.returncode == 2, p.stderr
    assert f"the simulator cannot listen on 127.0.0.1:{port}" in p.stderr and "choose another --port" in p.stderr

    p = run_cli("simulate", "--p-500", "2", timeout=30)
    assert p.returncode == 2 and "--p-500 must be between 0 and 1, not 2.0" in p.stderr, p.stderr

    p = run_cli("simulate", "--port", "99999", timeout=30)
    assert p.returncode == 2 and "--port" in p.stderr, p.stderr

    binary = tmp_path / "cards.csv"
    binary.write_bytes(b"\xff\xfe\x00not text")
    p = run_cli("simulate", "--cards", str(binary), "--port", "0", timeout=30)
    assert p.returncode == 2 and f"--cards {binary} cannot be read" in p.stderr, p.stderr
    assert "internal error" not in p.stderr


# ---- 7: status and report --ledger find the run directory the run used ---------------------------
def test_status_and_report_with_the_ledger_alone_use_the_runs_own_directory(tmp_path, sim, run_cli, pg_url):
    pairs = make_cards(12)
    src = write_csv(tmp_path / "cards.csv", pairs)
    s = sim(cards=fresh_cards(pairs))
    run_dir = tmp_path / "elsewhere" / "tonight"
    p = run_cli(*worker_args(src, s.url, pg_url, "nightly", "--rate", "unlimited", "--run-dir", str(run_dir)))
    assert p.returncode == 0, p.stderr
    (run_dir / "results.csv").unlink()

    other_host = tmp_path / "other-host"            # another working directory: no reports dir of its own
    other_host.mkdir()
    st = run_cli("status", "--ledger", pg_url, "--job", "nightly", "--json", cwd=other_host)
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["run_dir"] == str(run_dir.resolve())
    rp = run_cli("report", "--ledger", pg_url, "--job", "nightly", cwd=other_host)
    assert rp.returncode == 0, rp.stderr
    assert f"reports rebuilt in {run_dir.resolve()}" in rp.stdout
    assert len((run_dir / "results.csv").read_text().splitlines()) == 1 + len(pairs)
    assert not (other_host / "reports").exists()

    alone = run_cli("status", "--ledger", pg_url, "--json", cwd=other_host)   # the database's only job
    assert alone.returncode == 0 and json.loads(alone.stdout)["run_dir"] == str(run_dir.resolve()), alone.stderr
    p = run_cli(*worker_args(src, s.url, pg_url, "weekly", "--rate", "unlimited", "--run-dir", str(tmp_path / "w")))
    assert p.returncode == 0, p.stderr
    two = run_cli("status", "--ledger", pg_url, cwd=other_host)
    assert two.returncode == 2 and "it holds the jobs nightly, weekly" in two.stderr and "--job NAME" in two.stderr


# ---- 8: the crash log keeps no secrets of the command line ---------------------------------------
def test_the_crash_log_keeps_no_secret_of_the_command_line(monkeypatch):
    from capbatch import cli

    argv = ["run", "in.csv", "--ledger", "postgresql://ops:hunter2@db:5432/capbatch?sslpassword=s3",
            "--notify-url=https://hooks.slack.com/services/T000/B000/XXXXSECRET",
            "--pushgateway", "https://push:pgw-pass@push.example.com:9091", "--client-secret", "cs-value",
            "--auth", "basic", "--base-url", "https://api.example.com", "--rate", "10/s"]
    monkeypatch.setattr(sys, "argv", ["capbatch", *argv])
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        where = cli._crash_log()
    assert where is not None
    text = Path(where).read_text()
    Path(where).unlink()
    for secret in ("hunter2", "sslpassword=s3", "ops:", "XXXXSECRET", "T000", "pgw-pass", "cs-value", "basic"):
        assert secret not in text, secret
    assert "postgresql://***@db:5432/capbatch?***" in text and "--notify-url=https://hooks.slack.com/***" in text
    assert "'https://api.example.com'" in text and "'10/s'" in text and "RuntimeError: a bug" in text


# ---- 3: revert shares the run's options and sends the run's extra fields -------------------------
def test_revert_sends_the_runs_extra_fields_and_takes_the_runs_options(tmp_path, sim, run_cli):
    pairs = make_cards(5)
    old = {c: f"OLD{i}" for i, (c, _) in enumerate(pairs)}
    s = sim(cards=dict(old), required_fields=["statusLabel"])   # an org whose updates need statusLabel
    src = write_csv(tmp_path / "cards.csv", pairs)
    run_dir = tmp_path / "run"
    p = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", run_dir, "--record-previous",
                "--extra-field", "statusLabel=Active")
    assert p.returncode == 0, p.stderr
    assert s.card_ids() == dict(pairs)
    s.reset_stats()
    p = run_cli("revert", run_dir, "--rate", "unlimited", "--outage-budget", "5", "--progress", "none", "-q")
    assert p.returncode == 0, p.stderr
    assert s.card_ids() == old
    assert s.stats()["put_extra_fields"] == {"statusLabel": {'"Active"': len(pairs)}}   # (as JSON)
    assert "reverting with the run's extra fields" not in p.stderr        # -q: quiet, as on run


def test_run_and_revert_share_one_definition_of_their_common_options():
    from capbatch import cli

    def options(command):
        return {p.name: p.to_info_dict() for p in command.params
                if isinstance(p, __import__("click").Option)}

    run, revert = options(cli.run_cmd), options(cli.revert_cmd)
    common = set(run) & set(revert) - {"dry_run", "retry_failed", "json_out"}   # these say what they do per command
    assert {"cluster", "base_url", "rate", "read_rate", "concurrency", "max_attempts", "timeout", "outage_budget",
            "grace_period", "allow_http", "no_verify_tls", "auth", "progress", "progress_interval", "config_file",
            "quiet", "verbose"} <= common
    assert {name: run[name] for name in common} == {name: revert[name] for name in common}


# ---- 9: structure and wording --------------------------------------------------------------------
PACKAGE = Path(__file__).resolve().parent.parent / "capbatch"


def test_exit_codes_are_defined_once_and_the_stop_errors_are_public():
    import re

    import capbatch
    from capbatch import exitcodes, report

    defined = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if re.search(r"^\s*(EXIT_\w+|exit_code)\s*=\s*\d", p.read_text(), re.M)}
    assert defined == {"exitcodes.py"}
    assert report.EXIT_ABORTED is exitcodes.EXIT_ABORTED == capbatch.Paused.exit_code == capbatch.LedgerLost.exit_code
    assert {"Paused", "LedgerLost", "PlanError"} <= set(capbatch.__all__)
    assert capbatch.PlanError.exit_code == exitcodes.EXIT_USAGE


def test_job_memory_sql_lives_behind_the_ledger_interface():
    from capbatch.ledger import JobStore, Ledger
    from capbatch.ledger.base import Ledger as Base

    jobs_source = (PACKAGE / "jobs.py").read_text()
    assert not any(word in jobs_source for word in ("sqlite3", "SELECT ", "INSERT ", "UPDATE ", "DELETE "))
    assert "import_expecting" in vars(Base) and Ledger is Base
    assert {"bind_target", "settle_confirmed", "remember", "forget", "forget_pairs", "describe",
            "history"} <= JobStore.__abstractmethods__


def test_one_canary_row_is_one_row_and_notes_quote_values_not_words(tmp_path, sim, run_cli):
    from conftest import read_csv

    pairs = make_cards(4)
    s = sim(cards={c: f"OLD{i}" for i, (c, _) in enumerate(pairs)})
    src = write_csv(tmp_path / "cards.csv", pairs)
    run_dir = tmp_path / "run"
    p = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", run_dir, "--record-previous",
                "--canary", "1")
    assert p.returncode == 0, p.stderr
    assert "canary: sending 1 row spread across the file" in p.stderr
    s.update(cards={pairs[0][0]: None})                  # someone cleared this card since
    p = run_cli("revert", run_dir, "--rate", "unlimited")
    assert p.returncode == 1, p.stderr
    failure = read_csv(run_dir / "revert" / "failures.csv")[0]
    assert failure["capbatch_reason"] == (f"the card now holds no external ID, not {pairs[0][1]!r}: changed by "
                                          "someone else since; left alone")
    assert "1 card changed since the run" in p.stderr
