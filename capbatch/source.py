"""Input reading: spreadsheets and delimited text -> rows of cell text, exactly as the user sees them.

Nothing here converts types. Every cell comes back as text; the two key columns (card number and
external id) additionally carry a reader-level *problem* when the cell could not hold the exact
value the user typed (an Excel number that is not a whole number or has more than 15 digits, a date,
a logical value, an error cell, a formula without a computed value, a CSV row with extra cells).

Delimited text is read with the stdlib ``csv`` module (measured ~2-4x faster than
``pandas.read_csv(dtype=str, chunksize=...)`` once rows are turned into Python tuples, and it gives
exact record-level row numbers: one record = one row, blank lines included).  Excel files are read
with python-calamine; error cells and formulas without a cached value (which calamine returns as
``""``) are told apart from genuinely empty cells by a lazy second look at the file (sheet XML for
.xlsx, xlrd cell types for .xls), done only when a key cell is empty.
"""

from __future__ import annotations

import codecs
import csv
import datetime as _dt
import hashlib
import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from xml.etree import ElementTree

from capbatch.errors import InputFileError, UsageError

__all__ = [
    "InputOptions",
    "SourceRow",
    "InputTable",
    "CellProblem",
    "open_input",
    "file_sha256",
    "normalize_header",
    "CARD_FIELD",
    "EXTERNAL_ID_FIELD",
]

CARD_FIELD = "cardNumber"
EXTERNAL_ID_FIELD = "cardExternalId"

# Normalised header names (lowercase, alphanumerics only). Canonical names win over aliases.
_CARD_CANONICAL = frozenset({"cardnumber"})
_CARD_ALIASES = frozenset({"cardno", "cardnum", "card"})
_EXT_CANONICAL = frozenset({"cardexternalid"})
_EXT_ALIASES = frozenset({"externalid", "cardextid", "extid", "externalcardid"})

_DELIMITERS = (",", ";", "\t", "|")
_DELIM_NAMES = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}
_TEXT_EXTS = {".csv", ".tsv", ".txt", ".tab"}
_XLSX_EXTS = {".xlsx", ".xlsm", ".xltx", ".xltm"}
_XLS_EXTS = {".xls", ".xlt"}

_CHUNK = 1 << 20
_SAMPLE_CHARS = 256 * 1024
_MAX_EXCEL_DIGITS = 15  # Excel keeps 15 significant digits; a longer integer cannot be trusted.


# --------------------------------------------------------------------------------------------
# public data types


@dataclass(frozen=True)
class InputOptions:
    card_column: str | None = None  # header name given by the user; None = auto-detect
    external_id_column: str | None = None
    delimiter: str | None = None  # None = detect among , ; \t |
    encoding: str | None = None  # None = detect
    sheet: str | int | None = None  # Excel: name or 0-based index; None = first sheet with the headers
    header_row: int = 1  # 1-based row holding the headers (rows above are skipped)


@dataclass(frozen=True, slots=True)
class SourceRow:
    sheet: str | None
    row_number: int
    values: tuple[str, ...]
    card: str
    external_id: str
    card_problem: str | None
    external_id_problem: str | None


class CellProblem(str):
    """A user-facing reason (it *is* the message string) that also carries a stable ``code``."""

    code: str

    def __new__(cls, code: str, message: str) -> "CellProblem":
        obj = super().__new__(cls, message)
        obj.code = code
        return obj

    def __getnewargs__(self) -> tuple[str, str]:  # type: ignore[override]
        return (self.code, str(self))


# capbatch's own CSV reports carry this column. Their cells were neutralised against formula
# injection (a leading ' before = + - @ TAB CR); reading such a file back restores the originals,
# so a failures.csv fed back to `capbatch run` sends exactly what the user first wrote.
REPORT_MARKER_COLUMN = "capbatch_row"
_NEUTRALISED_PREFIXES = tuple("'" + c for c in ("=", "+", "-", "@", "\t", "\r"))


def _restore(value: str) -> str:
    return value[1:] if value.startswith(_NEUTRALISED_PREFIXES) else value


def _restore_neutralised(row: SourceRow) -> SourceRow:
    return SourceRow(row.sheet, row.row_number, tuple(_restore(v) for v in row.values), _restore(row.card),
                     _restore(row.external_id), row.card_problem, row.external_id_problem)


def normalize_header(name: str) -> str:
    """Lowercase and drop everything but letters and digits: 'Card Number' -> 'cardnumber'."""
    return re.sub(r"[^0-9a-z]", "", name.replace("\ufeff", "").casefold())


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _show(value: str, limit: int = 40) -> str:
    v = value if len(value) <= limit else value[: limit - 1] + "\u2026"
    return repr(v)


# --------------------------------------------------------------------------------------------
# the table


class InputTable:
    """An opened, validated input. ``rows()`` streams SourceRow objects; each call restarts."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path = path
        self.format = fmt
        self.encoding: str | None = None
        self.delimiter: str | None = None
        self.sheet: str | None = None
        self.columns: list[str] = []
        self.card_column = ""
        self.external_id_column = ""
        self.notes: list[str] = []
        # Extra (beyond the agreed interface): number of rows rows() will yield, when known.
        self.row_count: int | None = None
        self._header_row = 1
        self._card_idx = 0
        self._ext_idx = 0
        self._excel_format = ""  # "xlsx" | "xls" as actually read (may differ from the extension)

    def __repr__(self) -> str:
        return (
            f"InputTable(path={str(self.path)!r}, format={self.format!r}, sheet={self.sheet!r}, "
            f"encoding={self.encoding!r}, delimiter={self.delimiter!r}, columns={self.columns!r})"
        )

    def rows(self) -> Iterator[SourceRow]:
        rows = self._csv_rows() if self.format == "csv" else self._excel_rows()
        if REPORT_MARKER_COLUMN in self.columns:
            return (_restore_neutralised(r) for r in rows)
        return rows

    # ---- delimited text ------------------------------------------------------------------

    def _csv_rows(self) -> Iterator[SourceRow]:
        width = len(self.columns)
        ci, ei = self._card_idx, self._ext_idx
        header_row = self._header_row
        empty = [""] * width
        try:
            with open(self.path, "rb") as raw:
                text = io.TextIOWrapper(raw, encoding=self.encoding, errors="strict", newline="")
                reader = csv.reader(text, delimiter=self.delimiter, strict=True)
                rn = 0
                for rec in reader:
                    rn += 1
                    if rn <= header_row or not any(rec):
                        continue
                    n = len(rec)
                    card_problem = None
                    if n == width:
                        values = tuple(rec)
                    elif n < width:
                        rec.extend(empty[: width - n])
                        values = tuple(rec)
                    else:
                        extras = rec[width:]
                        if any(extras):
                            values = tuple(rec)
                            card_problem = CellProblem(
                                "extra_cells",
                                f"row has {n} cells but the header has {width} columns: a value "
                                f"probably contains an unquoted {_DELIM_NAMES[self.delimiter]} "
                                "(delimiter), so the columns are shifted; put quotes around that "
                                "value or remove the extra cells",
                            )
                        else:
                            values = tuple(rec[:width])
                    yield SourceRow(None, rn, values, values[ci], values[ei], card_problem, None)
        except UnicodeDecodeError as e:  # the file changed since open_input validated it
            raise InputFileError(
                f"{self.path.name}: cannot be decoded as {self.encoding} ({e.reason})",
                "the file changed while it was being read; run again on a stable copy",
            ) from e
        except csv.Error as e:
            raise InputFileError(
                f"{self.path.name}: malformed quoting: {e}",
                "the file changed while it was being read; run again on a stable copy",
            ) from e

    # ---- Excel -----------------------------------------------------------------------------

    def _excel_rows(self) -> Iterator[SourceRow]:
        sheet = _load_sheet(self.path, self.sheet)
        col0 = sheet.start[1] if sheet.start is not None else 0
        width = len(self.columns)
        ci, ei = self._card_idx, self._ext_idx
        key_cols = (col0 + ci, col0 + ei)
        lookup: dict[tuple[int, int], tuple[str, str]] | None = None
        header_row = self._header_row
        name = self.sheet
        render = _excel_text
        for i, raw in enumerate(sheet.iter_rows()):
            rn = i + 1
            if rn <= header_row:
                continue
            cells = raw[:width]
            if len(cells) < width:
                cells = list(cells) + [""] * (width - len(cells))
            card_v = cells[ci]
            ext_v = cells[ei]
            if (card_v == "" or ext_v == "") and lookup is None:
                lookup = self._special_cells(key_cols)
            if not any(c != "" for c in cells) and not (
                lookup and ((i, key_cols[0]) in lookup or (i, key_cols[1]) in lookup)
            ):
                continue
            values = [v if type(v) is str else render(v) for v in cells]
            card, card_problem = _excel_key(card_v, "card number", (i, key_cols[0]), lookup)
            ext, ext_problem = _excel_key(ext_v, "external id", (i, key_cols[1]), lookup)
            values[ci] = card
            values[ei] = ext
            yield SourceRow(name, rn, tuple(values), card, ext, card_problem, ext_problem)

    def _special_cells(self, key_cols: tuple[int, int]) -> dict[tuple[int, int], tuple[str, str]]:
        """(row0, col0) -> (kind, text) for error cells and formulas without a value in key columns."""
        try:
            if self._excel_format == "xlsx":
                return _xlsx_special_cells(self.path, self.sheet or "", set(key_cols))
            return _xls_special_cells(self.path, self.sheet or "", set(key_cols))
        except Exception:  # best effort: a failure here must not hide the rows themselves
            return {}


# --------------------------------------------------------------------------------------------
# Excel cell rendering


def _excel_text(v: object) -> str:
    """Any calamine value as the text a user would recognise (non-key columns, headers)."""
    if type(v) is str:
        return v  # type: ignore[return-value]
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v.is_integer() and abs(v) <= 2**53:  # exactly the stored integer
            return str(int(v))
        return repr(v)
    if isinstance(v, _dt.datetime):
        return v.isoformat(sep=" ")
    if isinstance(v, (_dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        return str(v)
    return "" if v is None else str(v)


def _excel_key(
    v: object,
    label: str,
    pos: tuple[int, int],
    lookup: dict[tuple[int, int], tuple[str, str]] | None,
) -> tuple[str, str | None]:
    if type(v) is str:
        if v == "" and lookup:
            special = lookup.get(pos)
            if special is not None:
                kind, text = special
                if kind == "error":
                    return text, CellProblem(
                        "excel_error",
                        f"the {label} cell shows the Excel error {text}, not a value; fix the "
                        "formula or type the value (formatted as Text) and save the file",
                    )
                return "", CellProblem(
                    "formula_no_value",
                    f"the {label} cell holds a formula without a computed value; open and save "
                    "the file in Excel so the value is calculated (or paste the values as Text)",
                )
        return v, None  # type: ignore[return-value]
    text = _excel_text(v)
    if isinstance(v, bool):
        return text, CellProblem(
            "excel_bool",
            f"the {label} cell holds the logical value {text}, not a {label}; type the value "
            "into a column formatted as Text",
        )
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not v.is_integer():
            return text, CellProblem(
                "excel_number",
                f"the {label} cell holds the number {text}, which is not a whole number, so it "
                f"cannot be the {label}; format the column as Text and re-enter the values",
            )
        if abs(v) >= 10**_MAX_EXCEL_DIGITS:
            return text, CellProblem(
                "excel_number",
                f"the {label} cell holds the number {text}, which has more than "
                f"{_MAX_EXCEL_DIGITS} digits: Excel keeps only {_MAX_EXCEL_DIGITS} significant "
                "digits, so the last digits may be wrong; format the column as Text and "
                "re-enter the values",
            )
        return text, None
    if isinstance(v, (_dt.date, _dt.time, _dt.timedelta)):
        return text, CellProblem(
            "excel_date",
            f"the {label} cell holds a date/time ({text}), not text: Excel converted what was "
            "typed; format the column as Text and re-enter the values",
        )
    return text, CellProblem(
        "excel_cell",
        f"the {label} cell holds an unsupported value ({_show(text)}); type the value into a "
        "column formatted as Text",
    )


def _col_index(letters: str) -> int:
    n = 0
    for ch in letters:
        n = n * 26 + (ord(ch) - 64)
    return n - 1


_CELL_REF = re.compile(r"([A-Z]+)(\d+)")


def _xlsx_sheet_member(zf: zipfile.ZipFile, sheet_name: str) -> str:
    ns_main = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
    ns_rel = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}"
    wb = ElementTree.fromstring(zf.read("xl/workbook.xml"))
    rid = None
    for sh in wb.iter(f"{ns_main}sheet"):
        if sh.get("name") == sheet_name:
            rid = sh.get(f"{ns_rel}id")
            break
    if rid is None:
        raise KeyError(sheet_name)
    rels = ElementTree.fromstring(zf.read("xl/_rels/workbook.xml.rels"))
    for rel in rels:
        if rel.get("Id") == rid:
            target = rel.get("Target", "")
            if target.startswith("/"):
                return target.lstrip("/")
            return "xl/" + target
    raise KeyError(rid)


def _xlsx_special_cells(path: Path, sheet_name: str, cols: set[int]) -> dict:
    found: dict[tuple[int, int], tuple[str, str]] = {}
    with zipfile.ZipFile(path) as zf:
        member = _xlsx_sheet_member(zf, sheet_name)
        with zf.open(member) as fh:
            row0 = -1
            col = -1
            for _event, elem in ElementTree.iterparse(fh, events=("end",)):
                tag = elem.tag.rsplit("}", 1)[-1]
                if tag == "row":
                    elem.clear()
                    continue
                if tag != "c":
                    continue
                ref = elem.get("r")
                m = _CELL_REF.fullmatch(ref) if ref else None
                if m:
                    col = _col_index(m.group(1))
                    row0 = int(m.group(2)) - 1
                else:
                    col += 1
                if col in cols:
                    t = elem.get("t")
                    f = v = None
                    for child in elem:
                        ctag = child.tag.rsplit("}", 1)[-1]
                        if ctag == "f":
                            f = child
                        elif ctag == "v":
                            v = child
                    vtext = v.text if v is not None else None
                    if t == "e":
                        found[(row0, col)] = ("error", vtext or "#ERROR")
                    elif f is not None and not vtext and t != "str":
                        found[(row0, col)] = ("formula", "")
    return found


def _xls_special_cells(path: Path, sheet_name: str, cols: set[int]) -> dict:
    import xlrd

    found: dict[tuple[int, int], tuple[str, str]] = {}
    book = xlrd.open_workbook(str(path), on_demand=True)
    try:
        sh = book.sheet_by_name(sheet_name)
        for c in cols:
            if c >= sh.ncols:
                continue
            for r, (ctype, value) in enumerate(zip(sh.col_types(c), sh.col_values(c))):
                if ctype == xlrd.XL_CELL_ERROR:
                    found[(r, c)] = ("error", xlrd.error_text_from_code.get(value, "#ERROR"))
    finally:
        book.release_resources()
    return found


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(2)


def _workbook(path: Path):
    """Open with calamine; by content when the extension does not say what the file is."""
    import python_calamine as pc

    ext = path.suffix.lower()
    if ext in _XLSX_EXTS and _magic(path) == b"PK" or ext in _XLS_EXTS and _magic(path) == b"\xd0\xcf":
        return pc.CalamineWorkbook.from_path(str(path))
    with open(path, "rb") as fh:
        return pc.CalamineWorkbook.from_filelike(fh)


def _load_sheet(path: Path, sheet_name: str | None):
    try:
        wb = _workbook(path)
        return wb.get_sheet_by_name(sheet_name)
    except Exception as e:  # noqa: BLE001 - calamine raises several unrelated types
        raise _calamine_error(path, e) from e


def _calamine_error(path: Path, e: Exception) -> InputFileError:
    import python_calamine as pc

    if isinstance(e, pc.PasswordError) or "password" in str(e).lower() or "encrypt" in str(e).lower():
        return InputFileError(
            f"{path.name}: the workbook is password-protected (encrypted) and cannot be read",
            "open it in Excel, remove the password (File > Info > Protect Workbook > Encrypt "
            "with Password, clear it), save, and run again",
        )
    return InputFileError(
        f"{path.name}: the workbook is damaged or not a valid Excel file ({type(e).__name__}: {e})",
        "open it in Excel and save it again (or export the sheet as CSV UTF-8), then run again",
    )


# --------------------------------------------------------------------------------------------
# header matching


def _match_column(
    columns: list[str],
    explicit: str | None,
    canonical: frozenset[str],
    aliases: frozenset[str],
) -> tuple[int | None, list[int]]:
    """Return (index, []) on a unique match, (None, []) when missing, (None, hits) if ambiguous."""
    if explicit is not None:
        exact = [i for i, c in enumerate(columns) if c == explicit]
        if len(exact) == 1:
            return exact[0], []
        if len(exact) > 1:
            return None, exact
        n = normalize_header(explicit)
        hits = [i for i, c in enumerate(columns) if normalize_header(c) == n] if n else []
        if len(hits) == 1:
            return hits[0], []
        return None, hits
    norms = [normalize_header(c) for c in columns]
    for tier in (canonical, aliases):
        hits = [i for i, n in enumerate(norms) if n in tier]
        if len(hits) == 1:
            return hits[0], []
        if len(hits) > 1:
            return None, hits
    return None, []


def _resolve_columns(
    columns: list[str], options: InputOptions, where: str
) -> tuple[int, int] | InputFileError:
    found = ", ".join(repr(c) for c in columns) if columns else "(none)"
    hint = (
        "name the columns with --card-column NAME and --external-id-column NAME, or set "
        "--header-row N if the headers are not on that row"
    )
    result = []
    for field, explicit, flag, canon, alias in (
        (CARD_FIELD, options.card_column, "--card-column", _CARD_CANONICAL, _CARD_ALIASES),
        (
            EXTERNAL_ID_FIELD,
            options.external_id_column,
            "--external-id-column",
            _EXT_CANONICAL,
            _EXT_ALIASES,
        ),
    ):
        idx, hits = _match_column(columns, explicit, canon, alias)
        if idx is None:
            if hits:
                names = ", ".join(f"{columns[i]!r} (column {i + 1})" for i in hits)
                return InputFileError(
                    f"{where}: the {field} column is ambiguous: {names} all match; "
                    f"columns found: {found}",
                    f"rename one of them, or pick one explicitly with {flag} NAME",
                )
            what = f"column {explicit!r} (given with {flag})" if explicit else f"{field} column"
            return InputFileError(
                f"{where}: the {what} was not found; columns found: {found}", hint
            )
        result.append(idx)
    if result[0] == result[1]:
        return InputFileError(
            f"{where}: the same column {columns[result[0]]!r} was matched for both {CARD_FIELD} "
            f"and {EXTERNAL_ID_FIELD}; columns found: {found}",
            hint,
        )
    return result[0], result[1]


def _column_note(table: InputTable) -> str:
    return (
        f"columns: {CARD_FIELD} <- {table.card_column!r}, "
        f"{EXTERNAL_ID_FIELD} <- {table.external_id_column!r}"
    )


# --------------------------------------------------------------------------------------------
# file kind detection

_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"


def _sniff(path: Path) -> tuple[str, bytes]:
    with open(path, "rb") as f:
        head = f.read(8192)
    if not head:
        return "empty", head
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip", head
    if head.startswith(_OLE_MAGIC):
        return "ole", head
    for magic, kind in (
        (b"\x89PNG", "a PNG image"),
        (b"\xff\xd8\xff", "a JPEG image"),
        (b"GIF8", "a GIF image"),
        (b"%PDF", "a PDF document"),
        (b"\x1f\x8b", "a gzip archive"),
        (b"Rar!", "a RAR archive"),
        (b"7z\xbc\xaf", "a 7-Zip archive"),
    ):
        if head.startswith(magic):
            return "other:" + kind, head
    return "text", head


def _ole_is_encrypted(path: Path) -> bool:
    needle = "EncryptedPackage".encode("utf-16-le")
    tail = b""
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            if needle in tail + chunk:
                return True
            tail = chunk[-len(needle) :]
    return False


def _looks_like_markup(head: bytes) -> str | None:
    h = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if h.startswith(b"<!doctype html") or h.startswith(b"<html") or b"<table" in h[:2000]:
        return "an HTML page"
    if h.startswith(b"<?xml"):
        return "an XML file (e.g. an 'XML Spreadsheet 2003' export)"
    return None


def _encrypted_error(path: Path) -> InputFileError:
    return InputFileError(
        f"{path.name}: the workbook is password-protected (encrypted) and cannot be read",
        "open it in Excel, remove the password (File > Info > Protect Workbook > Encrypt with "
        "Password, clear it), save it as .xlsx, and run again",
    )


def _decide_format(path: Path, options: InputOptions) -> tuple[str, list[str]]:
    ext = path.suffix.lower()
    kind, head = _sniff(path)
    notes: list[str] = []
    name = path.name
    if kind == "empty":
        raise InputFileError(
            f"{name}: the file is empty (0 bytes)",
            "export the spreadsheet again, with a header row holding cardNumber and cardExternalId",
        )
    if kind.startswith("other:"):
        raise InputFileError(
            f"{name}: the file is {kind[6:]}, not a spreadsheet or CSV file",
            "pass the .xlsx, .xls or .csv file that holds the card numbers",
        )
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as zf:
                names = set(zf.namelist())
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise InputFileError(
                f"{name}: the file starts like an .xlsx workbook (zip) but is damaged or "
                f"incomplete ({e})",
                "the file was probably truncated while downloading or copying; copy it again, "
                "or open it in Excel and save it again",
            ) from e
        if "xl/workbook.xml" not in names:
            other = " (it looks like an OpenDocument spreadsheet)" if "content.xml" in names else ""
            raise InputFileError(
                f"{name}: the file is a zip archive but not an Excel workbook{other}",
                "open it in a spreadsheet program and save it as .xlsx or CSV UTF-8",
            )
        if ext in _TEXT_EXTS:
            raise InputFileError(
                f"{name}: the file is named {ext} but it is an Excel workbook (.xlsx)",
                f"rename it to {path.stem}.xlsx, or export it from Excel as CSV UTF-8",
            )
        if ext not in _XLSX_EXTS:
            notes.append(f"format: read as .xlsx (the content is an Excel workbook; named {ext or 'without extension'})")
        return "xlsx", notes
    if kind == "ole":
        if _ole_is_encrypted(path):
            raise _encrypted_error(path)
        if ext in _TEXT_EXTS:
            raise InputFileError(
                f"{name}: the file is named {ext} but it is a legacy Excel workbook (.xls)",
                f"rename it to {path.stem}.xls, or export it from Excel as CSV UTF-8",
            )
        if ext not in _XLS_EXTS:
            notes.append(f"format: read as .xls (the content is a legacy Excel workbook; named {ext or 'without extension'})")
        return "xls", notes
    # text (or unknown binary)
    if ext in _XLSX_EXTS or ext in _XLS_EXTS:
        markup = _looks_like_markup(head)
        if markup:
            raise InputFileError(
                f"{name}: the file is named {ext} but it is {markup}, not an Excel workbook",
                "open it in Excel and save it as .xlsx (Excel Workbook) or CSV UTF-8",
            )
        raise InputFileError(
            f"{name}: the file is named {ext} but it is not an Excel workbook; it looks like "
            "a text (CSV) file",
            f"rename it to {path.stem}.csv if it is CSV, or open it in Excel and save as .xlsx",
        )
    return "csv", notes


# --------------------------------------------------------------------------------------------
# encodings


def _bom_encoding(head: bytes) -> str | None:
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith(codecs.BOM_UTF32_LE) or head.startswith(codecs.BOM_UTF32_BE):
        return "utf-32"
    if head.startswith(codecs.BOM_UTF16_LE) or head.startswith(codecs.BOM_UTF16_BE):
        return "utf-16"
    return None


class _DecodeFailure(Exception):
    def __init__(self, offset: int, line: int, byte: int, reason: str) -> None:
        super().__init__(reason)
        self.offset, self.line, self.byte, self.reason = offset, line, byte, reason


def _validate_encoding(path: Path, encoding: str) -> bool:
    """Strictly decode the whole file, streaming. Raises _DecodeFailure at the first bad byte.

    Returns True if the decoded text is empty or whitespace-only.
    """
    dec = codecs.getincrementaldecoder(encoding)("strict")
    offset = 0
    lines = 1
    blank = True
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            final = not chunk
            pending = len(dec.getstate()[0])
            try:
                text = dec.decode(chunk, final)
            except UnicodeDecodeError as e:
                bad_at = offset - pending + e.start
                good = e.object[: e.start]
                try:
                    lines += codecs.decode(good, encoding, "ignore").count("\n")
                except Exception:  # noqa: BLE001
                    pass
                bad = e.object[e.start] if e.start < len(e.object) else 0
                raise _DecodeFailure(max(bad_at, 0), lines, bad, e.reason) from None
            lines += text.count("\n")
            if blank and text.strip("\ufeff \t\r\n"):
                blank = False
            offset += len(chunk)
            if final:
                return blank


def _utf16_without_bom(head: bytes) -> str | None:
    sample = head[:4096]
    if len(sample) < 4 or b"\x00" not in sample:
        return None
    even = sample[0::2].count(0) / max(1, len(sample[0::2]))
    odd = sample[1::2].count(0) / max(1, len(sample[1::2]))
    if odd > 0.3 and even < 0.05:
        return "utf-16-le"
    if even > 0.3 and odd < 0.05:
        return "utf-16-be"
    return None


def _choose_encoding(path: Path, options: InputOptions, notes: list[str]) -> str:
    with open(path, "rb") as f:
        head = f.read(8192)
    bom = _bom_encoding(head)
    name = path.name
    if options.encoding:
        try:
            enc = codecs.lookup(options.encoding).name
        except LookupError:
            raise UsageError(
                f"unknown encoding {options.encoding!r}",
                "use e.g. --encoding utf-8, utf-16, cp1252 or latin-1",
            ) from None
        if enc == "utf-8" and bom == "utf-8-sig":
            enc = "utf-8-sig"
        try:
            blank = _validate_encoding(path, enc)
        except _DecodeFailure as fail:
            suggestion = _suggest_encoding(path, head, bom, exclude=enc)
            raise InputFileError(
                f"{name}: the file is not valid {options.encoding}: byte 0x{fail.byte:02x} at "
                f"offset {fail.offset} (line {fail.line}) cannot be decoded",
                (f"it looks like {suggestion}; pass --encoding {suggestion}" if suggestion else
                 "pass the encoding the file was saved with, e.g. --encoding cp1252")
                + ", or re-export the file as CSV UTF-8",
            ) from None
        notes.append(f"encoding: {enc} (given with --encoding)")
        if blank:
            raise _empty_error(path)
        return enc
    if bom is None:
        guess = _utf16_without_bom(head)
        if guess:
            raise InputFileError(
                f"{name}: the file looks like UTF-16 text without a byte-order mark",
                f"pass --encoding {guess}, or re-export it as CSV UTF-8",
            )
        if b"\x00" in head:
            raise InputFileError(
                f"{name}: the file contains binary data (NUL bytes); it is not a CSV/text file",
                "pass the .xlsx, .xls or .csv file that holds the card numbers",
            )
    if bom:
        try:
            blank = _validate_encoding(path, bom)
        except _DecodeFailure as fail:
            raise InputFileError(
                f"{name}: the file starts with a {bom.upper()} byte-order mark but byte "
                f"0x{fail.byte:02x} at offset {fail.offset} (line {fail.line}) is not valid "
                f"{bom}",
                "the file is damaged or mixes encodings; re-export it as CSV UTF-8, or pass "
                "--encoding with the right encoding",
            ) from None
        notes.append(f"encoding: {_ENC_LABEL.get(bom, bom)} (byte-order mark)")
        if blank:
            raise _empty_error(path)
        return bom
    try:
        blank = _validate_encoding(path, "utf-8")
        if blank:
            raise _empty_error(path)
        return "utf-8"
    except _DecodeFailure as utf8_fail:
        mixed = _find_utf8_sequence(path)
        if mixed is not None:
            raise InputFileError(
                f"{name}: the file mixes encodings: it contains UTF-8 text (at offset {mixed}) "
                f"but byte 0x{utf8_fail.byte:02x} at offset {utf8_fail.offset} (line "
                f"{utf8_fail.line}) is not valid UTF-8; reading it either way would garble some "
                "values",
                "re-export the whole file as CSV UTF-8 (or fix the rows that were pasted from "
                "another file); pass --encoding only if you are sure which encoding is right",
            )
        try:
            blank = _validate_encoding(path, "cp1252")
        except _DecodeFailure as fail:
            raise InputFileError(
                f"{name}: the file is neither valid UTF-8 (byte 0x{utf8_fail.byte:02x} at offset "
                f"{utf8_fail.offset}, line {utf8_fail.line}) nor valid cp1252 (byte "
                f"0x{fail.byte:02x} at offset {fail.offset}, line {fail.line})",
                "pass the encoding the file was saved with (e.g. --encoding latin-1), or "
                "re-export it as CSV UTF-8",
            ) from None
        notes.append(
            f"encoding: cp1252 (not valid UTF-8: byte 0x{utf8_fail.byte:02x} at offset "
            f"{utf8_fail.offset}, line {utf8_fail.line}; pass --encoding to override)"
        )
        if blank:
            raise _empty_error(path)
        return "cp1252"


_UTF8_MULTIBYTE = re.compile(
    rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}"
)


def _find_utf8_sequence(path: Path) -> int | None:
    """Offset of the first well-formed UTF-8 multi-byte sequence, if any (mixed-encoding check).

    In real cp1252 text such byte pairs ('Ã©', 'Â£'...) are almost always UTF-8 read wrongly.
    """
    offset = 0
    carry = b""
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            buf = carry + chunk
            m = _UTF8_MULTIBYTE.search(buf)
            if m:
                return offset - len(carry) + m.start()
            carry = buf[-3:]
            offset += len(chunk)
    return None


_ENC_LABEL = {"utf-8-sig": "utf-8 with BOM", "utf-16": "utf-16", "utf-32": "utf-32"}


def _suggest_encoding(path: Path, head: bytes, bom: str | None, exclude: str) -> str | None:
    candidates = [bom] if bom else []
    candidates += ["utf-8", "cp1252"]
    for enc in candidates:
        if enc and codecs.lookup(enc).name != exclude:
            try:
                _validate_encoding(path, enc)
                return enc
            except _DecodeFailure:
                continue
    return None


def _empty_error(path: Path) -> InputFileError:
    return InputFileError(
        f"{path.name}: the file has no content (no header row)",
        "export the spreadsheet again, with a header row holding cardNumber and cardExternalId",
    )


# --------------------------------------------------------------------------------------------
# delimited text


def _read_sample(path: Path, encoding: str) -> str:
    with open(path, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding=encoding, errors="strict", newline="")
        return text.read(_SAMPLE_CHARS)


def _sample_records(sample: str, delimiter: str, complete: bool) -> list[list[str]]:
    reader = csv.reader(io.StringIO(sample, newline=""), delimiter=delimiter, strict=False)
    recs: list[list[str]] = []
    try:
        for rec in reader:
            recs.append(rec)
    except csv.Error:
        pass
    if not complete and len(recs) > 1:
        recs.pop()  # may be cut in the middle
    return recs


def _open_delimited(table: InputTable, options: InputOptions) -> None:
    path = table.path
    notes = table.notes
    enc = _choose_encoding(path, options, notes)
    table.encoding = enc
    sample = _read_sample(path, enc)
    complete = len(sample) < _SAMPLE_CHARS
    hr = options.header_row

    if options.delimiter is not None:
        delim = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}.get(
            options.delimiter.lower(), options.delimiter
        )
        if len(delim) != 1 or delim in "\"\r\n":
            raise UsageError(
                f"invalid delimiter {options.delimiter!r}",
                "use one character, e.g. --delimiter ';' or --delimiter tab",
            )
        candidates = [delim]
    else:
        candidates = list(_DELIMITERS)

    best = None
    for d in candidates:
        recs = _sample_records(sample, d, complete)
        if len(recs) < hr:
            continue
        header = recs[hr - 1]
        if header:
            header[0] = header[0].lstrip("\ufeff")
        res = _resolve_columns(header, options, path.name)
        ok = not isinstance(res, InputFileError)
        body = [r for r in recs[hr:] if any(r)][:200]
        consistent = sum(1 for r in body if len(r) == len(header))
        score = (ok, len(header) > 1, consistent, len(header))
        if best is None or score > best[0]:
            best = (score, d, header, res)
    if best is None:
        raise InputFileError(
            f"{path.name}: the file has fewer than {hr} rows, so there is no header on row {hr}",
            "check --header-row (the 1-based row holding the column names)",
        )
    _, delim, header, res = best
    if isinstance(res, InputFileError):
        if options.delimiter is None and len(header) <= 1:
            res.hint = (res.hint or "") + (
                "; the header row could not be split on , ; tab or | - pass --delimiter if the "
                "file uses another separator"
            )
        raise res
    table.delimiter = delim
    table.columns = header
    table.card_column = header[res[0]]
    table.external_id_column = header[res[1]]
    table._card_idx, table._ext_idx = res
    table._header_row = hr
    notes.append(_column_note(table))
    how = "given with --delimiter" if options.delimiter is not None else "detected"
    notes.append(f"delimiter: {_DELIM_NAMES.get(delim, repr(delim))} ({how})")
    _validate_structure(table)


def _validate_structure(table: InputTable) -> None:
    """One full pass with the real parser: catches broken quoting before anything is sent."""
    count = 0
    multiline: list[int] = []
    rn = 0
    with open(table.path, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding=table.encoding, errors="strict", newline="")
        reader = csv.reader(text, delimiter=table.delimiter, strict=True)
        last_line = 0
        while True:
            try:
                rec = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise InputFileError(
                    f"{table.path.name}: broken quoting in row {rn + 1} (starting at line "
                    f"{last_line + 1}): {e}",
                    "a cell has an opening quote (\") that is never closed, or text after a "
                    "closing quote; fix the quotes in that row (a quote inside a quoted cell is "
                    "written as two quotes \"\") and run again",
                ) from None
            rn += 1
            if reader.line_num - last_line > 1 and len(multiline) < 5 and rn > table._header_row:
                multiline.append(rn)
            last_line = reader.line_num
            if rn > table._header_row and any(rec):
                count += 1
    table.row_count = count
    if multiline:
        rows = ", ".join(str(r) for r in multiline)
        table.notes.append(
            f"some cells contain line breaks inside quotes (rows {rows}{', ...' if len(multiline) == 5 else ''}); "
            "each such record counts as one row"
        )


# --------------------------------------------------------------------------------------------
# Excel


def _open_excel(table: InputTable, options: InputOptions, fmt: str) -> None:
    path = table.path
    table._excel_format = fmt
    hr = options.header_row
    try:
        wb = _workbook(path)
        metas = list(wb.sheets_metadata)
    except Exception as e:  # noqa: BLE001
        raise _calamine_error(path, e) from e
    names = [m.name for m in metas]
    listed = ", ".join(f"{i}: {n!r}" for i, n in enumerate(names)) or "(none)"

    def load(name: str):
        try:
            return wb.get_sheet_by_name(name)
        except Exception as e:  # noqa: BLE001
            raise _calamine_error(path, e) from e

    def header_of(sheet) -> list[str] | None:
        for i, raw in enumerate(sheet.iter_rows()):
            if i == hr - 1:
                cells = [_excel_text(v) for v in raw]
                while cells and cells[-1] == "":
                    cells.pop()
                if cells:
                    cells[0] = cells[0].lstrip("\ufeff")
                return cells
        return None

    if options.sheet is not None:
        chosen = None
        s = options.sheet
        if isinstance(s, int):
            if 0 <= s < len(names):
                chosen = names[s]
        else:
            if s in names:
                chosen = s
            else:
                ci = [n for n in names if n.casefold() == s.strip().casefold()]
                if len(ci) == 1:
                    chosen = ci[0]
                elif s.strip().isdigit() and int(s) < len(names):
                    chosen = names[int(s)]
        if chosen is None:
            raise InputFileError(
                f"{path.name}: sheet {s!r} not found; sheets: {listed}",
                "pass --sheet with one of these names, or its 0-based index",
            )
        sheet = load(chosen)
        header = header_of(sheet)
        if header is None:
            raise InputFileError(
                f"{path.name}: sheet {chosen!r} has fewer than {hr} rows, so there is no header on "
                f"row {hr}",
                "check --sheet and --header-row",
            )
        res = _resolve_columns(header, options, f"{path.name}, sheet {chosen!r}, row {hr}")
        if isinstance(res, InputFileError):
            raise res
        table.notes.append(f"sheet {chosen!r} (given with --sheet)")
    else:
        chosen = None
        tried: list[str] = []
        first_error: InputFileError | None = None
        for meta in metas:
            if "WorkSheet" not in str(meta.typ):
                continue
            sheet = load(meta.name)
            header = header_of(sheet)
            if header is None:
                tried.append(f"{meta.name!r}: no row {hr}")
                continue
            res = _resolve_columns(header, options, f"{path.name}, sheet {meta.name!r}, row {hr}")
            if isinstance(res, InputFileError):
                first_error = first_error or res
                shown = ", ".join(repr(c) for c in header) or "(empty)"
                tried.append(f"{meta.name!r}: {shown}")
                continue
            chosen = meta.name
            break
        if chosen is None:
            if len(tried) == 1 and first_error is not None:
                raise first_error
            raise InputFileError(
                f"{path.name}: no sheet holds the {CARD_FIELD} and {EXTERNAL_ID_FIELD} columns on "
                f"row {hr}; headers found: " + ("; ".join(tried) or "(no worksheets)"),
                "pick the sheet with --sheet NAME and map the columns with --card-column NAME and "
                "--external-id-column NAME (and --header-row N if the headers are lower down)",
            )
        hidden = "Hidden" in str(metas[names.index(chosen)].visible)
        table.notes.append(
            f"sheet {chosen!r} chosen (it holds the required headers)"
            + (" - note: this sheet is hidden in Excel" if hidden else "")
        )
    table.sheet = chosen
    table.columns = header
    table.card_column = header[res[0]]
    table.external_id_column = header[res[1]]
    table._card_idx, table._ext_idx = res
    table._header_row = hr
    table.notes.insert(0, _column_note(table))
    count = 0
    width = len(header)
    for i, raw in enumerate(sheet.iter_rows()):
        if i >= hr and any(v != "" for v in raw[:width]):
            count += 1
    table.row_count = count


# --------------------------------------------------------------------------------------------
# entry point


def open_input(path: str | Path, options: InputOptions = InputOptions()) -> InputTable:
    """Open and validate an input file. Raises InputFileError for file-level problems."""
    p = Path(path)
    if not isinstance(options.header_row, int) or options.header_row < 1:
        raise UsageError(
            f"invalid header row {options.header_row!r}",
            "--header-row is the 1-based row number holding the column names (1 or more)",
        )
    if not p.exists():
        raise InputFileError(f"{p}: file not found", "check the path and try again")
    if p.is_dir():
        raise InputFileError(f"{p}: is a directory, not a file", "pass the spreadsheet file itself")
    try:
        fmt, notes = _decide_format(p, options)
        table = InputTable(p, fmt)
        table.notes.extend(notes)
        if fmt == "csv":
            _open_delimited(table, options)
        else:
            _open_excel(table, options, fmt)
    except PermissionError as e:
        raise InputFileError(f"{p}: permission denied", "check the file permissions") from e
    if REPORT_MARKER_COLUMN in table.columns:
        table.notes.append("this is a capbatch report: cells neutralised against formula injection "
                           "are restored to their original values")
    return table
