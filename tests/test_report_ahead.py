"""Reports ahead of the end: a helper process keeps a copy of the row reports current while a run sends,
and the end formats only the chunks settled since its last pass -- the same bytes as a full rebuild,
whatever state the helper was stopped in."""

from __future__ import annotations

import time

import pytest

from capbatch.ledger import Ledger
from capbatch.report import write_reports
from capbatch.report_ahead import MIN_ROWS, STAGING_DIR, ReportsAhead
from capbatch.report_rows import INDEX_FILE
from conftest import make_cards, read_csv, write_csv
from test_report_rows import CHUNK, N, Counting, _import, _same_as_full_rebuild, _settle


def _wait_for(path, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_the_end_formats_only_what_settled_after_the_helpers_last_pass(tmp_path):
    run_dir = tmp_path / "run"
    with Ledger.open(run_dir) as led:
        _import(led)
        stale = run_dir / STAGING_DIR
        stale.mkdir()
        (stale / "results.csv").write_text("a killed run's copy\n")
        assert ReportsAhead.start(led, run_dir, MIN_ROWS - 1) is None     # a small run: no helper ...
        assert not stale.exists()                                          # ... and no stale copy kept
        _settle(led, range(1, 2 * CHUNK + 10), 1_700_000_000.0)          # the first two chunks settled
        ahead = ReportsAhead.start(led, run_dir, MIN_ROWS)
        assert ahead is not None
        try:
            _wait_for(run_dir / STAGING_DIR / INDEX_FILE)                  # its pass after they settled
        finally:
            staging = ahead.stop()
        _settle(led, range(2 * CHUNK + 10, N + 1), 1_700_000_100.0)     # the rest, after its pass
        counting = Counting(led)
        summary = write_reports(led, run_dir, ahead=staging)
        assert {i // CHUNK for i in counting.rows} == {2}                 # only the last chunk was read
        assert summary["counts"]["pending"] == 0 and summary["counts"]["failed"] == 89
        ahead.discard()
        assert not (run_dir / STAGING_DIR).exists()
        _same_as_full_rebuild(led, run_dir, tmp_path)

        # a copy its index no longer describes (the helper killed between two files) is not used
        _settle(led, range(1, 200), 1_700_000_200.0)
        ahead = ReportsAhead.start(led, run_dir, MIN_ROWS)
        try:
            _wait_for(run_dir / STAGING_DIR / INDEX_FILE)
        finally:
            staging = ahead.stop()
        with open(staging / "results.csv", "ab") as fh:
            fh.write(b"half a line")
        write_reports(led, run_dir, ahead=staging)
        ahead.discard()
        _same_as_full_rebuild(led, run_dir, tmp_path)


@pytest.mark.slow   # MIN_ROWS (100,000) rows through the CLI: minutes on this machine
@pytest.mark.timeout(900)
def test_a_run_with_a_helper_writes_the_reports_a_rebuild_gives_and_removes_its_copy(tmp_path, sim, run_cli):
    pairs = make_cards(MIN_ROWS + 500)
    s = sim(cards={c: None for c, _ in pairs[:-3]})       # the last three cards do not exist: failed rows
    src = write_csv(tmp_path / "cards.csv", pairs)
    run_dir = tmp_path / "run"
    p = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", run_dir, "-v", timeout=900)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "chunks of rows formatted" in p.stderr
    assert not (run_dir / STAGING_DIR).exists()
    assert [r["cardNumber"] for r in read_csv(run_dir / "failures.csv")] == [c for c, _ in pairs[-3:]]
    fresh = tmp_path / "fresh"
    assert run_cli("report", run_dir, "--output-dir", fresh).returncode == 0
    for name in ("results.csv", "failures.csv"):
        assert (run_dir / name).read_bytes() == (fresh / name).read_bytes(), name
