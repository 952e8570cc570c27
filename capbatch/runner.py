"""The pipeline: input -> rules -> ledger -> engine -> reports. The CLI and the library both call it.

``run`` reads and validates the input into the run's ledger (the first time only), settles every
pending row through the API, then writes the reports. Rerunning with the same input resumes: the
ledger says what is left. Each stage below takes only the settings it needs; ``run``, ``validate``,
``check_remote`` and ``verify`` put the stages together from one :class:`Settings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import announce, exitcodes, intake, jobs, outputs, report
from .aio import run_async
from .config import Credentials, Settings, canary_rows, target_url
from .errors import ConfigError, InputFileError, Interrupted, LedgerError, LedgerLost, Paused, RunAborted, UsageError
from .ledger import LEDGER_FILE, Ledger, holds_import, open_for_reading, open_ledger, row_label
from .pacing import SharedQuota, quota_peers
from .plan import Plan, PlanSettings, check_deadline, make_plan
from .plan import actual as plan_actual
from .plan import announce as announce_plan
from .quota import QuotaKey, credential_fingerprint
from .report_ahead import ReportsAhead
from .source.frame import MemoryTable, is_dataframe, open_frame, open_records
from .window import SYSTEM_CLOCK, Clock, Schedule, WindowGate, human_duration, parse_deadline, schedule_for
from .rules import RuleSettings
from .source import InputOptions, InputTable, file_sha256, open_input
from .summary import Summary
from .wording import abort_advice, plural

if TYPE_CHECKING:  # the engine stage imports these when it runs: `capbatch --help` and `validate` need no HTTP stack
    from .engine import Counters, Engine, EngineResult, EngineSettings
    from .verify import CheckSettings

log = logging.getLogger("capbatch")

PROBLEMS_SHOWN = 10

#: What ``run(settings, source)`` accepts besides ``settings.input``: a path, a pandas.DataFrame, or an
#: iterable of (card, external_id) pairs or of mappings.
Source = Any


# ==== 1. input =======================================================================================
@dataclass(frozen=True)
class Input:
    """An input opened and checked as a whole, with the fingerprint of its content."""

    table: InputTable | MemoryTable
    sha256: str
    name: str                 # file name, or "dataframe" / "records"
    path: Path | None         # None for an in-memory input

    @property
    def stem(self) -> str:
        return self.path.stem if self.path else self.name


def input_options(s: Settings) -> InputOptions:
    return InputOptions(card_column=s.card_column, external_id_column=s.external_id_column,
                        delimiter=s.delimiter, encoding=s.encoding, sheet=s.sheet, header_row=s.header_row)


def read_input(source: Source, options: InputOptions, survey: bool = True, sha256: str | None = None) -> Input:
    """Open a file path, a DataFrame or an iterable of pairs/mappings. Raises InputFileError/UsageError.
    ``survey=False``: a file's structural pass is left to the first reading of its rows (see
    open_input): for a caller that loads every row into a ledger it throws away on an error, or that
    reads no row at all (a resume). ``sha256``: the file's content hash when the caller has it."""
    if source is None:
        raise UsageError("no input given", "capbatch run INPUT.csv|INPUT.xlsx (from code: run_backfill(source))")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise InputFileError(f"input file {path} does not exist",
                                 "check the path (relative to the current directory)")
        if path.is_dir():
            raise InputFileError(f"{path} is a directory, not a spreadsheet",
                                 "pass a .csv, .tsv, .txt, .xlsx or .xls file")
        table = open_input(path, options, survey)
        return Input(table, sha256 or file_sha256(path), path.name, path)
    if is_dataframe(source):
        memory = open_frame(source, options)
    elif isinstance(source, (bytes, bytearray)) or not _iterable(source) or _is_mapping(source):
        raise UsageError(
            f"the input is a {type(source).__name__}, not a path, a pandas.DataFrame or an iterable of "
            "(card, external_id) pairs or of mappings",
            "for a dict of card -> external id pass d.items(); for columns pass pandas.DataFrame(d)"
            if _is_mapping(source) else "e.g. run_backfill('cards.csv') or run_backfill(df)")
    else:
        memory = open_records(source, options)
    return Input(memory, memory.sha256(), memory.name, None)


def _iterable(obj: object) -> bool:
    try:
        iter(obj)  # type: ignore[call-overload]
    except TypeError:
        return False
    return True


def _is_mapping(obj: object) -> bool:
    from collections.abc import Mapping

    return isinstance(obj, Mapping)


# ==== 2. rules =======================================================================================
def rule_settings(s: Settings) -> RuleSettings:
    return RuleSettings(external_id_length=s.external_id_length, external_id_pattern=s.external_id_pattern,
                        strip_invisible=s.strip_invisible, allow_missing_external_id=s.generate_missing,
                        external_id_min_length=s.external_id_min_length)


def checked_rows(table: InputTable | MemoryTable, rules: RuleSettings) -> Iterator[tuple[Any, ...]]:
    """Every input row with its verdict, as the ledger stores it."""
    return intake.ledger_rows(table, rules)


def validation_fingerprint(inp: Input, header_row: int, rules: RuleSettings) -> dict[str, Any]:
    """Everything that decides which rows are valid: a resumed run must use the same."""
    t = inp.table
    fingerprint = {
        "card_column": t.card_column, "external_id_column": t.external_id_column,
        "sheet": getattr(t, "sheet_choice", t.sheet),  # --sheet all: the list of sheets read
        "header_row": header_row, "delimiter": t.delimiter,
        "encoding": t.encoding, "external_id_length": rules.external_id_length,
        "external_id_pattern": rules.external_id_pattern, "strip_invisible": rules.strip_invisible,
        "generate_missing": rules.allow_missing_external_id,
    }
    if rules.external_id_min_length is not None:  # only when set: older ledgers stay resumable
        fingerprint["external_id_min_length"] = rules.external_id_min_length
    return fingerprint


# ==== 3. ledger ======================================================================================
def default_run_dir(reports_dir: Path, inp: Input, job: str | None = None, latest: bool = False) -> Path:
    """reports/<input>-<content hash>: the same content (file or in-memory) finds the same run again.
    A job's runs go under reports/<job>/ (see jobs.run_dir_for; ``latest``: --retry-failed)."""
    if job:
        return jobs.run_dir_for(reports_dir, job, inp.stem, inp.sha256, latest=latest)
    return reports_dir / f"{inp.stem}-{inp.sha256[:12]}"


def load_ledger(run_dir: Path, inp: Input, rules: RuleSettings, fingerprint: dict[str, Any],
                changed_hint: str, location: str | None = None, job: str | None = None,
                problems_only: bool = False) -> tuple[Ledger, bool, int]:
    """Open (or create) the run's ledger; import and check the rows the first time. Returns
    (ledger, freshly_imported, valid rows left out). Resuming with other content or other validation
    settings, or a run that was reverted, is refused; ``changed_hint`` is what to say when the content
    changed. ``location``: a database URL (with ``job``) instead of the run directory's SQLite file.
    ``problems_only``: validate's scratch ledger, which holds only the rows a validation reports
    (see intake.load_for_validation); the valid rows it leaves out are counted."""
    ledger = open_ledger(location, run_dir, job=job, input_sha256=inp.sha256)
    left_out = 0
    try:
        if ledger.is_imported():
            _check_same_run(ledger, run_dir, inp, fingerprint, changed_hint)
            return ledger, False, 0
        ledger.reset_import()
        if problems_only:
            left_out = intake.load_for_validation(ledger, inp.table, rules)
        else:
            intake.load_rows(ledger, inp.table, rules)
        ledger.set_meta("input_name", inp.name)
        ledger.set_meta("input_path", str(inp.path.resolve()) if inp.path else "")
        ledger.set_meta("input_sha256", inp.sha256)
        ledger.set_meta("columns", json.dumps(inp.table.columns, ensure_ascii=False))
        ledger.set_meta("mapping", json.dumps({"cardNumber": inp.table.card_column,
                                               "cardExternalId": inp.table.external_id_column},
                                              ensure_ascii=False))
        ledger.set_meta("validation", json.dumps(fingerprint))
        ledger.mark_imported()
    except BaseException:
        ledger.close()
        raise
    return ledger, True, left_out


def _check_same_run(ledger: Ledger, run_dir: Path, inp: Input, fingerprint: dict[str, Any],
                    changed_hint: str) -> None:
    known = ledger.get_meta("input_sha256")
    if known != inp.sha256:
        raise LedgerError(
            f"run directory {run_dir} belongs to different input content "
            f"(ledger {known[:12] if known else '?'}…, {inp.name} is {inp.sha256[:12]}…)", changed_hint)
    if ledger.get_meta("reverted_at"):
        raise LedgerError(f"the run in {run_dir} was reverted (capbatch revert) and cannot be resumed",
                          "fix the input and start a new run (a changed file gets a new run directory)")
    stored = ledger.get_meta_json("validation", {})
    if stored != fingerprint:
        changed = sorted(k for k in fingerprint if stored.get(k) != fingerprint[k])
        raise LedgerError(
            f"run directory {run_dir} was validated with different settings ({', '.join(changed)})",
            "rerun with the settings of the original run to resume, or use a new --run-dir")


@dataclass
class Prepared:
    """An input read, validated and loaded into a ledger."""

    ledger: Ledger
    run_dir: Path
    table: InputTable | MemoryTable
    sha256: str
    notes: list[str] = field(default_factory=list)
    freshly_imported: bool = False
    left_out: int = 0   # valid rows a problems-only ledger does not hold (validate)


def prepare(s: Settings, run_dir: Path | None = None, source: Source = None,
            problems_only: bool = False) -> Prepared:
    """Stages 1-3: read ``source`` (default ``s.input``), check every row, load the run's ledger
    (``problems_only``: a scratch ledger of the rows a validation reports, see load_ledger)."""
    with intake.bulk():
        return _prepare(s, run_dir, source, problems_only)


def _prepare(s: Settings, run_dir: Path | None, source: Source, problems_only: bool) -> Prepared:
    scratch = run_dir is not None
    given = s.input if source is None else source
    # A scratch ledger (validate, checks) is thrown away on an error: the file is parsed once, its
    # structural checks made while its rows are loaded. A resume reads no row: no structural pass.
    sha256, imported = (None, False) if scratch else _imported_already(s, given)
    inp = read_input(given, input_options(s), survey=not scratch and not imported, sha256=sha256)
    rules = rule_settings(s)
    explicit = run_dir is not None or s.run_dir is not None
    run_dir = Path(run_dir or s.run_dir or default_run_dir(s.reports_dir, inp, s.job, s.retry_failed))
    hint = _changed_input_hint(s, "file" if inp.path else "data") if explicit else "use a new --run-dir"
    # A run directory given by the caller is a scratch ledger (validate, checks): never the database.
    location = None if scratch else s.ledger
    ledger, fresh, left_out = load_ledger(run_dir, inp, rules, validation_fingerprint(inp, s.header_row, rules),
                                          hint, location, s.job, problems_only=problems_only and scratch)
    return Prepared(ledger, run_dir, inp.table, inp.sha256, list(inp.table.notes), fresh, left_out)


def _imported_already(s: Settings, given: Source) -> tuple[str | None, bool]:
    """The input file's content hash (None for a DataFrame or pairs), and whether its run's ledger
    already holds an import of that content (a resume). Then the run reads none of its rows, and a
    1M-row CSV's structural pass (~1.5 s) is not needed: the ledger holds what that pass decided.
    Changed content has another hash, so it is still read, surveyed and refused as before. The hash
    is handed on to the reader, which would otherwise compute it again."""
    if not isinstance(given, (str, os.PathLike)) or not Path(given).is_file():
        return None, False
    path = Path(given)
    try:
        sha256 = file_sha256(path)
    except OSError:
        return None, False   # unreadable: the reader that follows says so, with its fix
    probe = Input(None, sha256, path.name, path)  # type: ignore[arg-type]  # the run directory needs no table
    run_dir = Path(s.run_dir) if s.run_dir else default_run_dir(s.reports_dir, probe, s.job, s.retry_failed)
    return sha256, holds_import(s.ledger, run_dir, s.job, sha256)


def _changed_input_hint(s: Settings, what: str = "file") -> str:
    if s.job:
        return (f"the {what} changed since that run. With --job every export gets its own run directory under "
                f"{jobs.job_dir(s.reports_dir, s.job)}: drop --run-dir. To resume that run, restore the "
                f"original {what}")
    return (f"the {what} changed since that run. For a nightly export, drop --run-dir and name a job instead "
            "(--job NAME --skip-confirmed): every export gets its own run directory and the job remembers "
            f"the pairs already confirmed (README: Nightly jobs). To resume that run, restore the original {what}")


def validation_report(ledger: Ledger, left_out: int = 0) -> dict[str, Any]:
    counts = ledger.counts()
    counts["pending"] += left_out   # valid rows a problems-only ledger does not hold
    by_reason: Counter[str] = Counter()
    first: list[dict[str, Any]] = []
    for r in ledger.rows_in_states(("rejected", "duplicate")):
        by_reason[r["reason_code"]] += 1
        if r["state"] == "rejected" and len(first) < PROBLEMS_SHOWN:
            first.append({"row": row_label(r["sheet"], r["row_number"]), "reason": r["reason"]})
    valid = counts["pending"] + counts["in_flight"] + counts["succeeded"] + counts["failed"] + counts["unchanged"]
    return {"rows": sum(counts.values()), "valid": valid, "rejected": counts["rejected"],
            "duplicates": counts["duplicate"], "by_reason": dict(by_reason.most_common()),
            "first_problems": first}


def log_validation(notes: list[str], v: dict[str, Any]) -> None:
    for note in notes:
        log.info("%s", note)
    log.info("input: %s, %d valid, %d rejected, %s (sent once)",
             plural(v["rows"], "row"), v["valid"], v["rejected"], plural(v["duplicates"], "duplicate"))
    for code, n in v["by_reason"].items():
        log.info("  %-22s %d", code, n)
    for p in v["first_problems"]:
        log.warning("  row %s: %s", p["row"], p["reason"])
    if v["rejected"] > len(v["first_problems"]):
        log.warning("  ... and %s more (see failures.csv / the validation CSV)",
                    plural(v["rejected"] - len(v["first_problems"]), "rejected row"))


# ==== 4. engine ======================================================================================
class StopSwitch:
    """Stops a run from any thread: the first press lets requests in flight finish (grace period),
    the second cuts them off at once. Signal handlers, Ctrl-C in a notebook and a cancelled
    ``run_backfill_async`` all press it; a press before the engine starts means it never starts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.presses = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: Engine | None = None
        self._task: asyncio.Future[Any] | None = None

    @property
    def pressed(self) -> bool:
        return self.presses > 0

    @property
    def hard(self) -> bool:
        return self.presses > 1

    def press(self, why: str) -> None:
        with self._lock:
            self.presses += 1
            loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._apply, why)

    def _attach(self, loop: asyncio.AbstractEventLoop, engine: Engine, task: asyncio.Future[Any]) -> None:
        with self._lock:
            self._loop, self._engine, self._task = loop, engine, task
            early = self.presses
        for _ in range(early):
            self._apply("stop requested before the run started")

    def _detach(self) -> None:
        with self._lock:
            self._loop = self._engine = self._task = None

    def _apply(self, why: str) -> None:
        engine, task = self._engine, self._task
        if engine is None or task is None or task.done():
            return
        if not engine.interrupted:
            log.warning("%s: stopping — finishing requests in flight (up to %g s); "
                        "press Ctrl-C again to stop at once", why, engine.s.grace_period)
            engine.request_stop()
        elif self.hard:
            log.warning("%s again: stopping now; the ledger is consistent, rerun to resume", why)
            task.cancel()


@contextlib.contextmanager
def _signals_press(switch: StopSwitch, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """SIGINT/SIGTERM press the switch while the engine runs — only in the main thread — and the
    host's own handlers (an orchestrator's SIGTERM handler) are put back afterwards, whatever happens."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, _frame: object) -> None:
        loop.call_soon_threadsafe(switch.press, signal.Signals(signum).name)

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.getsignal(sig)
            if old is None or old is signal.SIG_IGN:   # set from C (could not be put back), or ignored on purpose
                continue
            signal.signal(sig, on_signal)
            previous[sig] = old
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass(frozen=True)
class SendSettings:
    """What stage 4 (send_rows) uses of a run's settings: the engine's, and the client, quota,
    progress and window settings around it. Build it with :func:`send_settings`."""

    engine: EngineSettings
    credentials: Credentials
    timeout: float = 30.0
    verify_tls: bool = True
    extra_fields: tuple[tuple[str, Any], ...] = ()
    quota_dir: Path | None = None
    priority: int = 1
    job: str | None = None
    window_exit: bool = False
    progress: str = "auto"
    progress_interval: float = 10.0
    quiet: bool = False


def engine_settings(s: Settings, base_url: str) -> EngineSettings:
    """What the engine needs (``base_url``: the target, which decides the canary's default)."""
    from .engine import EngineSettings

    return EngineSettings(rate=s.rate, read_rate=s.read_rate, concurrency=s.concurrency, max_attempts=s.max_attempts,
                          outage_budget=s.outage_budget, grace_period=s.grace_period, mode=s.mode,
                          resume_check=s.resume_check, record_previous=s.record_previous, read_back=s.read_back,
                          canary=canary_rows(s, base_url), tripwire=s.tripwire, tripwire_rate=s.tripwire_rate,
                          tripwire_rows=s.tripwire_rows, verbose=s.verbose)


def send_settings(s: Settings, base_url: str) -> SendSettings:
    return SendSettings(engine=engine_settings(s, base_url), credentials=s.credentials, timeout=s.timeout,
                        verify_tls=s.verify_tls, extra_fields=tuple(dict(s.extra_fields).items()),
                        quota_dir=s.quota_dir, priority=s.priority, job=s.job, window_exit=s.window_exit,
                        progress=s.progress, progress_interval=s.progress_interval, quiet=s.quiet)


def check_settings(s: Settings) -> CheckSettings:
    """What the read-only checks (verify, --check-remote) need."""
    from .verify import CheckSettings

    return CheckSettings(credentials=s.credentials, rate=s.rate, read_rate=s.read_rate, concurrency=s.concurrency,
                         max_attempts=s.max_attempts, timeout=s.timeout, verify_tls=s.verify_tls,
                         quota_dir=s.quota_dir, priority=s.priority)


async def _engine_session(s: SendSettings, ledger: Ledger, base_url: str, switch: StopSwitch,
                          on_tick: Callable[[Counters], None] | None = None, schedule: Schedule | None = None,
                          clock: Clock = SYSTEM_CLOCK) -> EngineResult:
    from .api import CapillaryClient
    from .engine import Engine
    from .progress import Progress, choose_mode

    e = s.engine
    async with CapillaryClient(base_url, s.credentials, timeout=s.timeout, verify_tls=s.verify_tls,
                               max_connections=e.concurrency + 4, extra_fields=dict(s.extra_fields),
                               paced=e.rate is not None or e.read_rate is not None) as client:
        # One quota shared with every run on this key (capbatch.quota): in the ledger's database (any
        # host) or in this host's quota files. Sending windows: capbatch.window.
        quota = SharedQuota(e.rate, e.read_rate, target=base_url, credentials=s.credentials, quota_dir=s.quota_dir,
                            priority=s.priority, database=ledger.quota_database(), run=_quota_run_tag(ledger, s.job))
        gate = WindowGate(schedule or Schedule(), clock)
        engine = Engine(e, ledger, client, pacers=quota.pacers, window=gate)
        if s.window_exit:
            gate.on_close = lambda: engine.request_pause(
                f"the sending window closed ({gate.schedule.describe()}): --window-exit, stopping here")
        progress = Progress(choose_mode(s.progress, s.quiet), s.progress_interval, window=gate)
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(engine.run())
        progress.start(engine.counters)
        ticker = loop.create_task(_every(s.progress_interval, on_tick, engine.counters)) if on_tick else None
        with _signals_press(switch, loop):
            switch._attach(loop, engine, task)
            try:
                result = await task
                result.waiting_seconds = gate.closed_seconds
                return result
            except asyncio.CancelledError:
                if switch.hard and task.cancelled():
                    raise Interrupted("run stopped at once (second Ctrl-C/SIGTERM)",
                                      "rerun the same command to resume; rows that were in flight are "
                                      "checked first") from None
                raise
            finally:
                switch._detach()
                if ticker is not None:
                    ticker.cancel()
                    await asyncio.gather(ticker, return_exceptions=True)
                await progress.stop()
                await quota.close()


def _quota_run_tag(ledger: Ledger, job: str | None) -> str:
    """The run a process works on, as the shared quota knows it: the workers of one database job share
    one tag (they are one run), separate runs never do. A hash: no path or URL in the quota state."""
    ident = f"{ledger.location}\n{ledger.get_meta('input_sha256') or ''}\n{job or ''}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


async def _every(interval: float, call: Callable[[Counters], None], counters: Counters) -> None:
    """The periodic hook (metrics file) beside the progress display; never ends the run."""
    while True:
        await asyncio.sleep(interval)
        try:
            call(counters)
        except Exception:  # noqa: BLE001 - a monitoring hiccup must not stop the run
            log.debug("periodic hook failed", exc_info=True)


async def _run_engine(s: SendSettings, ledger: Ledger, base_url: str) -> EngineResult:
    """The engine stage as a coroutine (capbatch revert runs it on its own ledger)."""
    return await _engine_session(s, ledger, base_url, StopSwitch())


def send_rows(s: SendSettings, ledger: Ledger, base_url: str, switch: StopSwitch,
              on_tick: Callable[[Counters], None] | None = None, schedule: Schedule | None = None,
              clock: Clock = SYSTEM_CLOCK) -> EngineResult:
    """Stage 4: settle every pending row of ``ledger`` through the API. The engine takes its
    EngineSettings (rate, retries, modes, grace period...); this stage adds the client, the stop switch,
    the periodic hook (``on_tick``, every --progress-interval), the quota shared with other runs on
    the key and the sending windows (``schedule`` on ``clock``)."""
    return run_async(lambda: _engine_session(s, ledger, base_url, switch, on_tick, schedule, clock), switch.press)


# ==== 5. reports =====================================================================================
def write_run_reports(ledger: Ledger, run_dir: Path, result: EngineResult, audit_read: int | None = None,
                      ahead: Path | None = None) -> Summary:
    """Stage 5: results.csv, failures.csv, summary.json, report.html from the ledger. ``audit_read``:
    the rolling audit's rows this invocation read (summary.json: this_invocation.audit_reads);
    ``ahead``: the row reports written while the run sent (see report_ahead)."""
    this_invocation = {"requests": result.counters.requests, "retries": result.counters.retries,
                       "throttle_events": result.throttle_events, "outages": result.outages,
                       "outage_seconds": round(result.outage_seconds, 3)}
    if audit_read is not None and (audit_read > 0 or ledger.audit_counts()):
        this_invocation["audit_reads"] = audit_read
    return Summary(report.write_reports(ledger, run_dir, ahead=ahead, stop=result.stop, message=result.message,
                                        extra={"this_invocation": this_invocation}))


def _rows_left(counts: dict[str, int]) -> str:
    left = counts["pending"] + counts["in_flight"]
    if not counts["in_flight"]:
        return f"{plural(left, 'row')} left"
    return (f"{plural(left, 'row')} left: {counts['pending']} pending, {counts['in_flight']} whose outcome is unknown "
            "(settled first by reading the card)")


def _log_summary(summary: dict[str, Any]) -> None:
    c = summary["counts"]
    requests = summary["this_invocation"]["requests"]
    audit = summary.get("audit")
    logging.getLogger("capbatch.summary").info(   # shown with -q too: the line a scheduler's log keeps
        "%s: %d succeeded, %d unchanged, %d failed, %d rejected, %s, %d pending — %s, %.1f rows/s%s; "
        "reports in %s",
        summary["stop"] if summary["stop"] in ("aborted", "interrupted") else "done",
        c["succeeded"], c["unchanged"], c["failed"], c["rejected"], plural(c["duplicate"], "duplicate"),
        c["pending"] + c["in_flight"], plural(requests, "request"), summary["throughput_rows_per_second"],
        _audit_text(audit, summary["this_invocation"].get("audit_reads")) if audit else "",
        summary["run_dir"])
    if summary.get("warnings_by_code"):
        log.info("answers carried warnings: %s", ", ".join(
            f"{code or '?'} {w['message']!r} on {plural(w['rows'], 'row')}" for code, w in summary["warnings_by_code"].items()))
    job = (summary.get("settings") or {}).get("job")
    if summary["stop"] == "aborted":   # the canary, the tripwire, credentials, an outage: not the rows' fault
        log.info("%s", abort_advice(c))
        return
    if (c["failed"] or c["rejected"]) and job:
        log.info("failed rows go out again with the next run of job %s (now: the same command with "
                 "--retry-failed); rejected rows need a fixed export; details in %s",
                 job, Path(summary["run_dir"]) / report.FAILURES_CSV)
    elif c["failed"] or c["rejected"]:
        log.info("fix the rows in %s and feed it back: capbatch run %s ...",
                 Path(summary["run_dir"]) / report.FAILURES_CSV, Path(summary["run_dir"]) / report.FAILURES_CSV)
    if c["failed"] or c["rejected"]:
        log.info("editing in Excel? use %s instead: every cell is text, so leading zeros survive the round "
                 "trip; feed it back the same way", Path(summary["run_dir"]) / report.FAILURES_XLSX)


def _audit_text(audit: dict[str, Any], read_now: int | None) -> str:
    """'; audit: 18 re-read, 0 drifted and put back' (the run's), and what this invocation read of it
    when that is not all of it (a resumed run, --retry-failed)."""
    done = audit["rows"] - audit["pending"]
    now = f" ({read_now} by this invocation)" if read_now is not None and read_now != done else ""
    return f"; audit: {done} re-read{now}, {audit['drift_fixed']} drifted and put back"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": round(record.created, 3), "level": record.levelname.lower(),
                           "logger": record.name, "message": record.getMessage()}, ensure_ascii=False)


class _RunLogHandler(logging.FileHandler):
    """The run directory's log. A line it cannot write (a full disk) is dropped without the logging
    module's traceback on stderr: the ledger's own error says what happened."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def _attach_json_log(run_dir: Path) -> logging.Handler | None:
    try:
        handler = _RunLogHandler(run_dir / "capbatch.log.jsonl", encoding="utf-8")
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


# ==== the entry points ===============================================================================
def run(s: Settings, source: Source = None, *, stop: StopSwitch | None = None,
        clock: Clock | None = None) -> Summary | dict[str, Any]:
    """Run (or resume) a backfill of ``source`` (default ``s.input``). Returns the summary (also
    written to summary.json); with ``dry_run`` the validation counts (see :func:`validate`).

    Raises the same :class:`~capbatch.errors.CapbatchError` subclasses the CLI reports; a run that
    ends with failed or rejected rows is not an exception: read ``summary.exit_code``. ``stop`` lets
    another thread stop the run (the library's async entry point uses it). ``clock`` (epoch seconds)
    decides the sending windows (--window); tests pass one they control.
    """
    announcer = announce.Announcer(announce.Targets(s.metrics_file, s.pushgateway, s.notify_url, s.job),
                                   _input_name(s, source))
    try:
        if s.job and not s.dry_run and not s.ledger:   # (a database ledger's workers share the job on purpose)
            with jobs.lock(s.reports_dir, jobs.check_name(s.job)):   # one run of a job at a time
                return _run(s, source, stop, announcer, clock or SYSTEM_CLOCK)
        return _run(s, source, stop, announcer, clock or SYSTEM_CLOCK)
    except BaseException as exc:
        if not s.dry_run:
            announcer.failed(exc)   # metrics, Pushgateway, webhook: the nights that go wrong too
        raise


def _input_name(s: Settings, source: Source) -> str:
    given = s.input if source is None else source
    if isinstance(given, (str, os.PathLike)):
        return Path(given).name
    return _stem(s, source)


def _run(s: Settings, source: Source, stop: StopSwitch | None, announcer: announce.Announcer,
         clock: Clock = SYSTEM_CLOCK) -> Summary | dict[str, Any]:
    if s.skip_confirmed and not s.job:
        raise UsageError("--skip-confirmed needs --job NAME", "name the job whose earlier runs confirmed the pairs")
    if s.audit_fraction and not s.skip_confirmed:
        raise UsageError("--audit-fraction needs --skip-confirmed",
                         "the audit re-reads a slice of the pairs --skip-confirmed would not send; "
                         "without it every row is sent anyway")
    if s.job:
        jobs.check_name(s.job)
        folder = jobs.job_dir(s.reports_dir, s.job)
        if s.run_dir and Path(s.run_dir).resolve() == folder.resolve():
            raise UsageError(f"--run-dir {s.run_dir} is the folder of job {s.job} itself",
                             f"drop --run-dir: with --job every export gets its own run directory under {folder}")
    if s.dry_run:
        result = check_remote(s, source) if s.check_remote else validate(s, source=source)
        _write_dry_run_summary(s, source, result)
        return result
    base_url = target_url(s)
    _require_credentials(s)
    schedule = schedule_for(s.windows, s.timezone)
    if s.window_exit and not schedule.is_open(clock.now()):
        now = clock.now()
        opens = schedule.next_open(now)
        message = (f"outside the sending windows {schedule.describe()} (the next opens "
                   f"{schedule.local_hhmm(opens, now)}, in {human_duration(opens - now)}): --window-exit, nothing sent")
        logging.getLogger("capbatch.summary").info("%s", message)   # shown with -q too
        announcer.nothing_sent(message)   # the metrics file and the webhook hear of this night too
        return Summary({"stop": "outside window", "message": message, "exit_code": exitcodes.EXIT_OK,
                        "next_window_opens_at": report.iso(opens), "counts": {}, "run_dir": None})
    if not s.verify_tls:
        log.warning("TLS certificate verification is OFF (--no-verify-tls): use this only for a trusted test host")
    if s.run_dir:
        outputs.check_dir(s.run_dir, "--run-dir")
    else:
        outputs.check_dir(s.reports_dir, "--reports-dir")
    announcer.check_writable()
    if s.job:
        jobs.bind_target(s.ledger, s.reports_dir, s.job, base_url)   # a database job: in the database
    switch = stop or StopSwitch()
    prepared = prepare(s, source=source)
    ledger, run_dir = prepared.ledger, prepared.run_dir
    try:
        # The plan counts what is left once --retry-failed and --skip-confirmed have had their say;
        # a --deadline-strict refusal after them sends nothing and leaves the ledger resumable.
        _settle_before_plan(s, ledger)
        plan = _plan_before_run(s, prepared, schedule, clock, base_url)
    except BaseException:
        ledger.close()
        raise
    ledger.set_meta("plan", json.dumps(plan.to_dict()))
    file_log = _attach_json_log(run_dir)
    invocation = ledger.start_invocation()
    started_at = time.time()
    audit_before = audit_due(ledger)
    ahead: ReportsAhead | None = None
    try:
        v = validation_report(ledger)
        log_validation(prepared.notes if prepared.freshly_imported else prepared.notes[:1], v)
        log.info("run directory: %s", run_dir)
        if not prepared.freshly_imported:
            log.info("resuming: %s", report.status_line(ledger.counts()))
        announce_plan(plan, schedule)
        ledger.set_meta("settings", json.dumps(s.public_dict(), default=str))
        ledger.set_meta("run_dir", str(run_dir.resolve()))   # status/report --ledger find the reports there
        if s.job:
            ledger.set_meta("job", s.job)
            if not s.ledger:   # a database job's memory is in the database
                ledger.set_meta("job_store", str(jobs.store_path(s.reports_dir).resolve()))
        if switch.pressed:
            raise Interrupted("run stopped before the first request", "rerun the same command to resume")
        log.info("target %s, auth %s, rate %s, concurrency %d", base_url, s.credentials.kind,
                 s.rate or "unlimited", s.concurrency)
        announcer.attach(ledger)
        ahead = ReportsAhead.start(ledger, run_dir, plan.rows_to_send)
        result = send_rows(send_settings(s, base_url), ledger, base_url, switch, announcer.tick, schedule, clock)
    except BaseException as exc:
        if ahead is not None:
            ahead.discard()
        code = announce.exit_code_of(exc)
        try:
            ledger.end_invocation(invocation, code, "interrupted" if code == exitcodes.EXIT_INTERRUPTED else "error")
        except LedgerError:   # the ledger that failed cannot take the end either; the first error says why
            log.debug("could not record the end of invocation %s", invocation, exc_info=True)
        _detach(file_log)
        ledger.close()
        raise
    try:   # the reports-ahead helper is stopped whatever happens from here (a full disk too)
        counts = ledger.counts()
        exit_code = report.exit_code_for(counts, result.stop)
        ledger.end_invocation(invocation, exit_code, result.stop, result.counters.requests,
                              result.counters.by_status)
        ledger.set_meta("plan_actual", json.dumps(plan_actual(
            plan.to_dict(), result.counters.settled, result.counters.requests, time.time() - started_at,
            result.waiting_seconds)))
        try:
            summary = write_run_reports(ledger, run_dir, result, audit_read=audit_before - audit_due(ledger),
                                        ahead=ahead.stop() if ahead is not None else None)
        except OSError as exc:   # a full disk at the very end: every outcome is in the ledger already
            _detach(file_log)
            ledger.close()
            raise LedgerLost(f"the reports could not be written in {run_dir} ({exc.strerror or exc})",
                             f"free space there, then rerun the same command (or `capbatch report {run_dir}`): "
                             "the ledger has every outcome") from exc
    finally:
        if ahead is not None:
            ahead.discard()
    if s.job:
        jobs.remember(ledger, s.reports_dir, s.job, run_dir, summary, started_at)
    _log_summary(summary)
    announcer.finished(summary, exit_code)
    _detach(file_log)
    ledger.close()
    if result.stop == "aborted":
        raise RunAborted(f"run aborted: {result.message}",
                         "check the API contract, the credentials or the failure named above, then rerun the "
                         f"same command to resume ({_rows_left(counts)})")
    if result.stop == "interrupted":
        raise Interrupted("run interrupted", "rerun the same command to resume where it stopped")
    if result.stop == "paused" and exit_code == exitcodes.EXIT_ABORTED:
        raise Paused(result.message or "the sending window closed",
                     f"{plural(counts['pending'] + counts['in_flight'], 'row')} left: rerun the same command inside a "
                     "window to resume")
    return summary


def _settle_before_plan(s: Settings, ledger: Ledger, scratch: bool = False) -> None:
    """--retry-failed and --skip-confirmed change which rows are left to send: apply them first.
    ``scratch``: validate's throw-away copy (what a run would skip, said quietly)."""
    say = log.debug if scratch else log.info
    if s.retry_failed and not scratch:
        say("--retry-failed: %d failed rows go out again (rejected rows stay rejected)", ledger.requeue_failed())
    if s.job and s.skip_confirmed:
        skipped, audited = jobs.skip_confirmed(ledger, s.reports_dir, s.job, s.audit_fraction)
        say("job %s: %s already confirmed by earlier runs, settled without a request", s.job,
            plural(skipped, "row"))
        if s.audit_fraction:
            due = audit_due(ledger)
            if due < audited:   # a resumed run or --retry-failed: its slice was picked (and read) before
                say("job %s: rolling audit: this run's slice of %s was picked by an earlier invocation, "
                    "%d already re-read; %d to re-read now (--audit-fraction %g)", s.job,
                    plural(audited, "confirmed pair"), audited - due, due, s.audit_fraction)
            else:
                say("job %s: rolling audit re-reads %d confirmed pairs this run (--audit-fraction %g)",
                    s.job, audited, s.audit_fraction)


def audit_due(ledger: Ledger) -> int:
    """Rows of the rolling audit not read yet (what this invocation's audit reads are counted from)."""
    audit = ledger.audit_counts(("pending", "in_flight"))   # the audit's own index: no pass over every row
    return audit.get("pending", 0) + audit.get("in_flight", 0)


# ---- the plan (capbatch.plan) -----------------------------------------------------------------------
def plan_settings(s: Settings, now: float, base_url: str | None = None) -> PlanSettings:
    """What the plan needs beyond the ledger's counts (``base_url``: the target, when known)."""
    if base_url is None:
        try:
            base_url = target_url(s)
        except UsageError:          # validate without a target: the canary's default cannot be known
            base_url = None
    return PlanSettings(mode=s.mode, resume_check=s.resume_check, generate_missing=s.generate_missing,
                        rate=s.rate, read_rate=s.read_rate, read_back=s.read_back,
                        record_previous=s.record_previous and s.mode != "reconcile", retry_failed=s.retry_failed,
                        canary_reads=canary_rows(s, base_url) if base_url else (s.canary or 0),
                        deadline=parse_deadline(s.deadline, now, schedule_for((), s.timezone).tz)
                        if s.deadline else None, deadline_text=s.deadline)


def _plan_before_run(s: Settings, prepared: Prepared, schedule: Schedule | None = None,
                     clock: Clock = SYSTEM_CLOCK, base_url: str | None = None, source: Source = None,
                     temporary: bool = False) -> Plan:
    """The plan (rows, requests, rate, time) from the ledger that will be sent from; with
    --deadline-strict, refuse (exit 2) when it cannot finish in time. Sends nothing.
    ``temporary``: ``prepared`` is validate's scratch ledger — a run already under way for this input
    (in the run directory a real run would use) is planned from the rows it has left — and the plan
    is logged here."""
    schedule = schedule or schedule_for(s.windows, s.timezone)
    now = clock.now()
    existing = _existing_ledger(s, prepared, source) if temporary else None
    ledger = existing or prepared.ledger
    if temporary and existing is None and ledger.backend == "sqlite":
        _settle_before_plan(s, ledger, scratch=True)     # what --skip-confirmed would leave to send
    try:
        shared = 0
        if base_url and s.rate:
            shared = quota_peers(s.quota_dir, ledger.quota_database() or s.ledger,
                                 QuotaKey(base_url, credential_fingerprint(s.credentials)), s.rate, _quota_run_tag(ledger, s.job))
        audit = ledger.audit_counts(("pending", "in_flight"))
        counts = ledger.counts()
        if existing is None:
            counts["pending"] += prepared.left_out   # valid rows a problems-only ledger does not hold
        plan = make_plan(counts, ledger.missing_external_ids(), plan_settings(s, now, base_url), schedule, now,
                         shared_with=shared, audit=audit.get("pending", 0) + audit.get("in_flight", 0))
    finally:
        if existing is not None:
            existing.close()
    check_deadline(plan, s.deadline_strict)
    if temporary:
        announce_plan(plan, schedule)
    return plan


def _plan_dict(s: Settings, prepared: Prepared, base_url: str | None = None, source: Source = None) -> dict[str, Any]:
    """validate / --dry-run: the plan, with the run directory a real run would use."""
    plan = _plan_before_run(s, prepared, base_url=base_url, source=source, temporary=True).to_dict()
    run_dir = _would_be_run_dir(s, prepared, source)
    plan["run_dir"] = str(run_dir) if run_dir is not None else None
    return plan


def _would_be_run_dir(s: Settings, prepared: Prepared, source: Source) -> Path | None:
    """The run directory a real run of this input would use (None for in-memory inputs)."""
    if s.run_dir:
        return Path(s.run_dir)
    given = s.input if source is None else source
    if not isinstance(given, (str, os.PathLike)):
        return None
    path = Path(given)
    return default_run_dir(s.reports_dir, Input(prepared.table, prepared.sha256, path.name, path), s.job,
                           s.retry_failed)


def _existing_ledger(s: Settings, prepared: Prepared, source: Source) -> Ledger | None:
    run_dir = _would_be_run_dir(s, prepared, source)
    if run_dir is None or not (run_dir / LEDGER_FILE).exists():
        return None
    try:
        ledger = Ledger.open_readonly(run_dir)
    except LedgerError:
        return None
    if ledger.get_meta("input_sha256") != prepared.sha256:
        ledger.close()
        return None
    log.info("run directory %s holds this input's run: the plan covers the rows it has left", run_dir)
    return ledger


def _write_dry_run_summary(s: Settings, source: Source, result: dict[str, Any]) -> None:
    """--dry-run writes summary.json (with the plan) where the run would, unless a run is there."""
    where = (result.get("plan") or {}).get("run_dir")
    if not where:
        return
    run_dir = Path(where)
    if (run_dir / LEDGER_FILE).exists():
        log.info("dry run: %s holds a run already; its summary.json is left as it is", run_dir)
        return
    summary = {"dry_run": True, "run_dir": str(run_dir),
               "input": {"name": _stem(s, source), "sha256": result.get("input_sha256")},
               "validation": {k: result.get(k) for k in ("rows", "valid", "rejected", "duplicates", "by_reason")},
               "plan": result.get("plan"), "settings": s.public_dict(), "exit_code": result.get("exit_code")}
    report.atomic_write(run_dir / report.SUMMARY_JSON, lambda fh: json.dump(summary, fh, indent=2, default=str))
    log.info("dry run: plan written to %s", run_dir / report.SUMMARY_JSON)


def validate(s: Settings, output: Path | None = None, source: Source = None) -> dict[str, Any]:
    """Read and check the input without any network. Writes a validation CSV; returns the counts.

    ``exit_code`` in the result: 0 all valid, 1 some rows rejected (file-level problems raise).
    """
    with tempfile.TemporaryDirectory(prefix="capbatch-validate-") as tmp:
        # --skip-confirmed matches every valid row against the job's memory: the plan needs them all
        prepared = prepare(s, run_dir=Path(tmp), source=source, problems_only=not (s.job and s.skip_confirmed))
        try:
            v = validation_report(prepared.ledger, prepared.left_out)
            out = output or (s.reports_dir / f"{_stem(s, source)}.validation.csv")
            try:
                _write_validation_csv(prepared.ledger, out)
            except OSError as exc:
                raise UsageError(f"cannot write the validation CSV to {out}: {exc.strerror or exc}",
                                 "pass -o/--output a writable file path (or - for stdout)") from exc
            v["validation_csv"] = str(out)
            v["notes"] = prepared.notes
            v["sheets"] = dict(getattr(prepared.table, "sheet_rows", {}))
            log_validation(prepared.notes, v)
            log.info("validation details written to %s", "stdout" if str(out) == "-" else out)
            v["plan"] = _plan_dict(s, prepared, source=source)
            v["input_sha256"] = prepared.sha256
        finally:
            prepared.ledger.close()
    v["exit_code"] = 1 if v["rejected"] else 0
    return v


def _stem(s: Settings, source: Source) -> str:
    """The name reports beside the run directories take: the input file's stem, or what it is."""
    given = s.input if source is None else source
    if isinstance(given, (str, os.PathLike)):
        return Path(given).stem
    return "dataframe" if is_dataframe(given) else "records"


def _write_validation_csv(ledger: Ledger, out: Path) -> None:
    import csv

    columns = ledger.get_meta_json("columns", [])
    mapping = ledger.get_meta_json("mapping", {})
    header_of = {"card": mapping.get("cardNumber", ""), "external_id": mapping.get("cardExternalId", "")}
    n = report.neutralise

    def write(fh: Any) -> None:
        w = csv.writer(fh)
        w.writerow(["sheet", "row", "column", "value", "reason_code", "reason"])
        for r in ledger.rows_in_states(("rejected", "duplicate")):
            column = header_of.get(r["problem_column"] or "", "")
            values = json.loads(r["original"])
            at = columns.index(column) if column in columns else len(values)
            value = values[at] if at < len(values) else ""
            w.writerow([n(r["sheet"] or ""), r["row_number"], n(column), n(value), r["reason_code"],
                        n(r["reason"])])

    report.atomic_write(out, write)


def status(run_dir: Path | None, ledger_url: str | None = None, job: str | None = None) -> dict[str, Any]:
    """Counts per state and every invocation (timestamps as ISO 8601 UTC, as in summary.json), from a
    run directory or, with ``ledger_url``, the latest run of ``job`` in a database."""
    ledger, run_dir = open_for_reading(run_dir, ledger_url, job)
    try:
        invocations = [{**inv, "started_at": report.iso(inv["started_at"]), "ended_at": report.iso(inv["ended_at"]),
                        "last_seen_at": report.iso(inv["last_seen_at"]), "duration": round(inv["duration"], 3)}
                       for inv in ledger.invocations()]
        return {"run_dir": str(run_dir), "input": ledger.get_meta("input_name"),
                "counts": ledger.counts(), "invocations": invocations, "ledger": ledger.location}
    finally:
        ledger.close()


def rebuild_reports(run_dir: Path | None, out_dir: Path | None = None, ledger_url: str | None = None,
                    job: str | None = None) -> Summary:
    """Rebuild the reports from the ledger, into ``out_dir`` or the run directory itself (with
    ``ledger_url``: the latest run of ``job`` in a database; the run directory defaults as a run's)."""
    if out_dir is not None:
        outputs.check_dir(out_dir, "--output-dir")
    elif run_dir is not None and (run_dir / "ledger.sqlite").exists() and not os.access(run_dir, os.W_OK):
        raise UsageError(f"run directory {run_dir} is read-only: the reports cannot be rebuilt in it",
                         "pass --output-dir DIR to write them elsewhere")
    ledger, run_dir = open_for_reading(run_dir, ledger_url, job)
    try:
        return Summary(report.write_reports(ledger, run_dir, out_dir))
    finally:
        ledger.close()


# ---- read-only checks against the API -------------------------------------------------------------
def check_remote(s: Settings, source: Source = None) -> dict[str, Any]:
    """``run --dry-run --check-remote``: validate, then read every valid card; send and record nothing."""
    from .verify import Target, check_cards

    base_url = target_url(s)
    _require_credentials(s)
    outputs.check_dir(s.reports_dir, "--reports-dir")
    with tempfile.TemporaryDirectory(prefix="capbatch-check-") as tmp:
        prepared = prepare(s, run_dir=Path(tmp), source=source)
        try:
            v = validation_report(prepared.ledger)
            log_validation(prepared.notes, v)
            # Every valid card, also those the plan counts as settled by --skip-confirmed ("unchanged").
            targets = (Target(row_label(r["sheet"], r["row_number"]), r["card"], r["external_id"])
                       for r in prepared.ledger.rows_in_states(("pending", "unchanged")))
            out = s.reports_dir / f"{_stem(s, source)}.check-remote.csv"
            v["plan"] = _plan_dict(s, prepared, base_url=base_url, source=source)
            v["input_sha256"] = prepared.sha256
            counts = check_cards(check_settings(s), base_url, targets, out, database=s.ledger)
        finally:
            prepared.ledger.close()
    log.info("remote check: %d already hold their target ID, %d would change, %d cards do not exist, "
             "%d could not be read; details in %s", counts["match"], counts["differs"], counts["missing"],
             counts["error"], out)
    v.update(remote=counts, check_csv=str(out))
    v["exit_code"] = 1 if (v["rejected"] or counts["missing"] or counts["error"]) else 0
    return v


def verify(s: Settings, target: Path | None) -> dict[str, Any]:
    """Read every card back and compare with the intended external ID. Read-only; exit 1 on any difference.

    ``target`` is a run directory (checks the rows it settled) or an input file (checks its valid rows);
    None with a database ledger checks the rows the job's latest run settled.
    """
    from .verify import Target, check_cards

    base_url = target_url(s)
    _require_credentials(s)
    with contextlib.ExitStack() as stack:
        if target is None or target.is_dir():
            ledger, target = open_for_reading(target, s.ledger if target is None else None, s.job, s.reports_dir)
            out = target / "verify.csv"
            target.mkdir(parents=True, exist_ok=True)
            states: tuple[str, ...] = ("succeeded", "unchanged")
            database = ledger.quota_database()     # the reads share the quota where the run kept it
        else:
            outputs.check_dir(s.reports_dir, "--reports-dir")
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="capbatch-verify-"))
            ledger = prepare(replace(s, input=target), run_dir=Path(tmp)).ledger
            out = s.reports_dir / f"{target.stem}.verify.csv"
            states = ("pending",)
            database = s.ledger                    # ... or where a run of this input would
        stack.callback(ledger.close)
        targets = (Target(row_label(r["sheet"], r["row_number"]), r["card"], r["external_id"])
                   for r in ledger.rows_in_states(states))
        counts = check_cards(check_settings(s), base_url, targets, out, database=database)
    logging.getLogger("capbatch.summary").info(
        "verify: %d match, %d differ, %d cards missing, %d unreadable; details in %s",
        counts["match"], counts["differs"], counts["missing"], counts["error"], out)
    bad = counts["differs"] + counts["missing"] + counts["error"]
    return {"counts": counts, "verify_csv": str(out), "exit_code": 1 if bad else 0}


def _require_credentials(s: Settings) -> None:
    if s.credentials.kind == "both":
        raise ConfigError(
            "both Basic (CAPILLARY_USERNAME, CAPILLARY_PASSWORD) and OAuth (CAPILLARY_CLIENT_KEY, "
            "CAPILLARY_CLIENT_SECRET) credentials are set in the environment",
            "unset one pair, or choose with --auth basic or --auth oauth")
    if s.credentials.kind == "none" and s.auth:
        pair = "CAPILLARY_USERNAME and CAPILLARY_PASSWORD" if s.auth == "basic" else \
            "CAPILLARY_CLIENT_KEY and CAPILLARY_CLIENT_SECRET"
        raise ConfigError(f"--auth {s.auth} chooses {pair}, but they are not both set in the environment",
                          f"export {pair}, or choose the other pair with --auth")
    if s.credentials.kind == "none":
        raise ConfigError(
            "no Capillary credentials in the environment",
            "export CAPILLARY_USERNAME and CAPILLARY_PASSWORD (Basic auth) or "
            "CAPILLARY_CLIENT_KEY and CAPILLARY_CLIENT_SECRET (OAuth); they are never read from flags",
        )

