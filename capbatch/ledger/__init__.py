"""The run's ledger: every input row and its state. The single source of truth.

Two backends behind one interface (:class:`Ledger`): a SQLite file in the run directory (the
default), or a job in a PostgreSQL database (``--ledger postgresql://USER@HOST:PORT/DB --job NAME``)
that several workers on several hosts share. The URL's scheme picks the backend.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LedgerError, UsageError

from .base import (SETTLED_OK, JobStore, Ledger, RowResult, State, WorkRow, is_database_url,  # noqa: F401
                   redact_password, row_label)
from .jobstore import STORE_FILE, SqliteJobStore
from .base import CHUNK_BITS, REPORT_COLUMNS  # noqa: F401
from .sqlite import LEDGER_FILE, LOCK_FILE, SCHEMA_VERSION, SqliteLedger, _take_lock  # noqa: F401


def open_job_store(location: str | None, reports_dir: Path, *, readonly: bool = False) -> JobStore:
    """A job's memory where its runs keep it: the database at ``location``, or without one the
    store file in ``reports_dir`` (``capbatch forget``/``history``, and a run's target check)."""
    if not location:
        return SqliteJobStore(reports_dir / STORE_FILE)
    from .postgres import PostgresJobStore   # imported only when used

    return PostgresJobStore.open(location, readonly=readonly)


def open_for_reading(run_dir: Path | None, location: str | None, job: str | None,
                     reports_dir: Path = Path("reports")) -> tuple[Ledger, Path]:
    """A ledger to read (status, reports, verify) and the run directory its reports belong in.

    With a database ``location`` the job's latest run is read, and its reports go to ``run_dir`` or,
    without one, to the run directory the run recorded (else ``reports_dir/<job>/<input>-<hash>``, as a
    run would have put them)."""
    if location:
        job = job or _only_job(location)
        ledger = open_ledger(location, run_dir or reports_dir, job=job, readonly=True)
        if run_dir is None:
            recorded = ledger.get_meta("run_dir")
            name, sha = ledger.get_meta("input_name") or "input", ledger.get_meta("input_sha256") or ""
            run_dir = Path(recorded) if recorded else reports_dir / job / f"{Path(name).stem}-{sha[:12]}"
        return ledger, run_dir
    if run_dir is None:
        raise UsageError("no run directory given", "pass RUN_DIR, or --ledger URL --job NAME for a database ledger")
    return SqliteLedger.open_readonly(run_dir), run_dir


def _only_job(location: str) -> str:
    """The job a database holds, when it holds one: ``--ledger URL`` alone is enough there."""
    from .postgres import job_names

    names = job_names(location)
    if len(names) == 1:
        return names[0]
    held = f"it holds the jobs {', '.join(names)}" if names else "it holds no job yet"
    raise UsageError(f"which job of the database ledger {redact_password(location)}? {held}",
                     "name the job given to `capbatch run --job` with --job NAME")


def open_ledger(location: str | None, run_dir: Path, *, job: str | None = None,
                input_sha256: str | None = None, readonly: bool = False) -> Ledger:
    """The ledger a command works on: ``location`` is a database URL, or None for ``run_dir``'s SQLite file.

    With a database, ``job`` names the job and ``input_sha256`` the input content whose run to open
    (created when new); without ``input_sha256`` the job's latest run is opened (status, reports).
    """
    if not location:
        return SqliteLedger.open_readonly(run_dir) if readonly else SqliteLedger.open(run_dir)
    from .postgres import PostgresLedger   # imported only when used: SQLite users never load the driver

    if not readonly:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)   # the run directory still receives the reports
        except OSError as exc:
            raise LedgerError(f"cannot create run directory {run_dir}: {exc.strerror}",
                              "choose a writable place with --run-dir or --reports-dir") from exc
    return PostgresLedger.open(location, job=job, input_sha256=input_sha256, readonly=readonly)


def holds_import(location: str | None, run_dir: Path, job: str | None, input_sha256: str) -> bool:
    """Whether the ledger a run of this input would open already holds the import of exactly this
    content (a resume). Reads only: creates no run directory, file or database run; any problem
    opening it says False (opening it for the run then reports that problem)."""
    from ..errors import CapbatchError

    if not location and not (run_dir / LEDGER_FILE).is_file():
        return False
    try:
        ledger = open_ledger(location, run_dir, job=job, input_sha256=input_sha256, readonly=True)
    except CapbatchError:
        return False
    try:
        # imported_at is set once the whole input is in (an import killed half-way is redone)
        return ledger.get_meta("input_sha256") == input_sha256 and ledger.get_meta("imported_at") is not None
    except CapbatchError:
        return False
    finally:
        ledger.close()
