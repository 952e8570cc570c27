"""The library API: ``run(settings)`` and ``validate(settings)``. The CLI is a thin shell around these.

run: read + validate the input into the run's ledger (first time only), then settle every row through
the API, then write the reports. Rerunning the same command resumes: the ledger says what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from . import jobs, report
from .api import CapillaryClient
from .config import Settings, target_url
from .engine import Engine, EngineResult
from .errors import ConfigError, Interrupted, InputFileError, LedgerError, RunAborted, UsageError
from .ledger import Ledger, row_label
from .progress import Progress, choose_mode
from .rules import RuleSettings, Verdict, check_row
from .source import InputOptions, InputTable, file_sha256, open_input

log = logging.getLogger("capbatch")

PROBLEMS_SHOWN = 10


@dataclass
class Prepared:
    """An input file read, validated and loaded into a ledger."""

    ledger: Ledger
    run_dir: Path
    table: InputTable
    sha256: str
    notes: list[str] = field(default_factory=list)
    freshly_imported: bool = False


def input_options(s: Settings) -> InputOptions:
    return InputOptions(card_column=s.card_column, external_id_column=s.external_id_column,
                        delimiter=s.delimiter, encoding=s.encoding, sheet=s.sheet, header_row=s.header_row)


def rule_settings(s: Settings) -> RuleSettings:
    return RuleSettings(external_id_length=s.external_id_length, external_id_pattern=s.external_id_pattern,
                        strip_invisible=s.strip_invisible, allow_missing_external_id=s.generate_missing)


def _validation_fingerprint(s: Settings, table: InputTable) -> dict[str, Any]:
    """Everything that decides which rows are valid: a resumed run must use the same."""
    return {
        "card_column": table.card_column, "external_id_column": table.external_id_column,
        "sheet": table.sheet, "header_row": s.header_row, "delimiter": table.delimiter,
        "encoding": table.encoding, "external_id_length": s.external_id_length,
        "external_id_pattern": s.external_id_pattern, "strip_invisible": s.strip_invisible,
        "generate_missing": s.generate_missing,
    }


def default_run_dir(s: Settings, input_path: Path, sha256: str) -> Path:
    return s.reports_dir / f"{input_path.stem}-{sha256[:12]}"


def prepare(s: Settings, run_dir: Path | None = None) -> Prepared:
    """Open the input, open (or create) the ledger, and import + validate the rows the first time."""
    if s.input is None:
        raise UsageError("no input file given", "capbatch run INPUT.csv|INPUT.xlsx")
    path = Path(s.input)
    if not path.exists():
        raise InputFileError(f"input file {path} does not exist", "check the path (relative to the current directory)")
    if path.is_dir():
        raise InputFileError(f"{path} is a directory, not a spreadsheet", "pass a .csv, .tsv, .txt, .xlsx or .xls file")
    rules = rule_settings(s)
    table = open_input(path, input_options(s))
    sha = file_sha256(path)
    explicit = run_dir is not None or s.run_dir is not None
    run_dir = Path(run_dir or s.run_dir or default_run_dir(s, path, sha))
    ledger = Ledger.open(run_dir)
    try:
        fingerprint = _validation_fingerprint(s, table)
        fresh = False
        if ledger.is_imported():
            known = ledger.get_meta("input_sha256")
            if known != sha:
                raise LedgerError(
                    f"run directory {run_dir} belongs to different input content "
                    f"(ledger {known[:12] if known else '?'}…, {path.name} is {sha[:12]}…)",
                    "the file changed since that run: use a new --run-dir (or omit it) to start a new run, "
                    "or restore the original file to resume" if explicit else "use a new --run-dir")
            stored = ledger.get_meta_json("validation", {})
            if stored != fingerprint:
                changed = sorted(k for k in fingerprint if stored.get(k) != fingerprint[k])
                raise LedgerError(
                    f"run directory {run_dir} was validated with different settings ({', '.join(changed)})",
                    "rerun with the settings of the original run to resume, or use a new --run-dir")
        else:
            ledger.reset_import()
            ledger.import_rows(_ledger_rows(table, rules))
            ledger.apply_cross_row_rules(allow_empty_external_id=s.generate_missing)
            ledger.set_meta("input_name", path.name)
            ledger.set_meta("input_path", str(path.resolve()))
            ledger.set_meta("input_sha256", sha)
            ledger.set_meta("columns", json.dumps(table.columns, ensure_ascii=False))
            ledger.set_meta("mapping", json.dumps({"cardNumber": table.card_column,
                                                   "cardExternalId": table.external_id_column},
                                                  ensure_ascii=False))
            ledger.set_meta("validation", json.dumps(fingerprint))
            ledger.mark_imported()
            fresh = True
    except BaseException:
        ledger.close()
        raise
    return Prepared(ledger, run_dir, table, sha, list(table.notes), fresh)


def _ledger_rows(table: InputTable, rules: RuleSettings) -> Iterator[tuple[Any, ...]]:
    dumps = json.JSONEncoder(ensure_ascii=False).encode   # one encoder, not one per row
    for row in table.rows():
        v: Verdict = check_row(row, rules)
        yield (row.sheet, row.row_number, dumps(row.values), v.card, v.external_id,
               "rejected" if v.reason_code else "pending", v.reason_code, v.reason, v.column)


def validation_report(ledger: Ledger) -> dict[str, Any]:
    counts = ledger.counts()
    by_reason = {code: n for code, n in ledger.query(
        "SELECT reason_code, count(*) FROM rows WHERE state IN ('rejected','duplicate') "
        "GROUP BY reason_code ORDER BY 2 DESC")}
    first = [
        {"row": row_label(sheet, number), "reason": reason}
        for sheet, number, reason in ledger.query(
            "SELECT sheet, row_number, reason FROM rows WHERE state='rejected' ORDER BY id LIMIT ?",
            (PROBLEMS_SHOWN,))
    ]
    valid = counts["pending"] + counts["in_flight"] + counts["succeeded"] + counts["failed"] + counts["unchanged"]
    return {"rows": sum(counts.values()), "valid": valid, "rejected": counts["rejected"],
            "duplicates": counts["duplicate"], "by_reason": by_reason, "first_problems": first}


def log_validation(notes: list[str], v: dict[str, Any]) -> None:
    for note in notes:
        log.info("%s", note)
    log.info("input: %d rows, %d valid, %d rejected, %d duplicates (sent once)",
             v["rows"], v["valid"], v["rejected"], v["duplicates"])
    for code, n in v["by_reason"].items():
        log.info("  %-22s %d", code, n)
    for p in v["first_problems"]:
        log.warning("  row %s: %s", p["row"], p["reason"])
    if v["rejected"] > len(v["first_problems"]):
        log.warning("  ... and %d more rejected rows (see failures.csv / the validation CSV)",
                    v["rejected"] - len(v["first_problems"]))


def run_async(coro: Any) -> Any:
    """asyncio.run, also from code that already has a running loop (a notebook): then on a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="capbatch-run") as pool:
        return pool.submit(asyncio.run, coro).result()


# ---- validate -------------------------------------------------------------------------------------
def validate(s: Settings, output: Path | None = None) -> dict[str, Any]:
    """Read and check the input without any network. Writes a validation CSV; returns the counts.

    ``exit_code`` in the result: 0 all valid, 1 some rows rejected (file-level problems raise).
    """
    with tempfile.TemporaryDirectory(prefix="capbatch-validate-") as tmp:
        prepared = prepare(s, run_dir=Path(tmp))
        try:
            v = validation_report(prepared.ledger)
            out = output or (s.reports_dir / f"{Path(s.input or 'input').stem}.validation.csv")
            _write_validation_csv(prepared.ledger, out)
            v["validation_csv"] = str(out)
            v["notes"] = prepared.notes
            log_validation(prepared.notes, v)
            log.info("validation details written to %s", out)
        finally:
            prepared.ledger.close()
    v["exit_code"] = 1 if v["rejected"] else 0
    return v


def _write_validation_csv(ledger: Ledger, out: Path) -> None:
    import csv

    columns = ledger.get_meta_json("columns", [])
    mapping = ledger.get_meta_json("mapping", {})
    header_of = {"card": mapping.get("cardNumber", ""), "external_id": mapping.get("cardExternalId", "")}
    n = report.neutralise

    def write(fh: Any) -> None:
        w = csv.writer(fh)
        w.writerow(["sheet", "row", "column", "value", "reason_code", "reason"])
        for r in ledger.iter_rows("WHERE state IN ('rejected', 'duplicate')"):
            column = header_of.get(r["problem_column"] or "", "")
            values = json.loads(r["original"])
            at = columns.index(column) if column in columns else len(values)
            value = values[at] if at < len(values) else ""
            w.writerow([n(r["sheet"] or ""), r["row_number"], n(column), n(value), r["reason_code"],
                        n(r["reason"])])

    report.atomic_write(out, write)


# ---- run ------------------------------------------------------------------------------------------
def run(s: Settings) -> dict[str, Any]:
    """Run (or resume) a backfill. Returns the summary dict (also written to summary.json).

    Raises the same :class:`~capbatch.errors.CapbatchError` subclasses the CLI reports; a run that
    ends with failed or rejected rows is not an exception: read ``summary["exit_code"]``.
    """
    if s.skip_confirmed and not s.job:
        raise UsageError("--skip-confirmed needs --job NAME", "name the job whose earlier runs confirmed the pairs")
    if s.job:
        jobs.check_name(s.job)
    if s.dry_run:
        return check_remote(s) if s.check_remote else validate(s)
    base_url = target_url(s)
    _require_credentials(s)
    if not s.verify_tls:
        log.warning("TLS certificate verification is OFF (--no-verify-tls): use this only for a trusted test host")
    prepared = prepare(s)
    ledger, run_dir = prepared.ledger, prepared.run_dir
    file_log = _attach_json_log(run_dir)
    invocation = ledger.start_invocation()
    started_at = time.time()
    result: EngineResult | None = None
    try:
        v = validation_report(ledger)
        log_validation(prepared.notes if prepared.freshly_imported else prepared.notes[:1], v)
        log.info("run directory: %s", run_dir)
        if not prepared.freshly_imported:
            counts = ledger.counts()
            log.info("resuming: %s", report.status_line(counts))
        ledger.set_meta("settings", json.dumps(s.public_dict(), default=str))
        if s.job and s.skip_confirmed:
            skipped = jobs.skip_confirmed(ledger, jobs.store_path(s.reports_dir), s.job)
            log.info("job %s: %d rows already confirmed by earlier runs, settled without a request", s.job, skipped)
        log.info("target %s, auth %s, rate %s, concurrency %d", base_url, s.credentials.kind,
                 s.rate or "unlimited", s.concurrency)
        result = run_async(_run_engine(s, ledger, base_url))
    except BaseException as exc:
        code = getattr(exc, "exit_code", report.EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt)
                       else report.EXIT_ABORTED)
        ledger.end_invocation(invocation, code, "interrupted" if code == report.EXIT_INTERRUPTED else "error", 0)
        _detach(file_log)
        ledger.close()
        raise
    stop = result.stop
    counts = ledger.counts()
    exit_code = report.exit_code_for(counts, stop)
    ledger.end_invocation(invocation, exit_code, stop, result.counters.requests)
    summary = report.write_reports(ledger, run_dir, stop=stop, message=result.message,
                                   extra={"this_invocation": {
                                       "requests": result.counters.requests,
                                       "retries": result.counters.retries,
                                       "throttle_events": result.throttle_events,
                                       "outages": result.outages,
                                       "outage_seconds": round(result.outage_seconds, 3)}})
    if s.job:
        jobs.remember(ledger, jobs.store_path(s.reports_dir), s.job, run_dir, summary, started_at)
    _log_summary(summary)
    _detach(file_log)
    ledger.close()
    if stop == "aborted":
        raise RunAborted(f"run aborted: {result.message}",
                         f"fix the cause, then rerun the same command to resume ({_rows_left(counts)})")
    if stop == "interrupted":
        raise Interrupted("run interrupted", "rerun the same command to resume where it stopped")
    return summary


async def _run_engine(s: Settings, ledger: Ledger, base_url: str) -> EngineResult:
    async with CapillaryClient(base_url, s.credentials, timeout=s.timeout, verify_tls=s.verify_tls,
                               max_connections=s.concurrency + 4, extra_fields=dict(s.extra_fields)) as client:
        engine = Engine(s, ledger, client)
        progress = Progress(choose_mode(s.progress, s.quiet), s.progress_interval)
        loop = asyncio.get_running_loop()
        presses = 0

        def on_signal(signame: str) -> None:
            nonlocal presses
            presses += 1
            if presses == 1:
                log.warning("%s: stopping — finishing requests in flight (up to %g s); "
                            "press Ctrl-C again to exit at once", signame, s.grace_period)
                engine.request_stop()
            else:
                log.warning("second %s: exiting now; the ledger is consistent, rerun to resume", signame)
                try:
                    engine.writer.flush()
                finally:
                    os._exit(report.EXIT_INTERRUPTED)

        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_signal, sig.name)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):  # not the main thread (library use)
                pass
        progress.start(engine.counters)
        try:
            return await engine.run()
        finally:
            await progress.stop()
            for sig in installed:
                loop.remove_signal_handler(sig)


def _rows_left(counts: dict[str, int]) -> str:
    left = counts["pending"] + counts["in_flight"]
    if not counts["in_flight"]:
        return f"{left} rows left"
    return (f"{left} rows left: {counts['pending']} pending, {counts['in_flight']} whose outcome is unknown "
            "(settled first by reading the card)")


def _log_summary(summary: dict[str, Any]) -> None:
    c = summary["counts"]
    stop = summary.get("stop")
    log.info(
        "%s: %d succeeded, %d unchanged, %d failed, %d rejected, %d duplicates, %s — "
        "%d requests, %.1f rows/s; reports in %s", "done" if stop == "done" else f"stopped ({stop})",
        c["succeeded"], c["unchanged"], c["failed"], c["rejected"], c["duplicate"],
        _rows_left(c), summary["this_invocation"]["requests"],
        summary["throughput_rows_per_second"], summary["run_dir"])
    if summary.get("warnings_by_code"):
        log.info("answers carried warnings: %s", ", ".join(
            f"{code or '?'} {w['message']!r} on {w['rows']} rows" for code, w in summary["warnings_by_code"].items()))
    if c["failed"] or c["rejected"]:
        log.info("fix the rows in %s and feed it back: capbatch run %s ...",
                 Path(summary["run_dir"]) / report.FAILURES_CSV, Path(summary["run_dir"]) / report.FAILURES_CSV)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": round(record.created, 3), "level": record.levelname.lower(),
                           "logger": record.name, "message": record.getMessage()}, ensure_ascii=False)


def _attach_json_log(run_dir: Path) -> logging.Handler | None:
    try:
        handler = logging.FileHandler(run_dir / "capbatch.log.jsonl", encoding="utf-8")
    except OSError:
        return None
    handler.setFormatter(_JsonFormatter())
    handler.setLevel(logging.INFO)
    logging.getLogger("capbatch").addHandler(handler)
    return handler


def _detach(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger("capbatch").removeHandler(handler)
        handler.close()


def status(run_dir: Path) -> dict[str, Any]:
    ledger = Ledger.open_readonly(run_dir)
    try:
        return {"run_dir": str(run_dir), "input": ledger.get_meta("input_name"),
                "counts": ledger.counts(), "invocations": ledger.invocations()}
    finally:
        ledger.close()


def rebuild_reports(run_dir: Path) -> dict[str, Any]:
    ledger = Ledger.open_readonly(run_dir)
    try:
        return report.write_reports(ledger, run_dir)
    finally:
        ledger.close()



# ---- read-only checks against the API -------------------------------------------------------------
def check_remote(s: Settings) -> dict[str, Any]:
    """``run --dry-run --check-remote``: validate, then read every valid card; send and record nothing."""
    from .verify import Target, check_cards

    base_url = target_url(s)
    _require_credentials(s)
    with tempfile.TemporaryDirectory(prefix="capbatch-check-") as tmp:
        prepared = prepare(s, run_dir=Path(tmp))
        try:
            v = validation_report(prepared.ledger)
            log_validation(prepared.notes, v)
            targets = (Target(row_label(r["sheet"], r["row_number"]), r["card"], r["external_id"])
                       for r in prepared.ledger.iter_rows("WHERE state='pending'"))
            out = s.reports_dir / f"{Path(s.input or 'input').stem}.check-remote.csv"
            counts = check_cards(s, base_url, targets, out)
        finally:
            prepared.ledger.close()
    log.info("remote check: %d already hold their target ID, %d would change, %d cards do not exist, "
             "%d could not be read; details in %s", counts["match"], counts["differs"], counts["missing"],
             counts["error"], out)
    v.update(remote=counts, check_csv=str(out))
    v["exit_code"] = 1 if (v["rejected"] or counts["missing"] or counts["error"]) else 0
    return v


def verify(s: Settings, target: Path) -> dict[str, Any]:
    """Read every card back and compare with the intended external ID. Read-only; exit 1 on any difference.

    ``target`` is a run directory (checks the rows it settled) or an input file (checks its valid rows).
    """
    from .verify import Target, check_cards

    base_url = target_url(s)
    _require_credentials(s)
    with contextlib.ExitStack() as stack:
        if target.is_dir():
            ledger = Ledger.open_readonly(target)
            out = target / "verify.csv"
            where = "WHERE state IN ('succeeded', 'unchanged')"
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="capbatch-verify-"))
            ledger = prepare(replace(s, input=target), run_dir=Path(tmp)).ledger
            out = s.reports_dir / f"{target.stem}.verify.csv"
            where = "WHERE state='pending'"
        stack.callback(ledger.close)
        targets = (Target(row_label(r["sheet"], r["row_number"]), r["card"], r["external_id"])
                   for r in ledger.iter_rows(where))
        counts = check_cards(s, base_url, targets, out)
    log.info("verify: %d match, %d differ, %d cards missing, %d unreadable; details in %s",
             counts["match"], counts["differs"], counts["missing"], counts["error"], out)
    bad = counts["differs"] + counts["missing"] + counts["error"]
    return {"counts": counts, "verify_csv": str(out), "exit_code": 1 if bad else 0}


def _require_credentials(s: Settings) -> None:
    if s.credentials.kind == "none":
        raise ConfigError(
            "no Capillary credentials in the environment",
            "export CAPILLARY_USERNAME and CAPILLARY_PASSWORD (Basic auth) or "
            "CAPILLARY_CLIENT_KEY and CAPILLARY_CLIENT_SECRET (OAuth); they are never read from flags",
        )
