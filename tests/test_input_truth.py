"""Input truth through the real CLI against the simulator: what reaches the API is exactly what the
spreadsheet shows, and nothing else.

The workbooks under tests/fixtures/lo/ were written by LibreOffice Calc (tests/fixtures/make_fixtures.py
drafts them and has LibreOffice re-write them in its own .xlsx/.ods/.xls XML and CSV).
"""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
from conftest import ledger_rows, read_csv

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "lo"


def run(run_cli, sim_thread, src: Path, run_dir: Path, *flags: str):
    return run_cli("run", src, "--base-url", sim_thread.url, "--rate", "unlimited", "--progress", "none",
                   "--run-dir", run_dir, *flags)


def applied(sim_thread) -> dict[str, str]:
    """card -> external ID for every card the simulator holds an ID for."""
    return {c: e for c, e in sim_thread.card_ids().items() if e is not None}


def rejected(run_dir: Path) -> dict[int, tuple[str, str]]:
    return {r["row_number"]: (r["reason_code"], r["reason"]) for r in ledger_rows(run_dir)
            if r["state"] == "rejected"}


# ---- number formats (.xlsx, .ods, .xls written by LibreOffice) ------------------------------------
NUMBER_FORMATS_SENT = {"0000000004111223": "NF002", "42": "NF003", "77": "NF004", "000005": "00123",
                       "123": "NF011"}
NUMBER_FORMATS_REJECTED = {5: "excel_number_format", 6: "excel_number_format", 7: "excel_number_format",
                           9: "excel_error", 10: "excel_error", 12: "excel_number", 13: "excel_date"}


@pytest.mark.parametrize("ext", ["xlsx", "ods", "xls"])
def test_number_formats_send_what_is_displayed_or_reject(tmp_path, sim, run_cli, ext):
    s = sim(auto_create=True)
    run_dir = tmp_path / "run"
    p = run(run_cli, s, FIXTURES / f"number_formats.{ext}", run_dir)
    assert p.returncode == 1, p.stderr
    assert applied(s) == NUMBER_FORMATS_SENT           # zero padding rendered, never the raw number
    assert set(s.stats()["puts_per_card"]) == set(NUMBER_FORMATS_SENT)   # nothing else was sent
    got = rejected(run_dir)
    assert {n: code for n, (code, _) in got.items()} == NUMBER_FORMATS_REJECTED
    assert "'1,234,567'" in got[5][1] and "Text" in got[5][1]
    assert "'12.00'" in got[6][1]
    if ext == "ods":                                     # the file stores what is displayed
        assert "'ABC0099'" in got[7][1]
    else:                                                # the format is named
        assert "'#,##0'" in got[5][1] and "'0.00'" in got[6][1]
        assert '\'"ABC"0000\'' in got[7][1] and "literal text" in got[7][1]
    assert "#DIV/0!" in got[9][1] and "#N/A" in got[10][1]
    assert "15 digits" in got[12][1]


# ---- text files: one set of rules with the workbooks -----------------------------------------------
ERRORS = ["#REF!", "#VALUE!", "#DIV/0!", "#NAME?", "#NUM!", "#NULL!", "#N/A", "#SPILL!", "#CALC!",
          "#GETTING_DATA", "########", "#", "Err:502"]


def test_text_file_rules(tmp_path, sim, run_cli):
    lines = ["cardNumber,cardExternalId,note"]                                     # row 1
    lines += [f"{i:04d},{err},error literal" for i, err in enumerate(ERRORS, start=1)]  # rows 2-14
    lines += [
        "#N/A,E-15,error literal in the card column",                             # 15
        '="00016",="E-16",keep-as-text idiom',                                    # 16 unwrapped
        '"=""00017""",E-17,the idiom quoted by a CSV writer',                      # 17 unwrapped
        "cardNumber,cardExternalId,note",                                          # 18 repeated header
        "\ufeffcardNumber,cardExternalId,note",                                    # 19 ... after a BOM
        "\t0020\t,\tE-20 ,TAB at the ends",                                        # 20 trimmed
        "\u00a00021\u00a0,E-21\u00a0,NBSP at the ends",                            # 21 trimmed
        "00\t22,E-22,TAB inside",                                                  # 22 rejected
        '"1,234,567",E-23,thousands separators',                                   # 23 rejected
        "4.11111E+15,E-24,scientific",                                             # 24 rejected
        f"{'7' * 150},E-25,150 characters: a valid card number",                  # 25 sent
        f"{'7' * 151},E-26,151 characters",                                        # 26 rejected
        "0027,E-27,plain",                                                         # 27 sent
    ]
    src = tmp_path / "messy.csv"
    src.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    s = sim(auto_create=True)
    run_dir = tmp_path / "run"
    p = run(run_cli, s, src, run_dir)
    assert p.returncode == 1, p.stderr
    sent = {"00016": "E-16", "00017": "E-17", "0020": "E-20", "0021": "E-21", "0027": "E-27"}
    # the 150-character card number is sent too, and applied: the documented limit is 150 (3024)
    assert {c: e for c, e in applied(s).items()} == {**sent, "7" * 150: "E-25"}
    assert set(s.stats()["puts_per_card"]) == set(sent) | {"7" * 150}
    got = rejected(run_dir)
    assert {n: code for n, (code, _) in got.items()} == {
        **{n: "excel_error" for n in range(2, 16)}, 22: "invisible_chars", 23: "thousands_separators",
        24: "scientific_notation", 26: "too_long"}
    rows = {r["row_number"] for r in ledger_rows(run_dir)}
    assert 18 not in rows and 19 not in rows                       # a repeated header is not data
    assert "rows 18, 19 repeat the header row" in p.stderr
    assert 'rows 16, 17: ="..."' in p.stderr and "unwrapped" in p.stderr
    assert "too narrow" in got[12][1]                             # ########


def test_error_literals_in_a_csv_saved_by_a_spreadsheet(tmp_path, sim, run_cli):
    s = sim(auto_create=True)
    run_dir = tmp_path / "run"
    p = run(run_cli, s, FIXTURES / "errors_export.csv", run_dir)
    assert p.returncode == 1, p.stderr
    assert applied(s) == {"000099": "GOOD-99", "0000000004111223": "PADDED"}
    assert set(s.stats()["puts_per_card"]) == {"000099", "0000000004111223"}
    assert {n: code for n, (code, _) in rejected(run_dir).items()} == {n: "excel_error" for n in range(2, 9)}


def test_header_without_data_rows_is_refused_and_nothing_sent(tmp_path, sim, run_cli):
    src = tmp_path / "empty-export.csv"
    src.write_text("cardNumber,cardExternalId\r\n", encoding="utf-8")
    s = sim(auto_create=True)
    p = run(run_cli, s, src, tmp_path / "run")
    assert p.returncode == 2 and "0 data rows" in p.stderr, p.stderr
    assert s.stats()["requests"] == 0


# ---- sheets --------------------------------------------------------------------------------------
def test_several_sheets_with_the_columns_are_refused(tmp_path, sim, run_cli):
    s = sim(auto_create=True)
    p = run(run_cli, s, FIXTURES / "sheets.xlsx", tmp_path / "run")
    assert p.returncode == 2, p.stderr
    assert "2 sheets hold the cardNumber and cardExternalId columns: 0: 'Examples' (2 rows), " \
           "1: 'Cards' (5 rows)" in p.stderr
    assert "hidden sheet 3: 'Old' (1 row) holds the columns too but was not read" in p.stderr
    assert "--sheet NAME or --sheet INDEX" in p.stderr and "--sheet all" in p.stderr
    assert s.stats()["requests"] == 0
    v = run_cli("validate", FIXTURES / "sheets.xlsx")                # validate shows the same choice
    assert v.returncode == 2 and "0: 'Examples' (2 rows), 1: 'Cards' (5 rows)" in v.stderr


def test_sheet_all_sends_every_visible_sheet_in_order(tmp_path, sim, run_cli):
    s = sim(auto_create=True)
    run_dir = tmp_path / "run"
    p = run(run_cli, s, FIXTURES / "sheets.ods", run_dir, "--sheet", "all")
    assert p.returncode == 0, p.stderr
    cards = {f"00{i:014d}": f"CARD-{i}" for i in range(1, 6)}
    assert applied(s) == {"0000000000009901": "EXAMPLE-1", "0000000000009902": "EXAMPLE-2", **cards}
    assert "0000000000000099" not in s.stats()["puts_per_card"]      # the hidden sheet is not read
    results = read_csv(run_dir / "results.csv")
    assert [(r["capbatch_sheet"], r["capbatch_row"]) for r in results] == (
        [("Examples", "2"), ("Examples", "3")] + [("Cards", str(n)) for n in range(2, 7)])
    assert "sheets (--sheet all, in workbook order): 'Examples' (2 rows), 'Cards' (5 rows)" in p.stderr


def test_validate_shows_sheet_counts_and_reads_a_hidden_sheet_only_when_named(tmp_path, run_cli):
    v = run_cli("validate", FIXTURES / "sheets.xls", "--sheet", "all", "--json", "-o", tmp_path / "v.csv")
    assert v.returncode == 0, v.stderr
    assert json.loads(v.stdout)["sheets"] == {"Examples": 2, "Cards": 5}
    assert "hidden sheet 3: 'Old' (1 row)" in v.stderr
    h = run_cli("validate", FIXTURES / "sheets.xls", "--sheet", "Old", "--json", "-o", tmp_path / "h.csv")
    assert h.returncode == 0 and json.loads(h.stdout)["sheets"] == {"Old": 1}
    assert "it is hidden in the workbook" in h.stderr
    only = run_cli("validate", FIXTURES / "hidden_only.xlsx")
    assert only.returncode == 2 and "no visible sheet" in only.stderr and "--sheet 'Data'" in only.stderr


# ---- reports fed back ----------------------------------------------------------------------------
def test_fed_back_reports_keep_the_users_columns_and_xlsx_keeps_zeros(tmp_path, sim, run_cli):
    import openpyxl

    src = tmp_path / "cards.csv"
    src.write_text("cardNumber,cardExternalId,region\r\n0001,E-1,north\r\n0002,,south\r\n"
                   "0003,N/A,east\r\n", encoding="utf-8")
    s = sim(auto_create=True)
    first = tmp_path / "run1"
    p = run(run_cli, s, src, first)
    assert p.returncode == 1 and "failures.xlsx" in p.stderr, p.stderr     # the closing hint
    header = ["cardNumber", "cardExternalId", "region", "capbatch_row", "capbatch_sheet", "capbatch_state",
              "capbatch_error_code", "capbatch_reason"]
    assert list(read_csv(first / "failures.csv")[0]) == header
    # failures.csv fed back, then its own failures.csv: the capbatch_* columns never pile up
    second = tmp_path / "run2"
    p = run(run_cli, s, first / "failures.csv", second)
    assert p.returncode == 1 and "capbatch_* columns are dropped" in p.stderr, p.stderr
    assert list(read_csv(second / "failures.csv")[0]) == header
    assert json.loads((second / "summary.json").read_text())["input"]["columns"] == header[:3]
    third = tmp_path / "run3"
    assert run(run_cli, s, second / "failures.csv", third).returncode == 1
    assert list(read_csv(third / "failures.csv")[0]) == header
    # failures.xlsx: every cell text (Text format), zeros kept; fixed in a spreadsheet and fed back
    book = openpyxl.load_workbook(first / "failures.xlsx")
    ws = book.active
    cells = [c for row in ws.iter_rows() for c in row if c.value is not None]
    assert all(c.data_type == "s" and c.number_format == "@" for c in cells)
    assert [c.value for c in ws["A"]] == ["cardNumber", "0002", "0003"]
    ws["B2"], ws["B3"] = "FIXED-2", "FIXED-3"
    book.save(tmp_path / "fixed.xlsx")
    fourth = tmp_path / "run4"
    p = run(run_cli, s, tmp_path / "fixed.xlsx", fourth)
    assert p.returncode == 0, p.stderr
    assert applied(s) == {"0001": "E-1", "0002": "FIXED-2", "0003": "FIXED-3"}
    assert [r["original"] for r in ledger_rows(fourth)] == ['["0002", "FIXED-2", "south"]',
                                                             '["0003", "FIXED-3", "east"]']


@pytest.mark.parametrize("fmt", ["xlsx", "ods", "csv"])
def test_failures_fixed_and_saved_by_libreoffice_feed_back_exactly(fmt, tmp_path, sim, run_cli):
    """failures.xlsx, fixed in its Text cells and saved again by LibreOffice (xlsx, ods, or CSV as
    shown): every value is sent exactly as the cell shows it, the capbatch_* columns are dropped."""
    s = sim(auto_create=True)
    p = run(run_cli, s, FIXTURES / f"failures_fixed.{fmt}", tmp_path / "run")
    assert p.returncode == 0, p.stderr
    assert "capbatch_* columns are dropped" in p.stderr
    assert applied(s) == {"0002": "FIXED-2", "0003": "00123", "4111111111111111111": "EXT-19",
                          "000000004111223": "0000000000000000042"}


# ---- output paths --------------------------------------------------------------------------------
def test_validate_output_to_devices_pipes_stdout_and_unwritable_paths(tmp_path, run_cli):
    src = tmp_path / "c.csv"
    src.write_text("cardNumber,cardExternalId\r\n0001,E-1\r\n0002,N/A\r\n", encoding="utf-8")
    before = os.stat("/dev/null")
    p = run_cli("validate", src, "-o", "/dev/null")
    assert p.returncode == 1, p.stderr
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev   # still the device
    out = run_cli("validate", src, "-o", "-")
    assert out.returncode == 1 and out.stdout.splitlines()[0] == "sheet,row,column,value,reason_code,reason"
    assert "0002" not in out.stdout and ",3,cardExternalId,N/A,placeholder," in out.stdout
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    f = run_cli("validate", src, "-o", fifo)
    reader.join(timeout=30)
    assert f.returncode == 1 and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert b"placeholder" in received[0]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad = run_cli("validate", src, "-o", blocker / "v.csv")
    assert bad.returncode == 2 and "-o/--output" in bad.stderr and "internal error" not in bad.stderr


def test_external_id_min_length_setting_from_flag_env_and_file(tmp_path):
    from capbatch import config
    from capbatch.errors import UsageError
    from capbatch.runner import rule_settings

    assert config.resolve({"external_id_min_length": "card"}, {}).external_id_min_length == "card"
    s = config.resolve({}, {"CAPBATCH_EXTERNAL_ID_MIN_LENGTH": "12"})
    assert s.external_id_min_length == 12 and rule_settings(s).external_id_min_length == 12
    toml = tmp_path / "c.toml"
    toml.write_text('[capbatch]\nexternal_id_min_length = "Card"\n')
    assert config.resolve({}, {}, toml).external_id_min_length == "card"
    for bad in ("0", "51"):
        with pytest.raises(UsageError):
            config.resolve({"external_id_min_length": bad}, {})
    with pytest.raises(UsageError):
        config.resolve({"external_id_min_length": "10", "external_id_length": 8}, {})


def test_a_text_formula_in_an_xls_saved_by_libreoffice_is_refused_not_sent_as_zero(tmp_path, sim, run_cli):
    """LibreOffice keeps no text result for ="000104" in .xls: the cell reads as the number 0, which
    would send card "0" (another customer's card, if it existed)."""
    s = sim(auto_create=True)
    run_dir = tmp_path / "run"
    p = run(run_cli, s, FIXTURES / "text_formula.xls", run_dir)
    assert p.returncode == 1, p.stderr
    assert "0" not in s.stats()["puts_per_card"]
    assert applied(s) == {"105": "EXT-A105"}                    # LibreOffice shows 000105 typed in CSV as 105
    code, reason = rejected(run_dir)[2]
    assert code == "excel_number" and "text formula" in reason and "Text" in reason


def test_negative_whole_numbers_are_never_keys(tmp_path, sim, run_cli):
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["cardNumber", "cardExternalId"])
    ws.append([-5, "NEG"])
    ws.cell(2, 1).number_format = "0000"
    ws.append(["000777", "OK"])
    src = tmp_path / "neg.xlsx"
    wb.save(src)
    s = sim(auto_create=True)
    run_dir = tmp_path / "run"
    p = run(run_cli, s, src, run_dir)
    assert p.returncode == 1, p.stderr
    assert applied(s) == {"000777": "OK"}
    assert rejected(run_dir)[2][0] == "excel_number" and "negative" in rejected(run_dir)[2][1]


def test_a_value_starting_with_a_quote_and_a_trigger_survives_the_failures_round_trip(tmp_path, sim, run_cli):
    src = tmp_path / "q.csv"
    src.write_text("cardNumber,cardExternalId\n0000602,'-Q602\n0000602,'-Q602b\n0000603,'=Q603\n0000604,''+Q604\n0000604,''+Q604b\n", encoding="utf-8")
    s = sim(auto_create=True)
    first = tmp_path / "run1"
    p = run(run_cli, s, src, first)
    assert p.returncode == 1, p.stderr                         # 0000602 and 0000604 conflict with themselves
    assert applied(s) == {"0000603": "'=Q603"}
    lines = (first / "failures.csv").read_text(encoding="utf-8").splitlines()
    fixed = tmp_path / "fixed.csv"
    fixed.write_text("\n".join(line for line in lines if "Q602b" not in line and "Q604b" not in line) + "\n", encoding="utf-8")
    p = run(run_cli, s, fixed, tmp_path / "run2")
    assert p.returncode == 0, p.stderr
    assert applied(s) == {"0000602": "'-Q602", "0000603": "'=Q603", "0000604": "''+Q604"}
