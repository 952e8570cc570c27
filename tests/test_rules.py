"""Per-row text exactness rules."""

from __future__ import annotations

import pytest

from conftest_messy import write_text

from capbatch.errors import UsageError
from capbatch.rules import RuleSettings, Verdict, check_row, compile_settings
from capbatch.source import CellProblem, InputOptions, SourceRow, open_input

DEFAULT = RuleSettings()


def row(card: str, ext: str, card_problem=None, ext_problem=None) -> SourceRow:
    return SourceRow(None, 2, (card, ext), card, ext, card_problem, ext_problem)


def verdict(card, ext, settings=DEFAULT, **kw) -> Verdict:
    return check_row(row(card, ext, **kw), settings)


def test_valid_row_is_trimmed_and_exact():
    v = verdict("\u00a0 000123\u202f", "\u2007EXT-01 ")
    assert v == Verdict("000123", "EXT-01", None, None, None)


def test_inner_spaces_are_kept():
    assert verdict("12 34", "A B").reason_code is None
    assert verdict("12 34", "A B").card == "12 34"


@pytest.mark.parametrize(
    "value", ["NA", "n/a", "NULL", "None", "nil", "-", "--", "?", "NaN", " na "]
)
@pytest.mark.parametrize("column", ["card", "external_id"])
def test_placeholders(value, column):
    v = verdict(value, "E1") if column == "card" else verdict("0001", value)
    assert (v.reason_code, v.column) == ("placeholder", column)
    assert repr(value.strip()) in v.reason and "placeholder" in v.reason


@pytest.mark.parametrize("value", ["4.11111E+15", "4,11111E+15", "1E+15", "4.1e15", "-1.2E-3"])
def test_scientific_notation(value):
    v = verdict(value, "E1")
    assert v.reason_code == "scientific_notation" and v.column == "card"
    assert "format the column as Text" in v.reason
    v = verdict("0001", value)
    assert v.reason_code == "scientific_notation" and v.column == "external_id"


@pytest.mark.parametrize("value", ["12E45", "E15", "4E", "1.5"])
def test_not_scientific_notation(value):
    assert verdict("0001", value).reason_code is None


@pytest.mark.parametrize("value", ["12345.0", "12345.00"])
def test_float_rendering(value):
    v = verdict(value, "E1")
    assert (v.reason_code, v.column) == ("float_rendering", "card")
    assert verdict("0001", value).reason_code == "float_rendering"


@pytest.mark.parametrize("bad", ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\x00", "\t", "\x1f", "\u00ad"])
def test_invisible_characters_rejected_anywhere(bad):
    v = verdict(f"00{bad}12", "E1")
    assert (v.reason_code, v.column) == ("invisible_chars", "card")
    assert f"U+{ord(bad):04X}" in v.reason and "--strip-invisible" in v.reason
    v = verdict("0012", f"E{bad}1")
    assert (v.reason_code, v.column) == ("invisible_chars", "external_id")


def test_strip_invisible_option():
    s = RuleSettings(strip_invisible=True)
    v = verdict("\u200b0012\u200d", "E\u20601\n", s)
    assert v == Verdict("0012", "E1", None, None, None)
    assert verdict("\u200b", "E1", s).reason_code == "missing_card"


def test_missing_values():
    assert (verdict("", "E1").reason_code, verdict("", "E1").column) == ("missing_card", "card")
    assert verdict(" \u00a0", "E1").reason_code == "missing_card"
    v = verdict("0001", "  ")
    assert (v.reason_code, v.column) == ("missing_external_id", "external_id")
    assert "'0001'" in v.reason


def test_generate_missing_mode():
    s = RuleSettings(allow_missing_external_id=True)
    assert verdict("0001", " ", s) == Verdict("0001", "", None, None, None)
    assert verdict("0001", "N/A", s).reason_code == "placeholder"  # a placeholder is not "empty"
    assert verdict("", "", s).reason_code == "missing_card"


def test_lengths():
    s = RuleSettings(max_card_length=5, max_external_id_length=4, external_id_length=3)
    assert verdict("123456", "ABC", s).reason_code == "too_long"
    assert verdict("123456", "ABC", s).column == "card"
    v = verdict("12345", "ABCDE", s)
    assert (v.reason_code, v.column) == ("too_long", "external_id")
    v = verdict("12345", "0AB0"[:2], s)
    assert v.reason_code == "wrong_length" and "exactly 3" in v.reason
    assert verdict("12345", "ABC", s).reason_code is None


def test_pattern_fullmatch():
    s = compile_settings(RuleSettings(external_id_pattern=r"[A-Z]{2}\d{4}"))
    assert verdict("1", "AB1234", s).reason_code is None
    v = verdict("1", "AB12345", s)
    assert v.reason_code == "pattern" and "AB12345" in v.reason


def test_invalid_pattern_is_a_usage_error():
    with pytest.raises(UsageError, match="invalid external id pattern"):
        compile_settings(RuleSettings(external_id_pattern="[A-"))
    with pytest.raises(UsageError):
        compile_settings(RuleSettings(max_card_length=0))
    assert compile_settings(max_card_length=9).max_card_length == 9


def test_reader_problems_pass_through_with_codes():
    p = CellProblem("excel_date", "the card number cell holds a date/time (2024-01-01), not text")
    v = verdict("2024-01-01", "E1", card_problem=p)
    assert (v.reason_code, v.reason, v.column) == ("excel_date", str(p), "card")
    q = CellProblem("excel_error", "the external id cell shows the Excel error #N/A, not a value")
    v = verdict("0001", "#N/A", ext_problem=q)
    assert (v.reason_code, v.column) == ("excel_error", "external_id")
    v = verdict("1", "2", card_problem=CellProblem("extra_cells", "row has 3 cells but ..."))
    assert (v.reason_code, v.column) == ("extra_cells", None)


def test_long_values_are_truncated_in_reasons():
    v = verdict("9" * 151, "E1")
    assert v.reason_code == "too_long" and "9" * 151 not in v.reason and "\u2026" in v.reason


def test_end_to_end_messy_csv(tmp_path):
    p = write_text(
        tmp_path / "messy.csv",
        "Card Number;Card External ID;Name\r\n"  # 1
        "0000123;00EXT;Zoë\r\n"  # 2 ok
        "\u00a00000456\u00a0; EXT-2 ;x\r\n"  # 3 ok after trim
        "4,11111E+15;EXT-3;x\r\n"  # 4 scientific (decimal comma)
        "789.0;EXT-4;x\r\n"  # 5 float rendering
        "\r\n"  # 6 blank
        "0000789;n/a;x\r\n"  # 7 placeholder
        "0000790;EX\u200bT;x\r\n"  # 8 zero-width
        '"0000791";"EXT;7";"multi\nline"\r\n'  # 9 quoted delimiter + newline
        "0000792;;x\r\n",  # 10 missing
        "utf-8-sig",
    )
    table = open_input(p, InputOptions())
    out = [
        (r.row_number, v.card, v.external_id, v.reason_code)
        for r in table.rows()
        for v in [check_row(r, DEFAULT)]
    ]
    assert out == [
        (2, "0000123", "00EXT", None),
        (3, "0000456", "EXT-2", None),
        (4, "4,11111E+15", "EXT-3", "scientific_notation"),
        (5, "789.0", "EXT-4", "float_rendering"),
        (7, "0000789", "n/a", "placeholder"),
        (8, "0000790", "EX\u200bT", "invisible_chars"),
        (9, "0000791", "EXT;7", None),
        (10, "0000792", "", "missing_external_id"),
    ]


# ---- the cell rules every format shares ------------------------------------------------------------
@pytest.mark.parametrize("value", ["#REF!", "#VALUE!", "#DIV/0!", "#NAME?", "#NUM!", "#NULL!", "#N/A",
                                   "#SPILL!", "#CALC!", "#GETTING_DATA", "########", "#", "#n/a",
                                   "Err:502", " #REF! "])
@pytest.mark.parametrize("column", ["card", "external_id"])
def test_spreadsheet_error_literals_are_rejected_in_text(value, column):
    v = verdict(value, "E1") if column == "card" else verdict("0001", value)
    assert (v.reason_code, v.column) == ("excel_error", column)


@pytest.mark.parametrize("value", ["#123", "A#REF!", "#REFX", "Err:5", "N#A"])
def test_text_that_only_contains_a_hash_is_not_an_error_literal(value):
    assert verdict("0001", value).reason_code is None


@pytest.mark.parametrize("raw,sent", [('="00123"', "00123"), (' ="00123" ', "00123"),
                                      ('="A""B"', 'A"B'), ('=" 0042 "', "0042")])
def test_keep_as_text_idiom_is_unwrapped(raw, sent):
    assert verdict(raw, raw) == Verdict(sent, sent, None, None, None)


def test_unwrapped_text_goes_through_every_other_rule():
    assert verdict('="#N/A"', "E1").reason_code == "excel_error"
    assert verdict("0001", '="N/A"').reason_code == "placeholder"
    assert verdict('="00\u200b1"', "E1").reason_code == "invisible_chars"
    assert verdict('="00123', "E1").card == '="00123'          # not the idiom: sent as typed


def test_tab_and_nbsp_are_trimmed_but_a_tab_inside_is_rejected():
    assert verdict("\t\u00a00001 \t", "\tE1\u00a0") == Verdict("0001", "E1", None, None, None)
    v = verdict("00\t01", "E1")
    assert (v.reason_code, v.column) == ("invisible_chars", "card") and "U+0009" in v.reason


@pytest.mark.parametrize("value", ["1,234", "1,234,567", "-12,345.00"])
def test_numbers_with_thousands_separators_are_rejected(value):
    assert verdict(value, "E1").reason_code == "thousands_separators"


@pytest.mark.parametrize("value", ["1,23", "12,3456", "A,123"])
def test_commas_that_are_not_grouping_are_left_alone(value):
    assert verdict("0001", value).reason_code is None


def test_card_numbers_up_to_150_characters():
    assert verdict("9" * 150, "E1").reason_code is None
    assert verdict("9" * 151, "E1").reason_code == "too_long"
    assert verdict("1", "E" * 51).reason_code == "too_long"     # external IDs stay capped at 50


def test_external_id_minimum_length():
    s = compile_settings(RuleSettings(external_id_min_length=4))
    assert verdict("0001", "ABCD", s).reason_code is None
    v = verdict("0001", "ABC", s)
    assert (v.reason_code, v.column) == ("too_short", "external_id") and "at least 4" in v.reason
    by_card = compile_settings(RuleSettings(external_id_min_length="card"))
    assert verdict("000123", "EXT123", by_card).reason_code is None
    v = verdict("000123", "E123", by_card)
    assert v.reason_code == "too_short" and "at least 6 (the length of card number '000123')" in v.reason
    both = compile_settings(RuleSettings(external_id_min_length=3, external_id_length=5))
    assert verdict("1", "ABCD", both).reason_code == "wrong_length"


@pytest.mark.parametrize("kwargs", [{"external_id_min_length": 0}, {"external_id_min_length": 51},
                                    {"external_id_min_length": "cards"},
                                    {"external_id_min_length": 6, "external_id_length": 5}])
def test_invalid_minimum_length_settings(kwargs):
    with pytest.raises(UsageError):
        compile_settings(RuleSettings(**kwargs))
