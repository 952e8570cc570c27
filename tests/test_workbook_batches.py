"""Workbook rows built column by column give exactly what the row-by-row path gives.

A batch of a sheet whose key cells are plain text, or whole numbers under one plain-digits format, is
built with a few C-level passes (cells.render_whole_numbers, cells.display_texts, the XML scan's
style runs); every other batch goes through cells.workbook_key row by row. Both are compared here on
values and workbooks chosen to hit each edge: formats that pad, group, add decimals or text; zero,
negative, fractional, huge and non-finite numbers; style changes inside a batch; blank rows, error
and formula cells; sheets read with --sheet all.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import xlsxwriter

from capbatch.source import InputOptions, open_input, workbook
from capbatch.source.cells import (NumberDisplay, display_text, display_texts, render_whole_numbers,
                                   workbook_key)

FORMATS = ["General", "@", "0", "0000000000000000", "#", "#,##0", "0.00", '"ID "0', "0;-0;\"zero\"",
           "[Red]0", "00000;(00000)", "-0", "0,"]
NUMBERS = [1.0, 7, 42.0, 4111223.0, 99999999999999.0, 10.0**15, 10.0**15 - 1, 0.0, -0.0, -5.0, 1.5,
           float("inf"), float("nan"), 2.0**53, 123456789012345.0]


@pytest.mark.parametrize("code", FORMATS)
def test_whole_numbers_render_as_workbook_key_renders_them(code):
    display = NumberDisplay(code=code)
    rng = random.Random(code)
    for _ in range(200):
        values = rng.sample(NUMBERS, rng.randint(1, 4))
        texts = render_whole_numbers(values, display)
        expected = [workbook_key(v, "card number", display) for v in values]
        if texts is not None:  # only ever a shortcut: never another text, never a missed problem
            assert texts == [t for t, _ in expected]
            assert all(p is None for _, p in expected)
    plain = [1.0, 2.0, 4111223.0, 99999999999999.0]
    if code in ("General", "@", "0", "0000000000000000", "#"):  # a plain-digits format: always the shortcut
        assert render_whole_numbers(plain, display) == [workbook_key(v, "x", display)[0] for v in plain]


def test_display_texts_is_display_text_of_each_value():
    rng = random.Random(16)
    pool = [1.5, 2.0, 1e15, 2.0**53, -(2.0**53), 2.0**53 + 2, 0.1, 1 / 3, -7.0, 1e-7, 5e-324, 9.5e15,
            float("nan"), float("inf"), -0.0, 0.0, 1e17, 123456789.0]
    columns = [[rng.choice(pool) for _ in range(300)],
               [rng.uniform(-1e6, 1e6) for _ in range(300)] + [float(rng.randint(-10**9, 10**9)) for _ in range(300)],
               ["a", "", "b"], ["x", 1.0, True, None, 3]]
    for column in columns:
        assert list(display_texts(column)) == [display_text(v) for v in column]


def _workbook(path: Path, rows_per_sheet: int, sheets: int = 1) -> None:
    """Card numbers as numbers under formats that change along the column (some plain, some not), as
    text, blank rows, error and formula cells, numeric external IDs, a float column."""
    wb = xlsxwriter.Workbook(str(path))
    fmts = [wb.add_format({"num_format": c}) for c in ("0000000000000000", "0", "#,##0", "0.00", "General")]
    k = 0
    for s in range(sheets):
        ws = wb.add_worksheet(f"Part {s + 1}")
        ws.write_row(0, 0, ["cardNumber", "cardExternalId", "Amount", "Name"])
        for i in range(1, rows_per_sheet + 1):
            k += 1
            block = (i // 9) % 7  # formats change every 9 rows, inside and across batches
            if block == 5:
                ws.write_string(i, 0, f"{k:016d}")
            elif block == 6 and i % 4 == 0:
                continue  # a blank row
            else:
                ws.write_number(i, 0, 4_000_000 + k if i % 13 else -k, fmts[block % len(fmts)])
            if i % 11 == 0:
                ws.write_number(i, 1, 700_000 + k)
            elif i % 17 == 0:
                ws.write_formula(i, 1, "=1/0", None, "#DIV/0!")
            elif i % 19 == 0:
                pass  # no external ID
            else:
                ws.write_string(i, 1, f"EXT{k:08d}")
            ws.write_number(i, 2, k * 1.5 if i % 3 else 0.0)
            ws.write_string(i, 3, f"Customer {k}")
    wb.close()


def _rows(path: Path, options: InputOptions) -> list[tuple]:
    table = open_input(path, options)
    return [(r.sheet, r.row_number, r.values, r.card, r.external_id, r.card_problem, r.external_id_problem)
            for r in table.rows()]


@pytest.mark.parametrize("sheets", [1, 2])
def test_column_built_batches_read_like_the_row_by_row_path(tmp_path, monkeypatch, sheets):
    path = tmp_path / "cards.xlsx"
    _workbook(path, 400, sheets)
    options = InputOptions(sheet="all" if sheets > 1 else None)
    monkeypatch.setattr(workbook, "BATCH_ROWS", 7)  # many batches: some plain, some not
    built = []
    by_column = workbook._SheetReader._by_column

    def counted(self, chunk, first):
        batch = by_column(self, chunk, first)
        built.append(batch is not None)
        return batch

    monkeypatch.setattr(workbook._SheetReader, "_by_column", counted)
    fast = _rows(path, options)
    monkeypatch.setattr(workbook._SheetReader, "_by_column", lambda self, chunk, first: None)
    slow = _rows(path, options)
    assert fast == slow
    assert any(built) and not all(built)  # some batches built column by column, some row by row
    assert len(fast) == sum(1 for _ in fast) > 300 * sheets
    codes = {getattr(p, "code", None) for r in fast for p in r[5:]}
    assert {"excel_number_format", "excel_error", None} <= codes  # the edges were hit
    assert ("0000000004000001" in {r[3] for r in fast}) and any(r[3] == "4000010" for r in fast)


def test_a_plain_sheet_is_built_by_column_and_loaded_once(tmp_path, monkeypatch):
    path = tmp_path / "plain.xlsx"
    wb = xlsxwriter.Workbook(str(path))
    ws = wb.add_worksheet("Cards")
    padded = wb.add_format({"num_format": "0000000000000000"})
    ws.write_row(0, 0, ["cardNumber", "cardExternalId", "Amount"])
    for i in range(1, 101):
        ws.write_number(i, 0, 4_000_000 + i, padded)
        ws.write_string(i, 1, f"EXT{i:08d}")
        ws.write_number(i, 2, i * 0.5)
    wb.close()
    loads: list[str] = []
    real_load = workbook.Workbook.load

    def counted(self, name, keep=False):
        loads.append(name)
        return real_load(self, name, keep)

    monkeypatch.setattr(workbook.Workbook, "load", counted)
    by_row = []
    monkeypatch.setattr(workbook._SheetReader, "_by_row",
                        lambda self, chunk, first: by_row.append(first) or iter(()))
    rows = list(open_input(path).rows())
    assert by_row == []  # every batch was built column by column
    assert [r.card for r in rows[:2]] == ["0000000004000001", "0000000004000002"]
    assert rows[1].values == ("0000000004000002", "EXT00000002", "1")
    assert loads == ["Cards", "Cards"]  # planned, then read from the sheet kept loaded
