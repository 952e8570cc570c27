"""A resume reads none of the input's rows: when the run's ledger already holds an import of exactly this
content, the input is not surveyed (no structural pass over a million-row CSV), and changed content is
still read and refused (both ledger backends)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from capbatch import config, runner
from capbatch.errors import LedgerError
from conftest import make_cards, write_csv


def _settings(tmp_path: Path, src: Path, backend: str, request: pytest.FixtureRequest) -> config.Settings:
    given: dict = {"input": src, "reports_dir": tmp_path / "reports"}
    if backend == "postgresql":
        given.update(ledger=request.getfixturevalue("pg_url"), job="resume-input")
    else:
        given["run_dir"] = tmp_path / "run"
    return config.resolve(given, os.environ)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_resume_of_the_same_content_reads_no_row_and_changed_content_is_refused(tmp_path, request, backend):
    pairs = make_cards(30)
    # a repeated header row: only the structural pass finds it (and says so in a note)
    src = write_csv(tmp_path / "cards.csv", pairs[:10])
    with open(src, "a", encoding="utf-8", newline="") as fh:
        fh.write("cardNumber,cardExternalId\r\n" + "".join(f"{c},{e}\r\n" for c, e in pairs[10:]))
    s = _settings(tmp_path, src, backend, request)

    first = runner.prepare(s)
    try:
        assert first.freshly_imported
        assert first.table.row_count == 30                  # surveyed: the structural pass ran
        assert any("repeats the header row" in n for n in first.notes), first.notes
        counts = first.ledger.counts()
    finally:
        first.ledger.close()
    assert counts["pending"] == 30 and sum(counts.values()) == 30

    again = runner.prepare(s)
    try:
        assert not again.freshly_imported
        assert again.table.row_count is None                # not surveyed: no row was read
        assert not any("repeats the header row" in n for n in again.notes)
        assert again.notes[:1] == first.notes[:1]          # the line a resume shows (the columns)
        assert again.ledger.counts() == counts
        assert again.sha256 == first.sha256
    finally:
        again.ledger.close()

    write_csv(src, pairs[:29] + [(pairs[29][0], "EXT-CHANGED")])
    with pytest.raises(LedgerError, match="different input content"):
        runner.prepare(s).ledger.close()
