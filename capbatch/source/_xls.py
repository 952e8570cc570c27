"""Legacy Excel (.xls, BIFF): number formats and error cells of the key columns, through xlrd.

xlrd with ``formatting_info=True`` gives each cell's XF record and so its format string; an .xls
sheet holds at most 65,536 rows, so the facts are read once per sheet, in full.
"""

from __future__ import annotations

from pathlib import Path

from ._xlsx import plain_digits
from .cells import GENERAL, UNREADABLE_FORMAT, NumberDisplay


class XlsFacts:
    def __init__(self, path: Path, sheet_name: str, cols: set[int]) -> None:
        import xlrd

        self._codes: dict[tuple[int, int], str] = {}
        self._special: dict[tuple[int, int], tuple[str, str]] = {}
        book = xlrd.open_workbook(str(path), formatting_info=True, on_demand=True)
        try:
            sh = book.sheet_by_name(sheet_name)
            for c in cols:
                if c >= sh.ncols:
                    continue
                for r in range(sh.nrows):
                    ctype = sh.cell_type(r, c)
                    if ctype == xlrd.XL_CELL_NUMBER:
                        xf = book.xf_list[sh.cell_xf_index(r, c)]
                        fmt = book.format_map.get(xf.format_key)
                        code = fmt.format_str if fmt is not None else None
                        if code is None or not plain_digits(code):
                            self._codes[(r, c)] = code or ""
                    elif ctype == xlrd.XL_CELL_ERROR:
                        text = xlrd.error_text_from_code.get(sh.cell_value(r, c), "#ERROR")
                        self._special[(r, c)] = ("error", text)
        finally:
            book.release_resources()
        self.special = self._special.get

    def display(self, row0: int, col: int) -> NumberDisplay:
        code = self._codes.get((row0, col))
        if code is None:
            return GENERAL
        return NumberDisplay(code=code) if code else UNREADABLE_FORMAT


class XlsEngine:
    numbers_plain = False  # the formats are only known after xlrd has read the sheet

    def __init__(self, path: Path) -> None:
        self.path = path

    def facts(self, sheet_name: str, cols: set[int]) -> XlsFacts | None:
        try:
            return XlsFacts(self.path, sheet_name, cols)
        except Exception:  # noqa: BLE001 - xlrd could not read what calamine did
            return None
