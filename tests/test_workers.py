"""The PostgreSQL ledger end to end: the real CLI in subprocesses, a real PostgreSQL server, the simulator.

One worker killed and resumed; the database down at start (exit 2) and lost mid-run (exit 3,
resumable); several workers on one job sharing the rows and one quota.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import cli_env, make_cards, popen_cli, write_csv
from test_resilience import finish, fresh_cards, wait_until


def pg_counts(url: str, job: str) -> dict[str, int]:
    """State -> rows of the job's latest run ({} before the import)."""
    import psycopg

    try:
        with psycopg.connect(url, autocommit=True) as conn:
            return dict(conn.execute(
                "SELECT state, count(*) FROM capbatch.rows WHERE run_id = (SELECT max(id) FROM capbatch.runs "
                "WHERE job=%s) AND EXISTS (SELECT 1 FROM capbatch.meta m WHERE m.run_id=rows.run_id "
                "AND m.key='imported_at') GROUP BY state", (job,)).fetchall())
    except psycopg.Error:
        return {}


def pg_fetch(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def worker_args(src: Path, sim_url: str, pg_url: str, job: str, *extra: str) -> list[str]:
    return ["run", str(src), "--base-url", sim_url, "--ledger", pg_url, "--job", job, "--progress", "none",
            "--grace-period", "2", *extra]


def assert_every_card_holds_its_id(url: str, job: str, sim: Any, pairs: list[tuple[str, str]]) -> None:
    assert pg_counts(url, job) == {"succeeded": len(pairs)}
    assert sim.card_ids() == dict(pairs)


def test_a_killed_worker_resumes_from_the_database(tmp_path, sim, run_cli, pg_url):
    n = 400
    pairs = make_cards(n)
    src = write_csv(tmp_path / "cards.csv", pairs)
    s = sim(cards=fresh_cards(pairs), latency=0.005)
    args = worker_args(src, s.url, pg_url, "nightly", "--rate", "unlimited", "--concurrency", "16")

    proc = popen_cli(*args, cwd=tmp_path)
    reached = wait_until(lambda: pg_counts(pg_url, "nightly").get("succeeded", 0) >= 100, proc, step=0.005)
    assert reached and proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    c = pg_counts(pg_url, "nightly")
    assert sum(c.values()) == n and 0 < c.get("in_flight", 0) <= 3 * 16, c

    p = run_cli(*args, timeout=60)
    assert p.returncode == 0, p.stderr
    assert_every_card_holds_its_id(pg_url, "nightly", s, pairs)
    assert max(s.stats()["puts_per_card"].values()) <= 2
    runs = pg_fetch(pg_url, "SELECT ended_at IS NULL, exit_code FROM capbatch.invocations ORDER BY id")
    assert runs == [(True, None), (False, 0)]
    # the reports went to the run directory, as with a SQLite ledger
    run_dirs = list((tmp_path / "reports" / "nightly").glob("cards-*"))
    assert len(run_dirs) == 1 and (run_dirs[0] / "results.csv").exists()
    assert not (run_dirs[0] / "ledger.sqlite").exists()


def test_database_down_at_start_is_exit_2_naming_the_url_without_its_password(tmp_path, sim, run_cli):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pairs = make_cards(5)
    src = write_csv(tmp_path / "cards.csv", pairs)
    s = sim(cards=fresh_cards(pairs))
    url = f"postgresql://capbatch@127.0.0.1:{port}/ledger"
    p = run_cli(*worker_args(src, s.url, url, "j"), env=cli_env(PGPASSWORD="s3cret-pw"))
    assert p.returncode == 2, p.stderr
    assert f"cannot connect to the ledger database {url}" in p.stderr and "s3cret" not in p.stderr + p.stdout
    assert "Traceback" not in p.stderr and s.stats()["requests"] == 0
    # a password in the URL is refused before anything is tried, and never echoed
    p = run_cli(*worker_args(src, s.url, f"postgresql://capbatch:hunter2@127.0.0.1:{port}/ledger", "j"))
    assert p.returncode == 2 and "hunter2" not in p.stderr and "PGPASSWORD" in p.stderr
    # the job name is required with a database ledger
    p = run_cli("run", str(src), "--base-url", s.url, "--ledger", url)
    assert p.returncode == 2 and "--job" in p.stderr


def test_database_lost_mid_run_stops_sending_exit_3_and_resumes(tmp_path, sim, run_cli, pg_url):
    n = 300
    pairs = make_cards(n)
    src = write_csv(tmp_path / "cards.csv", pairs)
    s = sim(cards=fresh_cards(pairs))
    args = worker_args(src, s.url, pg_url, "j", "--rate", "200/s", "--concurrency", "4")
    proc = popen_cli(*args, cwd=tmp_path)
    assert wait_until(lambda: pg_counts(pg_url, "j").get("succeeded", 0) >= 60, proc, step=0.01)
    pg_fetch(pg_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name='capbatch'")
    lost_at = time.monotonic()
    out = finish(proc, timeout=30)
    assert proc.returncode == 3, out
    assert "lost the connection to the ledger database" in out and "rerun the same command" in out
    assert "Traceback" not in out
    sent_by_then = s.stats()["requests"]
    assert time.monotonic() - lost_at < 10
    time.sleep(0.3)
    assert s.stats()["requests"] == sent_by_then     # nothing more went out
    assert sent_by_then < n                          # it stopped well before the end

    p = run_cli(*args, timeout=60)
    assert p.returncode == 0, p.stderr
    assert_every_card_holds_its_id(pg_url, "j", s, pairs)
    assert max(s.stats()["puts_per_card"].values()) <= 2


# ---- several workers, one job ------------------------------------------------------------------------
def _settled_rate(url: str, job: str) -> tuple[float, float]:
    """(requests, rows) per second between the first and the last row settled by the API.

    Requests are those the ledger recorded for the rows (a row's PUT, and its read when it was
    unknown); requests a killed worker sent but never recorded are left out, so this undercounts."""
    rows = pg_fetch(url, "SELECT settled_at, attempts FROM capbatch.rows WHERE state='succeeded' "
                         "AND run_id=(SELECT max(id) FROM capbatch.runs WHERE job=%s) ORDER BY settled_at", job)
    span = rows[-1][0] - rows[0][0]
    return (sum(a for _, a in rows[1:])) / span, (len(rows) - 1) / span


# 12-15 s of three processes at exactly R over 1 s windows: in the slow run (python -m pytest -m slow).
# A send that leaves late moves the shared grid (no 429), but on a 2-core host at load 4-5 those moves
# cost more than the 10 % the test allows (measured 0.75-0.91 of the quota there, 0.95-0.99 at load < 2.5).
@pytest.mark.slow
def test_three_workers_one_killed_and_restarted_share_the_job_and_the_quota(tmp_path, sim, pg_url):
    quota = 30                         # the simulator's strict quota: 30 requests in any 1 s
    n = 210                            # about 7 s of work at the quota
    pairs = make_cards(n)
    src = write_csv(tmp_path / "cards.csv", pairs)
    s = sim(cards=fresh_cards(pairs), rate_per_second=quota, rate_window="sliding", latency=0.01)
    args = worker_args(src, s.url, pg_url, "shared", "--rate", f"{quota}/s", "--concurrency", "4")
    hosts = [tmp_path / f"host{i}" for i in range(3)]   # each worker in a directory of its own
    for h in hosts:
        h.mkdir()
    procs = [popen_cli(*args, cwd=h) for h in hosts]
    assert wait_until(lambda: pg_counts(pg_url, "shared").get("succeeded", 0) >= 70, procs[1], step=0.01)
    assert procs[1].poll() is None, "the worker ended before it could be killed"
    procs[1].send_signal(signal.SIGKILL)
    finish(procs[1])
    killed_with = pg_counts(pg_url, "shared").get("in_flight", 0)
    procs[1] = popen_cli(*args, cwd=hosts[1])
    outs = [finish(p, timeout=90) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs

    assert_every_card_holds_its_id(pg_url, "shared", s, pairs)
    st = s.stats()
    assert max(st["puts_per_card"].values()) <= 2
    assert st["by_status"].get("429", 0) == 0 and st["rate_limited"] == 0, st["by_status"]
    rate, rows_rate = _settled_rate(pg_url, "shared")
    workers = pg_fetch(pg_url, "SELECT host, pid, exit_code, requests FROM capbatch.invocations ORDER BY id")
    print(f"\n3 workers (one killed with {killed_with} rows in flight job-wide, restarted): {rate:.1f} requests/s "
          f"= {rate / quota:.2f} of the {quota}/s quota ({rows_rate:.1f} rows/s); peak {st['peak_per_second']}/s; "
          f"{st['requests']} requests for {n} rows; invocations {workers}")
    assert len(workers) == 4 and sorted(w[2] is None for w in workers) == [False, False, False, True]
    assert sum(w[3] for w in workers if w[3]) > 0
    assert rate >= 0.9 * quota, rate


# ---- status, report, history, verify and job memory through the database ------------------------------
def test_status_report_history_verify_and_job_memory_read_the_database(tmp_path, sim, run_cli, pg_url):
    import json

    pairs = make_cards(60)
    monday = write_csv(tmp_path / "monday.csv", pairs[:40])
    tuesday = write_csv(tmp_path / "tuesday.csv", pairs)          # 40 known pairs + 20 new ones
    s = sim(cards=fresh_cards(pairs))
    p = run_cli(*worker_args(monday, s.url, pg_url, "cards", "--rate", "unlimited"))
    assert p.returncode == 0, p.stderr
    s.reset_stats()
    p = run_cli(*worker_args(tuesday, s.url, pg_url, "cards", "--rate", "unlimited", "--skip-confirmed"))
    assert p.returncode == 0, p.stderr
    assert s.stats()["puts_per_card"] == {card: 1 for card, _ in pairs[40:]}   # the known 40 were not sent
    assert s.card_ids() == dict(pairs)

    env = cli_env(CAPBATCH_LEDGER=pg_url)                      # the URL may come from the environment
    st = run_cli("status", "--job", "cards", "--json", env=env)
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["input"] == "tuesday.csv" and status["counts"]["unchanged"] == 40
    assert status["counts"]["succeeded"] == 20 and len(status["invocations"]) == 1

    out_dir = tmp_path / "rebuilt"
    rp = run_cli("report", str(out_dir), "--ledger", pg_url, "--job", "cards")
    assert rp.returncode == 0, rp.stderr
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["counts"]["unchanged"] == 40 and summary["input"]["name"] == "tuesday.csv"
    notes = {r["capbatch_message"] for r in __import__("conftest").read_csv(out_dir / "results.csv")[:40]}
    # each pair keeps the time it was confirmed (the first run's rows may settle across a second's edge)
    assert notes and all(n.startswith("confirmed by an earlier run of job cards on ") for n in notes), notes

    hist = run_cli("history", "--job", "cards", "--json", env=env)
    assert hist.returncode == 0, hist.stderr
    runs = json.loads(hist.stdout)
    assert [r["input_name"] for r in runs] == ["monday.csv", "tuesday.csv"]
    assert [r["requests"] for r in runs] == [40, 20] and runs[1]["counts"]["unchanged"] == 40

    s.update(cards={pairs[0][0]: "CHANGED-ELSEWHERE"})
    vp = run_cli("verify", "--ledger", pg_url, "--job", "cards", "--base-url", s.url, "--json",
                 env=cli_env(CAPBATCH_RATE="unlimited"))
    assert vp.returncode == 1, vp.stderr
    assert json.loads(vp.stdout)["counts"] == {"match": 59, "differs": 1, "missing": 0, "error": 0}

    # a different input while the job's run is unfinished is refused: no silent second run
    pg_fetch(pg_url, "UPDATE capbatch.rows SET state='pending' WHERE id=1 AND run_id=(SELECT max(id) FROM capbatch.runs)")
    p = run_cli(*worker_args(monday, s.url, pg_url, "cards"))
    assert p.returncode == 2 and "unfinished run for different input content" in p.stderr
