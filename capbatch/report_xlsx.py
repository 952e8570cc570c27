"""A report as an .xlsx workbook whose every cell is text (failures.xlsx).

Opening failures.csv in Excel and saving it strips the leading zeros of every card number (Excel
reads the digits as numbers). In this workbook every cell is written as a string and every column
carries the Text number format ("@"), so values keep their zeros in Excel, a value typed into a
cell while fixing it stays text too, and capbatch reads the file back exactly. Cells are stored as
text, never as formulas, so no formula-injection neutralising is needed (and none is done).

Written with XlsxWriter in constant_memory mode: rows stream to disk, memory stays flat.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

_MAX_WIDTH = 60
SHEET_ROWS = 1_048_575  # data rows per sheet: Excel's 1,048,576 rows, less the header


def write_text_xlsx(path: Path, header: list[str], rows: Iterable[list[str]], sheet: str = "Sheet1",
                    sheet_rows: int = SHEET_ROWS) -> int:
    """Write ``header`` and ``rows`` (text cells) to ``path`` atomically; returns the row count.

    More rows than a sheet holds continue on sheets named ``<sheet> 2``, ``<sheet> 3``... each with
    the header (read such a file back with ``--sheet all``)."""
    import xlsxwriter

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    try:
        book = xlsxwriter.Workbook(str(tmp), {"constant_memory": True, "strings_to_numbers": False,
                                             "strings_to_formulas": False, "strings_to_urls": False})
        text = book.add_format({"num_format": "@"})
        bold = book.add_format({"num_format": "@", "bold": True})
        widths = [min(max(len(h), 8), _MAX_WIDTH) for h in header]

        def new_sheet(number: int):
            ws = book.add_worksheet(sheet if number == 1 else f"{sheet} {number}")
            for c, name in enumerate(header):
                ws.set_column(c, c, widths[c] + 2, text)  # typed-in values stay text as well
                ws.write_string(0, c, name, bold)
            ws.freeze_panes(1, 0)
            return ws

        ws = new_sheet(1)
        r = 0
        for values in rows:
            if r == sheet_rows:
                ws, r = new_sheet(count // sheet_rows + 1), 0
            r += 1
            for c, value in enumerate(values):
                if value != "":
                    ws.write_string(r, c, value, text)
            count += 1
        book.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count
