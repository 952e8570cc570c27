"""The input-reading layer against a corpus of messy files generated under tmp_path."""

from __future__ import annotations

import datetime as dt
import hashlib
import pickle
import zipfile

import pytest

from conftest_messy import (
    ErrorCell,
    Formula,
    make_encrypted_ole,
    make_png,
    make_xls,
    make_xlsx,
    write_bytes,
    write_text,
)

from capbatch.errors import InputFileError, UsageError
from capbatch.rules import RuleSettings, check_row
from capbatch.source import InputOptions, SourceRow, file_sha256, open_input


def read(path, **opts):
    table = open_input(path, InputOptions(**opts))
    return table, list(table.rows())


def outcome(path, settings=RuleSettings(), **opts):
    """[(row_number, card_sent, external_id_sent, reason_code)] for every yielded row."""
    table = open_input(path, InputOptions(**opts))
    out = []
    for row in table.rows():
        v = check_row(row, settings)
        out.append((row.row_number, v.card, v.external_id, v.reason_code))
    return out


# ----------------------------------------------------------------------------- delimited text


def test_csv_reads_every_cell_as_text(tmp_path):
    p = write_text(
        tmp_path / "cards.csv",
        "cardNumber,cardExternalId,amount\n"
        "000123,00ABC,1.50\n"
        "4111111111111111,NA,\n"
        "0042,null,TRUE\n"
        "77,,x\n",
    )
    table, rows = read(p)
    assert table.format == "csv" and table.delimiter == "," and table.encoding == "utf-8"
    assert table.columns == ["cardNumber", "cardExternalId", "amount"]
    assert table.card_column == "cardNumber" and table.external_id_column == "cardExternalId"
    assert table.row_count == 4
    assert [(r.row_number, r.values) for r in rows] == [
        (2, ("000123", "00ABC", "1.50")),
        (3, ("4111111111111111", "NA", "")),
        (4, ("0042", "null", "TRUE")),
        (5, ("77", "", "x")),
    ]
    assert all(r.sheet is None and r.card_problem is None for r in rows)
    assert outcome(p) == [
        (2, "000123", "00ABC", None),
        (3, "4111111111111111", "NA", "placeholder"),
        (4, "0042", "null", "placeholder"),
        (5, "77", "", "missing_external_id"),
    ]


def test_utf8_bom_does_not_reach_the_first_header(tmp_path):
    p = write_text(tmp_path / "bom.csv", "cardNumber,cardExternalId\r\n01,E1\r\n", "utf-8-sig")
    table, rows = read(p)
    assert table.columns[0] == "cardNumber"
    assert table.encoding == "utf-8-sig"
    assert rows[0].values == ("01", "E1")


def test_forced_utf8_on_bom_file_still_strips_bom(tmp_path):
    p = write_text(tmp_path / "bom.csv", "cardNumber,cardExternalId\n01,E1\n", "utf-8-sig")
    table, rows = read(p, encoding="UTF-8")
    assert table.columns[0] == "cardNumber" and rows[0].card == "01"


def test_utf16_excel_unicode_text(tmp_path):
    text = "Card Number\tCard External ID\tName\r\n0001\tÉTÉ-1\tZoë\r\n0002\t東京-2\tX\r\n"
    p = write_bytes(tmp_path / "unicode.txt", b"\xff\xfe" + text.encode("utf-16-le"))
    table, rows = read(p)
    assert table.encoding == "utf-16" and table.delimiter == "\t"
    assert table.columns == ["Card Number", "Card External ID", "Name"]
    assert [(r.row_number, r.card, r.external_id) for r in rows] == [
        (2, "0001", "ÉTÉ-1"),
        (3, "0002", "東京-2"),
    ]
    assert any("byte-order mark" in n for n in table.notes)


def test_cp1252_fallback_is_noted_and_exact(tmp_path):
    p = write_text(
        tmp_path / "latin.csv", "cardNumber;cardExternalId\n0099;Café-€1\n", "cp1252"
    )
    table, rows = read(p)
    assert table.encoding == "cp1252"
    assert rows[0].external_id == "Café-€1"
    assert any(n.startswith("encoding: cp1252") and "--encoding" in n for n in table.notes)


def test_late_invalid_utf8_byte_falls_back_for_the_whole_file(tmp_path):
    head = "cardNumber,cardExternalId\n" + "".join(f"{i:08d},E{i}\n" for i in range(150_000))
    data = head.encode("ascii") + "99999999,Zoé\n".encode("cp1252")
    assert len(data) > 2 * (1 << 20)  # past the first decode chunks
    p = write_bytes(tmp_path / "late.csv", data)
    table = open_input(p)
    assert table.encoding == "cp1252"
    last = list(table.rows())[-1]
    assert (last.row_number, last.card, last.external_id) == (150_002, "99999999", "Zoé")


def test_mixed_encodings_are_refused_not_garbled(tmp_path):
    data = "cardNumber,cardExternalId\n1,Zoé\n".encode() + "2,Zoé\n".encode("cp1252")
    p = write_bytes(tmp_path / "mixed.csv", data)
    with pytest.raises(InputFileError, match="mixes encodings"):
        open_input(p)


def test_forced_encoding_that_fails_names_offset_and_suggests(tmp_path):
    p = write_text(tmp_path / "latin.csv", "cardNumber,cardExternalId\n1,ok\n2,Café\n", "cp1252")
    with pytest.raises(InputFileError) as e:
        open_input(p, InputOptions(encoding="utf-8"))
    msg = str(e.value)
    assert "byte 0xe9 at offset 36 (line 3)" in msg
    assert "--encoding cp1252" in msg


def test_unknown_encoding_is_a_usage_error(tmp_path):
    p = write_text(tmp_path / "a.csv", "cardNumber,cardExternalId\n1,2\n")
    with pytest.raises(UsageError):
        open_input(p, InputOptions(encoding="klingon"))


def test_utf16_without_bom_is_refused_with_a_suggestion(tmp_path):
    p = write_bytes(tmp_path / "nobom.csv", "cardNumber,cardExternalId\n1,2\n".encode("utf-16-le"))
    with pytest.raises(InputFileError, match="--encoding utf-16-le"):
        open_input(p)
    table, rows = read(p, encoding="utf-16-le")
    assert rows[0].values == ("1", "2")


@pytest.mark.parametrize(
    "delim,name", [(";", "semi.csv"), ("\t", "tabs.tsv"), ("|", "pipes.txt"), (",", "c.dat")]
)
def test_delimiter_detection_prefers_the_one_that_yields_the_headers(tmp_path, delim, name):
    rows = [["cardNumber", "cardExternalId", "note"], ["007", "A,1", "x;y|z\tw"], ["008", "B", "1,5"]]
    text = "".join(
        delim.join(f'"{c}"' if any(d in c for d in ",;|\t") else c for c in r) + "\n" for r in rows
    )
    p = write_text(tmp_path / name, text)
    table, out = read(p)
    assert table.delimiter == delim
    assert [r.values for r in out] == [("007", "A,1", "x;y|z\tw"), ("008", "B", "1,5")]


def test_explicit_delimiter(tmp_path):
    p = write_text(tmp_path / "a.csv", "cardNumber;cardExternalId;x\n1;2,5;3\n")
    table, rows = read(p, delimiter=";")
    assert table.delimiter == ";" and rows[0].values == ("1", "2,5", "3")
    assert "delimiter: ';' (given with --delimiter)" in table.notes


def test_explicit_delimiter_tab_word(tmp_path):
    p = write_text(tmp_path / "a.csv", "cardNumber\tcardExternalId\n1\t2\n")
    table, rows = read(p, delimiter="tab")
    assert table.delimiter == "\t" and rows[0].values == ("1", "2")


def test_quoted_newlines_blank_lines_and_row_numbers(tmp_path):
    p = write_text(
        tmp_path / "multi.csv",
        "cardNumber,cardExternalId,comment\r\n"
        '001,E1,"line one\r\nline two\r\nline three"\r\n'  # row 2 spans 3 physical lines
        "\r\n"  # row 3 blank
        ",,\r\n"  # row 4 all-empty cells
        '002,"E,2",ok\r\n'  # row 5
        "003,E3\r\n",  # row 6: short row padded
    )
    table, rows = read(p)
    assert [(r.row_number, r.values) for r in rows] == [
        (2, ("001", "E1", "line one\r\nline two\r\nline three")),
        (5, ("002", "E,2", "ok")),
        (6, ("003", "E3", "")),
    ]
    assert table.row_count == 3
    assert any("line breaks inside quotes (rows 2)" in n for n in table.notes)


def test_title_rows_and_header_row(tmp_path):
    p = write_text(
        tmp_path / "titled.csv",
        "Loyalty export\n"
        "generated 2024-01-01,by ops\n"
        "Card_Number,card-external-id\n"
        "0001,X1\n"
        "\n"
        "0002,X2\n",
    )
    table, rows = read(p, header_row=3)
    assert table.card_column == "Card_Number" and table.external_id_column == "card-external-id"
    assert [(r.row_number, r.card, r.external_id) for r in rows] == [
        (4, "0001", "X1"),
        (6, "0002", "X2"),
    ]
    with pytest.raises(InputFileError, match="--header-row"):
        open_input(p)


def test_extra_cells_are_a_row_problem_and_empty_extras_are_dropped(tmp_path):
    p = write_text(
        tmp_path / "shift.csv",
        "name,cardNumber,cardExternalId\n"
        "Smith, John,0001,E1\n"  # unquoted comma: columns shifted
        "Doe,0002,E2,,\n",  # trailing empty cells
    )
    table, rows = read(p)
    assert rows[0].values == ("Smith", " John", "0001", "E1")
    assert rows[0].card_problem is not None
    assert rows[1].values == ("Doe", "0002", "E2")
    assert outcome(p) == [(2, "John", "0001", "extra_cells"), (3, "0002", "E2", None)]


def test_unclosed_quote_is_a_file_error_before_any_row(tmp_path):
    p = write_text(tmp_path / "q.csv", 'cardNumber,cardExternalId\n1,"E1\n2,E2\n3,E3\n')
    with pytest.raises(InputFileError, match="broken quoting in row 2"):
        open_input(p)


def test_rows_is_restartable(tmp_path):
    p = write_text(tmp_path / "a.csv", "cardNumber,cardExternalId\n1,A\n2,B\n")
    table = open_input(p)
    first = list(table.rows())
    assert list(table.rows()) == first and len(first) == 2


def test_source_row_is_frozen_and_slotted(tmp_path):
    row = SourceRow(None, 2, ("1", "2"), "1", "2", None, None)
    with pytest.raises(Exception):
        row.card = "x"  # type: ignore[misc]
    assert not hasattr(row, "__dict__")


@pytest.mark.parametrize("text", ["cardNumber,cardExternalId\n", "cardNumber,cardExternalId\n\n,\n"])
def test_header_without_data_rows_is_refused(tmp_path, text):
    p = write_text(tmp_path / "h.csv", text)
    with pytest.raises(InputFileError, match="0 data rows"):
        open_input(p)


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"\r\n\r\n"])
def test_empty_files(tmp_path, content):
    p = write_bytes(tmp_path / "e.csv", content)
    with pytest.raises(InputFileError, match="empty|no content"):
        open_input(p)


# ----------------------------------------------------------------------------- header matching


@pytest.mark.parametrize(
    "card,ext",
    [
        ("Card Number", "Card External ID"),
        ("card_number", "card_external_id"),
        ("CARDNUMBER", "externalId"),
        ("cardnumber", "ext_id"),
        ("Card No.", "Card Ext ID"),
    ],
)
def test_header_variants(tmp_path, card, ext):
    p = write_text(tmp_path / "h.csv", f"{card},{ext},other\n1,2,3\n")
    table = open_input(p)
    assert (table.card_column, table.external_id_column) == (card, ext)
    assert any(f"cardNumber <- {card!r}" in n for n in table.notes)


def test_canonical_name_beats_alias(tmp_path):
    p = write_text(tmp_path / "h.csv", "card,cardNumber,externalId,cardExternalId\n1,2,3,4\n")
    table, rows = read(p)
    assert (rows[0].card, rows[0].external_id) == ("2", "4")


def test_ambiguous_headers(tmp_path):
    p = write_text(tmp_path / "h.csv", "Card Number,card_number,cardExternalId\n1,2,3\n")
    with pytest.raises(InputFileError) as e:
        open_input(p)
    assert "ambiguous" in e.value.message and "--card-column" in e.value.hint
    table = open_input(p, InputOptions(card_column="card_number"))
    assert list(table.rows())[0].card == "2"


def test_missing_headers_list_columns_and_flags(tmp_path):
    p = write_text(tmp_path / "h.csv", "Kartennummer,Extern\n1,2\n")
    with pytest.raises(InputFileError) as e:
        open_input(p)
    assert "'Kartennummer', 'Extern'" in e.value.message
    assert "--card-column" in e.value.hint and "--external-id-column" in e.value.hint
    table, rows = read(p, card_column="kartennummer", external_id_column="Extern")
    assert (rows[0].card, rows[0].external_id) == ("1", "2")
    with pytest.raises(InputFileError, match="'Karte' \\(given with --card-column\\) was not found"):
        open_input(p, InputOptions(card_column="Karte", external_id_column="Extern"))


def test_duplicate_unrelated_headers_are_allowed(tmp_path):
    p = write_text(tmp_path / "h.csv", "x,cardNumber,x,cardExternalId\na,1,b,2\n")
    table, rows = read(p)
    assert table.columns == ["x", "cardNumber", "x", "cardExternalId"]
    assert rows[0].values == ("a", "1", "b", "2")


# ----------------------------------------------------------------------------- wrong files


def test_png_renamed_csv(tmp_path):
    with pytest.raises(InputFileError, match="PNG image"):
        open_input(make_png(tmp_path / "cards.csv"))


def test_csv_renamed_xlsx(tmp_path):
    p = write_text(tmp_path / "cards.xlsx", "cardNumber,cardExternalId\n1,2\n")
    with pytest.raises(InputFileError) as e:
        open_input(p)
    assert "not an Excel workbook" in e.value.message and "cards.csv" in e.value.hint


def test_html_named_xls(tmp_path):
    p = write_text(tmp_path / "export.xls", "<html><table><tr><td>cardNumber</td></tr></table>")
    with pytest.raises(InputFileError, match="HTML page"):
        open_input(p)


def test_truncated_xlsx(tmp_path):
    good = make_xlsx(tmp_path / "good.xlsx", {"S": [["cardNumber", "cardExternalId"], ["1", "2"]]})
    data = good.read_bytes()
    p = write_bytes(tmp_path / "cut.xlsx", data[: len(data) // 2])
    with pytest.raises(InputFileError, match="damaged or incomplete"):
        open_input(p)


def test_zip_that_is_not_a_workbook(tmp_path):
    p = tmp_path / "x.xlsx"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(InputFileError, match="not a spreadsheet workbook"):
        open_input(p)


def test_encrypted_workbook(tmp_path):
    p = make_encrypted_ole(tmp_path / "secret.xlsx")
    with pytest.raises(InputFileError) as e:
        open_input(p)
    assert "password-protected" in e.value.message and "remove the password" in e.value.hint


def test_xlsx_named_csv(tmp_path):
    good = make_xlsx(tmp_path / "g.xlsx", {"S": [["cardNumber", "cardExternalId"], ["1", "2"]]})
    p = write_bytes(tmp_path / "cards.csv", good.read_bytes())
    with pytest.raises(InputFileError, match="named .csv but it is an Excel workbook"):
        open_input(p)


def test_missing_file(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        open_input(tmp_path / "nope.csv")


def test_file_sha256(tmp_path):
    p = write_bytes(tmp_path / "a.bin", b"abc" * 1000)
    assert file_sha256(p) == hashlib.sha256(b"abc" * 1000).hexdigest()


# ----------------------------------------------------------------------------- Excel


def _cards_workbook(tmp_path):
    return make_xlsx(
        tmp_path / "book.xlsx",
        {
            "Notes": [["Read me"], ["nothing here"]],
            "Cards": [
                ["Card Number", "Ext ID", "Amount", "When"],  # row 1
                ["000123", "00EXT", 1.5, dt.datetime(2024, 1, 2, 3, 4, 5)],  # 2 text stays text
                [12345, 987654321012345, 3, True],  # 3 ints -> digits
                [12345.0, "X-1", None, None],  # 4 integral float -> digits
                [123.45, "X-2", None, None],  # 5 non-integral float
                [4111111111111111, "X-3", None, None],  # 6 > 15 digits
                [None, None, None, None],  # 7 blank row
                [dt.date(2024, 3, 1), "X-4", None, None],  # 8 date
                [True, "X-5", None, None],  # 9 bool
                ["0001", ErrorCell("#N/A"), None, None],  # 10 error cell
                ["0002", Formula("=A2&B2"), None, None],  # 11 formula without cached value
                ["0003", "", None, None],  # 12 empty ext
                ["0004", "N/A", "x", None],  # 13 placeholder text
            ],
        },
    )


def test_xlsx_sheet_choice_values_and_problems(tmp_path):
    p = _cards_workbook(tmp_path)
    table, rows = read(p)
    assert table.format == "xlsx" and table.sheet == "Cards"
    assert table.columns == ["Card Number", "Ext ID", "Amount", "When"]
    assert "sheet 'Cards': 11 rows (the only visible sheet with the required headers)" in table.notes
    assert "columns: cardNumber <- 'Card Number', cardExternalId <- 'Ext ID'" in table.notes
    assert table.row_count == 11
    assert rows[0].values == ("000123", "00EXT", "1.5", "2024-01-02 03:04:05")
    assert rows[1].values == ("12345", "987654321012345", "3", "TRUE")
    assert all(r.sheet == "Cards" for r in rows)
    assert outcome(p) == [
        (2, "000123", "00EXT", None),
        (3, "12345", "987654321012345", None),
        (4, "12345", "X-1", None),
        (5, "123.45", "X-2", "excel_number"),
        (6, "4111111111111111", "X-3", "excel_number"),
        (8, "2024-03-01", "X-4", "excel_date"),
        (9, "TRUE", "X-5", "excel_bool"),
        (10, "0001", "#N/A", "excel_error"),
        (11, "0002", "", "formula_no_value"),
        (12, "0003", "", "missing_external_id"),
        (13, "0004", "N/A", "placeholder"),
    ]
    by_row = {r.row_number: r for r in rows}
    assert "15" in by_row[6].card_problem and "Text" in by_row[6].card_problem
    assert "#N/A" in by_row[10].external_id_problem
    assert "open and save the file in Excel" in by_row[11].external_id_problem


def test_generate_missing_mode_still_rejects_error_and_formula_cells(tmp_path):
    p = _cards_workbook(tmp_path)
    got = {r: code for r, _, _, code in outcome(p, RuleSettings(allow_missing_external_id=True))}
    assert got[10] == "excel_error" and got[11] == "formula_no_value" and got[12] is None


def test_xlsx_explicit_sheet_by_name_and_index(tmp_path):
    p = _cards_workbook(tmp_path)
    assert open_input(p, InputOptions(sheet="cards")).sheet == "Cards"
    assert open_input(p, InputOptions(sheet=1)).sheet == "Cards"
    assert open_input(p, InputOptions(sheet="1")).sheet == "Cards"
    with pytest.raises(InputFileError) as e:
        open_input(p, InputOptions(sheet="Nope"))
    assert "0: 'Notes', 1: 'Cards'" in e.value.message
    with pytest.raises(InputFileError, match="cardNumber column was not found"):
        open_input(p, InputOptions(sheet="Notes"))


def test_xlsx_no_sheet_has_headers(tmp_path):
    p = make_xlsx(tmp_path / "b.xlsx", {"A": [["x", "y"]], "B": [["Card", "z"]]})
    with pytest.raises(InputFileError) as e:
        open_input(p)
    assert "'A': 'x', 'y'" in e.value.message and "--sheet" in e.value.hint


def test_xlsx_title_rows_and_offset_columns(tmp_path):
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "Export"
    ws["C1"] = "Card export"
    ws["C3"], ws["D3"] = "cardNumber", "cardExternalId"
    ws["C4"], ws["D4"] = "0001", "A"
    ws["D6"].value = "#DIV/0!"
    ws["D6"].data_type = "e"
    ws["C6"] = "0003"
    wb.save(tmp_path / "t.xlsx")
    out = outcome(tmp_path / "t.xlsx", header_row=3)
    assert out == [(4, "0001", "A", None), (6, "0003", "#DIV/0!", "excel_error")]


def test_xls_legacy(tmp_path):
    p = make_xls(
        tmp_path / "old.xls",
        {
            "Sheet1": [
                ["cardNumber", "cardExternalId", "note"],
                ["00077", "E-1", "ok"],
                [12345, 678, 1.25],
                [1.5, "E-3", None],
                [None, None, None],
                ["0005", ErrorCell("#REF!"), None],
                [True, "E-6", None],
                [dt.date(2020, 5, 17), "E-7", None],
            ]
        },
    )
    table, rows = read(p)
    assert table.format == "xls" and table.sheet == "Sheet1"
    assert rows[1].values == ("12345", "678", "1.25")
    assert outcome(p) == [
        (2, "00077", "E-1", None),
        (3, "12345", "678", None),
        (4, "1.5", "E-3", "excel_number"),
        (6, "0005", "#REF!", "excel_error"),
        (7, "TRUE", "E-6", "excel_bool"),
        (8, "2020-05-17", "E-7", "excel_date"),
    ]


def test_xlsx_named_xls_is_read_by_content(tmp_path):
    good = make_xlsx(tmp_path / "g.xlsx", {"S": [["cardNumber", "cardExternalId"], ["01", "2"]]})
    p = write_bytes(tmp_path / "renamed.xls", good.read_bytes())
    table, rows = read(p)
    assert table.format == "xlsx" and rows[0].card == "01"
    assert any("read as .xlsx" in n for n in table.notes)


def test_problem_strings_pickle_with_their_code(tmp_path):
    p = _cards_workbook(tmp_path)
    row = [r for r in open_input(p).rows() if r.row_number == 5][0]
    back = pickle.loads(pickle.dumps(row))
    assert back == row and back.card_problem.code == "excel_number"
    assert check_row(back, RuleSettings()).reason_code == "excel_number"
    # a plain string (e.g. read back from the ledger) still maps to a code
    plain = SourceRow("S", 5, row.values, row.card, row.external_id, str(row.card_problem), None)
    assert check_row(plain, RuleSettings()).reason_code == "excel_number"


def test_xls_named_xlsx_is_read_by_content(tmp_path):
    old = make_xls(tmp_path / "o.xls", {"Cards": [["cardNumber", "cardExternalId"], ["007", "X"]]})
    p = write_bytes(tmp_path / "renamed.xlsx", old.read_bytes())
    table, rows = read(p)
    assert table.format == "xls" and (rows[0].card, rows[0].external_id) == ("007", "X")
    assert any("read as .xls" in n for n in table.notes)


def test_unknown_extension_with_csv_content(tmp_path):
    p = write_text(tmp_path / "export", "cardNumber|cardExternalId\n01|A\n")
    table, rows = read(p)
    assert table.format == "csv" and table.delimiter == "|" and rows[0].card == "01"


# ----------------------------------------------------------------------------- number formats


@pytest.mark.parametrize(
    "code,n,shown",
    [
        ("General", 77, "77"), ("@", 123, "123"), ("0", 42, "42"), ("0", -42, "-42"),
        ("0000000000000000", 4111223, "0000000004111223"), ("000000", 1234567, "1234567"),
        ("#,##0", 77, "77"), ("#,##0", 1234567, "1,234,567"), ("000,000", 5, "000,005"),
        ("0.00", 12, "12.00"), ("#", 0, ""), ("0000;-0000", -5, "-0005"), ("0;(0)", 5, "5"),
        ('"ABC"0000', 99, None), ("0%", 5, None), ("0.00E+00", 5, None), ("[Red]0", 5, None),
        ("#,##0,", 5000, None), ("0.##", 5, None), ("0;(0)", -5, None),
    ],
)
def test_render_format(code, n, shown):
    from capbatch.source.cells import render_format

    assert render_format(code, n) == shown


@pytest.mark.parametrize(
    "display,value,sent,code",
    [
        (("0000000000000000", None), 4111223, "0000000004111223", None),
        (("#,##0", None), 999, "999", None),
        (("#,##0", None), 1000, "1000", "excel_number_format"),
        ((None, "0000000004111223"), 4111223.0, "0000000004111223", None),
        ((None, "4111223"), 4111223.0, "4111223", None),
        ((None, "4.11E+06"), 4111223.0, "4111223", "excel_number_format"),
        ((None, None), 5, "5", "excel_number_format"),
        (("0", None), 12.5, "12.5", "excel_number"),
        (("0000000000000000", None), 10**15, "1000000000000000", "excel_number"),
    ],
)
def test_a_number_is_sent_only_as_the_digits_it_is_displayed_with(display, value, sent, code):
    from capbatch.source.cells import NumberDisplay, workbook_key

    text, problem = workbook_key(value, "card number", NumberDisplay(*display))
    assert (text, getattr(problem, "code", None)) == (sent, code)


def test_xlsx_built_in_and_custom_formats_written_by_openpyxl(tmp_path):
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["cardNumber", "cardExternalId"])
    for value, fmt in [(4111223, "0000000000000000"), (42, "0"), (1234567, "#,##0"), (12, "0.00"),
                       (7, "General"), (99, "0.00%")]:
        ws.append([value, "E"])
        ws.cell(ws.max_row, 1).number_format = fmt
    wb.save(tmp_path / "f.xlsx")
    assert outcome(tmp_path / "f.xlsx") == [
        (2, "0000000004111223", "E", None), (3, "42", "E", None),
        (4, "1234567", "E", "excel_number_format"), (5, "12", "E", "excel_number_format"),
        (6, "7", "E", None), (7, "99", "E", "excel_number_format"),
    ]


def test_xlsx_with_only_plain_formats_needs_no_sheet_pass(tmp_path):
    from capbatch.source._xlsx import XlsxEngine

    p = make_xlsx(tmp_path / "p.xlsx", {"S": [["cardNumber", "cardExternalId"], [123, "E"]]})
    assert XlsxEngine(p).numbers_plain
    assert outcome(p) == [(2, "123", "E", None)]


# ----------------------------------------------------------------------------- sheets and rows


def test_very_hidden_sheet_is_read_only_when_named(tmp_path):
    import openpyxl

    wb = openpyxl.Workbook()
    wb.active.title = "Cover"
    wb.active.append(["nothing"])
    secret = wb.create_sheet("Secret")
    secret.sheet_state = "veryHidden"
    secret.append(["cardNumber", "cardExternalId"])
    secret.append(["0001", "S-1"])
    wb.save(tmp_path / "v.xlsx")
    with pytest.raises(InputFileError) as e:
        open_input(tmp_path / "v.xlsx")
    assert "no visible sheet" in e.value.message and "'Secret' (1 row)" in e.value.message
    assert outcome(tmp_path / "v.xlsx", sheet="Secret") == [(2, "0001", "S-1", None)]


def test_sheet_all_needs_the_same_columns(tmp_path):
    p = make_xlsx(tmp_path / "b.xlsx", {
        "A": [["cardNumber", "cardExternalId", "x"], ["1", "A"]],
        "B": [["cardNumber", "cardExternalId"], ["2", "B"]],
    })
    with pytest.raises(InputFileError, match="same columns on every sheet"):
        open_input(p, InputOptions(sheet="all"))
    assert outcome(p, sheet="B") == [(2, "2", "B", None)]


def test_sheet_all_with_one_carrying_sheet_and_the_sheet_choice(tmp_path):
    p = make_xlsx(tmp_path / "b.xlsx", {"A": [["x"]], "B": [["cardNumber", "cardExternalId"], ["2", "B"]]})
    table = open_input(p, InputOptions(sheet="ALL"))
    assert table.sheets == ("B",) and table.sheet_choice == "B" and table.sheet_rows == {"B": 1}
    two = make_xlsx(tmp_path / "c.xlsx", {"A": [["cardNumber", "cardExternalId"], ["1", "A"]],
                                          "B": [["cardNumber", "cardExternalId"], ["2", "B"]]})
    both = open_input(two, InputOptions(sheet="all"))
    assert both.sheet_choice == ["A", "B"] and both.row_count == 2
    assert [(r.sheet, r.row_number, r.card) for r in both.rows()] == [("A", 2, "1"), ("B", 2, "2")]


def test_repeated_header_in_a_workbook_is_skipped_and_a_reordered_one_refused(tmp_path):
    header = ["Card Number", "Ext ID"]
    p = make_xlsx(tmp_path / "r.xlsx", {"S": [header, ["1", "A"], ["cardNumber", "cardExternalId"], ["2", "B"]]})
    table, rows = read(p)
    assert [(r.row_number, r.card) for r in rows] == [(2, "1"), (4, "2")] and table.row_count == 2
    assert "row S!3 repeats the header row (files joined together?) and was skipped: it is not data" in table.notes
    swapped = write_text(tmp_path / "s.csv", "cardNumber,cardExternalId\n1,A\ncardExternalId,cardNumber\nB,2\n")
    with pytest.raises(InputFileError, match="row 3 repeats the header row with the cardNumber and "
                                             "cardExternalId columns in another order"):
        open_input(swapped)


def test_only_repeated_headers_is_zero_data_rows(tmp_path):
    p = write_text(tmp_path / "h.csv", "cardNumber,cardExternalId\ncardNumber,cardExternalId\n")
    with pytest.raises(InputFileError, match="0 data rows"):
        open_input(p)


def test_ods_is_read_like_xlsx(tmp_path):
    from pathlib import Path

    lo = Path(__file__).resolve().parent / "fixtures" / "lo"
    table = open_input(lo / "sheets.ods", InputOptions(sheet="Cards"))
    assert table.format == "ods" and table.columns == ["Card Number", "Card External ID"]
    assert [r.card for r in table.rows()] == [f"00{i:014d}" for i in range(1, 6)]


# ----------------------------------------------------------------------------- capbatch reports


def test_a_capbatch_report_loses_its_own_columns(tmp_path):
    p = write_text(tmp_path / "failures.csv",
                   "cardNumber,cardExternalId,region,capbatch_row,capbatch_sheet,capbatch_state,"
                   "capbatch_error_code,capbatch_reason,capbatch_warnings\n"
                   "0001,'=X,north,2,,rejected,placeholder,why,\n")
    table, rows = read(p)
    assert table.columns == ["cardNumber", "cardExternalId", "region"]
    assert rows[0].values == ("0001", "=X", "north") and rows[0].external_id == "=X"


def test_an_xlsx_report_is_read_exactly_not_restored(tmp_path):
    from capbatch.report_xlsx import write_text_xlsx

    path = tmp_path / "failures.xlsx"
    header = ["cardNumber", "cardExternalId", "capbatch_row", "capbatch_reason"]
    write_text_xlsx(path, header, [["0001", "'=X", "2", "r"], ["0002", "E\x01", "3", "r"]])
    table, rows = read(path)
    assert table.columns == ["cardNumber", "cardExternalId"]
    assert [r.values for r in rows] == [("0001", "'=X"), ("0002", "E\x01")]


def _rewrite_sheet_xml(src, dst, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "xl/worksheets/sheet1.xml":
                data = edit(data)
            zout.writestr(item, data)
    return dst


@pytest.mark.parametrize("style", ["r first", "prefixed, r last", "no r"])
def test_xlsx_sheet_xml_variants_give_the_same_facts(tmp_path, style):
    import re

    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["cardNumber", "cardExternalId"])
    ws.append([4111223, "A"])
    ws.cell(2, 1).number_format = "0000000000000000"
    ws.append([1234567, "B"])
    ws.cell(3, 1).number_format = "#,##0"
    ws.append(["0004", None])
    ws.cell(4, 2).value = "#N/A"
    ws.cell(4, 2).data_type = "e"
    wb.save(tmp_path / "base.xlsx")

    def edit(data: bytes) -> bytes:
        if style == "prefixed, r last":
            data = data.replace(b"<sheetData>", b'<sheetData xmlns:x="http://schemas.openxmlformats.org/spreadsheetml/2006/main">')
            data = re.sub(rb'<c r="([A-Z]+\d+)"([^>]*?)(/?)>', rb'<x:c\2 r="\1"\3>', data)
            return data.replace(b"</c>", b"</x:c>")
        if style == "no r":
            return re.sub(rb'<c r="[A-Z]+\d+"', b"<c", data)
        return data

    p = _rewrite_sheet_xml(tmp_path / "base.xlsx", tmp_path / "v.xlsx", edit)
    assert outcome(p) == [(2, "0000000004111223", "A", None), (3, "1234567", "B", "excel_number_format"),
                          (4, "0004", "#N/A", "excel_error")]


def test_an_xlsx_report_longer_than_a_sheet_continues_on_the_next(tmp_path):
    from capbatch.report_xlsx import write_text_xlsx

    path = tmp_path / "failures.xlsx"
    rows = [[f"{i:04d}", f"E{i}", str(i + 2)] for i in range(5)]
    assert write_text_xlsx(path, ["cardNumber", "cardExternalId", "capbatch_row"], rows, "failures", 2) == 5
    with pytest.raises(InputFileError, match="3 sheets hold"):
        open_input(path)
    table = open_input(path, InputOptions(sheet="all"))
    assert table.sheets == ("failures", "failures 2", "failures 3")
    assert [(r.sheet, r.card) for r in table.rows()] == [
        ("failures", "0000"), ("failures", "0001"), ("failures 2", "0002"), ("failures 2", "0003"),
        ("failures 3", "0004")]
