"""``capbatch revert RUN_DIR``: put back the external IDs a run replaced.

A revert is a run of its own in ``RUN_DIR/revert/`` (ledger, results.csv, failures.csv, summary.json,
report.html): paced, resumable by rerunning it, with ``--dry-run``. Its rows come from the run's
ledger, one per card the run may have written, latest change first. Where the run read the card before
writing it (``--mode reconcile``, ``--record-previous``, the job's audit, a resume read) the previous ID
is known, and the engine settles the row by compare-and-set: read the card, and PUT the previous ID
only while the card still holds the ID the run set. A card changed since by someone else is left
alone and reported (failed, ``changed_since``).

Not revertible, reported as rejected rows (nothing is sent for them):

* ``no_previous_id``: the card had no external ID before the run, and the Capillary API has no
  documented way to clear one;
* ``previous_unknown``: the run did not read the card before writing it (backfill without
  ``--record-previous``);
* ``outcome_unknown``: the run stopped while this row was in flight, before its outcome was recorded.

Once a revert has begun, the run itself can no longer be resumed (``runner.prepare`` refuses it).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

from . import announce, exitcodes, jobs, report, runner
from .config import CLUSTERS, Settings, target_url
from .engine import CHANGED_SINCE
from .errors import Interrupted, LedgerError, RunAborted, UsageError
from .ledger import LEDGER_FILE, Ledger, State, row_label
from .wording import plural

log = logging.getLogger("capbatch")

REVERT_DIR = "revert"
PREVIEW_CSV = "revert.dry-run.csv"
COLUMNS = ["cardNumber", "set_by_run", "restore_to"]
NO_PREVIOUS_ID = "no_previous_id"
PREVIOUS_UNKNOWN = "previous_unknown"
OUTCOME_UNKNOWN = "outcome_unknown"
NOT_REVERTIBLE = (NO_PREVIOUS_ID, PREVIOUS_UNKNOWN, OUTCOME_UNKNOWN)


def plan_rows(original: Ledger) -> Iterator[tuple[Any, ...]]:
    """The revert's ledger rows: (sheet, row_number, original cells, card, ID to restore, state,
    reason_code, reason, problem_column, ID the card must still hold)."""
    for r in original.changed_rows():
        card, set_by_run, previous = r["card"], r["external_id"], r["previous_external_id"]
        if previous == set_by_run:
            continue   # the run wrote what the card already held: nothing to undo
        reason_code = reason = None
        if r["state"] == State.IN_FLIGHT.value:
            reason_code = OUTCOME_UNKNOWN
            reason = ("the run stopped while this row was in flight, so whether it changed the card is "
                      f"unknown; check card {card} by hand")
        elif previous is None:
            reason_code = PREVIOUS_UNKNOWN
            reason = ("the run did not read this card before writing it, so its earlier external ID is "
                      "unknown (use --mode reconcile or --record-previous on runs you may want to revert)")
        elif previous == "":
            reason_code = NO_PREVIOUS_ID
            reason = (f"the card had no external ID before the run; the Capillary API has no documented way "
                      f"to clear one, so it keeps {set_by_run!r}")
        cells = [card, set_by_run, previous or ""]
        yield (r["sheet"], r["row_number"], json.dumps(cells, ensure_ascii=False), card,
               previous or "", State.REJECTED.value if reason_code else State.PENDING.value,
               reason_code, reason, "external_id" if reason_code else None, set_by_run)


def revert(s: Settings, run_dir: Path) -> dict[str, Any]:
    """Revert the run in ``run_dir`` (or resume its revert). Returns the revert's summary."""
    if not (run_dir / LEDGER_FILE).exists():
        raise LedgerError(f"{run_dir} holds no ledger ({LEDGER_FILE} is missing)",
                          "pass the run directory that `capbatch run` printed")
    if s.dry_run:
        return preview(run_dir)
    with contextlib.ExitStack() as stack:
        original = Ledger.open(run_dir)          # the run's lock: it cannot be resumed meanwhile
        stack.callback(original.close)
        if not original.is_imported():
            raise LedgerError(f"the run in {run_dir} never finished reading its input: it wrote nothing",
                              "there is nothing to revert")
        run_settings = original.get_meta_json("settings", {})
        base_url = _target(s, run_settings)
        s = _with_run_fields(s, run_settings)
        runner._require_credentials(s)
        job, store = original.get_meta("job"), original.get_meta("job_store")
        if job and store:
            stack.enter_context(jobs.lock(Path(store).parent, job))
        if not original.get_meta("reverted_at"):
            original.set_meta("reverted_at", repr(time.time()))
        ledger = Ledger.open(run_dir / REVERT_DIR)
        stack.callback(ledger.close)
        if not ledger.is_imported():
            _import(original, ledger, run_dir)
        started_at = time.time()
        summary = _settle(s, ledger, run_dir, base_url)
        if job and store:
            _update_job(ledger, Path(store), job, summary, started_at)
    if summary["stop"] == "aborted":
        raise RunAborted(f"revert aborted: {summary['message']}",
                         "fix the cause, then rerun the same revert command to resume")
    if summary["stop"] == "interrupted":
        raise Interrupted("revert interrupted", "rerun the same revert command to resume where it stopped")
    return summary


def _target(s: Settings, run_settings: dict[str, Any]) -> str:
    """The API the run wrote to; a revert aimed anywhere else is refused."""
    run_cluster = (run_settings.get("cluster") or "").lower()
    run_target = (run_settings.get("base_url") or CLUSTERS.get(run_cluster) or "").rstrip("/")
    if not (s.base_url or s.cluster):
        if not run_target:
            raise UsageError("the run's ledger does not say which API it wrote to", "pass --cluster or --base-url")
        log.info("reverting against the run's own target %s", run_target)
        return target_url(Settings(base_url=run_target, allow_http=s.allow_http))
    target = target_url(s)
    if run_target and target != run_target:
        raise UsageError(f"this run wrote to {run_target}, not {target}",
                         "revert against the same API: drop --cluster/--base-url to use the run's own")
    return target


def _with_run_fields(s: Settings, run_settings: dict[str, Any]) -> Settings:
    """The revert's PUTs carry the run's own --extra-field values: an org that needs statusLabel or
    seriesId on an update needs them on the one that puts the old ID back too."""
    fields = tuple((run_settings.get("extra_fields") or {}).items())
    if fields:
        log.info("reverting with the run's extra fields: %s", ", ".join(f"{k}={v!r}" for k, v in fields))
    return dataclasses.replace(s, extra_fields=fields)


def _import(original: Ledger, ledger: Ledger, run_dir: Path) -> None:
    ledger.reset_import()
    ledger.import_expecting(plan_rows(original))
    ledger.set_meta("input_name", f"revert of {run_dir.name}")
    ledger.set_meta("input_path", str(run_dir.resolve()))
    ledger.set_meta("input_sha256", original.get_meta("input_sha256") or "")
    ledger.set_meta("columns", json.dumps(COLUMNS))
    ledger.set_meta("mapping", json.dumps({"cardNumber": "cardNumber", "cardExternalId": "restore_to"}))
    ledger.set_meta("revert_of", str(run_dir.resolve()))
    ledger.mark_imported()


def _settle(s: Settings, ledger: Ledger, run_dir: Path, base_url: str) -> dict[str, Any]:
    """One invocation of the engine over the revert's ledger, then its reports."""
    rd = run_dir / REVERT_DIR
    file_log = runner._attach_json_log(rd)
    invocation = ledger.start_invocation()
    try:
        ledger.set_meta("settings", json.dumps(s.public_dict() | {"base_url": base_url}, default=str))
        if s.retry_failed:
            log.info("--retry-failed: %d failed rows go out again", ledger.requeue_failed())
        log.info("reverting %s against %s: %s", run_dir, base_url, report.status_line(ledger.counts()))
        result = runner.run_async(runner._run_engine(runner.send_settings(s, base_url), ledger, base_url))
    except BaseException as exc:
        code = announce.exit_code_of(exc)   # as the CLI exits: a bug is 70, not "aborted"
        try:   # requests None: keep the figures recorded as the revert went
            ledger.end_invocation(invocation, code, "interrupted" if code == exitcodes.EXIT_INTERRUPTED else "error",
                                  None)
        except LedgerError:   # the ledger that failed cannot take the end either; the first error says why
            log.debug("could not record the end of the revert's invocation", exc_info=True)
        runner._detach(file_log)
        raise
    ledger.end_invocation(invocation, report.exit_code_for(ledger.counts(), result.stop), result.stop,
                          result.counters.requests)
    summary = report.write_reports(ledger, rd, stop=result.stop, message=result.message, extra={
        "revert": figures(ledger, run_dir, base_url),
        "this_invocation": {"requests": result.counters.requests, "retries": result.counters.retries}})
    _log_summary(summary)
    runner._detach(file_log)
    return summary


def figures(ledger: Ledger, run_dir: Path, base_url: str | None) -> dict[str, Any]:
    """The revert's outcome in plain terms, for summary.json and the end line."""
    c = ledger.counts()
    rejected = ledger.codes(State.REJECTED)
    failed = ledger.codes(State.FAILED)
    changed = failed.pop(CHANGED_SINCE, 0)
    not_revertible = {code: rejected.get(code, 0) for code in NOT_REVERTIBLE}
    notes = []
    if not_revertible[NO_PREVIOUS_ID]:
        notes.append(f"{_cards(not_revertible[NO_PREVIOUS_ID])} had no external ID before the run. The Capillary "
                     "API has no documented way to clear a card's external ID, so they keep the ID the run set.")
    if not_revertible[PREVIOUS_UNKNOWN]:
        notes.append(f"{_cards(not_revertible[PREVIOUS_UNKNOWN])} were written without being read first "
                     "(backfill without --record-previous): their earlier ID is unknown, so they were not reverted.")
    if not_revertible[OUTCOME_UNKNOWN]:
        notes.append(f"{_cards(not_revertible[OUTCOME_UNKNOWN])} were in flight when the run stopped: whether "
                     "the run changed them is unknown; check them by hand.")
    if changed:
        notes.append(f"{_cards(changed)} changed since the run (someone else set another ID): left alone.")
    return {"of_run": str(run_dir), "target": base_url, "restored": c["succeeded"],
            "already_restored": c["unchanged"], "changed_since": changed, "not_revertible": not_revertible,
            "failed": sum(failed.values()), "pending": c["pending"] + c["in_flight"], "notes": notes}


def _cards(n: int) -> str:
    return plural(n, "card")


def _log_summary(summary: dict[str, Any]) -> None:
    r = summary["revert"]
    log.info("revert done: %d restored, %d already held their previous ID, %d changed since (left alone), "
             "%d not revertible, %d failed, %d pending — %s; reports in %s",
             r["restored"], r["already_restored"], r["changed_since"], sum(r["not_revertible"].values()),
             r["failed"], r["pending"], plural(summary["this_invocation"]["requests"], "request"), summary["run_dir"])
    for note in r["notes"]:
        log.warning("%s", note)


def _update_job(ledger: Ledger, store: Path, job: str, summary: dict[str, Any], started_at: float) -> None:
    """The job now remembers what the revert confirmed (card -> previous ID) and forgets the pairs of
    cards found changed since, so its next run looks at those cards again. History lists the revert."""
    jobs.remember(ledger, store.parent, job, Path(summary["run_dir"]), summary, started_at)
    changed = [(r["card"], r["expect_external_id"])
               for r in ledger.rows_in_states(("failed",)) if r["error_code"] == CHANGED_SINCE]
    jobs.forget_pairs(ledger, store.parent, job, changed)


def preview(run_dir: Path) -> dict[str, Any]:
    """``revert --dry-run``: what a revert would do, from the ledger alone. Sends nothing."""
    original = Ledger.open_readonly(run_dir)
    counts = {"revert": 0, **{code: 0 for code in NOT_REVERTIBLE}}
    out = run_dir / PREVIEW_CSV

    def write(fh: Any) -> None:
        w = csv.writer(fh)
        w.writerow(["row", "cardNumber", "set_by_run", "restore_to", "action", "reason"])
        for sheet, number, _, card, restore, _, code, reason, _, set_by_run in plan_rows(original):
            counts[code or "revert"] += 1
            w.writerow([row_label(sheet, number), report.neutralise(card), report.neutralise(set_by_run),
                        report.neutralise(restore), "revert" if not code else f"not revertible: {code}",
                        report.neutralise(reason or "")])

    try:
        report.atomic_write(out, write)
    finally:
        original.close()
    not_revertible = sum(counts[c] for c in NOT_REVERTIBLE)
    log.info("revert preview (nothing sent): %s would be set back to their previous ID if they still hold "
             "the ID the run set; %d not revertible (%d had no ID before, %d previous ID unknown, "
             "%d outcome unknown); details in %s", plural(counts["revert"], "card"), not_revertible, counts[NO_PREVIOUS_ID],
             counts[PREVIOUS_UNKNOWN], counts[OUTCOME_UNKNOWN], out)
    return {"dry_run": True, "of_run": str(run_dir), "would_revert": counts["revert"],
            "not_revertible": {c: counts[c] for c in NOT_REVERTIBLE}, "preview_csv": str(out),
            "exit_code": exitcodes.EXIT_ROWS_FAILED if not_revertible else exitcodes.EXIT_OK}
