"""results.csv and failures.csv, and the figures the summary adds up, in proportion to what changed.

The ledger tracks its rows in chunks of 4,096 ids and tells which chunks changed since a mark it gave
earlier (``Ledger.change_mark`` / ``changed_chunks``). Beside the reports an index
(``.reports-index.json``) keeps that mark and, per chunk, where its lines sit in results.csv and
failures.csv and its figures (rows per state, error codes, warnings, latencies...), and their total.
Writing the reports again copies the bytes of the unchanged chunks from the previous files and formats
only the rows of the changed ones; the total loses the changed chunks' old figures and gains their new
ones (an unchanged chunk's figures are kept as JSON text, never parsed: a million rows' latencies are
megabytes of it). A resumed run of a million rows that settles the last thousand rewrites one or two
chunks.

Anything that does not match rebuilds everything (which gives the same bytes): no index, another
ledger or another import, a report file edited or replaced since, a ledger that does not track
changes (an older one read without upgrading it). The index is written last: a process killed
half-way leaves files the index does not describe, so the next write starts afresh.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import math
import os
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from .ledger import CHUNK_BITS, Ledger, State
from .source.model import REPORT_MARKER_COLUMN, formula_like

MARKER_COLUMN = REPORT_MARKER_COLUMN   # in every CSV report; tells the reader to undo neutralising

RESULTS_CSV = "results.csv"
FAILURES_CSV = "failures.csv"
FAILURES_XLSX = "failures.xlsx"
INDEX_FILE = ".reports-index.json"
# Bump when the bytes a row turns into change (or what the index keeps): older indexes then rebuild.
FORMAT = 3

BOM = "\ufeff".encode()   # the CSV reports open in Excel as UTF-8
_RISKY_FIRST = frozenset("=+-@\t\r'")
_FAILED = State.FAILED.value
_REJECTED = State.REJECTED.value
_SUCCEEDED = State.SUCCEEDED.value


def neutralise(value: Any) -> str:
    """OWASP CSV-injection defence: a leading ' makes the spreadsheet show the cell as text."""
    text = "" if value is None else value if type(value) is str else str(value)
    if text[:1] in _RISKY_FIRST and formula_like(text):
        return "'" + text
    return text


def reason(error_code: str | None, error_message: str | None, reason_code: str | None,
           reason_text: str | None, note: str | None) -> tuple[str, str]:
    """(code, message) explaining a row's state, whichever stage produced it."""
    if error_code or error_message:
        return error_code or "", error_message or ""
    return reason_code or "", reason_text or note or ""


def warnings_text(stored: str | list[dict[str, Any]]) -> str:
    """'3039: No update in status label; ...' from the ledger's JSON warnings column."""
    items = json.loads(stored) if isinstance(stored, str) else stored
    return "; ".join(f"{w.get('code')}: {w.get('message')}" if w.get("code") else str(w.get("message"))
                     for w in items)


def fit(values: list[str], width: int) -> list[str]:
    return values[:width] + [""] * (width - len(values))


# ---- figures --------------------------------------------------------------------------------------
class Figures:
    """What the summary and report.html add up over rows, kept per chunk and summed."""

    __slots__ = ("states", "failed_by", "rejected_by", "drifted", "generated", "with_warnings", "warnings",
                 "audit", "latency", "buckets")

    def __init__(self) -> None:
        self.states: dict[str, int] = {}
        self.failed_by: dict[str, int] = {}      # error_code of failed rows ('unknown' when none)
        self.rejected_by: dict[str, int] = {}    # reason_code of rejected rows
        self.drifted = 0                         # succeeded rows whose card held another ID before
        self.generated = 0
        self.with_warnings = 0
        self.warnings: dict[str, list[Any]] = {}  # code -> [rows carrying it, greatest message or None]
        self.audit: dict[str, int] = {}           # rows picked for the rolling audit, by state
        self.latency: dict[float, int] = {}       # latency rounded to 0.01 ms -> rows
        self.buckets: dict[int, int] = {}         # report.html's histogram buckets -> rows

    def add(self, other: "Figures") -> None:
        for mine, theirs in ((self.states, other.states), (self.failed_by, other.failed_by),
                             (self.rejected_by, other.rejected_by), (self.audit, other.audit),
                             (self.latency, other.latency), (self.buckets, other.buckets)):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n
        self.drifted += other.drifted
        self.generated += other.generated
        self.with_warnings += other.with_warnings
        self.add_warnings(other.warnings)

    def subtract(self, other: "Figures") -> None:
        """Take away a chunk's figures that :meth:`add` added (not its warnings: the greatest message
        cannot be taken away; the caller sums the chunks' warnings afresh)."""
        for mine, theirs in ((self.states, other.states), (self.failed_by, other.failed_by),
                             (self.rejected_by, other.rejected_by), (self.audit, other.audit),
                             (self.latency, other.latency), (self.buckets, other.buckets)):
            for key, n in theirs.items():
                left = mine.get(key, 0) - n
                if left:
                    mine[key] = left
                else:
                    mine.pop(key, None)
        self.drifted -= other.drifted
        self.generated -= other.generated
        self.with_warnings -= other.with_warnings

    def add_warnings(self, warnings: dict[str, list[Any]]) -> None:
        for code, (rows, message) in warnings.items():
            have = self.warnings.get(code)
            if have is None:
                self.warnings[code] = [rows, message]
            else:
                have[0] += rows
                if message is not None and (have[1] is None or message > have[1]):
                    have[1] = message

    # -- as the summary shows them
    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in State}
        out.update(self.states)
        return out

    @staticmethod
    def ranked(counts: dict[str, int]) -> list[tuple[str, int]]:
        """Most frequent first, then by code."""
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))

    def warning_counts(self) -> dict[str, dict[str, Any]]:
        ordered = sorted(self.warnings.items(), key=lambda kv: (-kv[1][0], kv[0]))
        return {code: {"rows": rows, "message": message or ""} for code, (rows, message) in ordered}

    def percentiles(self, points: Iterable[float] = (50, 90, 95, 99)) -> dict[str, float]:
        """Exact latency percentiles (nearest rank) of each row's last request, to 0.01 ms. Rounding
        keeps the order, so the rank-k value of the rounded latencies is the rounded rank-k latency."""
        total = sum(self.latency.values())
        out: dict[str, float] = {}
        if not total:
            return out
        wanted = sorted((max(0, math.ceil(total * p / 100.0) - 1), f"p{p:g}") for p in points)
        values = sorted(self.latency.items())
        i, seen = 0, 0
        for value, n in values:
            seen += n
            while i < len(wanted) and wanted[i][0] < seen:
                out[wanted[i][1]] = value
                i += 1
        out["max"] = values[-1][0]
        return out

    def histogram(self) -> list[tuple[int, int]]:
        return sorted(self.buckets.items())

    # -- in the index
    def to_json(self) -> dict[str, Any]:
        return {"states": self.states, "failed_by": self.failed_by, "rejected_by": self.rejected_by,
                "drifted": self.drifted, "generated": self.generated, "with_warnings": self.with_warnings,
                "warnings": self.warnings, "audit": self.audit,
                "latency": [x for pair in self.latency.items() for x in pair],
                "buckets": [x for pair in self.buckets.items() for x in pair]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Figures":
        f = cls()
        f.states, f.failed_by, f.rejected_by = data["states"], data["failed_by"], data["rejected_by"]
        f.drifted, f.generated, f.with_warnings = data["drifted"], data["generated"], data["with_warnings"]
        f.warnings, f.audit = data["warnings"], data["audit"]
        lat, buckets = data["latency"], data["buckets"]
        f.latency = dict(zip(lat[::2], lat[1::2]))
        f.buckets = dict(zip(buckets[::2], buckets[1::2]))
        return f


def _bucket(ms: float) -> int:
    """1 ms buckets below 100 ms, 10 ms up to 1 s, 100 ms above (as Ledger.latency_histogram)."""
    if ms < 100:
        return int(ms)
    if ms < 1000:
        return int(ms / 10) * 10
    return int(ms / 100) * 100


# ---- one chunk ------------------------------------------------------------------------------------
class Chunk:
    """One chunk's lines of results.csv and failures.csv (bytes) and its figures."""

    __slots__ = ("number", "results", "failures", "figures")

    def __init__(self, number: int, results: bytes, failures: bytes, figures: Figures) -> None:
        self.number = number
        self.results = results
        self.failures = failures
        self.figures = figures


def cells(original: str) -> list[str]:
    """A row's original cells from the ledger's JSON array of strings. Cells without a quote, a
    backslash or a control character (nearly all) are cut out directly; anything else is parsed."""
    if "\\" not in original and original[:2] == '["' and original[-2:] == '"]':
        parts = original[2:-2].split('"')
        if len(parts) == 1:
            return parts
        separators = parts[1::2]
        if separators.count(", ") == len(separators) or separators.count(",") == len(separators):
            return parts[::2]
    return json.loads(original)


def format_chunk(number: int, rows: Iterable[tuple[Any, ...]], width: int) -> Chunk:
    """results.csv and failures.csv lines of ``rows`` (tuples of REPORT_COLUMNS) and their figures."""
    lines: list[list[Any]] = []
    failure_lines: list[list[Any]] = []
    latencies: list[float] = []
    add_line, add_failure, add_latency = lines.append, failure_lines.append, latencies.append
    loads, n, risky, iso = json.loads, neutralise, _RISKY_FIRST, _iso_second
    f = Figures()
    states = f.states
    for (_id, row_number, sheet, original, state, attempts, http_status, error_code, error_message,
         reason_code, reason_text, note, external_id, previous, generated, card_id, customer_id,
         settled_at, warnings, latency_ms, audit) in rows:
        if error_code or error_message:
            code, message = error_code or "", error_message or ""
        else:
            code, message = reason_code or "", reason_text or note or ""
        values = cells(original)
        if len(values) != width:
            values = fit(values, width)
        if warnings is not None:
            items = loads(warnings)
            shown = n(warnings_text(items)) if items else ""
            f.with_warnings += 1
            _count_warnings(f.warnings, items)
        else:
            shown = ""
        shown_previous = "" if previous is None else n(previous) if previous[:1] in risky else previous
        add_line([row_number, "" if sheet is None else n(sheet)]
                 + [n(v) if v[:1] in risky else v for v in values]
                 + [state, attempts, http_status or "",
                    n(code) if code[:1] in risky else code,
                    n(message) if message[:1] in risky else message,
                    "" if state == _REJECTED else n(external_id) if external_id[:1] in risky else external_id,
                    shown_previous, "yes" if generated else "", card_id or "", customer_id or "",
                    iso(int(settled_at)) if settled_at else "", shown])
        # the figures
        states[state] = states.get(state, 0) + 1
        if state == _FAILED or state == _REJECTED:
            if state == _FAILED:
                key = error_code or "unknown"
                f.failed_by[key] = f.failed_by.get(key, 0) + 1
            else:
                key = reason_code or "unknown"
                f.rejected_by[key] = f.rejected_by.get(key, 0) + 1
            add_failure([n(v) for v in values] + [str(row_number), n(sheet or ""), state, n(code), n(message)])
        elif state == _SUCCEEDED and previous and previous != external_id:
            f.drifted += 1
        if generated == 1:
            f.generated += 1
        if audit == 1:
            f.audit[state] = f.audit.get(state, 0) + 1
        if latency_ms is not None:
            add_latency(latency_ms)
    # latencies: rounded and bucketed once per distinct value
    latency, buckets = f.latency, f.buckets
    for ms, k in Counter(latencies).items():
        key_ms = round(ms, 2)
        latency[key_ms] = latency.get(key_ms, 0) + k
        b = _bucket(ms)
        buckets[b] = buckets.get(b, 0) + k
    out = io.StringIO()
    csv.writer(out).writerows(lines)
    results = out.getvalue().encode()
    if failure_lines:
        out = io.StringIO()
        csv.writer(out).writerows(failure_lines)
        failures = out.getvalue().encode()
    else:
        failures = b""
    return Chunk(number, results, failures, f)


def _count_warnings(counts: dict[str, list[Any]], items: list[dict[str, Any]]) -> None:
    """Each code once per row (rows carrying it), and the greatest of its messages."""
    seen: dict[str, Any] = {}
    for w in items:
        if not isinstance(w, dict):
            continue
        code = str(w.get("code") or "")
        message = w.get("message")
        if code not in seen:
            seen[code] = message
        elif message is not None and (seen[code] is None or message > seen[code]):
            seen[code] = message
    for code, message in seen.items():
        have = counts.get(code)
        if have is None:
            counts[code] = [1, message]
        else:
            have[0] += 1
            if message is not None and (have[1] is None or message > have[1]):
                have[1] = message


@functools.lru_cache(maxsize=4096)
def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, tz=timezone.utc).isoformat(timespec="seconds")


def iso(ts: float | None) -> str:
    return _iso_second(int(ts)) if ts else ""


# ---- the files ------------------------------------------------------------------------------------
def results_header(columns: list[str]) -> list[str]:
    return ([MARKER_COLUMN, "capbatch_sheet"] + list(columns) +
            ["capbatch_state", "capbatch_attempts", "capbatch_http_status", "capbatch_error_code",
             "capbatch_message", "capbatch_sent_external_id", "capbatch_previous_external_id",
             "capbatch_generated", "capbatch_card_id", "capbatch_customer_id", "capbatch_settled_at",
             "capbatch_warnings"])


def failures_header(columns: list[str]) -> list[str]:
    return list(columns) + [MARKER_COLUMN, "capbatch_sheet", "capbatch_state", "capbatch_error_code",
                            "capbatch_reason"]


def _header_bytes(header: list[str]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerow([neutralise(h) for h in header])
    return BOM + buf.getvalue().encode()


def _stat(path: Path) -> list[int] | None:
    """What tells one version of a report file from another. Not the inode: a run directory copied
    with its times kept (cp -p, rsync -a, a restored backup) keeps its index."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


class _Index:
    """The previous write's index, if it still describes the files in ``out_dir`` for this ledger."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.mark = data["mark"]
        self.files: dict[str, list[int] | None] = data["files"]
        # [number, res_at, res_len, fail_at, fail_len, figures as JSON text, warnings]
        self.chunks: list[list[Any]] = data["chunks"]
        self.total = Figures.from_json(data["total"])

    @classmethod
    def load(cls, out_dir: Path, identity: str, columns: list[str], last_id: int) -> "_Index | None":
        try:
            data = json.loads((out_dir / INDEX_FILE).read_text(encoding="utf-8"))
            if (data.get("format") != FORMAT or data.get("chunk_bits") != CHUNK_BITS
                    or data.get("identity") != identity or data.get("columns") != columns
                    or data.get("last_id") != last_id or data.get("mark") is None):
                return None
            index = cls(data)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        for name in (RESULTS_CSV, FAILURES_CSV):
            if index.files.get(name) is None or _stat(out_dir / name) != index.files[name]:
                return None
        return index


class _Sink:
    """A report file being written: a temporary file renamed over it at the end (readers never see
    half a file), or — for something that is not a regular file, e.g. /dev/null — the file itself."""

    def __init__(self, path: Path) -> None:
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory", str(path))
        self.path = path.resolve() if path.is_symlink() else path   # a link keeps pointing at its target
        self.atomic = not self.path.exists() or self.path.is_file()
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp") if self.atomic else self.path
        self.fh: Any = None
        self.written: list[int] | None = None   # _stat of the file this sink put in place

    def open(self) -> Any:
        self.fh = open(self.tmp, "wb")
        return self.fh

    def finish(self) -> None:
        self.fh.close()
        if self.atomic:
            # taken before the rename: another process (`capbatch report` during a run) may replace
            # the file right after, and the index must not describe that one with our offsets
            self.written = _stat(self.tmp)
            os.replace(self.tmp, self.path)

    def abandon(self) -> None:
        if self.fh is not None:
            self.fh.close()
        if self.atomic:
            self.tmp.unlink(missing_ok=True)


def _copy(src: Any, dst: Any, start: int, length: int) -> None:
    """``length`` bytes of file ``src`` from ``start`` appended to ``dst`` (in the kernel where it can)."""
    if not length:
        return
    dst.flush()
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src.fileno(), dst.fileno(), length - done, start + done)
            if n <= 0:
                break
            done += n
    except (OSError, AttributeError):
        pass   # not on this file system: copy through user space below
    dst.seek(0, os.SEEK_END)
    if done < length:
        src.seek(start + done)
        left = length - done
        while left:
            block = src.read(min(left, 1 << 20))
            if not block:
                raise OSError(f"{src.name} ended early")
            dst.write(block)
            left -= len(block)


def _ranges(chunks: Iterable[int]) -> list[tuple[int, int]]:
    """Runs of consecutive chunk numbers as (first, last)."""
    out: list[tuple[int, int]] = []
    for _, run in itertools.groupby(enumerate(sorted(chunks)), key=lambda p: p[1] - p[0]):
        numbers = [c for _, c in run]
        out.append((numbers[0], numbers[-1]))
    return out


def _formatted(ledger: Ledger, ranges: list[tuple[int, int]] | None, width: int) -> Iterator[Chunk]:
    """The chunks in ``ranges`` (all when None) formatted from the ledger, in order."""
    for first, last in ranges if ranges is not None else [(None, None)]:
        lo = None if first is None else first << CHUNK_BITS
        hi = None if last is None else ((last + 1) << CHUNK_BITS) - 1
        for number, rows in itertools.groupby(ledger.report_rows(lo, hi), key=lambda r: r[0] >> CHUNK_BITS):
            yield format_chunk(number, rows, width)


class RowReports:
    """What :func:`write_row_reports` wrote: the run's figures, and how much it rewrote. Save the
    index with :meth:`commit` once every report beside the files is in place."""

    def __init__(self, out_dir: Path, data: dict[str, Any] | None, figures: Figures, failures_changed: bool,
                 rewritten: int, chunks: int, written: dict[str, list[int] | None] | None = None,
                 xlsx_recorded: list[int] | None = None) -> None:
        self.figures = figures
        self.failures_changed = failures_changed   # failures.csv's content is not what it was
        self.rewritten = rewritten                 # chunks formatted from the ledger ...
        self.chunks = chunks                       # ... of this many
        self._out_dir = out_dir
        self._data = data
        self._written = written or {}              # the CSV files as this write put them in place
        self._xlsx_recorded = xlsx_recorded        # failures.xlsx as the index read before this write had it

    def xlsx_current(self) -> bool:
        """Whether failures.xlsx still holds what failures.csv holds (then it need not be rewritten)."""
        if self.failures_changed or self._data is None:
            return False
        recorded = self._xlsx_recorded
        return recorded is not None and _stat(self._out_dir / FAILURES_XLSX) == recorded

    def commit(self) -> None:
        path = self._out_dir / INDEX_FILE
        if self._data is None:
            path.unlink(missing_ok=True)
            return
        self._data["files"] = {RESULTS_CSV: self._written.get(RESULTS_CSV),
                               FAILURES_CSV: self._written.get(FAILURES_CSV),
                               FAILURES_XLSX: _stat(self._out_dir / FAILURES_XLSX)}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self._data, separators=(",", ":")), encoding="utf-8")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_row_reports(ledger: Ledger, out_dir: Path, previous: Path | None = None) -> RowReports:
    """Write results.csv and failures.csv into ``out_dir``, copying what did not change since the
    last write there (or into ``previous``, when its index still describes its files: a copy written
    ahead, see report_ahead). Returns the run's figures (the index is saved by ``RowReports.commit``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ledger.get_meta_json("columns", [])
    width = len(columns)
    identity = ledger.identity()
    mark = ledger.change_mark()            # before any row is read: later changes count as later
    last_id = ledger.last_id()
    sinks = _Sink(out_dir / RESULTS_CSV), _Sink(out_dir / FAILURES_CSV)
    atomic = all(s.atomic for s in sinks)
    index = None
    source = out_dir
    if atomic and mark is not None:
        if previous is not None:
            index = _Index.load(previous, identity, columns, last_id)
            source = previous if index is not None else out_dir
        index = index or _Index.load(out_dir, identity, columns, last_id)
    changed = ledger.changed_chunks(index.mark) if index is not None else None
    if index is not None and changed is not None and not changed <= {c[0] for c in index.chunks}:
        changed = None             # rows the index never saw: start afresh
    total = index.total if changed is not None and index is not None else Figures()
    entries: list[list[Any]] = []
    failures_changed = changed is None
    rewritten = 0
    try:
        res, fail = sinks[0].open(), sinks[1].open()
        res.write(_header_bytes(results_header(columns)))
        fail.write(_header_bytes(failures_header(columns)))

        def put(chunk: Chunk) -> None:
            nonlocal rewritten
            entries.append([chunk.number, res.tell(), len(chunk.results), fail.tell(), len(chunk.failures),
                            json.dumps(chunk.figures.to_json(), separators=(",", ":")), chunk.figures.warnings])
            res.write(chunk.results)
            fail.write(chunk.failures)
            total.add(chunk.figures)
            rewritten += 1

        if changed is None:
            for chunk in _formatted(ledger, None, width):
                put(chunk)
        else:
            assert index is not None
            fresh = _formatted(ledger, _ranges(changed), width)
            upcoming = next(fresh, None)
            with open(source / RESULTS_CSV, "rb") as old_res, open(source / FAILURES_CSV, "rb") as old_fail:
                for number, res_at, res_len, fail_at, fail_len, figures, warnings in index.chunks:
                    if number not in changed:
                        entries.append([number, res.tell(), res_len, fail.tell(), fail_len, figures, warnings])
                        _copy(old_res, res, res_at, res_len)
                        _copy(old_fail, fail, fail_at, fail_len)
                        continue
                    total.subtract(Figures.from_json(json.loads(figures)))   # added back below if it has rows
                    if upcoming is None or upcoming.number != number:
                        failures_changed = failures_changed or fail_len > 0   # no rows left in it
                        continue
                    if not failures_changed:
                        old_fail.seek(fail_at)
                        failures_changed = old_fail.read(fail_len) != upcoming.failures
                    put(upcoming)
                    upcoming = next(fresh, None)
        total.warnings = {}
        for entry in entries:
            total.add_warnings(entry[6])
        for sink in sinks:
            sink.finish()
    except BaseException:
        for sink in sinks:
            sink.abandon()
        raise
    data = None
    if atomic and mark is not None:
        data = {"format": FORMAT, "chunk_bits": CHUNK_BITS, "identity": identity, "columns": columns,
                "last_id": last_id, "mark": mark, "chunks": entries, "total": total.to_json()}
    written = {RESULTS_CSV: sinks[0].written, FAILURES_CSV: sinks[1].written}
    xlsx = index.files.get(FAILURES_XLSX) if index is not None and source == out_dir else None
    return RowReports(out_dir, data, total, failures_changed, rewritten, len(entries), written, xlsx)
