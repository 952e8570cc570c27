"""OpenDocument spreadsheets (.ods): the displayed text and error cells of the key columns.

An .ods file stores, beside each cell's value, the text the spreadsheet displays (``<text:p>``),
so nothing has to be rendered: one streaming expat pass over ``content.xml`` keeps, for the key
columns, the numeric cells whose displayed text is not their plain digits, and the error cells
(which calamine returns as empty text).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from xml.parsers import expat

from .cells import GENERAL, NumberDisplay

_TABLE = "urn:oasis:names:tc:opendocument:xmlns:table:1.0 "
_OFFICE = "urn:oasis:names:tc:opendocument:xmlns:office:1.0 "
_TEXT = "urn:oasis:names:tc:opendocument:xmlns:text:1.0 "
_CALCEXT = "urn:org:documentfoundation:names:experimental:calc:xmlns:calcext:1.0 "

_T_TABLE, _T_NAME = _TABLE + "table", _TABLE + "name"
_T_ROW, _T_ROWS_REP = _TABLE + "table-row", _TABLE + "number-rows-repeated"
_T_CELL, _T_COVERED = _TABLE + "table-cell", _TABLE + "covered-table-cell"
_T_COLS_REP = _TABLE + "number-columns-repeated"
_O_TYPE, _O_VALUE = _OFFICE + "value-type", _OFFICE + "value"
_C_TYPE = _CALCEXT + "value-type"
_P, _S = _TEXT + "p", _TEXT + "s"
_NUMERIC = frozenset({"float", "percentage", "currency"})


class _Done(Exception):
    """The chosen table has been read: stop parsing."""


def _plain(value: str) -> str | None:
    try:
        f = float(value)
    except ValueError:
        return None
    return str(int(f)) if f.is_integer() else None


class _ContentScan:
    def __init__(self, sheet_name: str, cols: set[int]) -> None:
        self.sheet_name = sheet_name
        self.cols = cols
        self.shown: dict[tuple[int, int], str] = {}
        self.special: dict[tuple[int, int], tuple[str, str]] = {}
        self._in_table = False
        self._next_row = 0
        self._row = 0
        self._row_rep = 1
        self._col = 0
        self._records: list[tuple[int, str, str]] = []  # (col, kind, text) of the current row
        self._cell: tuple[list[int], str | None, str | None, list[str]] | None = None
        self._in_p = False
        p = expat.ParserCreate(namespace_separator=" ")
        p.buffer_text = True
        p.StartElementHandler = self._start
        p.EndElementHandler = self._end
        p.CharacterDataHandler = self._chars
        self._parser = p

    def run(self, fh) -> None:
        try:
            self._parser.ParseFile(fh)
        except _Done:
            pass

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        if name == _T_TABLE:
            self._in_table = attrs.get(_T_NAME) == self.sheet_name
            self._next_row = 0
        elif not self._in_table:
            return
        elif name == _T_ROW:
            self._row = self._next_row
            self._row_rep = int(attrs.get(_T_ROWS_REP, "1"))
            self._next_row += self._row_rep
            self._col = 0
            self._records = []
        elif name == _T_CELL or name == _T_COVERED:
            first = self._col
            self._col += int(attrs.get(_T_COLS_REP, "1"))
            hits = [c for c in self.cols if first <= c < self._col]
            if hits:
                kind = attrs.get(_C_TYPE) or attrs.get(_O_TYPE)
                self._cell = (hits, kind, attrs.get(_O_VALUE), [])
        elif name == _P and self._cell is not None:
            if self._cell[3]:
                self._cell[3].append("\n")
            self._in_p = True
        elif name == _S and self._in_p and self._cell is not None:
            self._cell[3].append(" " * int(attrs.get(_TEXT + "c", "1")))

    def _chars(self, data: str) -> None:
        if self._in_p and self._cell is not None:
            self._cell[3].append(data)

    def _end(self, name: str) -> None:
        if not self._in_table:
            return
        if name == _P:
            self._in_p = False
        elif (name == _T_CELL or name == _T_COVERED) and self._cell is not None:
            hits, kind, value, parts = self._cell
            self._cell = None
            text = "".join(parts)
            for col in hits:
                if kind == "error":
                    self._records.append((col, "error", text or "#ERROR"))
                elif kind in _NUMERIC and value is not None and text != _plain(value):
                    self._records.append((col, "shown", text))
        elif name == _T_ROW and self._records:
            for row in range(self._row, self._row + self._row_rep):
                for col, kind, text in self._records:
                    if kind == "error":
                        self.special[(row, col)] = ("error", text)
                    else:
                        self.shown[(row, col)] = text
        elif name == _T_TABLE:
            raise _Done


class OdsFacts:
    def __init__(self, path: Path, sheet_name: str, cols: set[int]) -> None:
        scan = _ContentScan(sheet_name, cols)
        with zipfile.ZipFile(path) as zf, zf.open("content.xml") as fh:
            scan.run(fh)
        self._shown = scan.shown
        self.special = scan.special.get

    def display(self, row0: int, col: int) -> NumberDisplay:
        shown = self._shown.get((row0, col))
        return GENERAL if shown is None else NumberDisplay(shown=shown)


class OdsEngine:
    numbers_plain = False  # the displayed text of each number is in content.xml

    def __init__(self, path: Path) -> None:
        self.path = path

    def facts(self, sheet_name: str, cols: set[int]) -> OdsFacts | None:
        try:
            return OdsFacts(self.path, sheet_name, cols)
        except Exception:  # noqa: BLE001 - content.xml unreadable where calamine read it
            return None
