"""Generators for a corpus of messy input files (used by test_source.py / test_rules.py)."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # the package is not installed in the venv; import it from the repo
    sys.path.insert(0, str(_ROOT))

OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"


def write_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class Formula:
    def __init__(self, text: str) -> None:
        self.text = text


class ErrorCell:
    def __init__(self, code: str) -> None:
        self.code = code


def make_xlsx(path: Path, sheets: dict[str, list[list[object]]], start_row: int = 1) -> Path:
    """Write an .xlsx with openpyxl. Cells: str/int/float/bool/date, Formula(...), ErrorCell(...),
    None = empty. Rows start at ``start_row``."""
    import openpyxl

    wb = openpyxl.Workbook()
    wb.remove(wb.active)
    for name, rows in sheets.items():
        ws = wb.create_sheet(name)
        for r, row in enumerate(rows, start=start_row):
            for c, v in enumerate(row, start=1):
                if v is None:
                    continue
                cell = ws.cell(r, c)
                if isinstance(v, Formula):
                    cell.value = v.text  # written as <f> without a cached value
                elif isinstance(v, ErrorCell):
                    cell.value = v.code
                    cell.data_type = "e"
                elif isinstance(v, str):
                    cell.value = v
                    cell.data_type = "s"  # never let openpyxl guess (e.g. '=...' or '#N/A')
                    cell.number_format = "@"
                else:
                    cell.value = v
    wb.save(path)
    return path


def make_xls(path: Path, sheets: dict[str, list[list[object]]]) -> Path:
    import xlwt

    wb = xlwt.Workbook()
    date_style = xlwt.easyxf(num_format_str="yyyy-mm-dd")
    codes = {"#NULL!": 0, "#DIV/0!": 7, "#VALUE!": 15, "#REF!": 23, "#NAME?": 29, "#NUM!": 36, "#N/A": 42}
    for name, rows in sheets.items():
        ws = wb.add_sheet(name)
        for r, row in enumerate(rows):
            for c, v in enumerate(row):
                if v is None:
                    continue
                if isinstance(v, ErrorCell):
                    ws.row(r).set_cell_error(c, codes[v.code])
                elif isinstance(v, bool):
                    ws.row(r).set_cell_boolean(c, v)
                elif isinstance(v, (dt.date, dt.datetime)):
                    ws.write(r, c, v, date_style)
                else:
                    ws.write(r, c, v)
    wb.save(str(path))
    return path


def make_encrypted_ole(path: Path) -> Path:
    """An OLE/CFB container like the one Excel writes for a password-protected .xlsx."""
    header = OLE_MAGIC + b"\x00" * 16 + b"\x3e\x00\x03\x00\xfe\xff\x09\x00" + b"\x00" * 480
    directory = "EncryptedPackage".encode("utf-16-le") + b"\x00" * 94
    directory += "EncryptionInfo".encode("utf-16-le") + b"\x00" * 98
    return write_bytes(path, header + directory + b"\x00" * 2048)


def make_png(path: Path) -> Path:
    return write_bytes(path, b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + b"\x00" * 64)
