"""The PostgreSQL ledger: a job's runs in a database that several workers, on several hosts, share.

Everything lives in the ``capbatch`` schema, created and migrated in the database itself (the
version is a row of ``capbatch.schema_version``; migrations run under a transaction-level advisory
lock, so workers starting together migrate once). A *job* holds one run per input content; a run's
rows carry the id of the worker (invocation) holding them in flight.

Workers cooperate through the database's own primitives:

* the first worker imports the input with ``COPY`` while holding ``pg_try_advisory_lock`` for the run;
  the others wait for the lock, then find the import done and join;
* each worker claims chunks of pending rows with ``FOR UPDATE SKIP LOCKED``, so no row is handed to
  two workers; outcomes of the previous chunk are written in the same transaction (one pipelined
  round trip);
* a worker is alive while it holds its session-level advisory lock (a killed process's connection
  closes and the server drops the lock at once) and its lease is fresh (renewed every few seconds;
  this covers a host that vanished without closing its connection). Rows held by a dead worker
  are claimed by the others as *unknown* and settled by the resume read, exactly as after a crash.

The driver is psycopg 3 (imported only when a database ledger is used).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Sequence

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row

from ..errors import LedgerError, LedgerLost, UsageError
from .base import JobStore, Ledger, RowResult, WorkRow, redact_password, shape_invocation, target_mismatch, warnings_json

log = logging.getLogger("capbatch.ledger")
# The driver logs what it ignores while tearing down a lost connection; our own error says it all.
logging.getLogger("psycopg").addHandler(logging.NullHandler())

SCHEMA_VERSION = 5
LEASE_SECONDS = 30.0            # a worker that has not renewed its lease for this long is dead
RENEW_EVERY = 5.0               # seconds between lease renewals
UNKNOWN_CHECK_EVERY = 2.0       # seconds between looks for rows a dead worker left in flight
CONNECT_TIMEOUT = 10            # seconds, unless the URL says otherwise

# Advisory lock keys (two int4s): this namespace, then a kind-specific number.
LOCK_NAMESPACE = 0x43425443     # "CBTC"
_MIGRATE_KEY = 0                # + transaction lock: one worker migrates the schema
_IMPORT_BASE = 1 << 30          # + run id: one worker imports a run's input

_MIGRATIONS: list[str] = [
    # version 1
    """
    CREATE TABLE capbatch.runs (
        id bigserial PRIMARY KEY,
        job text NOT NULL,
        input_sha256 text NOT NULL,
        created_at double precision NOT NULL,
        UNIQUE (job, input_sha256)
    );
    CREATE TABLE capbatch.meta (
        run_id bigint NOT NULL REFERENCES capbatch.runs ON DELETE CASCADE,
        key text NOT NULL,
        value text NOT NULL,
        PRIMARY KEY (run_id, key)
    );
    CREATE TABLE capbatch.rows (
        run_id bigint NOT NULL REFERENCES capbatch.runs ON DELETE CASCADE,
        id integer NOT NULL,                 -- input order, 1..N
        sheet text,
        row_number integer NOT NULL,
        original text NOT NULL,
        card text NOT NULL,
        external_id text NOT NULL,
        state text NOT NULL,
        reason_code text,
        reason text,
        problem_column text,
        duplicate_of integer,
        attempts integer NOT NULL DEFAULT 0,
        http_status integer,
        error_code text,
        error_message text,
        card_id text,
        customer_id text,
        previous_external_id text,
        generated integer NOT NULL DEFAULT 0,
        latency_ms double precision,
        note text,
        settled_at double precision,
        warnings text,                       -- JSON array of {"code", "message"} the API's answers carried
        audit integer NOT NULL DEFAULT 0,    -- picked for the job's rolling audit: read before writing
        expect_external_id text,             -- revert: write only while the card still holds this ID
        owner bigint,                        -- the invocation holding the row in flight
        PRIMARY KEY (run_id, id)
    );
    CREATE INDEX rows_by_state ON capbatch.rows (run_id, state, id);
    CREATE TABLE capbatch.timeline (
        run_id bigint NOT NULL REFERENCES capbatch.runs ON DELETE CASCADE,
        second bigint NOT NULL,
        ok integer NOT NULL DEFAULT 0,
        failed integer NOT NULL DEFAULT 0,
        retried integer NOT NULL DEFAULT 0,
        throttled integer NOT NULL DEFAULT 0,
        PRIMARY KEY (run_id, second)
    );
    CREATE TABLE capbatch.invocations (
        id bigserial PRIMARY KEY,
        run_id bigint NOT NULL REFERENCES capbatch.runs ON DELETE CASCADE,
        host text,
        pid integer,
        started_at double precision NOT NULL,
        ended_at double precision,
        exit_code integer,
        outcome text,
        requests integer NOT NULL DEFAULT 0,
        last_seen_at double precision,       -- last commit of this invocation: its duration if it was killed
        requests_by_status text,             -- JSON {"2xx": n, "4xx": n, "5xx": n, "none": n}
        lease_until timestamptz
    );
    CREATE INDEX invocations_by_run ON capbatch.invocations (run_id, id);
    -- job memory (capbatch/jobs.py keeps the same in jobs.sqlite for run-directory ledgers)
    CREATE TABLE capbatch.confirmed (
        job text NOT NULL,
        card text NOT NULL,
        external_id text NOT NULL,
        confirmed_at double precision NOT NULL,
        run_dir text,
        PRIMARY KEY (job, card)
    );
    CREATE TABLE capbatch.job_runs (
        id bigserial PRIMARY KEY,
        job text NOT NULL,
        run_id bigint REFERENCES capbatch.runs ON DELETE SET NULL,
        run_dir text NOT NULL,
        input_name text,
        host text,
        started_at double precision,
        ended_at double precision,
        exit_code integer,
        counts text,
        requests integer
    );
    CREATE INDEX job_runs_by_job ON capbatch.job_runs (job, id);
    -- one API quota shared by every worker (capbatch/ledger/pg_quota.py): a GCRA grid on the db clock
    CREATE TABLE capbatch.quota (
        key text PRIMARY KEY,                -- hash of (API base URL, account identity): no secret
        tat double precision NOT NULL DEFAULT 0,
        pause_until double precision NOT NULL DEFAULT 0,
        factor double precision NOT NULL DEFAULT 1,
        changed_at double precision NOT NULL DEFAULT 0,
        throttle_events integer NOT NULL DEFAULT 0,
        leases bigint NOT NULL DEFAULT 0
    );
    """,
    # version 2: the API target a job writes to (its confirmed pairs are only true there), kept with
    # the job in the database instead of in one host's jobs.sqlite
    """
    CREATE TABLE capbatch.jobs (
        job text PRIMARY KEY,
        target text NOT NULL,
        created_at double precision NOT NULL
    );
    """,
    # version 3: the quota row holds capbatch.quota's whole state (grid, back-off, learned margin,
    # members with their rate and priority): one design for the file and the database
    """
    DROP TABLE capbatch.quota;
    CREATE TABLE capbatch.quota (
        key text PRIMARY KEY,                -- hash of (API base URL, account identity, lane): no secret
        target text NOT NULL,                -- the API base URL
        lane text NOT NULL,                  -- "requests", or "reads" with --read-rate
        state jsonb NOT NULL DEFAULT '{}',   -- capbatch.quota.QuotaState (capbatch/ledger/pg_quota.py)
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    """,
    # version 4: which rows changed, for reports that rewrite only that. Every statement that updates
    # rows logs the chunks it touched (chunk = id >> 12, see base.CHUNK_BITS) with its transaction id;
    # a reader that noted the oldest transaction still running when it last read asks for the chunks
    # logged since (append-only: workers never wait on each other for it).
    """
    CREATE TABLE capbatch.row_changes (
        run_id bigint NOT NULL REFERENCES capbatch.runs ON DELETE CASCADE,
        chunk integer NOT NULL,
        xid bigint NOT NULL DEFAULT txid_current()
    );
    CREATE INDEX row_changes_by_run ON capbatch.row_changes (run_id, xid);
    CREATE FUNCTION capbatch.note_row_changes() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO capbatch.row_changes (run_id, chunk) SELECT DISTINCT run_id, id >> 12 FROM changed;
        RETURN NULL;
    END $$;
    CREATE TRIGGER rows_changed AFTER UPDATE ON capbatch.rows REFERENCING NEW TABLE AS changed
        FOR EACH STATEMENT EXECUTE FUNCTION capbatch.note_row_changes();
    """,
    # version 5: the rolling audit's rows, found without a pass over the job's rows (few are picked);
    # which worker settled a row (history counts a killed worker's own rows, not its neighbours')
    """
    CREATE INDEX rows_audited ON capbatch.rows (run_id, state) WHERE audit = 1;
    ALTER TABLE capbatch.rows ADD COLUMN settled_by bigint;
    """,
]


def check_url(url: str) -> None:
    """Refuse a password in the URL: it would sit in shell history, ``ps`` output and config files."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise UsageError(f"--ledger {redact_password(url)} is not a PostgreSQL URL ({_redact(str(exc), url)})",
                         "write it as postgresql://USER@HOST:PORT/DATABASE") from exc
    if info.get("password"):
        raise UsageError(f"--ledger {redact_password(url)} carries a password",
                         "drop it from the URL and give it as PGPASSWORD or in ~/.pgpass (libpq's conventions)")
    if not info.get("dbname"):
        raise UsageError(f"--ledger {redact_password(url)} names no database",
                         "write it as postgresql://USER@HOST:PORT/DATABASE")


def _redact(text: str, url: str) -> str:
    """A driver message as it may be printed: no password from the URL or the environment."""
    for secret in (os.environ.get("PGPASSWORD"), _url_password(url)):
        if secret:
            text = text.replace(secret, "***")
    return text.strip().splitlines()[0] if text.strip() else text


def _url_password(url: str) -> str | None:
    try:
        return psycopg.conninfo.conninfo_to_dict(url).get("password")  # type: ignore[return-value]
    except psycopg.Error:
        return None


def _qmarks(sql: str) -> str:
    return sql.replace("?", "%s")


class PostgresLedger(Ledger):
    """One run of a job in a PostgreSQL database. Use :meth:`open`."""

    backend = "postgresql"
    _rows = "capbatch.rows"
    _timeline = "capbatch.timeline"
    _tie_break = ", 1"

    def __init__(self, url: str, conn: psycopg.Connection[Any], job: str, run_id: int, readonly: bool) -> None:
        self.url = url
        self.location = redact_password(url)
        self.conn = conn
        self.job = job
        self.run_id = run_id
        self.readonly = readonly
        self._mine = f"run_id = {int(run_id)}"
        self.worker_id: int | None = None
        self._last_renew = 0.0
        self._last_unknown_check = 0.0
        self._lost: LedgerLost | None = None

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str, *, job: str | None, input_sha256: str | None = None,
             readonly: bool = False) -> "PostgresLedger":
        check_url(url)
        if not job:
            raise UsageError("a database ledger needs --job NAME", "name the job, e.g. --job cards-eu-nightly")
        conn = _connect(url, readonly)
        try:
            if readonly:
                run_id = _find_run(conn, url, job, input_sha256)
            else:
                _migrate(conn, url)
                run_id = _get_or_create_run(conn, url, job, input_sha256)
        except BaseException:
            conn.close()
            raise
        return cls(url, conn, job, run_id, readonly)

    def close(self) -> None:
        try:
            if self.worker_id is not None and not self._lost and not self.conn.closed:
                # Our rows stay in flight under a lease nobody renews; the lock goes with the connection.
                self._execute("SELECT pg_advisory_unlock_all()")
        except LedgerError:
            pass
        finally:
            self.conn.close()

    # ---- error handling ------------------------------------------------------------------------
    def _wrap(self, exc: BaseException) -> LedgerError:
        msg = _redact(str(exc), self.url)
        if isinstance(exc, pg_errors.DiskFull):
            return LedgerLost(f"the ledger database {self.location} is out of disk space ({msg})",
                              "free space on the database server, then rerun the same command to resume")
        if isinstance(exc, pg_errors.InsufficientPrivilege):
            return LedgerError(f"the ledger database {self.location} refused an operation: {msg}",
                               "grant the privileges README lists (section 'A PostgreSQL ledger') and rerun")
        if isinstance(exc, pg_errors.ReadOnlySqlTransaction):
            return LedgerError(f"the ledger database {self.location} is read-only here ({msg})",
                               "point --ledger at the primary server")
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)) or self.conn.broken:
            self._lost = LedgerLost(f"lost the connection to the ledger database {self.location} ({msg}); "
                                    "stopped sending",
                                    "rows in flight are kept and settled on resume: once the database is back, "
                                    "rerun the same command")
            return self._lost
        return LedgerError(f"ledger error in {self.location} (job {self.job}): {msg}",
                           "rerun the same command; if it persists, check the database server's log")

    def _check(self) -> None:
        if self._lost:
            raise LedgerLost(self._lost.message, self._lost.hint)

    def _execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> psycopg.Cursor[Any]:
        self._check()
        try:
            return self.conn.execute(sql, params)  # type: ignore[arg-type]
        except psycopg.Error as exc:
            raise self._wrap(exc) from exc

    @contextmanager
    def _batch(self) -> Iterator[psycopg.Connection[Any]]:
        """One transaction whose statements travel together (pipeline mode: one round trip)."""
        self._check()
        try:
            with self.conn.pipeline(), self.conn.transaction():
                yield self.conn
        except psycopg.Error as exc:
            raise self._wrap(exc) from exc

    # ---- read primitives -----------------------------------------------------------------------
    def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._execute(_qmarks(sql), params).fetchall()

    def _stream(self, sql: str, params: Sequence[Any] = ()) -> Iterator[tuple[Any, ...]]:
        yield from self._server_cursor(sql, params, None)

    def _stream_dicts(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Mapping[str, Any]]:
        yield from self._server_cursor(sql, params, dict_row)

    def _server_cursor(self, sql: str, params: Sequence[Any], factory: Any) -> Iterator[Any]:
        self._check()
        try:
            with self.conn.transaction():
                kwargs = {"row_factory": factory} if factory else {}
                with self.conn.cursor(name=f"capbatch_{id(sql)}_{time.monotonic_ns()}", **kwargs) as cur:
                    cur.itersize = 5000
                    cur.execute(_qmarks(sql), params)
                    yield from cur
        except psycopg.Error as exc:
            raise self._wrap(exc) from exc

    # ---- meta ----------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._execute("SELECT value FROM capbatch.meta WHERE run_id=%s AND key=%s", (self.run_id, key)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._execute("INSERT INTO capbatch.meta(run_id, key, value) VALUES (%s, %s, %s) "
                      "ON CONFLICT (run_id, key) DO UPDATE SET value=excluded.value", (self.run_id, key, value))

    # ---- import --------------------------------------------------------------------------------
    def is_imported(self) -> bool:
        if super().is_imported():
            return True
        # Not yet: become the importer, or wait for the one that is (then find its work done).
        key = self._import_key()
        said = False
        while not self._execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_NAMESPACE, key)).fetchone()[0]:
            if not said:
                log.info("another worker is importing the input of job %s; waiting for it", self.job)
                said = True
            time.sleep(0.25)
        if super().is_imported():
            self._execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_NAMESPACE, key))
            return True
        return False    # this process imports, holding the lock until mark_imported

    def _import_key(self) -> int:
        return (_IMPORT_BASE + self.run_id) % (1 << 31)

    def reset_import(self) -> None:
        self._execute("DELETE FROM capbatch.rows WHERE run_id=%s", (self.run_id,))

    def import_rows(self, rows: Iterable[tuple[Any, ...]], batch: int = 20000, numbered: bool = False) -> int:
        count = 0
        self._check()
        try:
            with self.conn.transaction(), self.conn.cursor() as cur:
                with cur.copy("COPY capbatch.rows (run_id, id, sheet, row_number, original, card, external_id, "
                              "state, reason_code, reason, problem_column) FROM STDIN") as copy:
                    for count, row in enumerate(rows, 1):
                        copy.write_row((self.run_id, *row) if numbered else (self.run_id, count, *row))
        except psycopg.Error as exc:
            raise self._wrap(exc) from exc
        return count

    def apply_cross_row_rules(self, allow_empty_external_id: bool = False,
                              only: Sequence[int] | None = None) -> None:
        if only is not None and not only:
            return  # every card number and external ID occurs once: nothing to do
        empty_ok = "AND external_id <> ''" if allow_empty_external_id else ""
        run = f"run_id = {int(self.run_id)}"
        label = "coalesce(sheet || '!', '') || row_number"
        statements = [
            f"""CREATE TEMP TABLE card_conflicts ON COMMIT DROP AS
                SELECT card, string_agg({label}, ', ' ORDER BY id) AS labels FROM capbatch.rows
                WHERE {run} AND state='pending' AND card IN (
                    SELECT card FROM capbatch.rows WHERE {run} AND state='pending' GROUP BY card
                    HAVING count(DISTINCT external_id) > 1)
                GROUP BY card""",
            f"""CREATE TEMP TABLE ext_conflicts ON COMMIT DROP AS
                SELECT external_id, string_agg({label}, ', ' ORDER BY id) AS labels FROM capbatch.rows
                WHERE {run} AND state='pending' {empty_ok} AND external_id IN (
                    SELECT external_id FROM capbatch.rows WHERE {run} AND state='pending' {empty_ok}
                    GROUP BY external_id HAVING count(DISTINCT card) > 1)
                GROUP BY external_id""",
            f"""UPDATE capbatch.rows AS r SET state='rejected', reason_code='conflict_card', problem_column='card',
                reason='card ' || r.card || ' appears with different external IDs in rows ' || c.labels
                       || ': keep one external ID per card and rerun'
                FROM card_conflicts AS c WHERE r.{run} AND r.card = c.card AND r.state='pending'""",
            f"""UPDATE capbatch.rows AS r SET state='rejected', reason_code='conflict_external_id',
                problem_column='external_id',
                reason='external ID ' || r.external_id || ' is given to different cards in rows ' || c.labels
                       || ': external IDs are unique across cards; keep one card per external ID and rerun'
                FROM ext_conflicts AS c WHERE r.{run} AND r.external_id = c.external_id AND r.state='pending'""",
            f"""CREATE TEMP TABLE first_of_pair ON COMMIT DROP AS
                SELECT card, external_id, min(id) AS first_id FROM capbatch.rows WHERE {run} AND state='pending'
                GROUP BY card, external_id HAVING count(*) > 1""",
            f"""UPDATE capbatch.rows AS r SET state='duplicate', reason_code='duplicate', problem_column='card',
                duplicate_of=f.first_id,
                reason='same card and external ID as row ' || (SELECT coalesce(o.sheet || '!', '') || o.row_number
                        FROM capbatch.rows o WHERE o.{run} AND o.id=f.first_id) || ': sent once for both'
                FROM first_of_pair AS f
                WHERE r.{run} AND r.card=f.card AND r.external_id=f.external_id AND r.id<>f.first_id
                  AND r.state='pending'""",
        ]
        with self._batch() as conn:
            for sql in statements:
                conn.execute(sql)

    def mark_imported(self) -> None:
        self.set_meta("imported_at", repr(time.time()))
        self._execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_NAMESPACE, self._import_key()))

    # ---- workers, leases and claims ------------------------------------------------------------
    def _ensure_worker(self) -> int:
        """Register this process as a worker of the run: an invocation row, its lease and its lock."""
        if self.worker_id is None:
            row = self._execute(
                "INSERT INTO capbatch.invocations(run_id, host, pid, started_at, last_seen_at, lease_until) "
                "VALUES (%s, %s, %s, %s, %s, now() + make_interval(secs => %s)) RETURNING id",
                (self.run_id, socket.gethostname(), os.getpid(), time.time(), time.time(), LEASE_SECONDS)).fetchone()
            self.worker_id = int(row[0])
            self._execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_NAMESPACE, self._worker_key(self.worker_id)))
            self._last_renew = time.monotonic()
        return self.worker_id

    @staticmethod
    def _worker_key(worker_id: int) -> int:
        return worker_id % _IMPORT_BASE   # below the import keys

    def heartbeat(self) -> None:
        if self.worker_id is None or time.monotonic() - self._last_renew < RENEW_EVERY:
            return
        renewed = self._execute("UPDATE capbatch.invocations SET lease_until = now() + make_interval(secs => %s) "
                                "WHERE id=%s AND lease_until > now() RETURNING id",
                                (LEASE_SECONDS, self.worker_id)).fetchone()
        if renewed is None:
            # Stalled past the lease (stopped, starved): other workers may have taken our rows, so
            # sending them now could send a row twice at once. Stop; a rerun joins afresh.
            self._lost = LedgerLost(f"this worker's lease on job {self.job} expired (it was stalled for over "
                                    f"{LEASE_SECONDS:g} s) and its rows may be with other workers; stopped sending",
                                    "rerun the same command to join the job again")
            raise self._lost
        self._last_renew = time.monotonic()

    # Live workers of this run: a fresh lease and the advisory lock held (by a connection that exists).
    _LIVE = f"""SELECT w.id FROM capbatch.invocations w JOIN pg_locks l
                ON l.locktype = 'advisory' AND l.classid::bigint = {LOCK_NAMESPACE}
                   AND l.objid::bigint = mod(w.id, {_IMPORT_BASE}) AND l.objsubid = 2 AND l.granted
                WHERE w.run_id = %(run)s AND w.ended_at IS NULL AND w.lease_until > now()"""

    def unknown_rows(self) -> list[WorkRow]:
        rows = self._execute(
            f"WITH live AS MATERIALIZED ({self._LIVE}) SELECT {self._WORK_COLUMNS} FROM capbatch.rows "
            "WHERE run_id=%(run)s AND state='in_flight' AND (owner IS NULL OR owner NOT IN (SELECT id FROM live)) "
            "ORDER BY id", {"run": self.run_id}).fetchall()
        return [WorkRow(i, c, e, True, bool(g), bool(a), x) for i, c, e, g, a, x in rows]

    def held_elsewhere(self) -> int:
        return int(self._execute("SELECT count(*) FROM capbatch.rows WHERE run_id=%s AND state='in_flight' "
                                 "AND owner IS DISTINCT FROM %s", (self.run_id, self.worker_id)).fetchone()[0])

    _RETURNING = "r.id, r.card, r.external_id, r.generated, r.audit, r.expect_external_id"

    def claim(self, limit: int, results: Sequence[RowResult] = (),
              timeline: dict[int, list[int]] | None = None,
              requests: Mapping[str, int] | None = None) -> list[WorkRow]:
        # Each statement below is one round trip: the outcomes, the timeline and the claim travel
        # as data-modifying CTEs of a single statement (atomic on its own, no BEGIN/COMMIT needed).
        me = self._ensure_worker()
        now = time.monotonic()
        if now - self._last_unknown_check >= UNKNOWN_CHECK_EVERY:
            self._last_unknown_check = now
            unknown = self._outcomes_then(
                results, timeline, requests,
                f"live AS MATERIALIZED ({self._LIVE}), c AS ("
                "  SELECT id FROM capbatch.rows WHERE run_id=%(run)s AND state='in_flight' "
                "  AND (owner IS NULL OR owner NOT IN (SELECT id FROM live)) "
                "  ORDER BY id LIMIT %(n)s FOR UPDATE SKIP LOCKED) "
                "UPDATE capbatch.rows r SET owner=%(me)s FROM c WHERE r.run_id=%(run)s AND r.id=c.id "
                f"RETURNING {self._RETURNING}", {"me": me, "n": limit})
            if unknown:
                self._last_unknown_check = 0.0   # more may follow: look again next time
                return sorted((WorkRow(i, c, e, True, bool(g), bool(a), x) for i, c, e, g, a, x in unknown),
                              key=lambda r: r.id)
            results, timeline, requests = (), None, None   # written; now the pending rows
        claimed = self._outcomes_then(
            results, timeline, requests,
            "c AS (SELECT id FROM capbatch.rows WHERE run_id=%(run)s AND state='pending' "
            "  ORDER BY id LIMIT %(n)s FOR UPDATE SKIP LOCKED) "
            "UPDATE capbatch.rows r SET state='in_flight', owner=%(me)s FROM c "
            f"WHERE r.run_id=%(run)s AND r.id=c.id RETURNING {self._RETURNING}", {"me": me, "n": limit})
        if not claimed:
            self._last_unknown_check = 0.0   # at the end, look for a dead worker's rows on every call
        return sorted((WorkRow(i, c, e, False, bool(g), bool(a), x) for i, c, e, g, a, x in claimed),
                      key=lambda r: r.id)

    def spread_pending(self, count: int) -> list[WorkRow]:
        """As on any ledger, but the rows come claimed (in flight for this worker): the canary settles
        them alone while other workers may be claiming chunks."""
        wanted = [r.id for r in super().spread_pending(count)]
        if not wanted:
            return []
        rows = self._execute(
            "UPDATE capbatch.rows r SET state='in_flight', owner=%(me)s WHERE run_id=%(run)s "
            f"AND id = ANY(%(ids)s) AND state='pending' RETURNING {self._RETURNING}",
            {"me": self._ensure_worker(), "run": self.run_id, "ids": wanted}).fetchall()
        return sorted((WorkRow(i, c, e, False, bool(g), bool(a), x) for i, c, e, g, a, x in rows), key=lambda r: r.id)

    def warning_counts(self) -> dict[str, dict[str, Any]]:
        rows = self._execute(
            "SELECT w->>'code', count(DISTINCT r.id), max(w->>'message') FROM capbatch.rows r, "
            "jsonb_array_elements(r.warnings::jsonb) AS w WHERE r.run_id=%s AND r.warnings IS NOT NULL "
            "GROUP BY 1 ORDER BY 2 DESC, 1", (self.run_id,)).fetchall()
        return {str(code or ""): {"rows": int(n), "message": message or ""} for code, n, message in rows}

    def change_mark(self) -> Any:
        """The oldest transaction still running: every change by an older one is visible now.

        Taking a mark (reports are about to be written) also prunes the change log, which would
        otherwise grow by a row per statement for ever: what the oldest of the last
        ``KEEP_REPORT_MARKS`` marks (any worker's, any report directory's) covered goes, and so
        does everything of the job's other runs (finished: a job has one unfinished run).
        ``changes_kept_from`` in the run's meta says where the log now starts; an index older than
        that is answered None (every chunk changed), never a partial list."""
        mark = int(self._execute("SELECT txid_snapshot_xmin(txid_current_snapshot())").fetchone()[0])
        if not self.readonly:
            self._prune_changes(mark)
        return mark

    KEEP_REPORT_MARKS = 16             # report indexes (directories, workers) that stay incremental
    _KEPT_FROM = "changes_kept_from"   # meta: row_changes of the run older than this xid are gone
    _REPORT_MARKS = "report_marks"     # meta: the last marks handed out for reports, oldest first

    def _prune_changes(self, mark: int) -> None:
        upsert = ("INSERT INTO capbatch.meta(run_id, key, value) {rows} ON CONFLICT (run_id, key) DO UPDATE "
                  "SET value = greatest(capbatch.meta.value::bigint, excluded.value::bigint)::text")
        self._execute(
            "WITH cur AS (SELECT string_to_array(value, ',')::bigint[] AS marks FROM capbatch.meta "
            "WHERE run_id=%(run)s AND key=%(rm)s), "
            "kept AS (SELECT m[greatest(1, cardinality(m) - %(keep)s + 1):] AS marks FROM (SELECT "
            "coalesce((SELECT marks FROM cur), '{}'::bigint[]) || %(mark)s::bigint AS m) AS x), "
            "mine AS (DELETE FROM capbatch.row_changes WHERE run_id=%(run)s AND xid < (SELECT marks[1] FROM kept)), "
            "others AS (DELETE FROM capbatch.row_changes c USING capbatch.runs r WHERE c.run_id=r.id "
            "AND r.job=%(job)s AND r.id<>%(run)s RETURNING c.run_id), "
            "kept_from AS (" + upsert.format(rows="SELECT %(run)s, %(kf)s, marks[1]::text FROM kept") + "), "
            "kept_others AS (" + upsert.format(rows="SELECT DISTINCT run_id, %(kf)s, (txid_current() + 1)::text "
                                                    "FROM others") + ") "
            "INSERT INTO capbatch.meta(run_id, key, value) SELECT %(run)s, %(rm)s, array_to_string(marks, ',') "
            "FROM kept ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value",
            {"run": self.run_id, "job": self.job, "rm": self._REPORT_MARKS, "kf": self._KEPT_FROM,
             "mark": mark, "keep": self.KEEP_REPORT_MARKS})

    def changed_chunks(self, since: Any) -> set[int] | None:
        if not isinstance(since, int) or isinstance(since, bool):
            return None
        if self._execute("SELECT to_regclass('capbatch.row_changes')").fetchone()[0] is None:
            return None   # a read-only look at a database below schema 4: rewrite everything
        # One statement, one snapshot: the log's start and its rows agree, whatever a prune does meanwhile.
        kept_from, chunks = self._execute(
            "SELECT (SELECT value::bigint FROM capbatch.meta WHERE run_id=%s AND key=%s), "
            "ARRAY(SELECT DISTINCT chunk FROM capbatch.row_changes WHERE run_id=%s AND xid >= %s)",
            (self.run_id, self._KEPT_FROM, self.run_id, since)).fetchone()
        if kept_from is not None and since < kept_from:
            return None   # pruned past this mark: every chunk counts as changed
        return {int(chunk) for chunk in chunks}

    def mark_in_flight(self, ids: Sequence[int]) -> None:
        self.record((), None, ids)

    def release(self, ids: Sequence[int]) -> None:
        if ids:
            self._execute("UPDATE capbatch.rows SET state='pending', owner=NULL WHERE run_id=%s AND id = ANY(%s) "
                          "AND state='in_flight'", (self.run_id, list(ids)))

    def requeue_failed(self) -> int:
        return self._execute(
            "UPDATE capbatch.rows SET state='pending', note='earlier attempt failed: ' || "
            "trim(coalesce(error_code, '') || ' ' || coalesce(error_message, '')), "
            "error_code=NULL, error_message=NULL, http_status=NULL, settled_at=NULL, settled_by=NULL "
            "WHERE run_id=%s AND state='failed'", (self.run_id,)).rowcount

    def store_generated(self, row_id: int, external_id: str) -> None:
        self._execute("UPDATE capbatch.rows SET external_id=%s, generated=1 WHERE run_id=%s AND id=%s",
                      (external_id, self.run_id, row_id))

    def record(self, results: Sequence[RowResult], timeline: dict[int, list[int]] | None = None,
               journal: Sequence[int] = (), requests: Mapping[str, int] | None = None) -> None:
        if not results and not timeline and not journal and requests is None:
            return
        me = self._ensure_worker() if journal else self.worker_id
        self._outcomes_then(results, timeline, requests,
                            "j AS (UPDATE capbatch.rows SET state='in_flight', owner=%(me)s WHERE run_id=%(run)s "
                            "AND id = ANY(%(journal)s) AND state='pending' RETURNING 1) "
                            "SELECT (SELECT count(*) FROM done), (SELECT count(*) FROM tl), (SELECT count(*) FROM j)",
                            {"me": me, "journal": list(journal)})

    def _outcomes_then(self, results: Sequence[RowResult], timeline: dict[int, list[int]] | None,
                       requests: Mapping[str, int] | None, tail: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """One statement: write a batch of outcomes (CTE ``done``), timeline counters (``tl``) and this
        invocation's request figures (``inv``), then ``tail`` (more CTEs and the final statement,
        whose rows are returned). The outcomes touch rows in flight, a claim touches pending ones:
        one statement never updates a row twice."""
        cols: list[list[Any]] = [list(c) for c in zip(*(
            (r.id, r.state.value, r.attempts, r.http_status, r.error_code, r.error_message, r.card_id,
             r.customer_id, r.previous_external_id, r.latency_ms, r.note, r.settled_at,
             warnings_json(r.warnings) if r.warnings else None) for r in results))] \
            or [[] for _ in range(13)]
        seconds = sorted(timeline or {})
        names = ("ids", "states", "attempts", "statuses", "codes", "messages", "card_ids", "customer_ids",
                 "previous", "latencies", "notes", "settled", "warnings")
        values: dict[str, Any] = dict(zip(names, cols))
        values.update(run=self.run_id, seconds=seconds, worker=self.worker_id, now=time.time(),
                      requests=None if requests is None else sum(requests.values()),
                      by_status=None if requests is None else json.dumps(dict(requests)),
                      **{f"t{k}": [timeline[s][k] for s in seconds] for k in range(4)} if timeline else
                      {f"t{k}": [] for k in range(4)}, **params)
        sql = (
            "WITH done AS (UPDATE capbatch.rows r SET state=v.state, attempts=r.attempts+v.attempts, "
            "http_status=v.http_status, error_code=v.error_code, error_message=v.error_message, "
            "card_id=coalesce(v.card_id, r.card_id), customer_id=coalesce(v.customer_id, r.customer_id), "
            "previous_external_id=coalesce(v.previous, r.previous_external_id), "
            "latency_ms=coalesce(v.latency_ms, r.latency_ms), note=coalesce(v.note, r.note), "
            "settled_at=v.settled_at, warnings=v.warnings, owner=NULL, settled_by=%(worker)s "
            "FROM unnest(%(ids)s::int[], %(states)s::text[], %(attempts)s::int[], %(statuses)s::int[], "
            "%(codes)s::text[], %(messages)s::text[], %(card_ids)s::text[], %(customer_ids)s::text[], "
            "%(previous)s::text[], %(latencies)s::float8[], %(notes)s::text[], %(settled)s::float8[], "
            "%(warnings)s::text[]) "
            "AS v(id, state, attempts, http_status, error_code, error_message, card_id, customer_id, previous, "
            "latency_ms, note, settled_at, warnings) WHERE r.run_id=%(run)s AND r.id=v.id RETURNING 1), "
            "tl AS (INSERT INTO capbatch.timeline AS t (run_id, second, ok, failed, retried, throttled) "
            "SELECT %(run)s, * FROM unnest(%(seconds)s::bigint[], %(t0)s::int[], %(t1)s::int[], %(t2)s::int[], "
            "%(t3)s::int[]) ON CONFLICT (run_id, second) DO UPDATE SET ok=t.ok+excluded.ok, "
            "failed=t.failed+excluded.failed, retried=t.retried+excluded.retried, "
            "throttled=t.throttled+excluded.throttled RETURNING 1), "
            "inv AS (UPDATE capbatch.invocations SET last_seen_at=%(now)s, requests=%(requests)s, "
            "requests_by_status=%(by_status)s WHERE id=%(worker)s AND %(requests)s::int IS NOT NULL RETURNING 1), "
            + tail)
        return self._execute(sql, values).fetchall()

    # ---- job memory: in the database ----------------------------------------------------------
    def job_store(self, reports_dir: Any = None) -> "PostgresJobStore":
        """The job's memory, in this ledger's database (on its connection)."""
        return PostgresJobStore(self.url, self.conn, owned=False, wrap=self._wrap)

    # ---- the shared quota ----------------------------------------------------------------------
    def quota_database(self) -> str | None:
        return self.url

    # ---- invocations ---------------------------------------------------------------------------
    def start_invocation(self) -> int:
        return self._ensure_worker()

    def end_invocation(self, run_id: int, exit_code: int, outcome: str, requests: int | None = None,
                       requests_by_status: Mapping[str, int] | None = None) -> None:
        if self._lost:
            return   # the database is gone; its lease runs out on its own
        now = time.time()
        by_status = json.dumps(dict(requests_by_status)) if requests_by_status is not None else None
        self._execute("UPDATE capbatch.invocations SET ended_at=%s, last_seen_at=%s, exit_code=%s, outcome=%s, "
                      "requests=coalesce(%s, requests), requests_by_status=coalesce(%s, requests_by_status), "
                      "lease_until=now() WHERE id=%s", (now, now, exit_code, outcome, requests, by_status, run_id))

    def invocations(self) -> list[dict[str, Any]]:
        cur = self._execute("SELECT id, pid, started_at, ended_at, exit_code, outcome, requests, last_seen_at, "
                            "requests_by_status, host FROM capbatch.invocations WHERE run_id=%s ORDER BY id",
                            (self.run_id,))
        cols = [d[0] for d in cur.description or ()]
        return [shape_invocation(dict(zip(cols, r))) for r in cur.fetchall()]


class PostgresJobStore(JobStore):
    """A database job's memory: ``capbatch.jobs`` (its target), ``capbatch.confirmed`` (its confirmed
    pairs) and ``capbatch.job_runs`` (its history), shared by every worker and every host."""

    def __init__(self, url: str, conn: psycopg.Connection[Any], *, owned: bool,
                 wrap: Any = None, readonly: bool = False) -> None:
        self.url = url
        self.location = redact_password(url)
        self.conn = conn
        self._owned = owned
        self._readonly = readonly
        self._wrap_error = wrap or (lambda exc: _wrap_setup(exc, url))

    @classmethod
    def open(cls, url: str, readonly: bool = False) -> "PostgresJobStore":
        """A store on a connection of its own (commands that have no run open: forget, history)."""
        check_url(url)
        conn = _connect(url, readonly)
        try:
            if not readonly:
                _migrate(conn, url)
        except BaseException:
            conn.close()
            raise
        return cls(url, conn, owned=True, readonly=readonly)

    def close(self) -> None:
        if self._owned:
            self.conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self.conn.transaction():
                yield self.conn
        except psycopg.Error as exc:
            raise self._wrap_error(exc) from exc

    def _has(self, table: str) -> bool:
        """Whether ``capbatch.<table>`` exists (a read-only look at an older or empty database)."""
        return self.conn.execute("SELECT to_regclass(%s)", (f"capbatch.{table}",)).fetchone()[0] is not None

    # ---- the job's target ----------------------------------------------------------------------
    def bind_target(self, job: str, target: str) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT INTO capbatch.jobs(job, target, created_at) VALUES (%s, %s, %s) "
                         "ON CONFLICT (job) DO NOTHING", (job, target, time.time()))
            bound = conn.execute("SELECT target FROM capbatch.jobs WHERE job=%s", (job,)).fetchone()[0]
        if bound != target:
            raise target_mismatch(job, bound, target)

    # ---- confirmed pairs -----------------------------------------------------------------------
    def settle_confirmed(self, ledger: Ledger, job: str, audit_fraction: float | None = None) -> tuple[int, int]:
        """Picked once per run, under a row lock on the run, so workers starting together pick one slice."""
        run_id = _run_of(ledger, self)
        params = {"now": time.time(), "job": job, "run": run_id}
        match = ("FROM capbatch.rows r JOIN capbatch.confirmed c ON c.job=%(job)s AND c.card=r.card "
                 "AND c.external_id=r.external_id WHERE r.run_id=%(run)s AND r.state='pending' AND r.audit=0 "
                 "AND r.external_id <> ''")
        with self._transaction() as conn:
            conn.execute("SELECT 1 FROM capbatch.runs WHERE id=%(run)s FOR UPDATE", params)
            picked = conn.execute("SELECT value FROM capbatch.meta WHERE run_id=%(run)s "
                                  "AND key='audit_picked'", params).fetchone()
            audited = int(picked[0]) if picked else 0
            if audit_fraction and not picked:
                matched = conn.execute(f"SELECT count(*) {match}", params).fetchone()[0]
                audited = conn.execute(
                    f"UPDATE capbatch.rows SET audit=1 WHERE run_id=%(run)s AND id IN (SELECT r.id {match} "
                    "ORDER BY c.confirmed_at, r.card LIMIT %(limit)s)",
                    {**params, "limit": math.ceil(matched * audit_fraction)}).rowcount
                conn.execute("INSERT INTO capbatch.meta(run_id, key, value) VALUES (%(run)s, "
                             "'audit_picked', %(n)s)", {**params, "n": str(audited)})
            settled = conn.execute(
                "UPDATE capbatch.rows r SET state='unchanged', settled_at=%(now)s, "
                "note='confirmed by an earlier run of job ' || %(job)s || ' on ' || "
                "to_char(to_timestamp(c.confirmed_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') "
                "|| ' UTC; not sent (--skip-confirmed)' "
                "FROM capbatch.confirmed c WHERE r.run_id=%(run)s AND r.state='pending' AND r.audit=0 "
                "AND r.external_id <> '' AND c.job=%(job)s AND c.card=r.card AND c.external_id=r.external_id",
                params).rowcount
        return settled, audited

    def remember(self, ledger: Ledger, job: str, run_dir: Any, summary: Mapping[str, Any],
                 started_at: float) -> None:
        run_id = _run_of(ledger, self)
        input_name = ledger.get_meta("input_name")
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO capbatch.confirmed(job, card, external_id, confirmed_at, run_dir) "
                "SELECT %(job)s, card, external_id, coalesce(settled_at, %(now)s), %(dir)s FROM capbatch.rows "
                "WHERE run_id=%(run)s AND state IN ('succeeded','unchanged') AND external_id <> '' AND attempts > 0 "
                "ON CONFLICT (job, card) DO UPDATE SET external_id=excluded.external_id, "
                "confirmed_at=excluded.confirmed_at, run_dir=excluded.run_dir",
                {"job": job, "now": time.time(), "dir": str(run_dir), "run": run_id})
            conn.execute(
                "INSERT INTO capbatch.job_runs(job, run_id, run_dir, input_name, host, started_at, ended_at, "
                "exit_code, counts, requests) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                (job, run_id, str(run_dir), input_name, socket.gethostname(), started_at,
                 time.time(), summary.get("exit_code"), json.dumps(summary.get("counts", {})),
                 (summary.get("this_invocation") or {}).get("requests", 0)))

    def forget(self, job: str, cards: Iterable[str] = ()) -> int:
        wanted = list(cards)
        with self._transaction() as conn:
            if wanted:
                return conn.execute("DELETE FROM capbatch.confirmed WHERE job=%s AND card = ANY(%s)",
                                    (job, wanted)).rowcount
            conn.execute("DELETE FROM capbatch.jobs WHERE job=%s", (job,))
            return conn.execute("DELETE FROM capbatch.confirmed WHERE job=%s", (job,)).rowcount

    def forget_pairs(self, job: str, pairs: Iterable[tuple[str, str]]) -> int:
        cards, ids = [list(c) for c in zip(*pairs)] or [[], []]
        with self._transaction() as conn:
            return conn.execute("DELETE FROM capbatch.confirmed c USING unnest(%s::text[], %s::text[]) AS p(card, ext) "
                                "WHERE c.job=%s AND c.card=p.card AND c.external_id=p.ext", (cards, ids, job)).rowcount

    # ---- reading -------------------------------------------------------------------------------
    def describe(self, job: str) -> dict[str, Any]:
        out: dict[str, Any] = {"job": job, "target": None, "confirmed_pairs": 0, "oldest_check": None,
                               "newest_check": None}
        try:
            if self._has("jobs"):
                row = self.conn.execute("SELECT target FROM capbatch.jobs WHERE job=%s", (job,)).fetchone()
                out["target"] = row[0] if row else None
            if self._has("confirmed"):
                n, oldest, newest = self.conn.execute(
                    "SELECT count(*), min(confirmed_at), max(confirmed_at) FROM capbatch.confirmed WHERE job=%s",
                    (job,)).fetchone()
                out.update(confirmed_pairs=int(n), oldest_check=oldest, newest_check=newest)
        except psycopg.Error as exc:
            raise self._wrap_error(exc) from exc
        return out

    def history(self, job: str) -> list[dict[str, Any]]:
        """One line per worker invocation that finished, then each that ended without one (killed: its
        row has no end and no live connection holds its lock), oldest first."""
        try:
            if not self._has("job_runs"):
                return []
            cur = self.conn.execute("SELECT id, run_dir, input_name, started_at, ended_at, exit_code, counts, "
                                    "requests, host FROM capbatch.job_runs WHERE job=%s ORDER BY id", (job,))
            cols = [d[0] for d in cur.description or ()]
            lines = [{**dict(zip(cols, row)), "counts": json.loads(row[6] or "{}")} for row in cur.fetchall()]
            return sorted(lines + self._unended(job), key=lambda line: line.get("started_at") or 0.0)
        except psycopg.Error as exc:
            raise self._wrap_error(exc) from exc

    def _unended(self, job: str) -> list[dict[str, Any]]:
        """The job's worker invocations that never recorded an end, with the rows each settled (rows
        settled before the ledger recorded the worker count by time: the run's rows while it ran)."""
        if not self._has("invocations"):
            return []
        rows = self.conn.execute(
            "SELECT i.id, i.run_id, i.host, i.started_at, i.last_seen_at, i.requests, "
            "(SELECT value FROM capbatch.meta m WHERE m.run_id=i.run_id AND m.key='run_dir'), "
            "(SELECT value FROM capbatch.meta m WHERE m.run_id=i.run_id AND m.key='input_name'), "
            "EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' "
            f"AND l.classid::bigint = {LOCK_NAMESPACE} AND l.objid::bigint = mod(i.id, {_IMPORT_BASE}) "
            "AND l.objsubid = 2 AND l.granted) "
            "FROM capbatch.invocations i JOIN capbatch.runs r ON r.id = i.run_id "
            "WHERE r.job=%s AND i.ended_at IS NULL ORDER BY i.id", (job,)).fetchall()
        out = []
        for _id, run_id, host, started, last_seen, requests, run_dir, input_name, live in rows:
            settled = self.conn.execute(
                "SELECT state, count(*) FROM capbatch.rows WHERE run_id=%s AND (settled_by=%s OR (settled_by IS NULL "
                "AND settled_at >= %s AND settled_at <= %s)) GROUP BY state",
                (run_id, _id, started, last_seen or started)).fetchall()
            out.append({"id": None, "run_dir": run_dir, "input_name": input_name, "started_at": started,
                        "ended_at": None, "exit_code": None, "counts": {}, "requests": requests or 0, "host": host,
                        "recorded": False, "outcome": "running" if live else "killed",
                        "settled": {state: int(n) for state, n in settled}})
        return out


def _run_of(ledger: Ledger, store: PostgresJobStore) -> int:
    """The run id of a database ledger in the store's database; anything else is a wiring error."""
    if not isinstance(ledger, PostgresLedger) or ledger.url != store.url:
        raise LedgerError(f"the job memory in {store.location} serves that database's runs, not {ledger.location}",
                          "a run-directory job keeps its memory in <reports-dir>/jobs.sqlite")
    return ledger.run_id


# ---- connecting, migrating, finding the run --------------------------------------------------------
def connect_options(url: str, application_name: str = "capbatch") -> dict[str, Any]:
    """The options every capbatch connection to ``url`` uses (ledger and quota alike)."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    extra: dict[str, Any] = {"application_name": application_name}
    if "connect_timeout" not in info and not os.environ.get("PGCONNECT_TIMEOUT"):
        extra["connect_timeout"] = CONNECT_TIMEOUT
    # Keepalives: a database host that vanishes is noticed within about a minute, not hours.
    extra.update(keepalives=1, keepalives_idle=15, keepalives_interval=5, keepalives_count=3)
    return extra


def ensure_schema(url: str) -> None:
    """Create or upgrade capbatch's schema in ``url`` (as the first run would), then disconnect."""
    conn = _connect(url, readonly=False)
    try:
        _migrate(conn, url)
    finally:
        conn.close()


def _connect(url: str, readonly: bool) -> psycopg.Connection[Any]:
    extra = connect_options(url)
    try:
        conn = psycopg.connect(url, autocommit=True, **extra)
        if readonly:
            conn.execute("SET default_transaction_read_only = on")
    except psycopg.Error as exc:
        raise LedgerError(f"cannot connect to the ledger database {redact_password(url)}: {_redact(str(exc), url)}",
                          "check that the server is up and the URL, user and PGPASSWORD/~/.pgpass are right; "
                          "nothing was sent") from exc
    return conn


def _wrap_setup(exc: psycopg.Error, url: str) -> LedgerError:
    msg = _redact(str(exc), url)
    if isinstance(exc, pg_errors.InsufficientPrivilege):
        return LedgerError(f"the ledger database {redact_password(url)} refused to set up capbatch's tables: {msg}",
                           "have the owner run capbatch once, or grant the privileges README lists "
                           "(section 'A PostgreSQL ledger')")
    return LedgerError(f"cannot use the ledger database {redact_password(url)}: {msg}",
                       "check the server and rerun; nothing was sent")


def schema_version(conn: psycopg.Connection[Any]) -> int | None:
    exists = conn.execute("SELECT to_regclass('capbatch.schema_version')").fetchone()[0]
    if exists is None:
        return None
    row = conn.execute("SELECT version FROM capbatch.schema_version").fetchone()
    return int(row[0]) if row else 0


def _migrate(conn: psycopg.Connection[Any], url: str) -> None:
    """Create or upgrade the capbatch schema, once, whoever else is starting at the same moment."""
    try:
        current = schema_version(conn)
        if current == SCHEMA_VERSION:
            return
        if current is not None and current > SCHEMA_VERSION:
            raise LedgerError(f"the ledger database {redact_password(url)} was set up by a newer capbatch "
                              f"(schema {current}, this capbatch knows {SCHEMA_VERSION})",
                              "upgrade capbatch on this host to work on that job")
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_NAMESPACE, _MIGRATE_KEY))
            if not conn.execute("SELECT 1 FROM pg_namespace WHERE nspname='capbatch'").fetchone():
                conn.execute("CREATE SCHEMA capbatch")   # needs CREATE on the database; a DBA may do it instead
            conn.execute("CREATE TABLE IF NOT EXISTS capbatch.schema_version (version integer NOT NULL)")
            current = schema_version(conn) or 0
            if current > SCHEMA_VERSION:
                raise LedgerError(f"the ledger database {redact_password(url)} was set up by a newer capbatch "
                                  f"(schema {current})", "upgrade capbatch on this host")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                conn.execute(_MIGRATIONS[version - 1])
                log.info("ledger database: schema migrated to version %d", version)
            conn.execute("DELETE FROM capbatch.schema_version")
            conn.execute("INSERT INTO capbatch.schema_version(version) VALUES (%s)", (SCHEMA_VERSION,))
    except psycopg.Error as exc:
        raise _wrap_setup(exc, url) from exc


def _get_or_create_run(conn: psycopg.Connection[Any], url: str, job: str, sha: str | None) -> int:
    if not sha:
        raise UsageError("a database ledger run needs the input's content hash", "pass the input file")
    try:
        other = conn.execute(
            "SELECT r.input_sha256, (SELECT value FROM capbatch.meta m WHERE m.run_id=r.id AND m.key='input_name') "
            "FROM capbatch.runs r WHERE r.job=%s AND r.input_sha256<>%s AND EXISTS (SELECT 1 FROM capbatch.rows w "
            "WHERE w.run_id=r.id AND w.state IN ('pending','in_flight')) ORDER BY r.id DESC LIMIT 1",
            (job, sha)).fetchone()
        if other:
            raise LedgerError(
                f"job {job} has an unfinished run for different input content "
                f"({other[1] or 'input'} {other[0][:12]}…, this file is {sha[:12]}…)",
                "finish that run first (rerun with its file), or give this input its own --job NAME")
        conn.execute("INSERT INTO capbatch.runs(job, input_sha256, created_at) VALUES (%s, %s, %s) "
                     "ON CONFLICT (job, input_sha256) DO NOTHING", (job, sha, time.time()))
        return int(conn.execute("SELECT id FROM capbatch.runs WHERE job=%s AND input_sha256=%s",
                                (job, sha)).fetchone()[0])
    except psycopg.Error as exc:
        raise _wrap_setup(exc, url) from exc


def job_names(url: str) -> list[str]:
    """The jobs that have runs in the database at ``url``, by name."""
    check_url(url)
    conn = _connect(url, readonly=True)
    try:
        if schema_version(conn) is None:
            return []
        return [row[0] for row in conn.execute("SELECT DISTINCT job FROM capbatch.runs ORDER BY job")]
    except psycopg.Error as exc:
        raise _wrap_setup(exc, url) from exc
    finally:
        conn.close()


def _find_run(conn: psycopg.Connection[Any], url: str, job: str, sha: str | None) -> int:
    try:
        if schema_version(conn) is None:
            raise LedgerError(f"the database {redact_password(url)} holds no capbatch ledger",
                              "check --ledger; `capbatch run --ledger URL --job NAME INPUT` creates it")
        row = conn.execute("SELECT id FROM capbatch.runs WHERE job=%s AND (%s::text IS NULL OR input_sha256=%s) "
                           "ORDER BY id DESC LIMIT 1", (job, sha, sha)).fetchone()
    except psycopg.Error as exc:
        raise _wrap_setup(exc, url) from exc
    if row is None:
        raise LedgerError(f"job {job} has no run in the ledger database {redact_password(url)}",
                          "check the --job name; `capbatch history --ledger URL --job NAME` lists a job's runs")
    return int(row[0])
