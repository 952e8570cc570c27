"""The SQLite ledger: one file in the run directory holding every input row and its state.

Writes are batched (one transaction per batch) so the ledger is never the bottleneck; WAL mode keeps
readers (``capbatch status``/``report``) working while a run writes. A process killed at any point
leaves a consistent file: the rows it had in flight stay ``in_flight`` and are settled on resume.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sqlite3
import time
import urllib.parse
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from ..errors import LedgerError, LedgerLost
from .base import Ledger, RowResult, State, WorkRow, shape_invocation, warnings_json
from .jobstore import STORE_FILE, SqliteJobStore

SCHEMA_VERSION = 5
LEDGER_FILE = "ledger.sqlite"
LOCK_FILE = ".lock"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    id INTEGER PRIMARY KEY,            -- input order, 1..N
    sheet TEXT,
    row_number INTEGER NOT NULL,       -- as the user's spreadsheet shows it
    original TEXT NOT NULL,            -- JSON array of every original cell, as text
    card TEXT NOT NULL,
    external_id TEXT NOT NULL,
    state TEXT NOT NULL,
    reason_code TEXT,
    reason TEXT,
    problem_column TEXT,               -- which input column the rejection is about
    duplicate_of INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    http_status INTEGER,
    error_code TEXT,
    error_message TEXT,
    card_id TEXT,
    customer_id TEXT,
    previous_external_id TEXT,
    generated INTEGER NOT NULL DEFAULT 0,
    latency_ms REAL,
    note TEXT,
    settled_at REAL,
    audit INTEGER NOT NULL DEFAULT 0,  -- picked for the job's rolling audit: read the card before writing
    expect_external_id TEXT,           -- revert: write only while the card still holds this ID
    warnings TEXT                      -- JSON array of {"code", "message"} the API's answers carried
);
CREATE INDEX IF NOT EXISTS rows_by_state ON rows(state, id);
CREATE TABLE IF NOT EXISTS timeline (
    second INTEGER PRIMARY KEY,        -- unix time, whole seconds
    ok INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    retried INTEGER NOT NULL DEFAULT 0,
    throttled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    pid INTEGER,
    started_at REAL NOT NULL,
    ended_at REAL,
    exit_code INTEGER,
    outcome TEXT,
    requests INTEGER NOT NULL DEFAULT 0,
    last_seen_at REAL,                 -- last commit of this invocation: its duration if it was killed
    requests_by_status TEXT            -- JSON {"2xx": n, "4xx": n, "5xx": n, "none": n}
);
-- Which rows changed: every update of a row bumps its chunk's revision (chunk = id >> 12, see
-- base.CHUNK_BITS), so the reports rewrite only the chunks that changed since they were written.
CREATE TABLE IF NOT EXISTS row_changes (chunk INTEGER PRIMARY KEY, rev INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS rows_changed AFTER UPDATE ON rows BEGIN
    INSERT INTO row_changes(chunk, rev) VALUES (NEW.id >> 12, 1) ON CONFLICT(chunk) DO UPDATE SET rev = rev + 1;
END;
"""

# The rolling audit's rows (few are picked), found without a pass over every row. Not in _SCHEMA:
# a ledger from before the audit has no such column until its migrations ran.
_AUDIT_INDEX = "CREATE INDEX IF NOT EXISTS rows_audited ON rows(state) WHERE audit=1"

# Each entry upgrades a ledger from version (index + 1) to (index + 2).
_MIGRATIONS: list[str] = [
    # 1 -> 2: the rolling audit (--audit-fraction) and revert's compare-and-set
    "ALTER TABLE rows ADD COLUMN audit INTEGER NOT NULL DEFAULT 0; "
    "ALTER TABLE rows ADD COLUMN expect_external_id TEXT;",
    # 2 -> 3: invocation figures recorded as the run goes (right after a kill -9)
    "ALTER TABLE runs ADD COLUMN last_seen_at REAL; ALTER TABLE runs ADD COLUMN requests_by_status TEXT;",
    "ALTER TABLE rows ADD COLUMN warnings TEXT;",   # 3 -> 4: warnings carried by the API's answers
    "",   # 4 -> 5: row_changes and its trigger (created by _SCHEMA itself on every open)
]


def _wrap(exc: sqlite3.Error, path: Path, writing: bool = False) -> LedgerError:
    """Our error for a SQLite one. A full disk, an I/O error, or any failed write of the run's
    progress (``writing``) stops the run resumably (LedgerLost, exit 3): what was sent is safe, the rows
    in flight are read back on the rerun."""
    text = str(exc).lower()
    if "disk is full" in text or "disk i/o" in text:
        return LedgerLost(f"the ledger at {path} could not be written: the disk is full or failing ({exc}); "
                          "sending stopped",
                          "free space on that disk (or use --run-dir elsewhere), then rerun the same command to resume")
    if "readonly" in text or "read-only" in text or "unable to open" in text:
        found = LedgerError(f"the ledger at {path} cannot be written ({exc})",
                            "make the run directory writable or choose another with --run-dir")
    elif "locked" in text or "busy" in text:
        found = LedgerError(f"the ledger at {path} is locked by another process",
                            "wait for the other capbatch process to finish")
    elif "not a database" in text or "malformed" in text:
        found = LedgerError(f"{path} is not a capbatch ledger or is damaged ({exc})",
                            "point --run-dir at a fresh directory")
    else:
        found = LedgerError(f"ledger error in {path}: {exc}",
                            "rerun the same command; if it persists, use a fresh --run-dir")
    if writing and isinstance(exc, sqlite3.OperationalError):
        return LedgerLost(f"{found.message}; sending stopped", f"{found.hint}, then rerun the same command to resume")
    return found


class SqliteLedger(Ledger):
    """A run directory's SQLite ledger. Use :meth:`open` (writer, takes the lock) or :meth:`open_readonly`."""

    backend = "sqlite"

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int | None) -> None:
        self.path = path
        self.location = str(path)
        self.conn = conn
        self._lock_fd = lock_fd
        self._unknown: list[WorkRow] | None = None   # claim(): rows in flight when this process began
        self._after = 0                               # claim(): pending rows are taken in id order
        self._invocation: int | None = None   # this process's row in `runs` (a writer only)
        self._counts: tuple[Any, dict[str, int]] | None = None   # counts(): (rows' change state, counts)

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, run_dir: Path) -> "SqliteLedger":
        """Open (creating if needed) the ledger for writing, holding an exclusive lock on the run dir."""
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"cannot create run directory {run_dir}: {exc.strerror}",
                              "choose a writable place with --run-dir") from exc
        lock_fd = _take_lock(run_dir)
        path = run_dir / LEDGER_FILE
        try:
            # check_same_thread off: from a running event loop (a notebook) the engine runs on a thread
            # of its own; the connection is still only ever used by one thread at a time.
            conn = sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA temp_store=FILE")   # big GROUP BYs at import spill to disk, not RAM
            conn.executescript(_SCHEMA)
            ledger = cls(path, conn, lock_fd)
            ledger._migrate()
        except sqlite3.Error as exc:
            os.close(lock_fd)
            raise _wrap(exc, path) from exc
        return ledger

    @classmethod
    def open_readonly(cls, run_dir: Path) -> "SqliteLedger":
        """Open for reading only, creating no file: on a read-only run directory too.

        With no writer running and nothing left in the write-ahead log (every cleanly ended run),
        the file is opened ``immutable``: SQLite then needs no -wal/-shm files and creates none.
        While a run writes, or after one was killed (its -wal still holds the last commits), a plain
        read-only connection reads through the log the writer left.
        """
        path = run_dir / LEDGER_FILE
        if not path.exists():
            raise LedgerError(f"{run_dir} holds no ledger ({LEDGER_FILE} is missing)",
                              "pass the run directory that `capbatch run` printed")
        wal = path.with_name(path.name + "-wal")
        live = writer_active(run_dir) or (wal.exists() and wal.stat().st_size > 0)
        base = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"
        try:
            try:
                conn = sqlite3.connect(base if live else base + "&immutable=1", uri=True, isolation_level=None,
                                       timeout=10)
                conn.execute("SELECT count(*) FROM meta").fetchone()
            except sqlite3.OperationalError:
                if not live:
                    raise
                # a killed run's log in a directory we cannot write: read the file as it stands
                conn = sqlite3.connect(base + "&immutable=1", uri=True, isolation_level=None, timeout=10)
                conn.execute("SELECT count(*) FROM meta").fetchone()
        except sqlite3.Error as exc:
            raise _wrap(exc, path) from exc
        return cls(path, conn, None)

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            if self._lock_fd is not None:
                # No pid left behind: a reader in this same (live) process, e.g. load_results after
                # run_backfill, then opens the cleanly closed file immutable and leaves no -wal/-shm.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._lock_fd, 0)
                os.close(self._lock_fd)
                self._lock_fd = None

    def _migrate(self) -> None:
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
            self._exec(_AUDIT_INDEX)
            return
        current = int(version)
        if current > SCHEMA_VERSION:
            raise LedgerError(f"{self.path} was written by a newer capbatch (schema {current})",
                              "upgrade capbatch to resume this run")
        while current < SCHEMA_VERSION:
            for statement in filter(None, (part.strip() for part in _MIGRATIONS[current - 1].split(";"))):
                try:
                    self.conn.execute(statement)
                except sqlite3.OperationalError as exc:
                    # a column already there: an upgrade killed half-way (each ALTER commits alone)
                    if "duplicate column name" not in str(exc):
                        raise
            current += 1
            self.set_meta("schema_version", str(current))
        self._exec(_AUDIT_INDEX)    # once per ledger: a no-op when it exists

    # ---- helpers -------------------------------------------------------------------------------
    def _exec(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise _wrap(exc, self.path) from exc

    def _rollback(self) -> None:
        """Undo an unfinished write; a disk too full even for that leaves it to the next open."""
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(sql, rows)
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise _wrap(exc, self.path, writing=True) from exc

    def get_meta(self, key: str) -> str | None:
        row = self._exec("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._exec("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                   (key, value))

    # ---- import --------------------------------------------------------------------------------
    def reset_import(self) -> None:
        self._exec("DELETE FROM rows")

    def import_rows(self, rows: Iterable[tuple[Any, ...]], batch: int = 20000, numbered: bool = False) -> int:
        columns = "sheet, row_number, original, card, external_id, state, reason_code, reason, problem_column"
        if numbered:
            columns = "id, " + columns
        sql = f"INSERT INTO rows({columns}) VALUES ({', '.join('?' * (columns.count(',') + 1))})"
        # A bulk load: build the state index once at the end, and skip fsyncs (an import that dies
        # half-way is redone from scratch, see reset_import).
        self._exec("DROP INDEX IF EXISTS rows_by_state")
        self._exec("PRAGMA synchronous=OFF")
        try:
            count = self._insert_chunks(sql, rows, batch)
        finally:
            self._exec("PRAGMA synchronous=NORMAL")
            self._exec("CREATE INDEX IF NOT EXISTS rows_by_state ON rows(state, id)")
        return count

    def apply_cross_row_rules(self, allow_empty_external_id: bool = False,
                              only: Sequence[int] | None = None) -> None:
        if only is not None and not only:
            return  # every card number and external ID occurs once: nothing to do
        empty_ok = "AND external_id <> ''" if allow_empty_external_id else ""
        # ``only``: the rows that can be involved, in a temporary table the queries below are limited to
        among = "AND id IN (SELECT id FROM temp.suspects)" if only is not None else ""
        rows_among = "AND rows.id IN (SELECT id FROM temp.suspects)" if only is not None else ""
        script = f"""
        DROP TABLE IF EXISTS temp.card_conflicts; DROP TABLE IF EXISTS temp.ext_conflicts;
        DROP TABLE IF EXISTS temp.first_of_pair;
        CREATE TEMP TABLE card_conflicts AS
            SELECT card, group_concat(label, ', ') AS labels, count(*) AS n FROM (
                SELECT card, coalesce(sheet || '!', '') || row_number AS label FROM rows
                WHERE state='pending' {among} AND card IN (
                    SELECT card FROM rows WHERE state='pending' {among} GROUP BY card
                    HAVING count(DISTINCT external_id) > 1)
                ORDER BY id)
            GROUP BY card;
        CREATE TEMP TABLE ext_conflicts AS
            SELECT external_id, group_concat(label, ', ') AS labels, count(*) AS n FROM (
                SELECT external_id, coalesce(sheet || '!', '') || row_number AS label FROM rows
                WHERE state='pending' {empty_ok} {among} AND external_id IN (
                    SELECT external_id FROM rows WHERE state='pending' {empty_ok} {among} GROUP BY external_id
                    HAVING count(DISTINCT card) > 1)
                ORDER BY id)
            GROUP BY external_id;
        BEGIN IMMEDIATE;
        UPDATE rows SET state='rejected', reason_code='conflict_card', problem_column='card',
            reason='card ' || rows.card || ' appears with different external IDs in rows ' || c.labels
                   || ': keep one external ID per card and rerun'
            FROM temp.card_conflicts AS c WHERE rows.card = c.card AND rows.state='pending' {rows_among};
        UPDATE rows SET state='rejected', reason_code='conflict_external_id', problem_column='external_id',
            reason='external ID ' || rows.external_id || ' is given to different cards in rows ' || c.labels
                   || ': external IDs are unique across cards; keep one card per external ID and rerun'
            FROM temp.ext_conflicts AS c WHERE rows.external_id = c.external_id AND rows.state='pending'
            {rows_among};
        CREATE TEMP TABLE first_of_pair AS
            SELECT card, external_id, min(id) AS first_id FROM rows WHERE state='pending' {among}
            GROUP BY card, external_id HAVING count(*) > 1;
        UPDATE rows SET state='duplicate', reason_code='duplicate', problem_column='card', duplicate_of=f.first_id,
            reason='same card and external ID as row '
                   || (SELECT coalesce(r.sheet || '!', '') || r.row_number FROM rows r WHERE r.id=f.first_id)
                   || ': sent once for both'
            FROM temp.first_of_pair AS f
            WHERE rows.card=f.card AND rows.external_id=f.external_id AND rows.id<>f.first_id
              AND rows.state='pending' {rows_among};
        COMMIT;
        DROP TABLE temp.card_conflicts; DROP TABLE temp.ext_conflicts; DROP TABLE temp.first_of_pair;
        DROP TABLE IF EXISTS temp.suspects;
        """
        try:
            if only is not None:
                self.conn.execute("DROP TABLE IF EXISTS temp.suspects")
                self.conn.execute("CREATE TEMP TABLE suspects (id INTEGER PRIMARY KEY)")
                self.conn.executemany("INSERT INTO temp.suspects(id) VALUES (?)", ((i,) for i in only))
            self.conn.executescript(script)
        except sqlite3.Error as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise _wrap(exc, self.path) from exc

    def mark_imported(self) -> None:
        self.set_meta("imported_at", repr(time.time()))

    # ---- the engine's side ---------------------------------------------------------------------
    def unknown_rows(self) -> list[WorkRow]:
        cur = self._exec("SELECT id, card, external_id, generated, audit, expect_external_id FROM rows "
                         "WHERE state='in_flight' ORDER BY id")
        return [WorkRow(i, c, e, True, bool(g), bool(a), x) for i, c, e, g, a, x in cur]

    def claim(self, limit: int, results: Sequence[RowResult] = (),
              timeline: dict[int, list[int]] | None = None,
              requests: Mapping[str, int] | None = None) -> list[WorkRow]:
        # The run directory's lock makes this process the only writer: the rows in flight when it
        # began are the unknown ones, and the next pending rows are simply the next ones by id.
        if self._unknown is None:
            self._unknown = self.unknown_rows()
        if self._unknown:
            part, self._unknown = self._unknown[:limit], self._unknown[limit:]
            self.record(results, timeline, (), requests)
            return part
        page = self.pending_page(self._after, limit)
        # One commit settles what finished since the last chunk and journals this one.
        self.record(results, timeline, [r.id for r in page], requests)
        if page:
            self._after = page[-1].id
        return page

    def mark_in_flight(self, ids: Sequence[int]) -> None:
        self._many("UPDATE rows SET state='in_flight' WHERE id=?", ((i,) for i in ids))

    def release(self, ids: Sequence[int]) -> None:
        if ids:
            self._many("UPDATE rows SET state='pending' WHERE id=? AND state='in_flight'", ((i,) for i in ids))

    def store_generated(self, row_id: int, external_id: str) -> None:
        self._many("UPDATE rows SET external_id=?, generated=1 WHERE id=?", [(external_id, row_id)])

    def record(self, results: Sequence[RowResult], timeline: dict[int, list[int]] | None = None,
               journal: Sequence[int] = (), requests: Mapping[str, int] | None = None) -> None:
        """Write a batch of outcomes, the timeline counters and (optionally) the journal entry for the
        next chunk — all in one transaction. ``requests`` (this process's requests by status class)
        updates the invocation's figures in the same commit, so they survive a kill -9."""
        if not results and not timeline and not journal and requests is None:
            return
        sql = ("UPDATE rows SET state=?, attempts=attempts+?, http_status=?, error_code=?, error_message=?, "
               "card_id=coalesce(?, card_id), customer_id=coalesce(?, customer_id), "
               "previous_external_id=coalesce(?, previous_external_id), latency_ms=coalesce(?, latency_ms), "
               "note=coalesce(?, note), settled_at=?, warnings=? WHERE id=?")
        params = [(r.state.value, r.attempts, r.http_status, r.error_code, r.error_message, r.card_id,
                   r.customer_id, r.previous_external_id, r.latency_ms, r.note, r.settled_at,
                   warnings_json(r.warnings) if r.warnings else None, r.id)
                  for r in results]
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(sql, params)
            if timeline:
                self.conn.executemany(
                    "INSERT INTO timeline(second, ok, failed, retried, throttled) VALUES (?,?,?,?,?) "
                    "ON CONFLICT(second) DO UPDATE SET ok=ok+excluded.ok, failed=failed+excluded.failed, "
                    "retried=retried+excluded.retried, throttled=throttled+excluded.throttled",
                    [(sec, *vals) for sec, vals in timeline.items()])
            if journal:
                # A chunk is a run of consecutive pending rows: one range update journals it.
                self.conn.execute("UPDATE rows SET state='in_flight' WHERE id BETWEEN ? AND ? AND state='pending'",
                                  (min(journal), max(journal)))
            if requests is not None and self._invocation is not None:
                self.conn.execute("UPDATE runs SET last_seen_at=?, requests=?, requests_by_status=? WHERE id=?",
                                  (time.time(), sum(requests.values()), json.dumps(dict(requests)),
                                   self._invocation))
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise _wrap(exc, self.path, writing=True) from exc

    def requeue_failed(self) -> int:
        """--retry-failed: failed rows go back to pending (attempts keep counting); the failure they
        had is kept in the note. Rejected rows stay rejected: their input is invalid."""
        cur = self._exec(
            "UPDATE rows SET state='pending', note='earlier attempt failed: ' || "
            "trim(coalesce(error_code, '') || ' ' || coalesce(error_message, '')), "
            "error_code=NULL, error_message=NULL, http_status=NULL, settled_at=NULL WHERE state='failed'")
        return cur.rowcount

    def audit_counts(self, states: Sequence[str] | None = None) -> dict[str, int]:
        """Rows picked for the rolling audit, by state ({} when none, or a ledger older than the audit);
        only ``states`` when given. The audit's partial index finds them: no pass over every row."""
        among = f" AND state IN ({', '.join('?' * len(states))})" if states else ""
        try:
            cur = self.conn.execute(f"SELECT state, count(*) FROM rows WHERE audit=1{among} GROUP BY state",
                                    tuple(states or ()))
        except sqlite3.OperationalError:
            return {}
        return {state: n for state, n in cur}

    # ---- job memory ----------------------------------------------------------------------------
    def job_store(self, reports_dir: Path) -> SqliteJobStore:
        """A run directory's job keeps its memory in ``<reports_dir>/jobs.sqlite``."""
        return SqliteJobStore(reports_dir / STORE_FILE)

    # ---- revert --------------------------------------------------------------------------------
    def import_expecting(self, rows: Iterable[tuple[Any, ...]], batch: int = 20000) -> int:
        """Insert rows as :meth:`import_rows` does, each with a 10th field: the external ID the card
        must still hold for the row to be written (``expect_external_id``)."""
        sql = ("INSERT INTO rows(sheet, row_number, original, card, external_id, state, reason_code, reason, "
               "problem_column, expect_external_id) VALUES (?,?,?,?,?,?,?,?,?,?)")
        return self._insert_chunks(sql, rows, batch)

    def _insert_chunks(self, sql: str, rows: Iterable[tuple[Any, ...]], batch: int) -> int:
        count = 0
        it = iter(rows)
        while chunk := list(islice(it, batch)):
            self._many(sql, chunk)
            count += len(chunk)
        return count

    # ---- invocations ---------------------------------------------------------------------------
    def start_invocation(self) -> int:
        now = time.time()
        cur = self._exec("INSERT INTO runs(pid, started_at, last_seen_at) VALUES (?, ?, ?)", (os.getpid(), now, now))
        self._invocation = int(cur.lastrowid or 0)
        return self._invocation

    def end_invocation(self, run_id: int, exit_code: int, outcome: str, requests: int | None = None,
                       requests_by_status: Mapping[str, int] | None = None) -> None:
        """Close the invocation's row; ``requests`` None keeps the figures recorded as the run went."""
        now = time.time()
        by_status = json.dumps(dict(requests_by_status)) if requests_by_status is not None else None
        self._exec("UPDATE runs SET ended_at=?, last_seen_at=?, exit_code=?, outcome=?, requests=coalesce(?, requests), "
                   "requests_by_status=coalesce(?, requests_by_status) WHERE id=?",
                   (now, now, exit_code, outcome, requests, by_status, run_id))
        if run_id == self._invocation:
            self._invocation = None

    def invocations(self) -> list[dict[str, Any]]:
        """Every invocation, oldest first. ``duration`` is up to its end, or for one that never ended
        (killed, or still running) up to its last commit."""
        cur = self._exec("SELECT * FROM runs ORDER BY id")
        cols = [d[0] for d in cur.description]
        return [shape_invocation(dict(zip(cols, r))) for r in cur]

    # ---- the read primitives the shared queries use ---------------------------------------------
    def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._exec(sql, params))

    def _stream(self, sql: str, params: Sequence[Any] = ()) -> Iterator[tuple[Any, ...]]:
        yield from self._exec(sql, params)

    def _stream_dicts(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Mapping[str, Any]]:
        cur = self.conn.cursor()
        cur.row_factory = sqlite3.Row
        try:
            cur.execute(sql, params)
        except sqlite3.Error as exc:
            raise _wrap(exc, self.path) from exc
        yield from cur

    def counts(self) -> dict[str, int]:
        """Rows per state. Counting a million rows takes a tenth of a second, and a run asks several
        times before anything changed: the answer is kept while no row changes (every update bumps
        row_changes; an import changes the highest id and imported_at)."""
        try:
            key = (self.get_meta("imported_at"), self.last_id(),
                   tuple(self.conn.execute("SELECT total(rev), count(*) FROM row_changes").fetchone()))
        except sqlite3.OperationalError:
            key = None    # a ledger older than row_changes (read-only): count every time
        if key is not None and self._counts is not None and self._counts[0] == key:
            return dict(self._counts[1])
        states = [s.value for s in State]
        # one index range per state: about twice as fast as GROUP BY over the whole index
        row = self._fetch("SELECT " + ", ".join("(SELECT count(*) FROM rows WHERE state=?)" for _ in states),
                          states)[0]
        out = {state: int(n) for state, n in zip(states, row)}
        self._counts = (key, out) if key is not None else None
        return dict(out)

    def change_mark(self) -> Any:
        """Each chunk's revision now, as [[chunk, rev], ...]; None for a ledger older than row_changes
        (opened read-only, so not upgraded)."""
        try:
            return [list(r) for r in self.conn.execute("SELECT chunk, rev FROM row_changes ORDER BY chunk")]
        except sqlite3.OperationalError:
            return None

    def changed_chunks(self, since: Any) -> set[int] | None:
        now = self.change_mark()
        if now is None or not isinstance(since, list):
            return None
        try:
            before = {int(chunk): int(rev) for chunk, rev in since}
        except (TypeError, ValueError):
            return None
        after = {chunk: rev for chunk, rev in now}
        return {chunk for chunk in before.keys() | after.keys() if before.get(chunk) != after.get(chunk)}

    def iter_rows(self) -> Iterator[Mapping[str, Any]]:
        return self.rows_in_states(None)

    def has_column(self, name: str) -> bool:
        """Whether the rows table has this column (a read-only ledger of an older schema may lack it)."""
        return any(r[1] == name for r in self._exec("PRAGMA table_info(rows)"))

    def warning_counts(self) -> dict[str, dict[str, Any]]:
        """Warning code -> {"rows": rows whose answers carried it, "message": one of its messages}
        ({} for a ledger older than the warnings column)."""
        if not self.has_column("warnings"):
            return {}
        out: dict[str, dict[str, Any]] = {}
        sql = ("SELECT json_extract(w.value, '$.code'), count(DISTINCT rows.id), "
               "max(json_extract(w.value, '$.message')) FROM rows, json_each(rows.warnings) AS w "
               "WHERE rows.warnings IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1")
        for code, n, message in self._exec(sql):
            out[str(code or "")] = {"rows": int(n), "message": message or ""}
        return out


Ledger.run_directory_backend = SqliteLedger   # Ledger.open(run_dir) opens this


def writer_active(run_dir: Path) -> bool:
    """Whether the process that last locked the run directory is still alive. Checked by the pid it
    wrote into the lock file, never by taking the lock: a reader must not make a starting run fail."""
    try:
        pid = int((run_dir / LOCK_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_lock(run_dir: Path) -> int:
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LedgerError(f"cannot write to run directory {run_dir}: {exc.strerror}",
                          "make it writable or choose another with --run-dir") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = ""
        try:
            holder = os.pread(fd, 32, 0).decode().strip()
        except OSError:
            pass
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            who = f" (pid {holder})" if holder else ""
            raise LedgerError(f"another capbatch process{who} is running on {run_dir}",
                              "wait for it to finish, or stop it; rerunning afterwards resumes the run") from exc
        raise LedgerError(f"cannot lock {path}: {exc.strerror}", "choose another --run-dir") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
