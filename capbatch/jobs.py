"""Memory across runs: a job's state store, beside the run directories.

A job name (``--job NAME``) ties nightly runs together. The store keeps, per card, the last external
ID the API confirmed for it (a run set it, or read it back) and when; with ``--skip-confirmed`` those
pairs are settled without any API call, except a rotating slice re-read each run (``--audit-fraction``,
longest-unchecked first) so drift made by another system is found. It also keeps the target the job
writes to (a job's memory is only true of one API) and one line per run for ``capbatch history``.
Each job's run directories go under ``<reports-dir>/<job>/``; a lock there keeps two runs of one job
from overlapping.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import LedgerError, UsageError
from .ledger import Ledger, _take_lock

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


@contextlib.contextmanager
def _transaction(store: Path) -> Iterator[sqlite3.Connection]:
    conn = _connect(store)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise LedgerError(f"could not update the job store {store}: {exc}", "rerun the same command") from exc
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


def job_dir(reports_dir: Path, job: str) -> Path:
    """Where a job's run directories go by default."""
    return reports_dir / job


def run_dir_for(reports_dir: Path, job: str, input_name: str, sha256: str, latest: bool = False) -> Path:
    """The run directory of a job's run on this input: the latest one for the same content while it
    is unfinished (a rerun resumes it), else a new one, so an export that did not change since last
    night still gets its nightly run (unconfirmed rows sent again, the audit's next slice).
    ``latest`` returns the latest run even if finished (``--retry-failed``)."""
    stem = f"{input_name}-{sha256[:12]}"
    folder = job_dir(reports_dir, job)
    numbers = [1 if d.name == stem else int(d.name[len(stem) + 1:])
               for d in (folder.iterdir() if folder.is_dir() else ())
               if d.name == stem or (d.name.startswith(stem + "-") and d.name[len(stem) + 1:].isdigit())]
    if not numbers:
        return folder / stem
    n = max(numbers)
    current = folder / (stem if n == 1 else f"{stem}-{n}")
    return current if latest or not _finished(current) else folder / f"{stem}-{n + 1}"


def _finished(run_dir: Path) -> bool:
    """Nothing left to resume: every row settled, or the run was reverted."""
    try:
        ledger = Ledger.open_readonly(run_dir)
    except LedgerError:
        return False          # no ledger yet (the import never started): reuse the directory
    try:
        if not ledger.is_imported():
            return False
        counts = ledger.counts()
        return bool(ledger.get_meta("reverted_at")) or not (counts["pending"] or counts["in_flight"])
    finally:
        ledger.close()


@contextlib.contextmanager
def lock(reports_dir: Path, job: str) -> Iterator[None]:
    """Hold the job's lock: a second run of the same job (e.g. last night's, still going) is refused."""
    folder = job_dir(reports_dir, job)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LedgerError(f"cannot create {folder}: {exc.strerror}",
                          "make the reports directory writable or pass --reports-dir") from exc
    fd = _take_lock(folder)
    try:
        yield
    finally:
        os.close(fd)


def bind_target(store: Path, job: str, target: str) -> None:
    """Tie the job to the API it writes to on its first run; refuse another target later."""
    with _transaction(store) as conn:
        conn.execute("INSERT INTO jobs(job, target, created_at) VALUES (?,?,?) ON CONFLICT(job) DO NOTHING",
                     (job, target, time.time()))
        bound = conn.execute("SELECT target FROM jobs WHERE job=?", (job,)).fetchone()[0]
    if bound != target:
        raise UsageError(
            f"job {job} writes to {bound}, not {target}: its memory of confirmed pairs is only true there",
            f"use another --job name for {target}, or `capbatch forget --job {job}` to start it afresh")


def skip_confirmed(ledger: Ledger, store: Path, job: str, audit_fraction: float | None = None) -> tuple[int, int]:
    """Settle pending rows whose exact pair an earlier run of ``job`` confirmed, without a request.

    With ``audit_fraction`` F, ceil(F x those rows) of them, the longest unchecked first, stay pending
    flagged for the rolling audit (the engine reads the card, and puts the ID back if it drifted). The
    slice is picked once per run directory, so a resumed run does not pick a second one.
    Returns (rows settled without a request, rows in this run's audit slice).
    """
    if ledger.keeps_job_memory:   # a database ledger holds the job's memory itself
        return ledger.settle_confirmed(job, audit_fraction)
    if not store.exists():
        return 0, 0
    _connect(store).close()
    conn = ledger.conn
    match = ("FROM rows r JOIN jobstore.confirmed c ON c.job=? AND c.card=r.card AND c.external_id=r.external_id "
             "WHERE r.state='pending' AND r.audit=0 AND r.external_id <> ''")
    try:
        conn.execute("ATTACH DATABASE ? AS jobstore", (str(store),))
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
        raise LedgerError(f"could not read the job store {store}: {exc}", "rerun; if it persists, move the file aside") from exc


def remember(ledger: Ledger, store: Path, job: str, run_dir: Path, summary: dict[str, Any],
             started_at: float) -> None:
    """Record the pairs the API confirmed in this run, and the run itself, in the job store.

    Only rows settled by a request count (attempts > 0): a pair skipped by --skip-confirmed keeps the
    date it was last really checked, which is what the rolling audit orders by."""
    if ledger.keeps_job_memory:
        return ledger.remember_job_run(job, run_dir, summary, started_at)
    with _transaction(store) as conn:
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


def _upsert(conn: sqlite3.Connection, batch: list[tuple[Any, ...]]) -> None:
    conn.executemany(
        "INSERT INTO confirmed(job, card, external_id, confirmed_at, run_dir) VALUES (?,?,?,?,?) "
        "ON CONFLICT(job, card) DO UPDATE SET external_id=excluded.external_id, "
        "confirmed_at=excluded.confirmed_at, run_dir=excluded.run_dir", batch)


def forget(store: Path, job: str, cards: Iterable[str] = ()) -> int:
    """Make the job forget confirmed pairs: the given cards, or all of them (and the target it is
    tied to). The run history is kept. Returns how many pairs were forgotten."""
    if not store.exists():
        return 0
    wanted = list(cards)
    with _transaction(store) as conn:
        if wanted:
            return sum(conn.execute("DELETE FROM confirmed WHERE job=? AND card=?", (job, card)).rowcount
                       for card in wanted)
        conn.execute("DELETE FROM jobs WHERE job=?", (job,))
        return conn.execute("DELETE FROM confirmed WHERE job=?", (job,)).rowcount


def forget_pairs(store: Path, job: str, pairs: Iterable[tuple[str, str]]) -> int:
    """Forget (card, external ID) pairs that are no longer true (a revert changed the card), unless a
    later run confirmed another ID for that card meanwhile."""
    if not store.exists():
        return 0
    with _transaction(store) as conn:
        return sum(conn.execute("DELETE FROM confirmed WHERE job=? AND card=? AND external_id=?",
                                (job, card, ext)).rowcount for card, ext in pairs)


def describe(store: Path, job: str) -> dict[str, Any]:
    """What the job remembers: its target, how many confirmed pairs, the oldest and newest check."""
    out: dict[str, Any] = {"job": job, "target": None, "confirmed_pairs": 0, "oldest_check": None,
                           "newest_check": None}
    if not store.exists():
        return out
    conn = _connect(store)
    try:
        target = conn.execute("SELECT target FROM jobs WHERE job=?", (job,)).fetchone()
        n, oldest, newest = conn.execute(
            "SELECT count(*), min(confirmed_at), max(confirmed_at) FROM confirmed WHERE job=?", (job,)).fetchone()
    finally:
        conn.close()
    out.update(target=target[0] if target else None, confirmed_pairs=n, oldest_check=oldest, newest_check=newest)
    return out


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
