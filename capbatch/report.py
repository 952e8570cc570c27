"""Reports built from the ledger: results.csv, failures.csv, summary.json (and report.html).

Reports only read the ledger, so ``capbatch report RUN_DIR`` can rebuild them at any time, even while
a run is in progress. CSV cells that a spreadsheet would run as a formula are neutralised (OWASP);
the source reader undoes that for files carrying the ``capbatch_row`` column, so a failures file fed
back to ``capbatch run`` sends the original values.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from .exitcodes import EXIT_ABORTED, EXIT_INTERRUPTED, EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE  # noqa: F401
from .ledger import Ledger, State
from .report_html import REPORT_HTML, write_html  # noqa: F401  (REPORT_HTML: re-exported name)
from .source import REPORT_MARKER_COLUMN

RESULTS_CSV = "results.csv"
FAILURES_CSV = "failures.csv"
FAILURES_XLSX = "failures.xlsx"
SUMMARY_JSON = "summary.json"

FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
# A value that already starts with ' + trigger gets the prefix too, so the reader's "strip one
# quote" restores it exactly.
_QUOTED_TRIGGERS = tuple("'" + t for t in FORMULA_TRIGGERS)
MARKER_COLUMN = REPORT_MARKER_COLUMN   # in every CSV report; tells the reader to undo neutralising



_RISKY_FIRST = frozenset("=+-@\t\r'")


def neutralise(value: Any) -> str:
    """OWASP CSV-injection defence: a leading ' makes the spreadsheet show the cell as text."""
    text = "" if value is None else value if type(value) is str else str(value)
    if text[:1] in _RISKY_FIRST and (text.startswith(FORMULA_TRIGGERS) or text.startswith(_QUOTED_TRIGGERS)):
        return "'" + text
    return text


@functools.lru_cache(maxsize=4096)
def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, tz=timezone.utc).isoformat(timespec="seconds")


def exit_code_for(counts: dict[str, int], stop: str) -> int:
    if stop == "aborted":
        return EXIT_ABORTED
    if stop == "interrupted":
        return EXIT_INTERRUPTED
    if stop == "paused" and (counts.get("pending", 0) or counts.get("in_flight", 0)):
        return EXIT_ABORTED       # the sending window closed (--window-exit): stopped, resumable
    if counts.get("failed", 0) or counts.get("rejected", 0):
        return EXIT_ROWS_FAILED
    if counts.get("pending", 0) or counts.get("in_flight", 0):
        return EXIT_INTERRUPTED
    return EXIT_OK


def iso(ts: float | None) -> str:
    return _iso_second(int(ts)) if ts else ""


def atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(fh)`` to a temporary file, then rename: readers never see half a file.

    Only a regular file is replaced that way. ``-`` is stdout, and anything else that is not a
    regular file (a device such as /dev/null, a named pipe) is written directly: renaming onto it
    would replace the device with a file. A symbolic link keeps pointing at its (replaced) target.
    Raises OSError when the path cannot be written.
    """
    if str(path) == "-":
        write(sys.stdout)
        sys.stdout.flush()
        return
    if path.exists() and not path.is_file():
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory", str(path))
        with open(path, "w", newline="", encoding="utf-8") as fh:
            write(fh)
        return
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8-sig" if path.suffix == ".csv" else "utf-8") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _reason(error_code: str | None, error_message: str | None, reason_code: str | None,
            reason: str | None, note: str | None) -> tuple[str, str]:
    """(code, message) explaining a row's state, whichever stage produced it."""
    if error_code or error_message:
        return error_code or "", error_message or ""
    return reason_code or "", reason or note or ""


def write_results(ledger: Ledger, run_dir: Path) -> None:
    columns = ledger.get_meta_json("columns", [])
    width = len(columns)
    header = ([MARKER_COLUMN, "capbatch_sheet"] + list(columns) +
              ["capbatch_state", "capbatch_attempts", "capbatch_http_status", "capbatch_error_code",
               "capbatch_message", "capbatch_sent_external_id", "capbatch_previous_external_id",
               "capbatch_generated", "capbatch_card_id", "capbatch_customer_id", "capbatch_settled_at",
               "capbatch_warnings"])
    loads, n, risky = json.loads, neutralise, _RISKY_FIRST

    def write(fh: Any) -> None:
        w = csv.writer(fh)
        w.writerow([n(h) for h in header])
        for (row_number, sheet, original, state, attempts, http_status, error_code, error_message,
             reason_code, reason, note, external_id, previous, generated, card_id, customer_id,
             settled_at, warnings) in ledger.result_rows():
            code, message = _reason(error_code, error_message, reason_code, reason, note)
            values = loads(original)
            if len(values) != width:
                values = _fit(values, width)
            w.writerow([row_number, n(sheet)] + [n(v) if v[:1] in risky else v for v in values]
                       + [state, attempts, http_status or "", n(code), n(message),
                          n(external_id) if state != "rejected" else "", n(previous),
                          "yes" if generated else "", card_id or "", customer_id or "", iso(settled_at),
                          n(warnings_text(warnings)) if warnings else ""])

    atomic_write(run_dir / RESULTS_CSV, write)


def warnings_text(stored: str) -> str:
    """'3039: No update in status label; ...' from the ledger's JSON warnings column."""
    return "; ".join(f"{w.get('code')}: {w.get('message')}" if w.get("code") else str(w.get("message"))
                     for w in json.loads(stored))


def failure_rows(ledger: Ledger) -> tuple[list[str], Iterable[list[str]]]:
    """(header, rows) of the failures file: failed and rejected rows, original columns first, as
    plain text (not neutralised)."""
    columns = ledger.get_meta_json("columns", [])
    header = list(columns) + [MARKER_COLUMN, "capbatch_sheet", "capbatch_state", "capbatch_error_code",
                              "capbatch_reason"]

    def rows() -> Iterable[list[str]]:
        for row in ledger.rows_in_states(("failed", "rejected")):
            code, message = _reason(row["error_code"], row["error_message"], row["reason_code"], row["reason"],
                                    row["note"])
            original = json.loads(row["original"])
            yield (_fit(original, len(columns))
                   + [str(row["row_number"]), row["sheet"] or "", row["state"], code, message])

    return header, rows()


def write_failures(ledger: Ledger, run_dir: Path) -> int:
    """Failed and rejected rows, original columns first, so the file can be fixed and fed back;
    failures.xlsx beside it holds the same cells, all stored as text (see report_xlsx)."""
    header, rows = failure_rows(ledger)
    count = 0

    def write(fh: Any) -> None:
        nonlocal count
        w = csv.writer(fh)
        w.writerow([neutralise(h) for h in header])
        for values in rows:
            w.writerow([neutralise(v) for v in values])
            count += 1

    atomic_write(run_dir / FAILURES_CSV, write)
    from .report_xlsx import write_text_xlsx

    write_text_xlsx(run_dir / FAILURES_XLSX, *failure_rows(ledger), sheet="failures")
    return count


def _fit(values: list[str], width: int) -> list[str]:
    return values[:width] + [""] * (width - len(values))


def percentiles(ledger: Ledger, points: Iterable[float] = (50, 90, 95, 99)) -> dict[str, float]:
    """Exact latency percentiles (nearest rank) of each row's last request, streamed in one sorted pass."""
    total = ledger.latency_count()
    out: dict[str, float] = {}
    if not total:
        return out
    wanted = sorted((max(0, math.ceil(total * p / 100.0) - 1), f"p{p:g}") for p in points)
    i = 0
    last = 0.0
    for index, value in enumerate(ledger.latencies_sorted()):
        last = value
        while i < len(wanted) and wanted[i][0] == index:
            out[wanted[i][1]] = round(value, 2)
            i += 1
    out["max"] = round(last, 2)
    return out


def retry_totals(ledger: Ledger) -> tuple[int, int]:
    """(retries, 429 answers) over the whole run, as recorded in the timeline."""
    return ledger.timeline_totals()


def build_summary(ledger: Ledger, run_dir: Path, *, stop: str | None = None, message: str | None = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    counts = ledger.counts()
    invocations = ledger.invocations()
    started = min((i["started_at"] for i in invocations), default=None)
    ended = max((i["ended_at"] or 0 for i in invocations), default=None) or None
    active = sum(i["duration"] for i in invocations)   # a killed invocation: up to its last commit
    requests = sum(i["requests"] or 0 for i in invocations)
    requests_by_status: dict[str, int] = {}
    for inv in invocations:
        for status_class, n in inv["requests_by_status"].items():
            requests_by_status[status_class] = requests_by_status.get(status_class, 0) + n
    by_error: dict[str, int] = {}
    for code, n in ledger.counts_by("error_code", ("failed",)):
        by_error[str(code)] = n
    by_reason: dict[str, int] = {}
    for code, n in ledger.counts_by("reason_code", ("rejected",)):
        by_reason[str(code)] = n
    retries, throttled = retry_totals(ledger)
    drifted = ledger.drifted_count()
    generated = ledger.generated_count()
    warnings_by_code = ledger.warning_counts()
    rows_with_warnings = ledger.rows_with_warnings()
    settled_by_api = counts["succeeded"] + counts["failed"] + counts["unchanged"]
    if stop is None:
        last = invocations[-1] if invocations else None
        stop = (last or {}).get("outcome") or ("in progress" if last and not last.get("ended_at") else "done")
    exit_code = exit_code_for(counts, stop if stop in ("aborted", "interrupted", "paused") else "done")
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "input": {
            "name": ledger.get_meta("input_name"),
            "sha256": ledger.get_meta("input_sha256"),
            "rows": sum(counts.values()),
            "columns": ledger.get_meta_json("columns", []),
            "mapping": ledger.get_meta_json("mapping", {}),
        },
        "counts": counts,
        "drifted": drifted,
        "generated_external_ids": generated,
        "failed_by_error_code": by_error,
        "rejected_by_reason": by_reason,
        "warnings_by_code": warnings_by_code,
        "rows_with_warnings": rows_with_warnings,
        "started_at": iso(started),
        "ended_at": iso(ended),
        "duration_seconds": round(active, 3),
        "invocations": len(invocations),
        "requests": requests,
        "requests_by_status": dict(sorted(requests_by_status.items())),
        "retries": retries,
        "throttled_responses": throttled,
        "throughput_rows_per_second": round(settled_by_api / active, 2) if active > 0 else 0.0,
        "latency_ms": percentiles(ledger),
        "settings": ledger.get_meta_json("settings", {}),
        "stop": stop,
        "message": message,
        "exit_code": exit_code,
    }
    audit = ledger.audit_counts()
    if audit:   # the job's rolling audit (--audit-fraction): confirmed pairs re-read in this run
        summary["audit"] = {"rows": sum(audit.values()), "still_held": audit.get("unchanged", 0),
                            "drift_fixed": audit.get("succeeded", 0), "failed": audit.get("failed", 0),
                            "pending": audit.get("pending", 0) + audit.get("in_flight", 0)}
    plan = ledger.get_meta_json("plan")
    if plan:   # made before the last invocation's first request; its actual figures beside it
        summary["plan"] = plan
        summary["actual"] = ledger.get_meta_json("plan_actual")
    if extra:
        summary.update(extra)
    return summary


def write_reports(ledger: Ledger, run_dir: Path, out_dir: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """(Re)build every report from the ledger, into ``out_dir`` (default: the run directory).
    Returns the summary."""
    out = run_dir if out_dir is None else out_dir
    write_results(ledger, out)
    write_failures(ledger, out)
    summary = build_summary(ledger, run_dir, **kwargs)
    atomic_write(out / SUMMARY_JSON, lambda fh: json.dump(summary, fh, indent=2, sort_keys=False))
    write_html(ledger, out, summary)
    return summary


def status_line(counts: dict[str, int]) -> str:
    order = [s.value for s in State]
    return "  ".join(f"{k}={counts.get(k, 0)}" for k in order if counts.get(k, 0) or k in ("succeeded", "failed"))
