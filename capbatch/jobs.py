"""Memory across runs: which runs belong to a job, and the job's memory, wherever it is kept.

A job name (``--job NAME``) ties nightly runs together. Its memory (capbatch.ledger's JobStore) keeps,
per card, the last external ID the API confirmed for it (a run set it, or read it back) and when;
with ``--skip-confirmed`` those pairs are settled without any API call, except a rotating slice
re-read each run (``--audit-fraction``, longest-unchecked first) so drift made by another system is
found. It also keeps the target the job writes to (a job's memory is only true of one API) and one
line per run for ``capbatch history``. A run-directory job keeps it in ``<reports-dir>/jobs.sqlite``,
a database job (``--ledger URL``) in the database, so every host and pod shares it.
Each job's run directories go under ``<reports-dir>/<job>/``; a lock there keeps two runs of one job
from overlapping.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import LedgerError, UsageError
from .ledger import LEDGER_FILE, STORE_FILE, Ledger, _take_lock, open_job_store
from .ledger.sqlite import writer_active


def check_name(job: str) -> str:
    if not job or len(job) > 100 or any(c in job for c in "/\\\0"):
        raise UsageError(f"--job {job!r} is not a usable job name", "use letters, digits, '-' or '_', e.g. --job nightly-eu")
    return job


def store_path(reports_dir: Path) -> Path:
    """The job store file of run-directory jobs under ``reports_dir``."""
    return reports_dir / STORE_FILE


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


def bind_target(location: str | None, reports_dir: Path, job: str, target: str) -> None:
    """Tie the job to the API it writes to on its first run; refuse another target later (exit 2,
    naming both). ``location``: the job's database ledger, else the store in ``reports_dir``."""
    with open_job_store(location, reports_dir) as store:
        store.bind_target(job, target)


def skip_confirmed(ledger: Ledger, reports_dir: Path, job: str, audit_fraction: float | None = None) -> tuple[int, int]:
    """Settle pending rows whose exact pair an earlier run of ``job`` confirmed, without a request.

    With ``audit_fraction`` F, ceil(F x those rows) of them, the longest unchecked first, stay pending
    flagged for the rolling audit (the engine reads the card, and puts the ID back if it drifted). The
    slice is picked once per run, so a resumed run does not pick a second one.
    Returns (rows settled without a request, rows in this run's audit slice).
    """
    with ledger.job_store(reports_dir) as store:
        return store.settle_confirmed(ledger, job, audit_fraction)


def remember(ledger: Ledger, reports_dir: Path, job: str, run_dir: Path, summary: dict[str, Any],
             started_at: float) -> None:
    """Record the pairs the API confirmed in this run, and the run itself, in the job's memory.

    Only rows settled by a request count (attempts > 0): a pair skipped by --skip-confirmed keeps the
    date it was last really checked, which is what the rolling audit orders by."""
    with ledger.job_store(reports_dir) as store:
        store.remember(ledger, job, run_dir, summary, started_at)


def forget(location: str | None, reports_dir: Path, job: str, cards: Iterable[str] = ()) -> int:
    """Make the job forget confirmed pairs: the given cards, or all of them (and the target it is
    tied to). The run history is kept. Returns how many pairs were forgotten."""
    with open_job_store(location, reports_dir) as store:
        return store.forget(job, cards)


def forget_pairs(ledger: Ledger, reports_dir: Path, job: str, pairs: Iterable[tuple[str, str]]) -> int:
    """Forget (card, external ID) pairs that are no longer true (a revert changed the card), unless a
    later run confirmed another ID for that card meanwhile."""
    with ledger.job_store(reports_dir) as store:
        return store.forget_pairs(job, pairs)


def describe(location: str | None, reports_dir: Path, job: str) -> dict[str, Any]:
    """What the job remembers: its target, how many confirmed pairs, the oldest and newest check."""
    with open_job_store(location, reports_dir, readonly=True) as store:
        return store.describe(job)


def history(location: str | None, reports_dir: Path, job: str) -> list[dict[str, Any]]:
    """The job's runs, oldest first: one line per invocation that wrote its summary (``recorded``),
    and, from the run directories' ledgers, each that ended without one (killed with SIGKILL, a power
    cut, an error before the end): its start, the requests and rows it settled, ``outcome`` "killed"
    (or "running" while it still runs)."""
    with open_job_store(location, reports_dir, readonly=True) as store:
        lines = [{"recorded": True, **line} for line in store.history(job)]
    if location:          # a database job: its workers' lines are in the database
        return lines
    lines += _unrecorded(reports_dir, job, lines)
    return sorted(lines, key=lambda line: line.get("started_at") or 0.0)


def _unrecorded(reports_dir: Path, job: str, lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The invocations of the job's run directories that no line of the job store stands for."""
    folder = job_dir(reports_dir, job)
    candidates = sorted(folder.iterdir()) if folder.is_dir() else []
    candidates += [_found(Path(line["run_dir"]), folder) for line in lines if line.get("run_dir")]
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for run_dir in candidates:
        # Lines keep the run directory as the run was given it (maybe relative to another working
        # directory): a run directory is known by its own name and its folder's.
        key = _key(run_dir)
        if key in seen or not (run_dir / LEDGER_FILE).is_file():
            continue
        seen.add(key)
        spans = [(line["started_at"], line.get("ended_at") or line["started_at"]) for line in lines
                 if line.get("started_at") and _key(Path(line["run_dir"])) == key]
        try:
            ledger = Ledger.open_readonly(run_dir)
        except LedgerError:
            continue
        with ledger:
            if ledger.get_meta("job") not in (None, job):
                continue
            out += _unmatched(ledger, run_dir, spans)
    return out


def _unmatched(ledger: Ledger, run_dir: Path, spans: list[tuple[float, float]]) -> list[dict[str, Any]]:
    """``ledger``'s invocations whose span no store line (``spans``) overlaps: a line is written at its
    invocation's end and spans it; invocations of one run directory never overlap."""
    out: list[dict[str, Any]] = []
    invocations = ledger.invocations()
    for n, inv in enumerate(invocations, 1):
        end = inv["ended_at"]
        latest = n == len(invocations)
        last = end if latest else (end or inv.get("last_seen_at"))   # None: still open, or killed last
        if any(begun <= (last if last is not None else begun) and ended >= inv["started_at"]
               for begun, ended in spans):
            continue
        running = end is None and latest and writer_active(run_dir)
        outcome = "running" if running else ("killed" if end is None else inv.get("outcome") or "error")
        out.append({"id": None, "run_dir": str(run_dir), "input_name": ledger.get_meta("input_name"),
                    "started_at": inv["started_at"], "ended_at": end, "exit_code": inv.get("exit_code"),
                    "counts": {}, "requests": inv.get("requests") or 0, "recorded": False, "outcome": outcome,
                    "settled": ledger.settled_between(inv["started_at"], end or inv.get("last_seen_at"))})
    return out


def _key(run_dir: Path) -> tuple[str, str]:
    return run_dir.parent.name, run_dir.name


def _found(run_dir: Path, folder: Path) -> Path:
    """A line's run directory, or where it is under this job folder when the line's path was relative
    to another working directory (a run's own directory, or a revert's inside it)."""
    if (run_dir / LEDGER_FILE).is_file():
        return run_dir
    for there in (folder / run_dir.name, folder / run_dir.parent.name / run_dir.name):
        if (there / LEDGER_FILE).is_file():
            return there
    return run_dir
