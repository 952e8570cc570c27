"""The ledger on real SQLite files: schema version, journal semantics, clear errors for bad places."""

from __future__ import annotations

import json
import sqlite3

import pytest

from capbatch.errors import LedgerError
from capbatch.ledger import SCHEMA_VERSION, Ledger, RowResult, State


def _rows(n):
    return [(None, i + 2, json.dumps([f"{i:04d}", f"E{i}"]), f"{i:04d}", f"E{i}", "pending", None, None, None)
            for i in range(n)]


def test_journal_release_and_record(tmp_path):
    with Ledger.open(tmp_path / "r") as led:
        led.import_rows(_rows(10))
        page = led.pending_page(0, 4)
        led.mark_in_flight([r.id for r in page])
        assert led.counts()["in_flight"] == 4
        led.record([RowResult(page[0].id, State.SUCCEEDED, attempts=1, http_status=200, settled_at=1.0)],
                   {1: [1, 0, 0, 0]})
        led.release([page[1].id])
        counts = led.counts()
        assert counts["succeeded"] == 1 and counts["in_flight"] == 2 and counts["pending"] == 7
        unknown = led.unknown_rows()
        assert [r.id for r in unknown] == [page[2].id, page[3].id] and all(r.unknown for r in unknown)
    # WAL mode and the schema version are on disk
    conn = sqlite3.connect(tmp_path / "r" / "ledger.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    conn.close()


def test_duplicates_and_conflicts_are_found_in_sql(tmp_path):
    rows = [
        (None, 2, "[]", "A", "X", "pending", None, None, None),
        (None, 3, "[]", "A", "X", "pending", None, None, None),   # duplicate of row 2
        (None, 4, "[]", "B", "Y", "pending", None, None, None),
        (None, 5, "[]", "B", "Z", "pending", None, None, None),   # card B: two IDs
        (None, 6, "[]", "C", "W", "pending", None, None, None),
        (None, 7, "[]", "D", "W", "pending", None, None, None),   # ID W: two cards
        (None, 8, "[]", "E", "V", "pending", None, None, None),
    ]
    with Ledger.open(tmp_path / "r") as led:
        led.import_rows(rows)
        led.apply_cross_row_rules()
        got = {r["row_number"]: (r["state"], r["reason_code"], r["reason"]) for r in led.iter_rows()}
    assert got[2][0] == "pending" and got[8][0] == "pending"
    assert got[3][:2] == ("duplicate", "duplicate") and "row 2" in got[3][2]
    assert got[4][:2] == ("rejected", "conflict_card") and "4, 5" in got[4][2]
    assert got[6][:2] == ("rejected", "conflict_external_id") and "6, 7" in got[7][2]


def test_a_newer_schema_is_refused(tmp_path):
    with Ledger.open(tmp_path / "r") as led:
        led.set_meta("schema_version", str(SCHEMA_VERSION + 1))
    with pytest.raises(LedgerError, match="newer capbatch"):
        Ledger.open(tmp_path / "r")


def test_a_full_disk_is_a_clear_error(tmp_path):
    with Ledger.open(tmp_path / "r") as led:
        led.conn.execute("PRAGMA max_page_count = 12")   # SQLite answers SQLITE_FULL like a full disk
        with pytest.raises(LedgerError) as exc:
            led.import_rows(_rows(5000), batch=500)
        assert "disk is full" in str(exc.value) and "rerun the same command" in str(exc.value)


def test_an_unusable_run_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(LedgerError, match="cannot create run directory"):
        Ledger.open(blocker / "run")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "ledger.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match="not a capbatch ledger"):
        Ledger.open(tmp_path / "junk")
    with pytest.raises(LedgerError, match="holds no ledger"):
        Ledger.open_readonly(tmp_path / "empty")
