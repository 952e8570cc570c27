"""The bulk path of reading, checking and loading rows gives exactly what the row-by-row rules give.

Each fast path (a batch of plain rows checked with a few C-level passes, original cells JSON-encoded
by joining, the cross-row rules limited to rows sharing a key hash, validate's ledger of problem rows
only, a CSV parsed once for validate) is compared here with the plain implementation it shortcuts.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import pytest

from capbatch import intake, runner
from capbatch.config import Settings
from capbatch.errors import InputFileError
from capbatch.ledger import Ledger
from capbatch.rules import BLOCK_ROWS, CARD_LENGTH, RuleSettings, check_batch, check_row
from capbatch.source import CellProblem, InputOptions, RowBatch, SourceRow, open_input

# Cells chosen to hit every cell rule and every edge of the batch test: plain ids, the alphanumeric
# placeholders (short and long enough to be one), spaces to trim, ="..." wrapping, invisible and
# control characters, Unicode digits and letters, numbers as Excel renders them, empties.
CELLS = ["0000123456789012", "EXT0000000001", "A1", "abcd", "abcde", "NA", "null", "None", "nan", "n/a",
         "-", " 12345 ", "\u00a012345", '="00123"', '="NA"', "12\u200b34", "12\t34", "\u00b2\u00b3\u00b9",
         "Z\u00fcrich1", "4.11111E+15", "1,234,567", "123.0", "#N/A", "#####", "", "   ", "x" * 151,
         "E" * 51, "ABC12345678", "abc12345678", "0" * 11]

SETTINGS = [RuleSettings(), RuleSettings(external_id_length=11), RuleSettings(external_id_min_length=5),
            RuleSettings(external_id_min_length=CARD_LENGTH), RuleSettings(external_id_pattern="[A-Z]{3}[0-9]{8}"),
            RuleSettings(strip_invisible=True), RuleSettings(allow_missing_external_id=True)]


def _batch(pairs: list[tuple[str, str]], problems: dict[int, str] | None = None) -> RowBatch:
    return RowBatch(None, list(range(2, len(pairs) + 2)), [list(p) for p in pairs], [c for c, _ in pairs],
                    [e for _, e in pairs], problems or {}, {})


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: repr(s)[12:60])
def test_check_batch_gives_check_rows_verdicts(settings):
    rng = random.Random(16)
    plain = [(f"{i:016d}", f"ABC{i:08d}") for i in range(3 * BLOCK_ROWS)]
    mixed = [(rng.choice(CELLS), rng.choice(CELLS)) for _ in range(3 * BLOCK_ROWS)]
    sprinkled = list(plain)
    for i in range(0, len(sprinkled), 97):
        sprinkled[i] = (rng.choice(CELLS), rng.choice(CELLS))
    problem = CellProblem("extra_cells", "row has 3 cells but the header has 2 columns")
    cases = [(plain, None), (mixed, None), (sprinkled, None), (plain, {BLOCK_ROWS + 3: problem})]
    for cell in CELLS:   # one odd cell in a block of plain rows, as card number and as external ID
        cases.append(([*plain[:5], (cell, plain[5][1]), *plain[6:9]], None))
        cases.append(([*plain[:5], (plain[5][0], cell), *plain[6:9]], None))
    for pairs, problems in cases:
        batch = _batch(pairs, problems)
        checked = check_batch(batch, settings)
        for i, row in enumerate(batch.rows()):
            v = check_row(row, settings)
            assert (checked.cards[i], checked.external_ids[i]) == (v.card, v.external_id), row
            assert (checked.rejected[i] if v.reason_code else None) == (v if v.reason_code else None), row
        assert set(checked.rejected) == {i for i, r in enumerate(batch.rows()) if check_row(r, settings).reason_code}


def test_original_json_is_what_json_dumps_writes():
    rng = random.Random(4)
    alphabet = ['a', '0', ' ', '"', '\\', '\n', '\r', '\t', '\x00', '\x1f', '\x7f', '\u00fc', '\u2028', '\U0001f600', ',']
    rows = [["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(3)] for _ in range(2000)]
    clean = [["0001", "EXT1", "Z\u00fcrich, \u2028 ok"]] * 50
    for values in (rows, clean, [r for r in rows if not any(c in "".join(r) for c in '"\\\n\r\t\x00\x1f')]):
        assert intake.original_json(values) == [json.dumps(v, ensure_ascii=False) for v in values]


@pytest.mark.parametrize("numpy_from", [10**9, 2])
def test_key_hashes_name_every_row_that_shares_a_card_or_an_external_id(monkeypatch, numpy_from):
    monkeypatch.setattr(intake, "_NUMPY_FROM", numpy_from)   # both ways of finding repeats
    keys = intake.KeyHashes()
    keys.add(["1", "2", "3", "1", "4"], ["A", "B", "C", "D", "B"])
    keys.add(["5"], ["E"])
    assert keys.suspects() == [1, 2, 4, 5]
    alone = intake.KeyHashes()
    alone.add(["1", "2"], ["A", "B"])
    assert alone.suspects() == []


# ---- a CSV parsed once (validate) is read as when it is surveyed at open ---------------------------
TRICKY = {
    "multiline": 'cardNumber,cardExternalId,note\r\n001,E1,"a\r\nb"\r\n\r\n,,\r\n002,"E,2",ok\r\n003,E3\r\n'
                 + "".join(f"{i:04d},X{i},\"l\nm\"\r\n" for i in range(10, 30)),
    "echo": "cardNumber,cardExternalId\n1,A\ncardNumber,cardExternalId\n2,B\nCard Number,external id\n3,C\n",
    "wrapped": 'cardNumber,cardExternalId\n="001",E1\n002,"=""E2"""\n3,C\n',
    "extra": "name,cardNumber,cardExternalId\nSmith, John,0001,E1\nDoe,0002,E2,,\n",
    "titled": "export\n\ncardNumber,cardExternalId\n1,A\n",
    "report": "cardNumber,cardExternalId,capbatch_row,capbatch_state\n'=1,E1,2,failed\n2,E2,3,failed\n",
}
BROKEN = {
    "quoting": ('cardNumber,cardExternalId\n1,A\n2,"B\n3,C\n', "broken quoting in row 3"),
    "swapped": ("cardNumber,cardExternalId\n1,A\ncardExternalId,cardNumber\n2,B\n", "another order"),
    "no rows": ("cardNumber,cardExternalId\n\n,\n", "0 data rows"),
}


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / f"{name.replace(' ', '_')}.csv"
    p.write_bytes(text.encode("utf-8"))
    return p


def _multiline_rows(path: Path, header_row: int = 1) -> list[int]:
    """The rows read from more than one line, record by record (what the note must list)."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        out, last = [], 0
        for n, _ in enumerate(reader, 1):
            if reader.line_num - last > 1 and n > header_row:
                out.append(n)
            last = reader.line_num
    return out


@pytest.mark.parametrize("name", sorted(TRICKY))
def test_a_csv_parsed_once_reads_like_one_surveyed_at_open(tmp_path, monkeypatch, name):
    monkeypatch.setattr("capbatch.source.delimited.BATCH_ROWS", 3)   # batches end inside the tricky parts
    p = _write(tmp_path, name, TRICKY[name])
    options = InputOptions(header_row=3) if name == "titled" else InputOptions()
    surveyed = open_input(p, options)
    once = open_input(p, options, survey=False)
    assert once.row_count is None
    rows = list(once.rows())
    assert rows == list(surveyed.rows())
    assert (once.notes, once.row_count, once.columns) == (surveyed.notes, surveyed.row_count, surveyed.columns)
    assert list(once.rows()) == rows   # and again, now surveyed
    multiline = _multiline_rows(p, options.header_row)[:5]
    note = [n for n in once.notes if "line breaks" in n]
    assert note == ([f"some cells contain line breaks inside quotes (rows {', '.join(map(str, multiline))}"
                     f"{', ...' if len(multiline) == 5 else ''}); each such record counts as one row"]
                    if multiline else [])


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_csv_parsed_once_raises_the_open_time_errors(tmp_path, monkeypatch, name):
    monkeypatch.setattr("capbatch.source.delimited.BATCH_ROWS", 2)
    text, message = BROKEN[name]
    p = _write(tmp_path, name, text)
    with pytest.raises(InputFileError, match=message) as at_open:
        open_input(p)
    once = open_input(p, survey=False)
    with pytest.raises(InputFileError, match=message) as while_reading:
        list(once.rows())
    assert str(while_reading.value) == str(at_open.value)


# ---- validate's ledger of problem rows gives the full import's report ----------------------------
def _problem_file(path: Path, n: int) -> None:
    rows = [(f"{i:016d}", f"EXT{i:08d}") for i in range(n)]
    rows[10] = rows[3]                                 # a duplicate pair
    rows[20] = (rows[5][0], "EXT99999999")             # card 5 with two external IDs: a conflict
    rows[30] = ("9" * 16, rows[7][1])                  # external ID 7 on two cards: a conflict
    rows[40] = ("NA", "EXT00000040")                   # rejected by the cell rules
    rows[50] = (" " + rows[50][0], rows[50][1])        # trimmed: still valid
    rows[60] = (rows[60][0], "")                       # no external ID
    rows[n - 1] = rows[n - 2]                          # a duplicate at the very end
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["cardNumber", "cardExternalId", "name"])
        w.writerows((c, e, f"n{i}") for i, (c, e) in enumerate(rows))


@pytest.mark.parametrize("generate_missing", [False, True])
@pytest.mark.parametrize("n", [80, 250])
def test_validate_reports_what_a_full_import_holds(tmp_path, monkeypatch, generate_missing, n):
    monkeypatch.setattr("capbatch.source.delimited.BATCH_ROWS", 7)
    src = tmp_path / "cards.csv"
    _problem_file(src, n)
    s = Settings(input=src, reports_dir=tmp_path / "reports", generate_missing=generate_missing)
    result = runner.validate(s, tmp_path / "v.csv")
    full = runner.prepare(s, run_dir=tmp_path / "full")
    try:
        expected = runner.validation_report(full.ledger)
        runner._write_validation_csv(full.ledger, tmp_path / "full.csv")
        pending = full.ledger.counts()["pending"]
    finally:
        full.ledger.close()
    assert {k: result[k] for k in expected} == expected
    assert (tmp_path / "v.csv").read_text() == (tmp_path / "full.csv").read_text()
    assert expected["duplicates"] == 2 and expected["by_reason"]["conflict_card"] == 2
    assert result["plan"]["rows_to_send"] == pending


def test_a_full_import_with_no_repeats_skips_the_cross_row_queries(tmp_path):
    ledger = Ledger.open(tmp_path)
    try:
        ledger.import_rows([(None, i + 2, "[]", f"c{i}", f"e{i}", "pending", None, None, None) for i in range(5)]
                           + [(None, 7, "[]", "c0", "e0", "pending", None, None, None)])
        ledger.apply_cross_row_rules(only=[])     # told nothing repeats: nothing changes
        assert ledger.counts()["duplicate"] == 0
        ledger.apply_cross_row_rules(only=[1, 6])
        assert ledger.counts()["duplicate"] == 1
    finally:
        ledger.close()


def test_load_rows_imports_every_row_and_applies_the_cross_row_rules(tmp_path):
    src = tmp_path / "cards.csv"
    _problem_file(src, 120)
    table = open_input(src)
    ledger = Ledger.open(tmp_path / "run")
    try:
        assert intake.load_rows(ledger, table, RuleSettings()) == 120
        counts = ledger.counts()
        assert (counts["duplicate"], counts["rejected"]) == (2, 2 + 2 + 1 + 1)
        kept = {r["row_number"]: r for r in ledger.rows_in_states(("pending",))}
        assert kept[52]["card"] == f"{50:016d}" and json.loads(kept[52]["original"])[0] == " " + f"{50:016d}"
    finally:
        ledger.close()


def test_source_rows_come_from_the_batches(tmp_path):
    p = _write(tmp_path, "plain", "cardNumber,cardExternalId\n" + "".join(f"{i},E{i}\n" for i in range(25)))
    table = open_input(p)
    rows = list(table.rows())
    assert rows[0] == SourceRow(None, 2, ("0", "E0"), "0", "E0", None, None) and len(rows) == 25
    assert [len(b) for b in table.batches()] == [25]
    buf = io.StringIO()
    csv.writer(buf).writerows(r.values for r in rows)
    assert buf.getvalue().splitlines()[-1] == "24,E24"
