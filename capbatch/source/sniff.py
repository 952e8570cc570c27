"""What kind of file this is, by its content first: csv, xlsx, xls or ods (or a clear refusal)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

from capbatch.errors import InputFileError

from .encoding import CHUNK
from .model import InputOptions

TEXT_EXTS = {".csv", ".tsv", ".txt", ".tab"}
XLSX_EXTS = {".xlsx", ".xlsm", ".xltx", ".xltm"}
XLS_EXTS = {".xls", ".xlt"}
ODS_EXTS = {".ods", ".ots"}
WORKBOOK_EXTS = XLSX_EXTS | XLS_EXTS | ODS_EXTS

_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_ODS_MIMETYPES = (b"application/vnd.oasis.opendocument.spreadsheet",
                  b"application/vnd.oasis.opendocument.spreadsheet-template")
_PASS_A_SPREADSHEET = "pass the .xlsx, .xls, .ods or .csv file that holds the card numbers"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


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
        while chunk := f.read(CHUNK):
            if needle in tail + chunk:
                return True
            tail = chunk[-len(needle) :]
    return False


def _looks_like_markup(head: bytes) -> str | None:
    h = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if h.startswith(b"<!doctype html") or h.startswith(b"<html") or b"<table" in h[:2000]:
        return "an HTML page"
    if h.startswith(b"<?xml"):
        return "an XML file (e.g. an 'XML Spreadsheet 2003' or flat OpenDocument export)"
    return None


def encrypted_error(path: Path) -> InputFileError:
    return InputFileError(
        f"{path.name}: the workbook is password-protected (encrypted) and cannot be read",
        "open it in Excel, remove the password (File > Info > Protect Workbook > Encrypt with "
        "Password, clear it), save it as .xlsx, and run again",
    )


def _zip_kind(path: Path) -> str:
    """'xlsx' or 'ods' for a zip file, or InputFileError."""
    name = path.name
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            mimetype = zf.read("mimetype").strip() if "mimetype" in names else b""
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        raise InputFileError(
            f"{name}: the file starts like a workbook (zip) but is damaged or incomplete ({e})",
            "the file was probably truncated while downloading or copying; copy it again, or open "
            "it in Excel and save it again",
        ) from e
    if "xl/workbook.xml" in names:
        return "xlsx"
    if "content.xml" in names and mimetype in _ODS_MIMETYPES:
        return "ods"
    other = " (it is another OpenDocument file, not a spreadsheet)" if "content.xml" in names else ""
    raise InputFileError(
        f"{name}: the file is a zip archive but not a spreadsheet workbook{other}",
        "open it in a spreadsheet program and save it as .xlsx, .ods or CSV UTF-8",
    )


_LABEL = {"xlsx": "an Excel workbook (.xlsx)", "xls": "a legacy Excel workbook (.xls)",
          "ods": "an OpenDocument spreadsheet (.ods)"}
_EXTS = {"xlsx": XLSX_EXTS, "xls": XLS_EXTS, "ods": ODS_EXTS}


def decide_format(path: Path, options: InputOptions) -> tuple[str, list[str]]:
    """('csv' | 'xlsx' | 'xls' | 'ods', notes). Raises InputFileError for what cannot be read."""
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
        raise InputFileError(f"{name}: the file is {kind[6:]}, not a spreadsheet or CSV file",
                             _PASS_A_SPREADSHEET)
    if kind in ("zip", "ole"):
        if kind == "ole" and _ole_is_encrypted(path):
            raise encrypted_error(path)
        fmt = _zip_kind(path) if kind == "zip" else "xls"
        if ext in TEXT_EXTS:
            raise InputFileError(
                f"{name}: the file is named {ext} but it is {_LABEL[fmt]}",
                f"rename it to {path.stem}.{fmt}, or export it as CSV UTF-8",
            )
        if ext not in _EXTS[fmt]:
            notes.append(f"format: read as .{fmt} (the content is {_LABEL[fmt]}; named "
                         f"{ext or 'without extension'})")
        return fmt, notes
    if ext in WORKBOOK_EXTS:
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
