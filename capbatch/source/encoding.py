"""Text encodings: decide how a delimited file is decoded, strictly, before any row is read.

UTF-8 (with or without BOM), UTF-16/32 with BOM, or a reported cp1252 fallback; ``--encoding``
overrides. The whole file is decoded once up front, so a bad byte deep in the file is a file-level
error (with its offset and line), never mojibake in a row.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from capbatch.errors import InputFileError, UsageError

from .model import InputOptions

CHUNK = 1 << 20


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
            chunk = f.read(CHUNK)
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


def choose_encoding(path: Path, options: InputOptions, notes: list[str]) -> str:
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
            raise empty_error(path)
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
            raise empty_error(path)
        return bom
    try:
        blank = _validate_encoding(path, "utf-8")
        if blank:
            raise empty_error(path)
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
            raise empty_error(path)
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
        while chunk := f.read(CHUNK):
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


def empty_error(path: Path) -> InputFileError:
    return InputFileError(
        f"{path.name}: the file has no content (no header row)",
        "export the spreadsheet again, with a header row holding cardNumber and cardExternalId",
    )
