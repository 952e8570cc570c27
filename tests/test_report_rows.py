"""Reports in proportion to what changed: a rewrite formats only the chunks of rows that changed since
the last write, and gives exactly the bytes a full rebuild gives (both ledger backends)."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
from pathlib import Path
from typing import Any, Callable

import pytest

from capbatch.ledger import CHUNK_BITS, Ledger, RowResult, State, open_ledger
from capbatch.report import write_reports
from capbatch.report_rows import INDEX_FILE, write_row_reports
from conftest import ledger_query, make_cards, popen_cli, read_csv, write_csv

SHA = "b" * 64
CHUNK = 1 << CHUNK_BITS
N = 2 * CHUNK + 500           # three chunks: 1..4095, 4096..8191, 8192..8692


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path) -> Ledger:
    if request.param == "sqlite":
        led = Ledger.open(tmp_path / "run")
    else:
        led = open_ledger(request.getfixturevalue("pg_url"), tmp_path / "run", job="j", input_sha256=SHA)
    yield led
    led.close()


class Counting:
    """Counts the rows the reports read from the ledger (the real ledger answers)."""

    def __init__(self, led: Ledger) -> None:
        self.rows: list[int] = []
        real = led.report_rows

        def report_rows(first_id: int | None = None, last_id: int | None = None) -> Any:
            for row in real(first_id, last_id):
                self.rows.append(row[0])
                yield row

        led.report_rows = report_rows  # type: ignore[method-assign]


def _import(led: Ledger) -> None:
    rows = [(None, i + 2, json.dumps([card, ext]), card, ext, "pending", None, None, None)
            for i, (card, ext) in enumerate(make_cards(N))]
    rows[10] = (None, 12, json.dumps(["=1+2", ""]), "=1+2", "", "rejected", "missing_external_id",
                "the external ID is empty", "external_id")
    assert not led.is_imported()
    led.import_rows(rows)
    led.apply_cross_row_rules()
    led.set_meta("columns", json.dumps(["cardNumber", "cardExternalId"]))
    led.mark_imported()


def _settle(led: Ledger, ids: range, at: float, **kw: Any) -> None:
    results = []
    ids = [i for i in ids if i != 11]      # row 11 was rejected at import
    for i in ids:
        if i % 97 == 0:
            results.append(RowResult(i, State.FAILED, 2, 400, error_code="3010", error_message="card not found",
                                     latency_ms=20.0 + i % 13 * 0.37, settled_at=at, **kw))
        else:
            results.append(RowResult(i, State.SUCCEEDED, 1, 200, card_id=str(i), customer_id=str(i + 5),
                                     previous_external_id="OLD" if i % 50 == 0 else "",
                                     latency_ms=3.0 + (i % 211) * 0.113, settled_at=at + i * 0.001,
                                     warnings=[("3039", "No update in status label")] if i % 7 == 0 else (),
                                     **kw))
    led.mark_in_flight(ids)
    led.record(results, {int(at): [len(results), 0, 0, 0]})


def _html(path: Path) -> str:
    """report.html without the moment it was generated (and, for a run in progress, its snapshot)."""
    return re.sub(r"(generated|taken at) [0-9: -]+ UTC", r"\1", path.read_text(encoding="utf-8"))


def _same_as_full_rebuild(led: Ledger, run_dir: Path, tmp_path: Path, written: Path | None = None) -> None:
    """The reports in ``written`` (default: the run directory) are what a rebuild from scratch gives."""
    written = written or run_dir
    fresh = tmp_path / "fresh"
    write_reports(led, run_dir, fresh)
    for name in ("results.csv", "failures.csv", "summary.json"):
        assert (written / name).read_bytes() == (fresh / name).read_bytes(), name
    assert _html(written / "report.html") == _html(fresh / "report.html")
    openpyxl = pytest.importorskip("openpyxl")
    cells = [[[c.value for c in row] for row in openpyxl.load_workbook(d / "failures.xlsx").active.iter_rows()]
             for d in (written, fresh)]
    assert cells[0] == cells[1]


def test_a_resume_rewrites_only_the_chunks_it_changed(ledger, tmp_path):
    _import(ledger)
    run_dir = tmp_path / "run"
    _settle(ledger, range(1, 2 * CHUNK + 100), 1_700_000_000.0)
    counting = Counting(ledger)
    first = write_reports(ledger, run_dir)
    assert len(counting.rows) == N and (run_dir / INDEX_FILE).exists()
    assert first["counts"]["failed"] == 85 and first["counts"]["rejected"] == 1
    xlsx_before = (run_dir / "failures.xlsx").stat().st_mtime_ns

    # the resume: the last rows are settled (only in the last chunk), no failure among them
    counting.rows.clear()
    _settle(ledger, range(2 * CHUNK + 100, 2 * CHUNK + 150), 1_700_000_100.0)
    summary = write_reports(ledger, run_dir)
    assert set(counting.rows) == set(range(2 * CHUNK, N + 1))       # the last chunk alone was read
    assert summary["counts"]["succeeded"] == first["counts"]["succeeded"] + 50
    assert (run_dir / "failures.xlsx").stat().st_mtime_ns == xlsx_before   # failures unchanged: kept
    _same_as_full_rebuild(ledger, run_dir, tmp_path)

    # more rows settled (two of them fail), then every failed row goes out again (--retry-failed)
    counting.rows.clear()
    _settle(ledger, range(2 * CHUNK + 150, 2 * CHUNK + 300), 1_700_000_200.0)
    assert ledger.requeue_failed() > 0
    summary = write_reports(ledger, run_dir)
    assert {i >> CHUNK_BITS for i in counting.rows} == {0, 1, 2}
    assert summary["counts"]["failed"] == 0 and summary["counts"]["pending"] > 0
    failures = read_csv(run_dir / "failures.csv")
    assert [(r["capbatch_row"], r["cardNumber"], r["capbatch_state"]) for r in failures] == [
        ("12", "'=1+2", "rejected")]
    _same_as_full_rebuild(ledger, run_dir, tmp_path)


def test_anything_that_does_not_match_the_index_rebuilds_everything(ledger, tmp_path):
    _import(ledger)
    run_dir = tmp_path / "run"
    _settle(ledger, range(1, 300), 1_700_000_000.0)
    write_reports(ledger, run_dir)
    counting = Counting(ledger)
    edits: list[Callable[[], None]] = [
        lambda: (run_dir / "results.csv").write_bytes((run_dir / "results.csv").read_bytes() + b"x"),  # edited
        lambda: (run_dir / "failures.csv").unlink(),                                                   # deleted
        lambda: (run_dir / INDEX_FILE).write_text("{not json"),                                        # damaged
        lambda: ledger.set_meta("imported_at", "1.5"),                                   # imported again
    ]
    for edit in edits:
        edit()
        counting.rows.clear()
        write_reports(ledger, run_dir)
        assert len(counting.rows) == N
        _same_as_full_rebuild(ledger, run_dir, tmp_path)
    counting.rows.clear()
    write_reports(ledger, run_dir)          # nothing changed since: nothing read
    assert counting.rows == []


def test_a_write_killed_before_its_index_or_raced_by_another_writer_leaves_nothing_stale(ledger, tmp_path):
    """A process killed after it replaced the CSV files but before it saved the index; and two writers
    (a run and `capbatch report` on its directory) whose files and indexes interleave."""
    _import(ledger)
    run_dir = tmp_path / "run"
    _settle(ledger, range(1, CHUNK + 10), 1_700_000_000.0)
    write_reports(ledger, run_dir)
    counting = Counting(ledger)

    _settle(ledger, range(CHUNK + 10, CHUNK + 20), 1_700_000_100.0)
    write_row_reports(ledger, run_dir)            # killed here: the files are new, the index is not
    _settle(ledger, range(CHUNK + 20, CHUNK + 30), 1_700_000_200.0)
    counting.rows.clear()
    write_reports(ledger, run_dir)
    assert len(counting.rows) == N                # the index no longer describes the files: all again
    _same_as_full_rebuild(ledger, run_dir, tmp_path)

    # writer A formats, writer B (after a change in the first chunk) replaces A's files and saves its
    # index, then A saves its own: A's offsets must not be taken for a description of B's files
    a = write_row_reports(ledger, run_dir)
    assert ledger.requeue_failed() > 0            # failed rows of chunks 0 and 1 go back to pending
    write_reports(ledger, run_dir)
    a.commit()
    _settle(ledger, range(2 * CHUNK, 2 * CHUNK + 5), 1_700_000_300.0)
    counting.rows.clear()
    write_reports(ledger, run_dir)
    assert len(counting.rows) == N
    _same_as_full_rebuild(ledger, run_dir, tmp_path)


def test_a_ledger_that_does_not_track_changes_is_reported_in_full(tmp_path):
    """A ledger of an older schema, read without upgrading it (capbatch report on a read-only copy)."""
    with Ledger.open(tmp_path / "run") as led:
        _import(led)
        _settle(led, range(1, 300), 1_700_000_000.0)
    conn = sqlite3.connect(tmp_path / "run" / "ledger.sqlite")
    conn.executescript("DROP TRIGGER rows_changed; DROP TABLE row_changes;")
    conn.close()
    with Ledger.open_readonly(tmp_path / "run") as old:
        assert old.change_mark() is None
        write_reports(old, tmp_path / "run", tmp_path / "out")
        assert not (tmp_path / "out" / INDEX_FILE).exists()
        assert len(read_csv(tmp_path / "out" / "results.csv")) == N
        _same_as_full_rebuild(old, tmp_path / "run", tmp_path, tmp_path / "out")


def _cli_counts(backend: str, run_dir: Path, pg_url: str | None) -> dict[str, int]:
    if backend == "sqlite":
        try:
            return dict(ledger_query(run_dir, "SELECT state, count(*) FROM rows GROUP BY state"))
        except sqlite3.Error:
            return {}
    from test_workers import pg_counts

    return pg_counts(pg_url, "cards")


# the PostgreSQL case (~10 s) runs with -m slow; its change tracking is also checked in process above
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def test_kill_9_between_the_ledger_and_the_reports_leaves_no_stale_report(backend, tmp_path, sim, run_cli, request):
    """Through the CLI, several resumes: a first run where some cards of the first chunk do not exist
    yet; --retry-failed killed with -9 after the ledger recorded part of it (the reports on disk are
    then the first run's); `capbatch report` into the run directory; the resume to the end. Each time
    the reports equal `capbatch report --output-dir` (a rebuild from scratch) byte for byte, and the
    last chunk, which never changed, was copied."""
    from test_resilience import finish, wait_until

    pairs = make_cards(CHUNK + 300)
    late = [i for i in range(CHUNK) if i % 20 == 0]     # 205 rows of the first chunk
    s = sim(cards={c: None for i, (c, _) in enumerate(pairs) if i not in set(late)})
    src = write_csv(tmp_path / "cards.csv", pairs)
    run_dir = tmp_path / "run"
    pg_url = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    where = ["--run-dir", run_dir] + (["--ledger", pg_url, "--job", "cards"] if pg_url else [])
    args = ["run", src, "--base-url", s.url, "--progress", "none", *where]

    def same_as_rebuild(label: str) -> None:
        rebuilt = tmp_path / f"rebuilt-{label}"
        p = run_cli("report", run_dir, "--output-dir", rebuilt, *where[2:])
        assert p.returncode == 0, p.stderr
        for name in ("results.csv", "failures.csv"):
            assert (run_dir / name).read_bytes() == (rebuilt / name).read_bytes(), (label, name)
        ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (run_dir, rebuilt))
        ours.pop("this_invocation", None)
        assert ours == theirs, label

    first = run_cli(*args, "--rate", "unlimited")
    assert first.returncode == 1, first.stderr
    assert len(read_csv(run_dir / "failures.csv")) == len(late)
    index = json.loads((run_dir / INDEX_FILE).read_text())

    s.update(cards={pairs[i][0]: None for i in late}, latency=0.02)
    proc = popen_cli(*map(str, args), "--retry-failed", "--rate", "unlimited", "--concurrency", "2", cwd=tmp_path)
    reached = wait_until(lambda: _cli_counts(backend, run_dir, pg_url).get("succeeded", 0) >= len(pairs) - 190,
                         proc, step=0.005)
    assert reached and proc.poll() is None, "the resume ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    assert len(read_csv(run_dir / "failures.csv")) == len(late)      # what the killed run left: stale
    p = run_cli("report", run_dir, *where[2:])                      # rewritten in place, from the index
    assert p.returncode == 0, p.stderr
    states = [r["capbatch_state"] for r in read_csv(run_dir / "results.csv")]
    assert read_csv(run_dir / "failures.csv") == []     # --retry-failed put them back to pending
    assert 0 < states.count("pending") + states.count("in_flight") <= 190, states.count("pending")
    same_as_rebuild("after-kill")

    s.update(latency=0.0)
    again = run_cli(*args, "--retry-failed", "--rate", "unlimited")
    assert again.returncode == 0, again.stderr
    assert s.card_ids() == dict(pairs) and read_csv(run_dir / "failures.csv") == []
    same_as_rebuild("resumed")
    after = json.loads((run_dir / INDEX_FILE).read_text())
    assert [c[0] for c in after["chunks"]] == [0, 1]
    assert after["chunks"][0] != index["chunks"][0]
    number, _, lines, _, failure_lines, figures, _ = after["chunks"][1]
    assert [lines, failure_lines, figures] == [index["chunks"][1][i] for i in (2, 4, 5)]  # copied, unchanged
