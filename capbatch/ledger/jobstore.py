"""The job store of run-directory jobs: ``<reports-dir>/jobs.sqlite``, beside the run directories.

One file for every job under a reports directory: per job the API target it writes to, per card the
last external ID the API confirmed and when, and one line per run (``capbatch history``). A database
job keeps the same in the database (capbatch/ledger/postgres.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from ..errors import LedgerError
from .base import JobStore, Ledger, target_mismatch

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
CREATE INDEX IF NOT EXISTS confirmed_by_age ON confirmed(job, confirmed_at);
CREATE TABLE IF NOT EXISTS jobs (
    job TEXT PRIMARY KEY,
    target TEXT NOT NULL,              -- the API base URL the confirmed pairs are true of
    created_at REAL NOT NULL
);
"""


class SqliteJobStore(JobStore):
    """``jobs.sqlite`` at ``path``; created on the first write, never by a read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise LedgerError(f"cannot open the job store {self.path}: {exc}",
                              "make the reports directory writable or pass --reports-dir") from exc
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise LedgerError(f"could not update the job store {self.path}: {exc}", "rerun the same command") from exc
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            yield conn
        except sqlite3.Error as exc:
            raise LedgerError(f"could not read the job store {self.path}: {exc}",
                              "rerun; if it persists, move the file aside") from exc
        finally:
            conn.close()

    # ---- the job's target ----------------------------------------------------------------------
    def bind_target(self, job: str, target: str) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT INTO jobs(job, target, created_at) VALUES (?,?,?) ON CONFLICT(job) DO NOTHING",
                         (job, target, time.time()))
            bound = conn.execute("SELECT target FROM jobs WHERE job=?", (job,)).fetchone()[0]
        if bound != target:
            raise target_mismatch(job, bound, target)

    # ---- confirmed pairs -----------------------------------------------------------------------
    def settle_confirmed(self, ledger: Ledger, job: str, audit_fraction: float | None = None) -> tuple[int, int]:
        """The store is attached to the run's own SQLite connection: one statement settles the rows."""
        if not self.path.exists():
            return 0, 0
        self._connect().close()    # an older store gets the tables it may lack
        conn: sqlite3.Connection = getattr(ledger, "conn", None)  # type: ignore[assignment]
        if not isinstance(conn, sqlite3.Connection):
            raise LedgerError(f"the job store {self.path} serves run-directory ledgers, not {ledger.location}",
                              "a database job keeps its memory in the database")
        match = ("FROM rows r JOIN jobstore.confirmed c ON c.job=? AND c.card=r.card AND c.external_id=r.external_id "
                 "WHERE r.state='pending' AND r.audit=0 AND r.external_id <> ''")
        try:
            conn.execute("ATTACH DATABASE ? AS jobstore", (str(self.path),))
            try:
                conn.execute("BEGIN IMMEDIATE")
                picked = conn.execute("SELECT value FROM meta WHERE key='audit_picked'").fetchone()
                audited = int(picked[0]) if picked else 0
                if audit_fraction and not picked:
                    matched = conn.execute(f"SELECT count(*) {match}", (job,)).fetchone()[0]
                    audited = conn.execute(
                        f"UPDATE rows SET audit=1 WHERE id IN (SELECT r.id {match} "
                        "ORDER BY c.confirmed_at, r.card LIMIT ?)",
                        (job, math.ceil(matched * audit_fraction))).rowcount
                    conn.execute("INSERT INTO meta(key, value) VALUES ('audit_picked', ?)", (str(audited),))
                cur = conn.execute(
                    "UPDATE rows SET state='unchanged', settled_at=?, "
                    "note='confirmed by an earlier run of job ' || ? || ' on ' || "
                    "(SELECT datetime(c.confirmed_at, 'unixepoch') FROM jobstore.confirmed c "
                    " WHERE c.job=? AND c.card=rows.card) || ' UTC; not sent (--skip-confirmed)' "
                    "WHERE state='pending' AND audit=0 AND external_id <> '' AND EXISTS "
                    "(SELECT 1 FROM jobstore.confirmed c "
                    "WHERE c.job=? AND c.card=rows.card AND c.external_id=rows.external_id)",
                    (time.time(), job, job, job))
                conn.execute("COMMIT")
                return cur.rowcount, audited
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                conn.execute("DETACH DATABASE jobstore")
        except sqlite3.Error as exc:
            raise LedgerError(f"could not read the job store {self.path}: {exc}",
                              "rerun; if it persists, move the file aside") from exc

    def remember(self, ledger: Ledger, job: str, run_dir: Path, summary: Mapping[str, Any],
                 started_at: float) -> None:
        with self._transaction() as conn:
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

    def forget(self, job: str, cards: Iterable[str] = ()) -> int:
        if not self.path.exists():
            return 0
        wanted = list(cards)
        with self._transaction() as conn:
            if wanted:
                return sum(conn.execute("DELETE FROM confirmed WHERE job=? AND card=?", (job, card)).rowcount
                           for card in wanted)
            conn.execute("DELETE FROM jobs WHERE job=?", (job,))
            return conn.execute("DELETE FROM confirmed WHERE job=?", (job,)).rowcount

    def forget_pairs(self, job: str, pairs: Iterable[tuple[str, str]]) -> int:
        if not self.path.exists():
            return 0
        with self._transaction() as conn:
            return sum(conn.execute("DELETE FROM confirmed WHERE job=? AND card=? AND external_id=?",
                                    (job, card, ext)).rowcount for card, ext in pairs)

    # ---- reading -------------------------------------------------------------------------------
    def describe(self, job: str) -> dict[str, Any]:
        out: dict[str, Any] = {"job": job, "target": None, "confirmed_pairs": 0, "oldest_check": None,
                               "newest_check": None}
        if not self.path.exists():
            return out
        with self._reading() as conn:
            target = conn.execute("SELECT target FROM jobs WHERE job=?", (job,)).fetchone()
            n, oldest, newest = conn.execute(
                "SELECT count(*), min(confirmed_at), max(confirmed_at) FROM confirmed WHERE job=?", (job,)).fetchone()
        out.update(target=target[0] if target else None, confirmed_pairs=n, oldest_check=oldest, newest_check=newest)
        return out

    def history(self, job: str) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self._reading() as conn:
            cur = conn.execute("SELECT id, run_dir, input_name, started_at, ended_at, exit_code, counts, requests "
                               "FROM job_runs WHERE job=? ORDER BY id", (job,))
            cols = [d[0] for d in cur.description]
            return [{**dict(zip(cols, row)), "counts": json.loads(row[6] or "{}")} for row in cur]


def _upsert(conn: sqlite3.Connection, batch: list[tuple[Any, ...]]) -> None:
    conn.executemany(
        "INSERT INTO confirmed(job, card, external_id, confirmed_at, run_dir) VALUES (?,?,?,?,?) "
        "ON CONFLICT(job, card) DO UPDATE SET external_id=excluded.external_id, "
        "confirmed_at=excluded.confirmed_at, run_dir=excluded.run_dir", batch)
