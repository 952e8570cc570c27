"""Memory across runs: a job's state store, beside the run directories.

A job name (``--job NAME``) ties nightly runs together. The store keeps, per card, the last external
ID a run confirmed (set it, or found it already set) and when; with ``--skip-confirmed`` those pairs
are settled without any API call. It also keeps one line per run for ``capbatch history``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from .errors import LedgerError, UsageError
from .ledger import Ledger

STORE_FILE = "jobs.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS confirmed (
    job TEXT NOT NULL,
    card TEXT NOT NULL,
    external_id TEXT NOT NULL,
    confirmed_at REAL NOT NULL,
    run_dir TEXT,
    PRIMARY KEY (job, card)
);
CREATE TABLE IF NOT EXISTS job_runs (
    id INTEGER PRIMARY KEY,
    job TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    input_name TEXT,
    started_at REAL,
    ended_at REAL,
    exit_code INTEGER,
    counts TEXT,
    requests INTEGER
);
CREATE INDEX IF NOT EXISTS job_runs_by_job ON job_runs(job, id);
"""


def check_name(job: str) -> str:
    if not job or len(job) > 100 or any(c in job for c in "/\\\0"):
        raise UsageError(f"--job {job!r} is not a usable job name", "use letters, digits, '-' or '_', e.g. --job nightly-eu")
    return job


def store_path(reports_dir: Path) -> Path:
    return reports_dir / STORE_FILE


def _connect(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
    except (sqlite3.Error, OSError) as exc:
        raise LedgerError(f"cannot open the job store {path}: {exc}",
                          "make the reports directory writable or pass --reports-dir") from exc
    return conn


def skip_confirmed(ledger: Ledger, store: Path, job: str) -> int:
    """Settle pending rows whose exact pair an earlier run of ``job`` confirmed. Returns how many."""
    if ledger.keeps_job_memory:   # a database ledger holds the job's memory itself
        return ledger.settle_confirmed_from(store, job, time.time())
    if not store.exists():
        return 0
    _connect(store).close()
    return ledger.settle_confirmed_from(store, job, time.time())


def remember(ledger: Ledger, store: Path, job: str, run_dir: Path, summary: dict[str, Any],
             started_at: float) -> None:
    """Record the pairs this run confirmed, and the run itself, in the job store."""
    if ledger.keeps_job_memory:
        return ledger.remember_job_run(job, run_dir, summary, started_at)
    conn = _connect(store)
    try:
        conn.execute("BEGIN IMMEDIATE")
        batch: list[tuple[Any, ...]] = []
        for card, ext, settled in ledger.confirmed_pairs():
            batch.append((job, card, ext, settled or time.time(), str(run_dir)))
            if len(batch) >= 10000:
                _upsert(conn, batch)
                batch.clear()
        _upsert(conn, batch)
        conn.execute(
            "INSERT INTO job_runs(job, run_dir, input_name, started_at, ended_at, exit_code, counts, requests) "
            "VALUES (?,?,?,?,?,?,?,?)",
            (job, str(run_dir), ledger.get_meta("input_name"), started_at, time.time(), summary.get("exit_code"),
             json.dumps(summary.get("counts", {})), (summary.get("this_invocation") or {}).get("requests", 0)))
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise LedgerError(f"could not update the job store {store}: {exc}", "rerun the same command") from exc
    finally:
        conn.close()


def _upsert(conn: sqlite3.Connection, batch: list[tuple[Any, ...]]) -> None:
    conn.executemany(
        "INSERT INTO confirmed(job, card, external_id, confirmed_at, run_dir) VALUES (?,?,?,?,?) "
        "ON CONFLICT(job, card) DO UPDATE SET external_id=excluded.external_id, "
        "confirmed_at=excluded.confirmed_at, run_dir=excluded.run_dir", batch)


def history(store: Path, job: str) -> list[dict[str, Any]]:
    if not store.exists():
        return []
    conn = _connect(store)
    try:
        cur = conn.execute("SELECT id, run_dir, input_name, started_at, ended_at, exit_code, counts, requests "
                           "FROM job_runs WHERE job=? ORDER BY id", (job,))
        cols = [d[0] for d in cur.description]
        out = []
        for row in cur:
            item = dict(zip(cols, row))
            item["counts"] = json.loads(item["counts"] or "{}")
            out.append(item)
        return out
    finally:
        conn.close()
