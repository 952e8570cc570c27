"""Reports built from the ledger: results.csv, failures.csv, summary.json (and report.html).

Reports only read the ledger, so ``capbatch report RUN_DIR`` can rebuild them at any time, even while
a run is in progress. CSV cells that a spreadsheet would run as a formula are neutralised (OWASP);
the source reader undoes that for files carrying the ``capbatch_row`` column, so a failures file fed
back to ``capbatch run`` sends the original values.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from .exitcodes import EXIT_ABORTED, EXIT_INTERRUPTED, EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE  # noqa: F401
from .ledger import Ledger, State
from .report_html import REPORT_HTML, write_html  # noqa: F401  (REPORT_HTML: re-exported name)
from .report_rows import (FAILURES_CSV, FAILURES_XLSX, MARKER_COLUMN,  # noqa: F401
                          RESULTS_CSV, Figures, fit, format_chunk, iso, neutralise, warnings_text,
                          write_row_reports)
from .report_rows import reason as _reason
from .report_rows import _RISKY_FIRST  # noqa: F401
from .source.model import FORMULA_TRIGGERS  # noqa: F401  (re-exported: the reports' rule)

SUMMARY_JSON = "summary.json"



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


_fit = fit


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
            yield (fit(original, len(columns))
                   + [str(row["row_number"]), row["sheet"] or "", row["state"], code, message])

    return header, rows()


def write_failures_xlsx(ledger: Ledger, out_dir: Path) -> int:
    """failures.xlsx: the failed and rejected rows, the same cells as failures.csv, all stored as
    text (see report_xlsx)."""
    from .report_xlsx import write_text_xlsx

    return write_text_xlsx(out_dir / FAILURES_XLSX, *failure_rows(ledger), sheet="failures")


def collect_figures(ledger: Ledger) -> Figures:
    """What the summary adds up over the rows, read from the ledger in one pass."""
    from itertools import groupby

    from .ledger import CHUNK_BITS

    columns = ledger.get_meta_json("columns", [])
    total = Figures()
    for number, rows in groupby(ledger.report_rows(), key=lambda r: r[0] >> CHUNK_BITS):
        total.add(format_chunk(number, rows, len(columns)).figures)
    return total


def percentiles(ledger: Ledger, points: Iterable[float] = (50, 90, 95, 99)) -> dict[str, float]:
    """Exact latency percentiles (nearest rank) of each row's last request, to 0.01 ms."""
    return collect_figures(ledger).percentiles(points)


def retry_totals(ledger: Ledger) -> tuple[int, int]:
    """(retries, 429 answers) over the whole run, as recorded in the timeline."""
    return ledger.timeline_totals()


def build_summary(ledger: Ledger, run_dir: Path, *, stop: str | None = None, message: str | None = None,
                  extra: dict[str, Any] | None = None, figures: Figures | None = None) -> dict[str, Any]:
    """summary.json's content; ``figures``: the rows' figures when the caller has them (else read here)."""
    if figures is None:
        figures = collect_figures(ledger)
    counts = figures.counts()
    invocations = ledger.invocations()
    started = min((i["started_at"] for i in invocations), default=None)
    ended = max((i["ended_at"] or 0 for i in invocations), default=None) or None
    active = sum(i["duration"] for i in invocations)   # a killed invocation: up to its last commit
    requests = sum(i["requests"] or 0 for i in invocations)
    requests_by_status: dict[str, int] = {}
    for inv in invocations:
        for status_class, n in inv["requests_by_status"].items():
            requests_by_status[status_class] = requests_by_status.get(status_class, 0) + n
    by_error = dict(Figures.ranked(figures.failed_by))
    by_reason = dict(Figures.ranked(figures.rejected_by))
    retries, throttled = retry_totals(ledger)
    drifted = figures.drifted
    generated = figures.generated
    warnings_by_code = figures.warning_counts()
    rows_with_warnings = figures.with_warnings
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
        "latency_ms": figures.percentiles(),
        "settings": ledger.get_meta_json("settings", {}),
        "stop": stop,
        "message": message,
        "exit_code": exit_code,
    }
    audit = figures.audit
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


def write_reports(ledger: Ledger, run_dir: Path, out_dir: Path | None = None, ahead: Path | None = None,
                  **kwargs: Any) -> dict[str, Any]:
    """(Re)build every report from the ledger, into ``out_dir`` (default: the run directory); ``ahead``:
    the copy of the row reports written while the run sent (report_ahead). Returns the summary."""
    out = run_dir if out_dir is None else out_dir
    rows = write_row_reports(ledger, out, ahead)   # only the chunks of rows that changed since the last time
    logging.getLogger("capbatch.report").debug("results.csv: %d of %d chunks of rows formatted", rows.rewritten,
                                               rows.chunks)
    if not rows.xlsx_current():
        write_failures_xlsx(ledger, out)
    summary = build_summary(ledger, run_dir, figures=rows.figures, **kwargs)
    atomic_write(out / SUMMARY_JSON, lambda fh: json.dump(summary, fh, indent=2, sort_keys=False))
    write_html(ledger, out, summary, latency_buckets=rows.figures.histogram())
    rows.commit()
    return summary


def status_line(counts: dict[str, int]) -> str:
    order = [s.value for s in State]
    return "  ".join(f"{k}={counts.get(k, 0)}" for k in order if counts.get(k, 0) or k in ("succeeded", "failed"))
