"""The ledger interface both backends implement, and the values it trades in.

Everything outside this package (engine, runner, reports, status, verify, reconcile, history) talks
to a :class:`Ledger` and never to SQL: the SQLite file in the run directory and a PostgreSQL job
are interchangeable. Read queries that are the same SQL on both backends live here once; each
backend supplies the table names, the row scope and the three primitives that run a statement.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from ..errors import CapbatchError, UsageError


class State(str, Enum):
    PENDING = "pending"          # valid, not yet settled
    IN_FLIGHT = "in_flight"      # journalled before sending; outcome unknown if the process died
    SUCCEEDED = "succeeded"
    FAILED = "failed"            # the API refused it, or retries ran out
    REJECTED = "rejected"        # never sent: invalid input or a conflict
    UNCHANGED = "unchanged"      # the card already carried the target ID; nothing sent
    DUPLICATE = "duplicate"      # the same pair as an earlier row, which is sent once for both

    def __str__(self) -> str:
        return self.value


SETTLED_OK = (State.SUCCEEDED.value, State.UNCHANGED.value, State.DUPLICATE.value)

# Columns a grouped count may be taken over (the name goes into SQL, so only these).
GROUPABLE = frozenset({"error_code", "reason_code"})
MESSAGE_COLUMNS = frozenset({"error_message", "reason"})

# The columns of results.csv's ledger part, in the order :meth:`Ledger.result_rows` yields them.
RESULT_COLUMNS = ("row_number", "sheet", "original", "state", "attempts", "http_status", "error_code",
                  "error_message", "reason_code", "reason", "note", "external_id", "previous_external_id",
                  "generated", "card_id", "customer_id", "settled_at", "warnings")
# What the reports read of each row (:meth:`Ledger.report_rows`): the id, results.csv's columns, and
# what the summary adds up.
REPORT_COLUMNS = ("id", *RESULT_COLUMNS, "latency_ms", "audit")
# Changes are tracked per chunk of 4,096 consecutive row ids (chunk = id >> CHUNK_BITS): the reports
# rewrite only the chunks that changed since they were last written.
CHUNK_BITS = 12


@dataclass(frozen=True, slots=True)
class WorkRow:
    """A row the engine must settle."""

    id: int
    card: str
    external_id: str
    unknown: bool = False      # was in flight when an earlier process stopped: outcome unknown
    generated: bool = False
    audit: bool = False        # a confirmed pair picked for the rolling audit: read before writing
    expect: str | None = None  # revert: PUT only while the card still holds this external ID


@dataclass(slots=True)
class RowResult:
    """The outcome of settling one row, as the engine hands it to the ledger."""

    id: int
    state: State
    attempts: int = 0                 # HTTP attempts spent in this process (added to the total)
    http_status: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    card_id: str | None = None
    customer_id: str | None = None
    previous_external_id: str | None = None
    latency_ms: float | None = None
    note: str | None = None
    settled_at: float = 0.0
    warnings: Sequence[tuple[str, str]] = ()   # (code, message) from the answers about this row


def row_label(sheet: str | None, row_number: int) -> str:
    return f"{sheet}!{row_number}" if sheet else str(row_number)


def warnings_json(warnings: Sequence[tuple[str, str]]) -> str:
    """A row's warnings as stored: a JSON array of {"code", "message"}."""
    return json.dumps([{"code": code, "message": message} for code, message in warnings], ensure_ascii=False)


def shape_invocation(inv: dict[str, Any]) -> dict[str, Any]:
    """An invocation row as :meth:`Ledger.invocations` returns it: request figures decoded, and
    ``duration`` up to its end or, for one that never ended (killed, or running), its last commit."""
    inv.setdefault("last_seen_at", None)
    by_status = inv.pop("requests_by_status", None)
    inv["requests_by_status"] = json.loads(by_status) if by_status else {}
    end = inv["ended_at"] or inv["last_seen_at"] or inv["started_at"]
    inv["duration"] = max(0.0, end - inv["started_at"])
    return inv


def is_database_url(location: str | None) -> bool:
    return bool(location) and re.match(r"^(postgres|postgresql)://", str(location), re.I) is not None


def redact_password(url: str) -> str:
    """The URL as it may be printed: any password (and a query's values) replaced by ***."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user = parts.username or ""
            host = netloc.rsplit("@", 1)[1]
            netloc = f"{user}:***@{host}"
        query = re.sub(r"(password|passfile|sslpassword)=[^&]*", r"\1=***", parts.query, flags=re.I)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "(an unparsable database URL)"


class Ledger(ABC):
    """One run's rows and their states. Open one with :func:`capbatch.ledger.open_ledger` (or, for the
    run directory's SQLite file, ``Ledger.open(run_dir)`` / ``Ledger.open_readonly(run_dir)``)."""

    backend = "abstract"
    #: where it lives, printable (a path, or a URL without its password)
    location = ""
    # How the shared read queries name this ledger's rows: table names and a WHERE term.
    _rows = "rows"
    _timeline = "timeline"
    _mine = "1=1"

    # ---- opening a run directory's ledger (kept on the base class for existing callers) --------
    #: the backend that keeps a ledger in a run directory (sqlite.py registers itself)
    run_directory_backend: "type[Ledger] | None" = None

    @classmethod
    def open(cls, run_dir: Path) -> "Ledger":
        assert cls.run_directory_backend is not None and cls.run_directory_backend is not cls
        return cls.run_directory_backend.open(run_dir)

    @classmethod
    def open_readonly(cls, run_dir: Path) -> "Ledger":
        assert cls.run_directory_backend is not None and cls.run_directory_backend is not cls
        return cls.run_directory_backend.open_readonly(run_dir)

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the primitives each backend provides --------------------------------------------------
    @abstractmethod
    def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read with ``?`` placeholders; all result rows."""

    @abstractmethod
    def _stream(self, sql: str, params: Sequence[Any] = ()) -> Iterator[tuple[Any, ...]]:
        """Run a read with ``?`` placeholders; rows as they come (large results)."""

    @abstractmethod
    def _stream_dicts(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Mapping[str, Any]]:
        """Like :meth:`_stream`, each row addressable by column name."""

    # ---- meta ----------------------------------------------------------------------------------
    @abstractmethod
    def get_meta(self, key: str) -> str | None: ...

    @abstractmethod
    def set_meta(self, key: str, value: str) -> None: ...

    def get_meta_json(self, key: str, default: Any = None) -> Any:
        value = self.get_meta(key)
        return default if value is None else json.loads(value)

    # ---- import --------------------------------------------------------------------------------
    def is_imported(self) -> bool:
        """Whether the input is in the ledger. Where several workers share a ledger, the one caller
        that gets False is the importer (until :meth:`mark_imported` or :meth:`close`): the others wait
        here meanwhile, then get True and join."""
        return self.get_meta("imported_at") is not None

    @abstractmethod
    def reset_import(self) -> None:
        """Drop a half-finished import (the process died while loading the file)."""

    @abstractmethod
    def import_rows(self, rows: Iterable[tuple[Any, ...]], batch: int = 20000, numbered: bool = False) -> int:
        """Insert (sheet, row_number, original_json, card, external_id, state, reason_code, reason,
        problem_column) tuples, in input order; ``numbered``: each tuple starts with the row's id (its
        1-based place in the input), for a ledger that holds some rows only (validate's)."""

    @abstractmethod
    def apply_cross_row_rules(self, allow_empty_external_id: bool = False,
                              only: Sequence[int] | None = None) -> None:
        """Duplicates and conflicts among the valid rows, done in the database so memory stays flat.

        The same card with different external IDs, or the same external ID on different cards, is a
        conflict: every row involved is rejected, naming the others. The same pair twice is sent once;
        the later rows become ``duplicate`` of the first. ``only``: the ids of the rows that can be
        involved (every other row's card number and external ID occur once in the input), when the
        caller knows them; None looks at every row.
        """

    @abstractmethod
    def mark_imported(self) -> None: ...

    # ---- the engine's side ---------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in State}
        for state, n in self._fetch(f"SELECT state, count(*) FROM {self._rows} WHERE {self._mine} GROUP BY state"):
            out[state] = int(n)
        return out

    def total(self) -> int:
        return int(self._fetch(f"SELECT count(*) FROM {self._rows} WHERE {self._mine}")[0][0])

    def missing_external_ids(self) -> int:
        """Rows still to send without an external ID (--generate-missing asks the API for one each)."""
        return int(self._fetch(f"SELECT count(*) FROM {self._rows} WHERE {self._mine} "
                               "AND state IN ('pending', 'in_flight') AND external_id = ''")[0][0])

    @abstractmethod
    def unknown_rows(self) -> list[WorkRow]:
        """Rows an earlier process had in flight when it stopped: their outcome is unknown."""

    _WORK_COLUMNS = "id, card, external_id, generated, audit, expect_external_id"

    def pending_page(self, after_id: int, limit: int) -> list[WorkRow]:
        rows = self._fetch(
            f"SELECT {self._WORK_COLUMNS} FROM {self._rows} WHERE {self._mine} AND state='pending' "
            "AND id > ? ORDER BY id LIMIT ?", (after_id, limit))
        return [WorkRow(i, c, e, False, bool(g), bool(a), x) for i, c, e, g, a, x in rows]

    def spread_pending(self, count: int) -> list[WorkRow]:
        """Up to ``count`` pending rows spread evenly across the file (first, last and between)."""
        total = int(self._fetch(f"SELECT count(*) FROM {self._rows} WHERE {self._mine} AND state='pending'")[0][0])
        if count <= 0 or total == 0:
            return []
        if count == 1 or total <= count:
            offsets = list(range(min(count, total)))
        else:
            offsets = sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})
        rows = []
        for offset in offsets:
            hit = self._fetch(f"SELECT {self._WORK_COLUMNS} FROM {self._rows} WHERE {self._mine} "
                              "AND state='pending' ORDER BY id LIMIT 1 OFFSET ?", (offset,))
            if hit:
                i, c, e, g, a, x = hit[0]
                rows.append(WorkRow(i, c, e, False, bool(g), bool(a), x))
        return rows

    def peek_work(self) -> WorkRow | None:
        """A row that still needs settling (without claiming it), or None when the run is done."""
        rows = self._fetch(
            f"SELECT {self._WORK_COLUMNS}, state FROM {self._rows} WHERE {self._mine} "
            "AND state IN ('in_flight', 'pending') ORDER BY state <> 'in_flight', id LIMIT 1")
        if not rows:
            return None
        i, c, e, g, a, x, state = rows[0]
        return WorkRow(i, c, e, state == "in_flight", bool(g), bool(a), x)

    @abstractmethod
    def claim(self, limit: int, results: Sequence[RowResult] = (),
              timeline: dict[int, list[int]] | None = None,
              requests: Mapping[str, int] | None = None) -> list[WorkRow]:
        """Record finished outcomes (and this invocation's request figures) and take the next chunk
        of work, in one commit.

        Rows whose outcome is unknown (in flight when an earlier process stopped) come first, marked
        ``unknown``; then pending rows in input order. Claimed rows are ``in_flight`` and belong to this
        process until it records or releases them; no other process is handed them meanwhile."""

    def held_elsewhere(self) -> int:
        """Rows other live workers hold in flight (their outcome may still become unknown)."""
        return 0

    def heartbeat(self) -> None:
        """Keep this process's claims alive (called often; backends decide how often to act)."""

    @abstractmethod
    def mark_in_flight(self, ids: Sequence[int]) -> None:
        """The journal entry written before a batch of requests goes out."""

    @abstractmethod
    def release(self, ids: Sequence[int]) -> None:
        """Rows journalled but never sent go back to pending (stop, abort)."""

    @abstractmethod
    def store_generated(self, row_id: int, external_id: str) -> None:
        """Record a generated external ID before it is sent, so a rerun never generates a second one."""

    @abstractmethod
    def requeue_failed(self) -> int:
        """--retry-failed: failed rows go back to pending (attempts keep counting); the failure they
        had is kept in the note. Rejected rows stay rejected: their input is invalid."""

    @abstractmethod
    def record(self, results: Sequence[RowResult], timeline: dict[int, list[int]] | None = None,
               journal: Sequence[int] = (), requests: Mapping[str, int] | None = None) -> None:
        """Write a batch of outcomes, the timeline counters and (optionally) the journal entry for the
        next chunk — all in one transaction. ``requests`` (this process's requests by status class)
        updates the invocation's figures in the same commit, so they survive a kill -9."""

    # ---- invocations ---------------------------------------------------------------------------
    @abstractmethod
    def start_invocation(self) -> int: ...

    @abstractmethod
    def end_invocation(self, run_id: int, exit_code: int, outcome: str, requests: int | None = None,
                       requests_by_status: Mapping[str, int] | None = None) -> None:
        """Close the invocation's row; ``requests`` None keeps the figures recorded as the run went."""

    @abstractmethod
    def invocations(self) -> list[dict[str, Any]]:
        """Every invocation, oldest first (see :func:`shape_invocation`)."""

    def settled_between(self, start: float, end: float | None) -> dict[str, int]:
        """Rows settled from ``start`` to ``end`` (None: since), by state: what one invocation settled
        (invocations of a run directory never overlap; a row settled again later counts there)."""
        rows = self._fetch(f"SELECT state, count(*) FROM {self._rows} WHERE {self._mine} AND settled_at >= ? "
                           "AND settled_at <= ? GROUP BY state", (start, end if end is not None else float("inf")))
        return {state: int(n) for state, n in rows}

    def quota_database(self) -> str | None:
        """The database whose quota table runs on this ledger share (capbatch.ledger.pg_quota), or
        None: they share the quota files of this host (capbatch.quota)."""
        return None

    # ---- job memory ----------------------------------------------------------------------------
    @abstractmethod
    def job_store(self, reports_dir: Path) -> "JobStore":
        """Where this run's job keeps its memory: a run directory's job lives in ``reports_dir``'s
        store file, a database job in the database itself (``reports_dir`` unused)."""

    # ---- revert --------------------------------------------------------------------------------
    def import_expecting(self, rows: Iterable[tuple[Any, ...]], batch: int = 20000) -> int:
        """Insert rows as :meth:`import_rows` does, each with a 10th field: the external ID the card
        must still hold for the row to be written (``expect_external_id``; ``capbatch revert``)."""
        raise CapbatchError(f"revert needs a run-directory ledger; {self.location} is a {self.backend} ledger",
                            "revert a run kept in a run directory (capbatch run without --ledger)")

    # ---- reading for reports -------------------------------------------------------------------
    def rows_in_states(self, states: Sequence[str] | None = None) -> Iterator[Mapping[str, Any]]:
        """Every column of the rows in ``states`` (all rows when None or empty), in input order."""
        where, params = self._states(states or None)
        return self._stream_dicts(f"SELECT * FROM {self._rows} WHERE {self._mine}{where} ORDER BY id", params)

    def row(self, row_id: int) -> Mapping[str, Any] | None:
        """Every column of one row, or None."""
        rows = list(self._stream_dicts(f"SELECT * FROM {self._rows} WHERE {self._mine} AND id=?", (row_id,)))
        return rows[0] if rows else None

    def changed_rows(self) -> Iterator[Mapping[str, Any]]:
        """Rows whose card this run may have written (succeeded, or in flight when it stopped),
        latest first: undone in that order, an ID moved from one card to another goes back in turn."""
        return self._stream_dicts(f"SELECT * FROM {self._rows} WHERE {self._mine} AND state IN "
                                  "('succeeded', 'in_flight') ORDER BY coalesce(settled_at, 9e18) DESC, id DESC")

    def codes(self, state: State) -> dict[str, int]:
        """Rows in ``state`` per code: the reason code of rejected rows, the error code of failed ones."""
        column = "reason_code" if state in (State.REJECTED, State.DUPLICATE) else "error_code"
        return dict(self.counts_by(column, (state.value,)))

    def audit_counts(self) -> dict[str, int]:
        """Rows picked for the rolling audit, by state ({} when none)."""
        return {state: int(n) for state, n in self._fetch(
            f"SELECT state, count(*) FROM {self._rows} WHERE {self._mine} AND audit=1 GROUP BY state")}

    def result_rows(self) -> Iterator[tuple[Any, ...]]:
        """Every row as a tuple of :data:`RESULT_COLUMNS`, in input order (results.csv); ``warnings``
        is None on a ledger older than that column."""
        columns = [c if c != "warnings" or self.has_column("warnings") else "NULL" for c in RESULT_COLUMNS]
        return self._stream(f"SELECT {', '.join(columns)} FROM {self._rows} WHERE {self._mine} ORDER BY id")

    def has_column(self, name: str) -> bool:
        """Whether the rows table has this column (a read-only ledger of an older schema may lack it)."""
        return True

    # ---- what changed, for reports that rewrite only that --------------------------------------
    def identity(self) -> str:
        """Names this ledger's rows as imported: another ledger, or the same one imported again,
        gives another identity (a report index of the old one is then worthless)."""
        return f"{self.backend}|{self.get_meta('input_sha256')}|{self.get_meta('imported_at')}"

    def change_mark(self) -> Any:
        """Where the ledger's changes stand now, as a JSON value to hand back to :meth:`changed_chunks`
        later; None when this ledger does not track changes. Take it *before* reading the rows it
        covers: a change made meanwhile then counts as made after it."""
        return None

    def changed_chunks(self, since: Any) -> set[int] | None:
        """Chunks (row id >> CHUNK_BITS) with a row changed after ``since`` (an earlier
        :meth:`change_mark`); None when that cannot be told (every chunk counts as changed)."""
        return None

    def last_id(self) -> int:
        """The highest row id (0 for no rows)."""
        return int(self._fetch(f"SELECT coalesce(max(id), 0) FROM {self._rows} WHERE {self._mine}")[0][0])

    def report_rows(self, first_id: int | None = None, last_id: int | None = None) -> Iterator[tuple[Any, ...]]:
        """Rows as tuples of :data:`REPORT_COLUMNS` in id order, all or those with ids in
        [first_id, last_id]. On a ledger of an older schema the missing columns read as NULL/0."""
        defaults = {"warnings": "NULL", "audit": "0"}
        columns = [c if c not in defaults or self.has_column(c) else defaults[c] for c in REPORT_COLUMNS]
        where, params = "", []
        if first_id is not None:
            where += " AND id >= ?"
            params.append(first_id)
        if last_id is not None:
            where += " AND id <= ?"
            params.append(last_id)
        return self._stream(f"SELECT {', '.join(columns)} FROM {self._rows} WHERE {self._mine}{where} ORDER BY id",
                            params)

    @abstractmethod
    def warning_counts(self) -> dict[str, dict[str, Any]]:
        """Warning code -> {"rows": rows whose answers carried it, "message": one of its messages}."""

    def rows_with_warnings(self) -> int:
        if not self.has_column("warnings"):
            return 0
        return int(self._fetch(f"SELECT count(*) FROM {self._rows} WHERE {self._mine} "
                               "AND warnings IS NOT NULL")[0][0])

    def counts_by(self, column: str, states: Sequence[str]) -> list[tuple[str, int]]:
        """(value of ``column`` or 'unknown', rows) among rows in ``states``, most frequent first."""
        if column not in GROUPABLE:
            raise ValueError(f"cannot group by {column!r}")
        where, params = self._states(states)
        rows = self._fetch(f"SELECT coalesce({column}, 'unknown'), count(*) FROM {self._rows} "
                           f"WHERE {self._mine}{where} GROUP BY 1 ORDER BY 2 DESC{self._tie_break}", params)
        return [(str(code), int(n)) for code, n in rows]

    def first_rows(self, state: str, limit: int) -> list[tuple[str | None, int, str | None]]:
        """(sheet, row_number, reason) of the first ``limit`` rows in ``state``."""
        return self._fetch(f"SELECT sheet, row_number, reason FROM {self._rows} WHERE {self._mine} "
                           "AND state=? ORDER BY id LIMIT ?", (state, limit))

    def group_counts(self, state: str, column: str, limit: int) -> list[tuple[str, int]]:
        """(code, rows) of the ``limit`` largest groups of ``column`` among rows in ``state``."""
        if column not in GROUPABLE:
            raise ValueError(f"cannot group by {column!r}")
        rows = self._fetch(f"SELECT coalesce({column}, 'unknown') AS k, count(*) FROM {self._rows} "
                           f"WHERE {self._mine} AND state=? GROUP BY k ORDER BY 2 DESC, 1 LIMIT ?", (state, limit))
        return [(str(k), int(n)) for k, n in rows]

    def group_examples(self, state: str, column: str, message_column: str, code: str,
                       limit: int) -> list[tuple[Any, ...]]:
        """(sheet, row_number, card, external_id, message, http_status) of the first rows of a group."""
        if column not in GROUPABLE or message_column not in MESSAGE_COLUMNS:
            raise ValueError(f"cannot list examples by {column!r}/{message_column!r}")
        return self._fetch(
            f"SELECT sheet, row_number, card, external_id, {message_column}, http_status FROM {self._rows} "
            f"WHERE {self._mine} AND state=? AND coalesce({column}, 'unknown')=? ORDER BY id LIMIT ?",
            (state, code, limit))

    def latency_histogram(self) -> list[tuple[int, int]]:
        """(bucket_ms, count) with 1 ms buckets below 100 ms, 10 ms up to 1 s, 100 ms above."""
        t = self._truncate
        sql = (f"SELECT CASE WHEN latency_ms < 100 THEN {t('latency_ms')} "
               f"WHEN latency_ms < 1000 THEN {t('latency_ms / 10')} * 10 "
               f"ELSE {t('latency_ms / 100')} * 100 END AS b, count(*) "
               f"FROM {self._rows} WHERE {self._mine} AND latency_ms IS NOT NULL GROUP BY b ORDER BY b")
        return [(int(b), int(n)) for b, n in self._fetch(sql)]

    def latency_count(self) -> int:
        return int(self._fetch(f"SELECT count(*) FROM {self._rows} WHERE {self._mine} "
                               "AND latency_ms IS NOT NULL")[0][0])

    def latencies_sorted(self) -> Iterator[float]:
        for (value,) in self._stream(f"SELECT latency_ms FROM {self._rows} WHERE {self._mine} "
                                     "AND latency_ms IS NOT NULL ORDER BY latency_ms"):
            yield value

    def drifted_count(self) -> int:
        """Succeeded rows whose card held another external ID before."""
        return int(self._fetch(f"SELECT count(*) FROM {self._rows} WHERE {self._mine} AND state='succeeded' "
                               "AND previous_external_id <> '' AND previous_external_id <> external_id")[0][0])

    def generated_count(self) -> int:
        return int(self._fetch(f"SELECT count(*) FROM {self._rows} WHERE {self._mine} AND generated=1")[0][0])

    def confirmed_pairs(self) -> Iterator[tuple[str, str, float | None]]:
        """(card, external_id, settled_at) of every row whose pair the API confirmed by a request
        (a pair skipped by --skip-confirmed keeps the date it was last really checked)."""
        return self._stream(f"SELECT card, external_id, settled_at FROM {self._rows} WHERE {self._mine} "
                            "AND state IN ('succeeded','unchanged') AND external_id <> '' AND attempts > 0")

    def timeline_totals(self) -> tuple[int, int]:
        """(retried, throttled) over the whole run."""
        retried, throttled = self._fetch(f"SELECT coalesce(sum(retried),0), coalesce(sum(throttled),0) "
                                         f"FROM {self._timeline} WHERE {self._mine}")[0]
        return int(retried), int(throttled)

    def timeline_span(self) -> tuple[int | None, int | None]:
        first, last = self._fetch(f"SELECT min(second), max(second) FROM {self._timeline} WHERE {self._mine}")[0]
        return first, last

    def timeline_bins(self, first: int, width: int) -> list[tuple[Any, ...]]:
        """(bin, ok, failed, retried, throttled) summed over bins of ``width`` seconds from ``first``."""
        return self._fetch(f"SELECT (second - ?) / ? AS b, sum(ok), sum(failed), sum(retried), sum(throttled) "
                           f"FROM {self._timeline} WHERE {self._mine} GROUP BY b ORDER BY b", (first, width))

    # ---- helpers for the shared SQL ------------------------------------------------------------
    _tie_break = ""     # SQLite keeps its historical order among equal counts; PostgreSQL needs one

    @staticmethod
    def _truncate(expr: str) -> str:
        return f"CAST({expr} AS INT)"

    @staticmethod
    def _states(states: Sequence[str] | None) -> tuple[str, tuple[str, ...]]:
        if states is None:
            return "", ()
        states = tuple(states)
        for s in states:
            State(s)   # only known states reach SQL
        return f" AND state IN ({', '.join('?' * len(states))})", states


class JobStore(ABC):
    """A job's memory across runs (``--job NAME``): the API target it writes to, per card the last
    external ID the API confirmed and when, and one line per run for ``capbatch history``.

    A run-directory job keeps it in ``<reports-dir>/jobs.sqlite``; a database job in the database.
    Open one with :func:`capbatch.ledger.open_job_store` or :meth:`Ledger.job_store`."""

    #: where it lives, printable
    location = ""

    def close(self) -> None:
        """Release what the store holds open (nothing, by default)."""

    def __enter__(self) -> "JobStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def bind_target(self, job: str, target: str) -> None:
        """Tie ``job`` to the API it writes to on its first run; raise UsageError (naming both) for
        another target later: the confirmed pairs are only true of one API."""

    @abstractmethod
    def settle_confirmed(self, ledger: Ledger, job: str, audit_fraction: float | None = None) -> tuple[int, int]:
        """Settle ``ledger``'s pending rows whose exact pair an earlier run of ``job`` confirmed, without a
        request. With ``audit_fraction`` F, ceil(F x those rows), the longest unchecked first, stay
        pending flagged for the rolling audit (picked once per run). Returns (settled, audit slice)."""

    @abstractmethod
    def remember(self, ledger: Ledger, job: str, run_dir: Path, summary: Mapping[str, Any],
                 started_at: float) -> None:
        """Record the pairs ``ledger``'s run confirmed by a request, and the run itself."""

    @abstractmethod
    def forget(self, job: str, cards: Iterable[str] = ()) -> int:
        """Forget the given cards' confirmed pairs, or all of them and the job's target; the run history
        is kept. Returns how many pairs were forgotten."""

    @abstractmethod
    def forget_pairs(self, job: str, pairs: Iterable[tuple[str, str]]) -> int:
        """Forget (card, external ID) pairs no longer true (a revert changed the card), unless a later
        run confirmed another ID for that card meanwhile."""

    @abstractmethod
    def describe(self, job: str) -> dict[str, Any]:
        """{"job", "target", "confirmed_pairs", "oldest_check", "newest_check"}."""

    @abstractmethod
    def history(self, job: str) -> list[dict[str, Any]]:
        """The job's runs, oldest first (``counts`` decoded)."""


def target_mismatch(job: str, bound: str, target: str) -> UsageError:
    """The error both stores raise when a job is run against another API than its own."""
    return UsageError(
        f"job {job} writes to {bound}, not {target}: its memory of confirmed pairs is only true there",
        f"use another --job name for {target}, or `capbatch forget --job {job}` to start it afresh")
